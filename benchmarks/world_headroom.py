"""Does the world's benchmark leave room for augmentation? Few-shot versus oracle accuracy.

Trains the same small CNN with the same recipe (fixed number of steps, light crop/flip
augmentation) on a few-shot split and on the large balanced oracle split, then reports accuracy
on the benchmark's balanced test split (all classes, base classes, novel classes). A few-shot
model far below the oracle means generated or retrieved images have room to help.

    python benchmarks/world_headroom.py --world worlds/default [--grid /tmp/world_grid.png]

Builds the default world first if ``--world`` holds none.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from genaug.artefacts import read_dataset
from genaug.world import WorldConfig, build_world


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images as a uint8 N x 3 x H x W tensor, labels, and class names."""
    data = read_dataset(root, split)
    images = np.stack([np.asarray(data.image(i)) for i in range(len(data))])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(data.labels), data.class_names


def small_cnn(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.MaxPool2d(2), *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 2-pixel-padded crops and horizontal flips (label-preserving for every class)."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (2, 2, 2, 2), mode="reflect")
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 3, h, w + 4)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 3, h, w)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(3)
    return cropped


def to_input(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - 0.5) / 0.25


def train(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, batch_size: int,
          seed: int, lr: float) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = small_cnn(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = augment(to_input(images[index]), generator)
        loss = F.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    predictions = torch.cat([model(to_input(chunk)).argmax(1) for chunk in images.split(512)])
    chosen = mask[labels]
    return float((predictions[chosen] == labels[chosen]).float().mean()) if chosen.any() else float("nan")


def save_grid(root: Path, path: Path, per_class: int = 6, scale: int = 3) -> None:
    """A few test images per class, one row per class with its name, for eyeballing the renders."""
    data = read_dataset(root, "test")
    labels = data.labels
    size = data.image(0).width * scale
    label_width = 130
    grid = Image.new("RGB", (label_width + per_class * (size + 2), len(data.class_names) * (size + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(data.class_names):
        indices = np.flatnonzero(labels == c)[:per_class]
        y = c * (size + 2)
        draw.text((4, y + size // 2 - 6), name, fill="black")
        for j, i in enumerate(indices):
            grid.paste(data.image(int(i)).resize((size, size), Image.NEAREST), (label_width + j * (size + 2), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="worlds/default", help="world folder (built with defaults if missing)")
    parser.add_argument("--fewshot", default="k4-trial0", help="few-shot split under <world>/fewshot/")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per model (same for both)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--grid", default="", help="also save a sample grid of the test split to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    world = Path(args.world)
    if not (world / "world.json").is_file():
        print(f"building the default world in {world} ...")
        build_world(WorldConfig(output=str(world)))
    info = json.loads((world / "world.json").read_text())
    novel = torch.tensor([bool(c["novel_concept"]) for c in info["benchmark"]["classes"]])
    every = torch.ones_like(novel)
    if args.grid:
        save_grid(world / "bench", Path(args.grid))
        print(f"sample grid: {args.grid}")

    test_x, test_y, class_names = load_split(world / "bench", "test")
    results = {}
    for name, root in (("few-shot " + args.fewshot, world / "fewshot" / args.fewshot), ("oracle", world / "oracle")):
        x, y, names = load_split(root, "train")
        assert names == class_names, "train and test class lists differ"
        started = time.perf_counter()
        model = train(x, y, len(class_names), args.steps, args.batch_size, args.seed, args.lr)
        results[name] = {"train_images": len(x), "seconds": round(time.perf_counter() - started, 1),
                         "test_acc": accuracy(model, test_x, test_y, every),
                         "base_acc": accuracy(model, test_x, test_y, ~novel),
                         "novel_acc": accuracy(model, test_x, test_y, novel)}
    print(f"{len(class_names)} classes, chance {1 / len(class_names):.3f}, test images {len(test_x)}")
    print(f"{'train set':<22}{'images':>8}{'test acc':>10}{'base':>8}{'novel':>8}{'secs':>8}")
    for name, r in results.items():
        print(f"{name:<22}{r['train_images']:>8}{r['test_acc']:>10.3f}{r['base_acc']:>8.3f}"
              f"{r['novel_acc']:>8.3f}{r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
