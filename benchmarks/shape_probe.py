"""How fast do small image models learn the pool's object *shape* from labels (issue 3)?

The embedded dual encoder's image tower reads shape at 0.23 by linear probe after its CPU budget.
This script asks whether that is the tower's patch size or a budget every small model shares: it
trains the CLIP vision tower (the shipped width and depth) at each patch size, and the small CNN
of the classifiers, supervised on shape (10 classes, chance 0.10), with the dual encoder's crop
and flip augmentation, and prints held-out shape accuracy as training goes. The CNN is trained
twice: with its residual blocks' last BatchNorm started at zero (``zero_init_last``, its default
until 2026-12-01) and at one (the default since).

    python benchmarks/shape_probe.py --world worlds/default --steps 800 --patches 8,4 --cnn
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def probe(name: str, model: torch.nn.Module, features, dim: int, x: torch.Tensor, y: torch.Tensor, n_train: int,
          steps: int, classes: int) -> list[dict]:
    from genaug.pretrain.clip import random_crop_flip

    torch.manual_seed(0)
    head = torch.nn.Linear(dim, classes)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    t0, history = time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:  # 50 warmup steps, then a cosine to zero
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, n_train, (128,), generator=g)
        loss = F.cross_entropy(head(features(model, random_crop_flip(x[idx], g))), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                accuracy = (head(features(model, x[n_train:])).argmax(1) == y[n_train:]).float().mean().item()
            model.train()
            history.append({"model": name, "step": step + 1, "shape_accuracy": round(accuracy, 3),
                            "seconds": round(time.time() - t0)})
            print(json.dumps(history[-1]), flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--patches", default="8,4", help="ViT patch sizes to try")
    parser.add_argument("--cnn", action="store_true", help="also the classifiers' small CNN (with and without "
                                                           "zero_init_last)")
    parser.add_argument("--images", type=int, default=20000, help="training images (2,000 more are held out)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from genaug.artefacts import read_dataset
    from genaug.pretrain.data import clip_normalize, load_split

    pool_dir = Path(args.world) / "pool"
    pool = load_split(pool_dir, "train", limit=args.images + 2000, progress=False)
    records = read_dataset(pool_dir, "train").records[:len(pool)]
    shapes = sorted({str(r["shape"]) for r in records})
    y = torch.tensor([shapes.index(str(r["shape"])) for r in records])
    x = clip_normalize(pool.images)
    results = []
    for patch in [int(p) for p in args.patches.split(",") if p]:
        torch.manual_seed(0)
        vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                               num_attention_heads=4, image_size=32, patch_size=patch))
        results += probe(f"vit-patch{patch}", vit, lambda m, b: m(pixel_values=b).pooler_output, 128, x, y,
                         args.images, args.steps, len(shapes))
    if args.cnn:
        import importlib

        import timm

        importlib.import_module("genaug.evaluate.backbones")  # registers genaug_cnn_small with timm

        for zero_init_last in (True, False):
            torch.manual_seed(0)
            cnn = timm.create_model("genaug_cnn_small", num_classes=0, zero_init_last=zero_init_last)
            results += probe(f"genaug_cnn_small{' zero_init_last' if zero_init_last else ''}", cnn,
                             lambda m, b: m(b), cnn.num_features, x, y, args.images, args.steps, len(shapes))
    print(json.dumps({"chance": round(1 / len(shapes), 3), "results": results}))


if __name__ == "__main__":
    main()
