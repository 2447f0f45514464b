"""Seconds per training step of each embedded model: the stock settings against genaug's.

`genaug pretrain` trains four models; issue 3 budgets all of it at about 60 minutes on 2 CPU cores.
This times one optimizer step of each at the shipped config's sizes and batches, on random data of
the real shapes (a step's cost does not depend on the pixels), in one process, alternating the
variants so that a shared or throttled CPU biases none:

    python benchmarks/pretrain_step_costs.py --steps 4 --repeats 3 --threads 2

Variants: float32 with the libraries' default attention (transformers' and diffusers' SDPA: the
stock way), bf16 autocast with SDPA, and bf16 autocast with eager attention (genaug's CPU default,
``attention: auto``); on a CPU without native bf16 also float32 with eager attention. Prints median
seconds per step and the speed-up of the setup genaug trains with on this CPU over the stock one.
bf16 only pays where the CPU computes it natively (``avx512_bf16`` or ``amx_bf16``); elsewhere oneDNN
emulates it, genaug trains in float32, and the script says so.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from genaug.pretrain.clip import (DualEncoderConfig, build_dual_encoder, contrastive_loss_and_embeds, native_bf16,
                                  training_attention)
from genaug.pretrain.diffusion import GeneratorConfig, build_unet, build_vae
from genaug.pretrain.oracle import OracleConfig, _create_model


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def dual_encoder_step(bf16: bool, attention: str):
    cfg = DualEncoderConfig(patch_size=8)  # the shipped config's patch size
    model = build_dual_encoder(cfg, vocab_size=49408)
    model.set_attn_implementation(attention)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (cfg.batch_size, 20), generator=g)
    ids[:, -1] = 49407
    negatives = ids.clone()
    pixels = torch.randn(cfg.batch_size, 3, 32, 32, generator=g)

    def step():
        loss, _ = contrastive_loss_and_embeds(model, ids, pixels, bf16=bf16, negative_ids=negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def vae_step(bf16: bool, attention: str):  # no attention: the VAE's mid-block attention is off
    cfg = GeneratorConfig()
    vae = build_vae(cfg, 32)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(cfg.vae_batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def step():
        with _autocast(bf16):
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn_like(dist.mean)
            rec = vae.decode(z).sample
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def unet_step(bf16: bool, attention: str):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    cfg = GeneratorConfig()
    unet = build_unet(cfg, 16, 128, 64)
    unet.set_attn_processor(AttnProcessor() if attention == "eager" else AttnProcessor2_0())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b = cfg.unet_batch_size
    xt = torch.randn(b, 4, 16, 16, generator=g)
    noise = torch.randn(b, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, 32, 128, generator=g)
    labels = torch.randn(b, 128, generator=g)

    def step():
        with _autocast(bf16):
            pred = unet(xt, t, encoder_hidden_states=text, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    return step


def oracle_step(bf16: bool, attention: str):  # a CNN: no attention
    cfg = OracleConfig()
    model = _create_model(cfg.arch, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 24, (cfg.batch_size,), generator=g)

    def step():
        with _autocast(bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


MODELS = {"dual encoder": dual_encoder_step, "autoencoder": vae_step, "UNet": unet_step, "oracle": oracle_step}
HAS_ATTENTION = {"dual encoder", "UNet"}
STOCK = (False, "sdpa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = native_bf16(torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, native bf16: {native}"
          + ("" if native else " (bf16 is emulated here: expect it slower)"))
    cpu = torch.device("cpu")
    # The columns: the stock setup, bf16 with each kernel, and on a CPU without native bf16 the
    # float32 + eager setup genaug trains with there.
    columns = {STOCK: "fp32, sdpa (stock)", (True, "sdpa"): "bf16, sdpa", (True, "eager"): "bf16, eager"}
    if not native:
        columns[(False, "eager")] = "fp32, eager"
    print("| model | " + " | ".join(f"{label} s/step" for label in columns.values()) + " | genaug vs stock |")
    print("|---|" + "---|" * (len(columns) + 1))
    for name in args.models.split(","):
        attention = training_attention("auto", cpu) if name in HAS_ATTENTION else "sdpa"
        genaug = (native, attention)  # what `genaug pretrain` trains with on this CPU
        keys = [key for key in columns if name in HAS_ATTENTION or key[1] == "sdpa"]
        steps = {key: MODELS[name](*key) for key in keys}
        times: dict[tuple, list[float]] = {key: [] for key in keys}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        for _ in range(args.repeats):
            for key, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[key].append((time.perf_counter() - t0) / args.steps)
        median = {key: statistics.median(values) for key, values in times.items()}
        cells = [f"{median[key]:.3f}" if key in median else "—" for key in columns]
        print(f"| {name} | {' | '.join(cells)} | {median[STOCK] / median[genaug]:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
