"""Why does the embedded generator not draw shapes? Three measurements on a model family folder.

1. The autoencoder: the oracle's accuracy on real test images and on their VAE reconstructions
   (does shape survive the latent space?).
2. The text tower the UNet is conditioned on: cosine similarity of its hidden states at the one
   token where two prompts differ, layer by layer (input embeddings first). Pairs that differ in
   shape, in pattern, in colour and in background.
3. Sampling: the oracle's accuracy on text-prompted samples of the drawable classes, at several
   guidance scales, split into "right shape" and "right pattern" (class names are "<pattern> <shape>");
   and how often samples conditioned on a test image's embedding (empty prompt) keep its class.

With ``--joint-pilot STEPS`` it also continues the UNet for STEPS steps on ``--pilot-images`` pool
images with the generator's copy of the text tower trained jointly (``--pilot-text-lr``; 0 keeps it
frozen), measuring (3) at guidance 4 every ``--pilot-eval-every`` steps. ``--pilot-text-attributes N``
first trains that text tower alone for N steps to name each caption's shape and pattern (a linear
head on its pooled output), which pulls the shape words apart, before the UNet continues. Nothing
is saved.

    python benchmarks/embedded_diagnostics.py --world worlds/default
    python benchmarks/embedded_diagnostics.py --world worlds/default --joint-pilot 1500
    python benchmarks/embedded_diagnostics.py --world worlds/default --joint-pilot 1500 \
        --pilot-text-attributes 300 --pilot-text-lr 0
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genaug.artefacts import read_dataset
from genaug.checkpoints import step_generator
from genaug.generate.sampler import Sampler
from genaug.models.embedded import EMBEDDED_ROOT
from genaug.models.loading import load_pipeline
from genaug.pretrain.data import clip_normalize, load_split, to_unit
from genaug.pretrain.diffusion import encode_image_embeds, encode_latents, image_condition, noise_schedulers
from genaug.pretrain.figures import PROMPT, _generate, _novel_classes
from genaug.pretrain.oracle import load_oracle

WORD_PAIRS = {
    "shape": ("a photo of a plain circle", "a photo of a plain square"),
    "shape (triangle)": ("a photo of a plain circle", "a photo of a plain triangle"),
    "pattern": ("a photo of a plain circle", "a photo of a striped circle"),
    "colour": ("a red circle on grass", "a blue circle on grass"),
    "background": ("a red circle on grass", "a red circle on water"),
}


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Ids padded to the tokenizer's length, as the pipelines and pretraining pad prompts."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def vae_check(pipe, oracle, test) -> dict[str, float]:
    with torch.no_grad():
        x = to_unit(test.images)
        rec = torch.cat([pipe.vae.decode(pipe.vae.encode(x[i:i + 256]).latent_dist.mean).sample
                         for i in range(0, len(x), 256)])
    rec_uint8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    real, _ = oracle.predict(test.images)
    recon, _ = oracle.predict(rec_uint8)
    return {"oracle_on_real_test": round(float((real == test.labels).float().mean()), 4),
            "oracle_on_vae_reconstructions": round(float((recon == test.labels).float().mean()), 4)}


def text_tower_check(pipe) -> dict[str, list[float]]:
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder

    def states(prompt: str):
        ids = token_ids(tokenizer, [prompt])
        with torch.no_grad():
            encoded = encoder(ids, output_hidden_states=True)
        # A tower with no layers (generator_pilot.py's word vectors) has only its normalized embeddings.
        return encoded.hidden_states or (encoded.last_hidden_state,), ids[0]

    out = {}
    for name, (a, b) in WORD_PAIRS.items():
        (ha, ia), (hb, ib) = states(a), states(b)
        token = int((ia != ib).nonzero()[0])
        out[name] = [round(float(F.cosine_similarity(x[0, token], y[0, token], dim=0)), 3) for x, y in zip(ha, hb)]
    return out


def sample_check(pipe, oracle, class_names: list[str], drawable: list[str], guidance: float,
                 per_class: int) -> dict[str, float]:
    """Oracle accuracy on text samples of the drawable "<pattern> <shape>" classes, whole and per word."""
    names = drawable
    prompts, labels, seeds = [], [], []
    for name in names:
        for j in range(per_class):
            prompts.append(PROMPT.format(name))
            labels.append(class_names.index(name))
            seeds.append(class_names.index(name) * 1000 + j)
    images = _generate(Sampler(pipe), prompts, seeds, steps=25, guidance=guidance, size=32)
    predicted, _ = oracle.predict(images)
    meant = [class_names[c].split() for c in labels]
    return {"guidance": guidance, **word_scores(class_names, predicted, labels),
            "shape_chance": round(1 / len({m[-1] for m in meant}), 3),
            "pattern_chance": round(1 / len({m[0] for m in meant}), 3)}


def image_check(pipe, oracle, test, drawable: list[str], guidance: float, per_class: int,
                seed: int = 0) -> dict[str, float]:
    """Oracle: how often a sample conditioned on a test image's embedding (empty prompt) keeps its class.

    As ``genaug pretrain`` measures "image-conditioned samples keep the source class" (the first ``per_class``
    test images of each drawable class, clean embeddings), split into shape and pattern like
    :func:`sample_check`. Guidance is image guidance: the unconditional branch has a zero image embedding.
    """
    ids = [test.class_names.index(n) for n in drawable]
    src = torch.cat([torch.nonzero(test.labels == c).flatten()[:per_class] for c in ids])
    sampler = Sampler(pipe)
    embeds = sampler.image_embeddings(clip_normalize(test.images[src]))
    images = _generate(sampler, [""] * len(src), [seed * 7 + i for i in range(len(src))], steps=25,
                       guidance=guidance, size=32, image_embeds=embeds)
    predicted, _ = oracle.predict(images)
    return {"guidance": guidance, **word_scores(test.class_names, predicted, test.labels[src].tolist())}


def word_scores(class_names: list[str], predicted, labels: list[int]) -> dict[str, float]:
    """Share of predictions naming the whole "<pattern> <shape>" class, its shape word, its pattern word."""
    said = [class_names[int(p)].split() for p in predicted]
    meant = [class_names[int(c)].split() for c in labels]
    return {"class": round(sum(s == m for s, m in zip(said, meant)) / len(meant), 3),
            "shape": round(sum(s[-1] == m[-1] for s, m in zip(said, meant)) / len(meant), 3),
            "pattern": round(sum(s[0] == m[0] for s, m in zip(said, meant)) / len(meant), 3)}


def text_attribute_pretraining(text_encoder, pool_ids: torch.Tensor, records: list[dict], steps: int,
                               seed: int = 7) -> None:
    """Train the text tower alone to name each caption's shape and pattern from its pooled output."""
    targets = []
    for key in ("shape", "pattern"):
        values = sorted({str(r[key]) for r in records})
        targets.append(torch.tensor([values.index(str(r[key])) for r in records]))
    sizes = [int(t.max()) + 1 for t in targets]
    head = torch.nn.Linear(text_encoder.config.hidden_size, sum(sizes))
    text_encoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(text_encoder.parameters()) + list(head.parameters()), lr=5e-4,
                                  weight_decay=0.01)
    for step in range(steps):
        idx = torch.randint(0, len(pool_ids), (256,), generator=step_generator(seed, step))
        logits = head(text_encoder(pool_ids[idx]).pooler_output).split(sizes, dim=1)
        loss = sum(F.cross_entropy(lg, t[idx]) for lg, t in zip(logits, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    text_encoder.requires_grad_(False)


def joint_pilot(pipe, oracle, class_names, drawable, pool, steps: int, text_lr: float, every: int, seed: int = 123):
    """Continue the shipped UNet (lr 2e-4, EMA 0.995) with the text tower trained jointly or frozen."""
    train_sched, _, image_noising = noise_schedulers()
    latents = encode_latents(pipe.vae, pool.images)
    embeds = encode_image_embeds(pipe.image_encoder, pool.images)
    ids, empty = token_ids(pipe.tokenizer, pool.captions), token_ids(pipe.tokenizer, [""])[0]
    unet, text_encoder = pipe.unet, pipe.text_encoder
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    joint = text_lr > 0
    text_encoder.requires_grad_(joint)
    groups = [{"params": list(unet.parameters()), "lr": 2e-4}]
    if joint:
        groups.append({"params": list(text_encoder.parameters()), "lr": text_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    pairs = [(dict(unet.named_parameters()), dict(ema_unet.named_parameters())),
             (dict(text_encoder.named_parameters()), dict(ema_text.named_parameters()))]
    history = []
    unet.train()
    for step in range(steps):
        g = step_generator(seed, step)
        idx = torch.randint(0, len(latents), (64,), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        noisy = train_sched.add_noise(latents[idx], noise, t)
        batch_ids = ids[idx]
        batch_ids[torch.rand(64, generator=g) < 0.15] = empty
        with torch.set_grad_enabled(joint):
            text = text_encoder(batch_ids)[0]
        levels = torch.randint(0, 1000, (64,), generator=g)
        levels[torch.rand(64, generator=g) < 0.5] = 0
        labels = image_condition(embeds[idx], levels, pipe.image_normalizer, image_noising,
                                 torch.randn(embeds[idx].shape, generator=g))
        labels[torch.rand(64, generator=g) < 0.5] = 0.0
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=text, class_labels=labels).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], 1.0)
        optimizer.step()
        with torch.no_grad():
            for live, ema in pairs:
                for k, p in live.items():
                    if p.requires_grad:
                        ema[k].lerp_(p.detach(), 0.005)
        if (step + 1) % every == 0 or step + 1 == steps:
            pipe.unet, pipe.text_encoder = ema_unet, ema_text
            history.append({"step": step + 1, **sample_check(pipe, oracle, class_names, drawable, 4.0, 8),
                            "text_tower_shape_cosine": text_tower_check(pipe)["shape"][-1]})
            print(json.dumps(history[-1]), flush=True)
            pipe.unet, pipe.text_encoder = unet, text_encoder
    return history


def load_family(family: Path, world: Path):
    """``(generator pipeline, oracle, bench test split, drawable class names)`` of a model family folder."""
    pipe = load_pipeline(str(family / "generator"), device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(family / "oracle")
    test = load_split(world / "bench", "test", progress=False)
    novel = set(_novel_classes(world, test.class_names))
    return pipe, oracle, test, [n for n in test.class_names if n not in novel]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--model", default=None, help="model family folder (default: the shipped one)")
    parser.add_argument("--guidance", default="1,4,8,12", help="guidance scales for the sampling check")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--joint-pilot", type=int, default=0, metavar="STEPS")
    parser.add_argument("--pilot-images", type=int, default=20000)
    parser.add_argument("--pilot-text-lr", type=float, default=1e-4)
    parser.add_argument("--pilot-eval-every", type=int, default=500)
    parser.add_argument("--pilot-text-attributes", type=int, default=0, metavar="STEPS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe, oracle, test, drawable = load_family(Path(args.model) if args.model else EMBEDDED_ROOT, Path(args.world))
    t0 = time.time()
    report = {"vae": vae_check(pipe, oracle, test),
              "text_tower_cosine_by_layer": text_tower_check(pipe),
              "samples": [sample_check(pipe, oracle, test.class_names, drawable, float(g), args.per_class)
                          for g in args.guidance.split(",")],
              "image_conditioned": [image_check(pipe, oracle, test, drawable, float(g), args.per_class)
                                    for g in args.guidance.split(",")]}
    if args.joint_pilot:
        pool = load_split(Path(args.world) / "pool", "train", limit=args.pilot_images, progress=False)
        if args.pilot_text_attributes:
            records = read_dataset(Path(args.world) / "pool", "train").records[:len(pool)]
            pool_ids = token_ids(pipe.tokenizer, pool.captions)
            text_attribute_pretraining(pipe.text_encoder, pool_ids, records, args.pilot_text_attributes)
            report["after_text_attributes"] = {"text_tower_cosine_by_layer": text_tower_check(pipe),
                                               "samples": sample_check(pipe, oracle, test.class_names, drawable,
                                                                       4.0, args.per_class)}
            print(json.dumps(report["after_text_attributes"]), flush=True)
        report["joint_pilot"] = {"text_lr": args.pilot_text_lr, "images": len(pool),
                                 "history": joint_pilot(pipe, oracle, test.class_names, drawable, pool, args.joint_pilot,
                                                        args.pilot_text_lr, args.pilot_eval_every)}
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
