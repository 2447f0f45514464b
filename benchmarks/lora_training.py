"""LoRA training speed: genaug train-lora against the stock diffusers DreamBooth-LoRA loop, same model and work.

The stock loop is the inner loop of diffusers' ``examples/dreambooth/train_dreambooth_lora.py``:
every step encodes the batch with the VAE (sampling the posterior), runs the frozen text encoder
on the prompt, adds noise, runs the UNet with peft LoRA on ``to_q/to_k/to_v/to_out.0`` and takes an
AdamW step. genaug's ``train-lora`` caches the VAE posterior and the prompt embedding once and
draws each step's latents from the cache. Same rank, batch size, steps and learning rate; each
variant runs in its own process (its own peak RSS), with the same torch thread count.

    python benchmarks/lora_training.py --model embedded --steps 100 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from _isolated import run_isolated  # benchmarks/ is on sys.path when a script here runs


def _images(folder: Path, n: int = 5) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def stock(args, data: str, queue) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from genaug.models.loading import default_resolution, load_pipeline
    from genaug.personalize.lora import UNET_TARGETS, _load_images

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = load_pipeline(args.model, device="cpu", dtype="float32")
    size = default_resolution(pipe)
    pixels = _load_images(data, None, size, "data")
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
    for m in (vae, unet, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = pipe.tokenizer(["a photo of sks object"], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    class_dim = unet.config.projection_class_embeddings_input_dim if unet.config.class_embed_type else None
    unet.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = pixels[torch.randint(0, len(pixels), (args.batch_size,))]
        latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
        text = text_encoder(ids.repeat(args.batch_size, 1))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,))
        labels = torch.zeros(args.batch_size, class_dim) if class_dim else None
        pred = unet(scheduler.add_noise(latents, noise, t), t, text, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    queue.put({"steps_per_second": args.steps / seconds,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def ours(args, data: str, out: str, queue) -> None:
    import torch

    from genaug.personalize.lora import LoraTrainConfig, train_lora

    torch.set_num_threads(args.threads)
    result = train_lora(LoraTrainConfig(model=args.model, instance_data=data, output=out, rank=args.rank,
                                        max_train_steps=args.steps, train_batch_size=args.batch_size, device="cpu",
                                        random_flip=False))
    queue.put({"steps_per_second": result.steps_per_second,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        _images(data)
        base = run_isolated(stock, args, str(data))
        mine = run_isolated(ours, args, str(data), str(Path(tmp) / "lora"))
    print(json.dumps({
        "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
        "stock_steps_per_second": round(base["steps_per_second"], 3),
        "genaug_steps_per_second": round(mine["steps_per_second"], 3),
        "speedup": round(mine["steps_per_second"] / base["steps_per_second"], 2),
        "peak_rss_mb": {"stock": round(base["peak_rss_mb"]), "genaug": round(mine["peak_rss_mb"])},
    }, indent=2))


if __name__ == "__main__":
    main()
