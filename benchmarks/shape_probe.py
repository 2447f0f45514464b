"""How fast do small image models learn the pool's object *shape* from labels (issue 3)?

The embedded dual encoder's image tower reads shape at 0.23 by linear probe after its CPU budget.
This script asks whether that is the tower's patch size or a budget every small model shares: it
trains the CLIP vision tower (the shipped width and depth) at each patch size, and the small CNN
of the classifiers, supervised on shape (10 classes, chance 0.10), with the dual encoder's crop
and flip augmentation, and prints held-out shape accuracy as training goes. The CNN is trained
twice: with its residual blocks' last BatchNorm started at zero (``zero_init_last``, its default
until 2026-12-01) and at one (the default since).

    python benchmarks/shape_probe.py --world worlds/default --steps 800 --patches 8,4 --cnn
    python benchmarks/shape_probe.py --steps 4000 --patches 8                  # the ViT, longer
    python benchmarks/shape_probe.py --steps 4000 --patches '' --cnn --cnn-inits one
    python benchmarks/shape_probe.py --steps 2000 --patches 8 --vit-init structured
    python benchmarks/shape_probe.py --steps 2000 --patches '' --hf-towers regnet

``--hf-towers`` trains stock transformers CNNs sized like ``genaug_cnn_small`` (widths 48, 96, 192 down to a
4x4 map; see ``hf_tower``). Unlike the timm CNN they load with transformers alone: candidates for a
convolutional image tower of the embedded dual encoder that needs no genaug code to load. Of the three,
only ConvNeXt's pooled output (N, C) fits a ``VisionTextDualEncoderModel``; RegNet's is (N, C, 1, 1).

``--vit-init structured`` starts the ViT as a convolution-like attention model without leaving the stock
``CLIPVisionModel``: mimetic attention weights (Trockman & Kolter 2023: each head's W_q^T W_k near
0.7 Z + 0.7 I, W_o W_v near 0.4 Z - 0.4 I) and MAE's 2D sin-cos table as the patches' first positions (then
learned), so that a token starts out attending to itself and the tokens near it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """MAE's 2D sin-cos position table, (grid * grid, dim), row-major like CLIP's patch order."""
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(dim // 4) / max(1, dim // 4 - 1)))
    y, x = y.flatten()[:, None] * omega[None], x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def _mimetic_factors(dim: int, rank: int, alpha: float, beta: float, sign: int, g: torch.Generator):
    """Rank-``rank`` factors L (dim x rank), R (rank x dim) with L @ R ~ alpha Z + sign beta I, Z ~ N(0, 1/dim)."""
    target = alpha * torch.randn(dim, dim, generator=g) / math.sqrt(dim) + sign * beta * torch.eye(dim)
    u, s, vh = torch.linalg.svd(target)
    return u[:, :rank] * s[:rank].sqrt(), s[:rank].sqrt()[:, None] * vh[:rank]


@torch.no_grad()
def structured_init(vit, seed: int = 0) -> None:
    """Mimetic attention weights and 2D sin-cos positions for a stock ``CLIPVisionModel`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    embeddings = vit.embeddings
    dim = embeddings.embed_dim
    embeddings.position_embedding.weight[1:] = sincos_2d(math.isqrt(embeddings.num_patches), dim)
    embeddings.position_embedding.weight[0] = 0.0
    for layer in vit.encoder.layers:
        attention = layer.self_attn
        width = attention.head_dim
        for head in range(attention.num_heads):
            left, right = _mimetic_factors(dim, width, 0.7, 0.7, +1, g)
            attention.q_proj.weight[head * width:(head + 1) * width] = left.T
            attention.k_proj.weight[head * width:(head + 1) * width] = right
        left, right = _mimetic_factors(dim, dim, 0.4, 0.4, -1, g)
        attention.v_proj.weight.copy_(right)
        attention.out_proj.weight.copy_(left)


HF_TOWERS = ("regnet", "regnet64", "convnext")


def hf_tower(name: str):
    """A stock transformers CNN with ``genaug_cnn_small``'s widths and feature-map sizes (32 px in, 4x4 out).

    regnet: RegNetX, one X block a stage with ungrouped 3x3 convolutions (a bottleneck ResNet block without
    reduction); its stem is a 3x3 convolution of stride 2 where genaug_cnn_small's has stride 1, and the first
    stage keeps the stem's 16x16. regnet64: the same blocks on the image upsampled to 64 px (an image
    processor's resize), so that the stride-2 stem keeps 32x32 and every stage halves it, as
    genaug_cnn_small's do. convnext: ConvNeXt with a 1x1 patch stem at full resolution and four stages
    (24, 48, 96, 192), layer scale off, since blocks that start as identities learned more slowly here (the
    ``zero_init_last`` entry in benchmarks/RESULTS.md).
    """
    from transformers import ConvNextConfig, ConvNextModel, RegNetConfig, RegNetModel

    if name in ("regnet", "regnet64"):
        return RegNetModel(RegNetConfig(embedding_size=24, hidden_sizes=[48, 96, 192], depths=[1, 1, 1],
                                        groups_width=192, layer_type="x",
                                        downsample_in_first_stage=name == "regnet64"))
    if name == "convnext":
        return ConvNextModel(ConvNextConfig(patch_size=1, num_stages=4, hidden_sizes=[24, 48, 96, 192],
                                            depths=[1, 1, 1, 1], layer_scale_init_value=0.0, image_size=32))
    raise ValueError(f"unknown tower {name!r}: expected one of {', '.join(HF_TOWERS)}")


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
    parser.add_argument("--cnn-inits", default="zero,one", help="with --cnn: the residual blocks' last BatchNorm "
                                                                "starts at zero (zero_init_last), at one, or both")
    parser.add_argument("--vit-init", choices=("default", "structured"), default="default",
                        help="structured: mimetic attention and 2D sin-cos positions (see above)")
    parser.add_argument("--hf-towers", default="", help=f"stock transformers CNNs to try, comma-separated: "
                                                         f"{', '.join(HF_TOWERS)} (see hf_tower)")
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
        if args.vit_init == "structured":
            structured_init(vit)
        suffix = "" if args.vit_init == "default" else f" {args.vit_init} init"
        results += probe(f"vit-patch{patch}{suffix}", vit, lambda m, b: m(pixel_values=b).pooler_output, 128, x, y,
                         args.images, args.steps, len(shapes))
    if args.cnn:
        import importlib

        import timm

        importlib.import_module("genaug.evaluate.backbones")  # registers genaug_cnn_small with timm

        inits = [init.strip() for init in args.cnn_inits.split(",") if init.strip()]
        if not set(inits) <= {"zero", "one"}:
            parser.error(f"--cnn-inits takes zero and/or one, got {args.cnn_inits!r}")
        for zero_init_last in [init == "zero" for init in inits]:
            torch.manual_seed(0)
            cnn = timm.create_model("genaug_cnn_small", num_classes=0, zero_init_last=zero_init_last)
            results += probe(f"genaug_cnn_small{' zero_init_last' if zero_init_last else ''}", cnn,
                             lambda m, b: m(b), cnn.num_features, x, y, args.images, args.steps, len(shapes))
    for name in [n.strip() for n in args.hf_towers.split(",") if n.strip()]:
        torch.manual_seed(0)
        tower = hf_tower(name)
        width = tower.config.hidden_sizes[-1]
        scale = 2 if name.endswith("64") else 1

        def features(m, b, scale=scale):
            if scale != 1:
                b = F.interpolate(b, scale_factor=scale, mode="bilinear", align_corners=False)
            return m(pixel_values=b).pooler_output.flatten(1)

        results += probe(f"transformers {name}", tower, features, width, x, y, args.images, args.steps, len(shapes))
    print(json.dumps({"chance": round(1 / len(shapes), 3), "results": results}))


if __name__ == "__main__":
    main()
