"""``genaug train-classifier``: a timm classifier on real data plus synthetic/retrieved datasets.

What the downstream tables are made of. One run trains on a real training split (often
long-tailed or few-shot) plus any number of extra datasets written by ``synth`` or ``retrieve``,
then scores a test split overall, per class and per many/medium/few bucket.

Mixing extra data, two ways:
* ``union`` — the extra images join the training set (what a "balance every class to N" budget
  is for: the rare classes get more samples);
* ``replace`` — DA-Fusion's rule: each drawn real image is replaced, with probability
  ``synthetic_prob``, by one of the extra images made from it (``source`` in their metadata) or,
  when none was, by an extra image of its class.
Per-sample weights (``sample_weight`` in the metadata, e.g. from DIAGen's confidence rule) scale
each sample's loss. Long-tail options: class-balanced sampling and Balanced Softmax / logit
adjustment (Menon et al. 2021): ``logits + tau * log(prior)`` in the training loss only.

Images are decoded once into memory (the embedded world's 32 px images: a few MB); a dataset
too large for that is refused with a clear error rather than swapped to death.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artefacts import (atomic_write_bytes, atomic_write_json, discard_partial_writes, folder_lock, list_splits,
                         open_image, read_dataset)
from ..checkpoints import require_finite
from ..config import config_to_dict, option, same_settings
from ..errors import ConfigError, DataError
from ..runs import RunRecord

LOSSES = ("ce", "balanced_softmax", "logit_adjusted")
SAMPLERS = ("random", "class_balanced", "sqrt")
MIXES = ("union", "replace")
AUGMENTS = ("crop_flip", "randaugment", "none")


@dataclass
class ClassifierConfig:
    """Train a classifier on real (+ synthetic/retrieved) data and score it on a test split."""

    real_data: str = option("worlds/default/bench", "real dataset (genaug or imagefolder)")
    split: str = option("train", "training split of real_data")
    extra_data: list[str] = option(help="synthetic or retrieved datasets to train on too", factory=list)
    mix: str = option("union", "how extra data is used: union (added to the training set) or replace "
                               "(DA-Fusion: a drawn real image is swapped for one of its extra images)")
    synthetic_prob: float = option(0.5, "replace mode: probability of swapping a drawn real image")
    use_sample_weights: bool = option(True, "scale each extra image's loss by its metadata sample_weight")
    test_data: str | None = option(None, "test dataset (default: real_data's test split)")
    test_split: str = option("test", "split of test_data")
    output: str = option("runs/classifier", "run folder: config, summary.csv, final.json, checkpoints")
    arch: str = option("auto", "timm architecture; auto: genaug_cnn_small for images <= 64 px, else resnet18")
    image_size: int = option(0, "train/test image side (0: the real data's own size)")
    pretrained: str | None = option(None, "start from these weights of arch: a local .safetensors file, or a "
                                          "folder holding model.safetensors (a downloaded timm hub repo); the "
                                          "classification head is new, inputs use the checkpoint's mean/std")
    freeze_backbone: bool = option(False, "train only the classification head on the frozen pretrained features "
                                          "(DA-Fusion's few-shot classifier: a linear head on an ImageNet "
                                          "ResNet-50); needs pretrained")
    zero_init_last: bool = option(False, "start each residual block's last BatchNorm at zero (timm's ResNet default; "
                                         "genaug_cnn_* and timm ResNets). Off: from scratch on the embedded world "
                                         "it learned markedly slower (long-tail real-only 0.21 vs 0.33)")
    epochs: int = option(30, "passes over the (real) training set")
    min_steps: int = option(300, "at least this many optimizer steps (few-shot sets are tiny)")
    batch_size: int = option(128, "images per step")
    learning_rate: float = option(2e-3, "peak AdamW learning rate (warmup, then cosine to zero)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    warmup_fraction: float = option(0.05, "fraction of the steps spent warming up")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    loss: str = option("ce", "ce, balanced_softmax (logit adjustment with tau=1) or logit_adjusted")
    tau: float = option(1.0, "logit_adjusted: weight of log(prior)")
    sampler: str = option("random", "random, class_balanced (every class equally often) or sqrt (prop. to "
                                    "sqrt(count))")
    augment: str = option("crop_flip", "crop_flip (random resized crop + flip), randaugment (+ RandAugment), none")
    crop_scale_min: float = option(0.7, "random resized crop keeps at least this fraction of the area")
    rotate90: bool = option(False, "also rotate by random multiples of 90 degrees")
    many_threshold: int = option(100, "a class with more training images than this is 'many'")
    few_threshold: int = option(20, "a class with fewer training images than this is 'few' (medium between)")
    checkpoint_every: int = option(5, "save a resumable checkpoint every N epochs (0: never)")
    max_memory_gb: float = option(8.0, "hold decoded images in memory up to this; larger datasets stream from disk")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    seed: int = option(0, "seed of initialization, sampling and augmentation")
    progress: bool = option(True, "show a progress bar")

    # Runs recorded before zero_init_last existed started their blocks at zero (genaug_cnn_* did then,
    # as timm's ResNets do): they do not count as runs of the new default.
    LEGACY_SETTINGS: ClassVar[dict[str, Any]] = {"zero_init_last": True}

    def __post_init__(self) -> None:
        for name, allowed in (("loss", LOSSES), ("sampler", SAMPLERS), ("mix", MIXES), ("augment", AUGMENTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.freeze_backbone and not self.pretrained:
            raise ValueError("freeze_backbone needs pretrained weights (set pretrained)")
        if self.min_steps < 0 or self.checkpoint_every < 0 or self.image_size < 0:
            raise ValueError("min_steps, checkpoint_every and image_size must not be negative")
        if not 0.0 <= self.synthetic_prob <= 1.0:
            raise ValueError(f"synthetic_prob must be in [0, 1], got {self.synthetic_prob}")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be positive")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError("warmup_fraction must be in [0, 1)")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError("crop_scale_min must be in (0, 1]")
        if not 0 <= self.few_threshold <= self.many_threshold:
            raise ValueError("few_threshold must be <= many_threshold")


@dataclass
class ClassifierResult:
    output: Path
    test_accuracy: float
    balanced_accuracy: float
    buckets: dict[str, float | None]
    per_class: dict[str, float]
    train_images: dict[str, int]
    seconds: float
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- data
class StreamedPixels:
    """uint8 images (N, 3, S, S) decoded from disk when indexed: for datasets above ``max_memory_gb``.

    Indexing returns exactly what the in-memory path holds (same decode, same resize), so a run
    trains the same either way; it only trades memory for decoding time (threads hide most of it).
    """

    def __init__(self, parts: list[tuple[Any, int]], size: int, threads: int = 8):
        self.parts = parts  # (dataset, record index) per row
        self.size = size
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="genaug-decode")

    def __len__(self) -> int:
        return len(self.parts)

    def _decode(self, row: int) -> torch.Tensor:
        ds, i = self.parts[row]
        return torch.from_numpy(decode_resized(ds, i, self.size)).permute(2, 0, 1)

    def take(self, rows: list[int]) -> torch.Tensor:
        return torch.stack(list(self._pool.map(self._decode, rows)))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            return self.take(list(range(len(self))[key]))
        return self._decode(int(key))

    def __add__(self, other: "StreamedPixels") -> "StreamedPixels":
        return StreamedPixels(self.parts + other.parts, self.size)


def decode_resized(ds, i: int, size: int) -> np.ndarray:
    from PIL import Image

    image = ds.image(i)
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def take_pixels(pixels: "torch.Tensor | StreamedPixels", rows: list[int]) -> torch.Tensor:
    return pixels.take(rows) if isinstance(pixels, StreamedPixels) else pixels[rows]


@dataclass
class Images:
    pixels: "torch.Tensor | StreamedPixels"  # uint8 (N, 3, S, S)
    labels: torch.Tensor
    weights: torch.Tensor
    ids: list[str]
    sources: list[str | None]


def load_images(root: str, split: str | None, size: int, class_names: list[str] | None, max_memory_gb: float,
                what: str) -> tuple[Images, list[str]]:
    """A dataset split at ``size`` px, decoded into memory (or streamed when above ``max_memory_gb``); labels are
    remapped by class name onto ``class_names``."""
    ds = read_dataset(root, split)
    names = class_names or ds.class_names
    if class_names is not None:
        unknown = sorted(set(ds.class_names[int(r["label"])] for r in ds.records) - set(class_names))
        if unknown:
            raise DataError(f"{what} has classes the real data lacks: {unknown[:3]}", where=root,
                            fix="make extra and test data from the same class list")
    if not len(ds):
        raise DataError(f"{what} is empty", where=root, fix="give a dataset with images")
    lookup = {n: i for i, n in enumerate(names)}
    if size and len(ds) * 3 * size * size / 2 ** 30 > max_memory_gb:
        # Too big to hold decoded: stream from disk. Check every file opens first, so a bad one is
        # refused before anything is written rather than in the middle of training.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: open_image(ds.image_path(i), header_only=True), range(len(ds))))
        print(f"{what}: {len(ds) * 3 * size * size / 2 ** 30:.1f} GB decoded is above --max-memory-gb "
              f"{max_memory_gb:g}: streaming it from disk", flush=True)
        pixels = StreamedPixels([(ds, i) for i in range(len(ds))], size)
    else:
        with ThreadPoolExecutor(4) as pool:
            arrays = list(pool.map(lambda i: decode_resized(ds, i, size), range(len(ds))))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"{what} images differ in size {sorted(shapes)[:2]}", where=root,
                            fix="set --image-size to resize them all")
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([lookup[ds.class_names[int(r["label"])]] for r in ds.records])
    weights = torch.tensor([float(r.get("sample_weight", 1.0) or 0.0) for r in ds.records])
    return Images(pixels, labels, weights, [str(r.get("id", r["file_name"])) for r in ds.records],
                  [r.get("source") for r in ds.records]), names


def _concat(parts: list[Images]) -> Images:
    if any(isinstance(p.pixels, StreamedPixels) for p in parts):
        # Mixed: hold the in-memory parts' rows as streamed too (they decode the same way).
        streamed = [p.pixels if isinstance(p.pixels, StreamedPixels) else None for p in parts]
        if any(x is None for x in streamed):
            raise DataError("extra datasets mix streamed and in-memory sizes", fix="raise --max-memory-gb so they "
                            "fit, or lower it so every one streams")
        pixels = streamed[0]
        for other in streamed[1:]:
            pixels = pixels + other
        return Images(pixels, torch.cat([p.labels for p in parts]), torch.cat([p.weights for p in parts]),
                      sum((p.ids for p in parts), []), sum((p.sources for p in parts), []))
    return Images(torch.cat([p.pixels for p in parts]), torch.cat([p.labels for p in parts]),
                  torch.cat([p.weights for p in parts]), sum((p.ids for p in parts), []),
                  sum((p.sources for p in parts), []))


# --------------------------------------------------------------------------- model and loss
def create_classifier(arch: str, num_classes: int, image_size: int, zero_init_last: bool = False) -> torch.nn.Module:
    """A fresh timm model; ``zero_init_last`` reaches the architectures that take it (genaug_cnn_*, timm ResNets)."""
    import timm

    from .backbones import takes_zero_init_last  # (importing it registers genaug_cnn_* in timm)

    name = arch if arch != "auto" else ("genaug_cnn_small" if image_size <= 64 else "resnet18")
    try:  # timm's "Unknown model" is a RuntimeError
        takes_zero_init = takes_zero_init_last(name)
        if zero_init_last and not takes_zero_init:
            raise ConfigError(f"zero_init_last does not apply to {name!r}", where="zero_init_last",
                              fix="leave it off, or use a genaug_cnn_* or timm ResNet architecture")
        kwargs = {"zero_init_last": zero_init_last} if takes_zero_init else {}
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        raise ConfigError(f"unknown timm architecture {name!r} ({exc})", where="arch",
                          fix="use auto, genaug_cnn_small, resnet18, resnet50 or another timm model name") from None


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the classification head's parameters (timm's ``get_classifier()``)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head}


def pretrained_file(path: str) -> Path:
    """The safetensors file that ``pretrained`` names (a file, or a folder holding model.safetensors)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "model.safetensors"
    if not file.is_file():
        raise DataError(f"pretrained weights not found: {file}", where="pretrained",
                        fix="give a local .safetensors file of the same timm architecture as arch, or a folder "
                            "with model.safetensors (e.g. a downloaded timm/<model> hub repo)")
    if file.suffix != ".safetensors":
        raise DataError(f"pretrained weights must be a .safetensors file, got {file.name} (genaug never unpickles "
                        "checkpoints)", where="pretrained",
                        fix="convert it once, where you trust the file: safetensors.torch.save_file("
                            "torch.load(f, weights_only=True), 'model.safetensors')")
    return file


def load_backbone_weights(model: torch.nn.Module, path: str) -> None:
    """Copy a checkpoint's weights into ``model``, all but the classification head (the new task's own).

    Safetensors only (never unpickled); every non-head tensor of ``model`` must come from the file with
    its shape, so a checkpoint of another architecture is one clear error instead of a half-loaded model."""
    from ..artefacts import read_safetensors

    file = pretrained_file(path)
    weights, _ = read_safetensors(file)
    head = head_parameter_names(model)
    own = {k: v for k, v in model.state_dict().items() if k not in head}
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own and k not in head]
    misshapen = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        example = (missing or unexpected or misshapen)[0]
        raise DataError(f"pretrained weights do not fit this architecture: {len(missing)} tensors missing, "
                        f"{len(unexpected)} unexpected, {len(misshapen)} of another shape (e.g. {example!r})",
                        where=str(file), fix="use a checkpoint of the same timm architecture as arch")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)


def input_normalization(model: torch.nn.Module, cfg: ClassifierConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the inputs: a pretrained checkpoint's own (timm's pretrained_cfg), else
    CLIP's, which the embedded world's models use."""
    from ..pretrain.data import CLIP_MEAN, CLIP_STD

    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.pretrained and pretrained_cfg.get("mean") and pretrained_cfg.get("std"):
        return [float(v) for v in pretrained_cfg["mean"]], [float(v) for v in pretrained_cfg["std"]]
    return list(CLIP_MEAN), list(CLIP_STD)


def adjusted_logits(logits: torch.Tensor, log_prior: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Balanced Softmax / logit adjustment: add ``tau * log(prior)`` to the logits during training."""
    return logits if log_prior is None else logits + tau * log_prior


def bucket_of(count: int, many: int, few: int) -> str:
    return "many" if count > many else "few" if count < few else "medium"


# Two-sided 95% Student-t critical values for 1..30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2:
        return float(arr.mean()) if len(arr) else float("nan"), 0.0
    df = len(arr) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return float(arr.mean()), float(t * arr.std(ddof=1) / math.sqrt(len(arr)))


# --------------------------------------------------------------------------- augmentation
def augment_batch(pixels_uint8: torch.Tensor, cfg: ClassifierConfig, generator: torch.Generator) -> torch.Tensor:
    """uint8 batch -> augmented float batch in [0, 1], seeded by ``generator``."""
    from ..pretrain.clip import random_crop_flip, random_rotate90

    x = pixels_uint8
    if cfg.augment == "randaugment":
        from torchvision.transforms import v2

        # v2 transforms draw from torch's global generator: seed it from ours for reproducibility.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
            op = v2.RandAugment(num_ops=2, magnitude=9)
            x = torch.stack([op(img) for img in x])
    x = x.float() / 255.0
    if cfg.augment != "none":
        x = random_crop_flip(x, generator, scale_min=cfg.crop_scale_min, flip=True)
    if cfg.rotate90:
        x = random_rotate90(x, generator)
    return x


# --------------------------------------------------------------------------- sampling
class MixedSampler:
    """Draws training batches (indices into real, or into extra) by the configured rules, seeded."""

    def __init__(self, real: Images, extra: Images | None, cfg: ClassifierConfig, num_classes: int):
        self.cfg = cfg
        self.real, self.extra = real, extra
        union = cfg.mix == "union" and extra is not None
        labels = torch.cat([real.labels, extra.labels]) if union else real.labels
        self.num_pool = len(labels)
        counts = torch.bincount(labels, minlength=num_classes).float()
        if cfg.sampler == "random":
            per_item = torch.ones(len(labels))
        else:
            class_weight = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
            if cfg.sampler == "sqrt":
                class_weight = class_weight * counts.sqrt()
            per_item = class_weight[labels]
        self.probabilities = per_item / per_item.sum()
        self.train_counts = counts
        # replace mode: extra images by source id and by class
        self.by_source: dict[str, list[int]] = {}
        self.by_class: dict[int, list[int]] = {}
        if extra is not None and cfg.mix == "replace":
            for j, (source, label) in enumerate(zip(extra.sources, extra.labels.tolist())):
                if source:
                    self.by_source.setdefault(str(source), []).append(j)
                self.by_class.setdefault(label, []).append(j)

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(uint8 pixels, labels, loss weights)`` of one batch."""
        picks = torch.multinomial(self.probabilities, batch_size, replacement=True, generator=generator).tolist()
        pixels, labels, weights = [], [], []
        n_real = len(self.real.labels)
        swap = torch.rand(batch_size, generator=generator) < self.cfg.synthetic_prob
        choice = torch.randint(0, 2 ** 31, (batch_size,), generator=generator).tolist()
        chosen: list[tuple[Images, int]] = []
        for b, i in enumerate(picks):
            source, index = (self.real, i) if i < n_real else (self.extra, i - n_real)
            if self.cfg.mix == "replace" and self.extra is not None and bool(swap[b]):
                options = self.by_source.get(self.real.ids[i]) or self.by_class.get(int(self.real.labels[i]))
                if options:
                    source, index = self.extra, options[choice[b] % len(options)]
            chosen.append((source, index))
            labels.append(int(source.labels[index]))
            weight = float(source.weights[index]) if (source is self.extra and self.cfg.use_sample_weights) else 1.0
            weights.append(weight)
        # One gather per source (a streamed source decodes its rows in parallel), back in batch order.
        for source in {id(s): s for s, _ in chosen}.values():
            slots = [b for b, (s, _) in enumerate(chosen) if s is source]
            pixels.extend(zip(slots, take_pixels(source.pixels, [chosen[b][1] for b in slots])))
        pixels = [p for _, p in sorted(pixels, key=lambda pair: pair[0])]
        return torch.stack(pixels), torch.tensor(labels), torch.tensor(weights)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: torch.nn.Module, pixels_uint8: torch.Tensor, device: torch.device, mean: torch.Tensor,
            std: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(pixels_uint8), batch):
        x = (pixels_uint8[start:start + batch].float() / 255.0 - mean) / std
        out.append(model(x.to(device)).argmax(dim=1).cpu())
    return torch.cat(out)


def score(predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str], train_counts: torch.Tensor,
          many: int, few: int) -> dict[str, Any]:
    """Top-1 overall, mean per-class (balanced) accuracy, per class, and per many/medium/few bucket."""
    correct = (predicted == labels).float()
    per_class, buckets = {}, {"many": [], "medium": [], "few": []}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            acc = float(correct[mask].mean())
            per_class[name] = round(acc, 5)
            buckets[bucket_of(int(train_counts[c]), many, few)].append(acc)
    return {"accuracy": round(float(correct.mean()), 5),
            "balanced_accuracy": round(float(np.mean(list(per_class.values()))), 5) if per_class else None,
            "buckets": {k: (round(float(np.mean(v)), 5) if v else None) for k, v in buckets.items()},
            "bucket_sizes": {k: len(v) for k, v in buckets.items()}, "per_class": per_class}


# --------------------------------------------------------------------------- training
def _save_checkpoint(folder: Path, epoch: int, model, optimizer, generator: torch.Generator) -> None:
    from safetensors.torch import save

    state = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for pid, s in optimizer.state_dict()["state"].items():
        for key, value in s.items():
            if torch.is_tensor(value):
                state[f"optim/{pid}/{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    state["rng"] = generator.get_state()
    atomic_write_bytes(folder / "checkpoint.safetensors", save(state, metadata={"epoch": str(epoch)}))


def _rank_rng_path(folder: Path, rank: int, epoch: int) -> Path:
    return folder / "rank-rng" / f"rank{rank}-epoch{epoch:05d}.safetensors"


def _save_rank_rng(folder: Path, rank: int, epoch: int, generator: torch.Generator) -> None:
    """The sampling stream of a process other than the main one (the main one's is in the checkpoint)."""
    from safetensors.torch import save

    atomic_write_bytes(_rank_rng_path(folder, rank, epoch), save({"rng": generator.get_state()}))
    for old in sorted((folder / "rank-rng").glob(f"rank{rank}-epoch*.safetensors"))[:-2]:
        old.unlink(missing_ok=True)


def _load_checkpoint(folder: Path, model, optimizer, generator: torch.Generator, rank: int = 0) -> int:
    from safetensors import safe_open

    path = folder / "checkpoint.safetensors"
    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as f:
        epoch = int(f.metadata()["epoch"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    # Rebuild AdamW's state: one step creates the right structure, then the tensors are copied in.
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state["state"].setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict(state)
    if rank == 0:
        generator.set_state(tensors["rng"])
    else:
        from ..artefacts import read_safetensors

        path = _rank_rng_path(folder, rank, epoch)
        if not path.is_file():
            raise DataError(f"the checkpoint of epoch {epoch} lacks process {rank}'s sampling state", where=str(path),
                            fix="resume with the same number of processes, or delete checkpoint.safetensors")
        generator.set_state(read_safetensors(path)[0]["rng"])
    return epoch


@dataclass
class _Ranks:
    """This process's place in a launch (``accelerate launch`` / torchrun); alone: rank 0 of 1, no accelerator."""

    accelerator: Any = None
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def _launch_ranks(cfg: ClassifierConfig) -> _Ranks:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Ranks()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cfg.device == "cpu")
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {accelerator.num_processes} processes",
                          fix="use a batch size divisible by the number of processes (it is the global batch)")
    return _Ranks(accelerator, accelerator.process_index, accelerator.num_processes)


def train_classifier(cfg: ClassifierConfig) -> ClassifierResult:
    """Train, checkpoint every few epochs (a rerun resumes), score the test split, write the run folder.

    Under ``accelerate launch`` (several GPUs) every process trains on its share of each global batch
    (DDP); only the main process writes.
    """
    from ..models.loading import resolve_device

    finished = _finished_run(cfg)
    if finished is not None:
        return finished
    if cfg.pretrained:
        pretrained_file(cfg.pretrained)  # a wrong path fails now, not after the data has loaded
    started = time.time()
    ranks = _launch_ranks(cfg)
    device = ranks.accelerator.device if ranks.accelerator is not None else resolve_device(cfg.device)
    probe = read_dataset(cfg.real_data, cfg.split)
    size = cfg.image_size or probe.image(0).size[0]
    real, class_names = load_images(cfg.real_data, cfg.split, size, None, cfg.max_memory_gb, "real data")
    extras = [load_images(path, "train", size, class_names, cfg.max_memory_gb, f"extra data {path}")[0]
              for path in cfg.extra_data]
    extra = _concat(extras) if extras else None
    test_root, test_split = cfg.test_data or cfg.real_data, cfg.test_split
    if cfg.test_data is None and test_split not in list_splits(cfg.real_data):
        raise DataError(f"real data has no {test_split!r} split to test on", where=cfg.real_data,
                        fix="pass --test-data")
    test, _ = load_images(test_root, test_split, size, class_names, cfg.max_memory_gb, "test data")
    # Built before anything is written, so that pretrained weights that do not fit leave no run folder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_classifier(cfg.arch, len(class_names), size, cfg.zero_init_last)
    if cfg.pretrained:
        load_backbone_weights(model, cfg.pretrained)
    if cfg.freeze_backbone:  # a linear probe: only the head learns, the backbone stays in eval mode
        head = head_parameter_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in head)
    out = Path(cfg.output)
    # Two runs training into one folder would mix checkpoints and summaries: hold it before writing.
    lock = folder_lock(out, "training a classifier in") if ranks.main else contextlib.nullcontext()
    with lock:
        return _train_locked(cfg, out, started, device, size, model, real, extra, test, class_names, ranks)


def _train_locked(cfg: ClassifierConfig, out: Path, started: float, device, size: int, model: torch.nn.Module,
                  real: Images, extra: Images | None, test: Images, class_names: list[str],
                  ranks: _Ranks) -> ClassifierResult:
    """``train_classifier`` from the first write on, with the output folder locked."""
    if ranks.main:
        discard_partial_writes(out)  # a killed run's temporaries
    num_classes = len(class_names)
    record = RunRecord.start(out, "train-classifier", cfg) if ranks.main else None
    # Each process samples its own stream; the main one's is the single-process stream.
    generator = torch.Generator().manual_seed(cfg.seed if ranks.main else cfg.seed * 1_000_003 + ranks.rank)
    model = model.to(device)
    sampler = MixedSampler(real, extra, cfg, num_classes)
    real_counts = torch.bincount(real.labels, minlength=num_classes)
    log_prior = None
    if cfg.loss != "ce":
        prior = sampler.train_counts.clamp(min=1) / sampler.train_counts.clamp(min=1).sum()
        log_prior = prior.log().to(device)
    tau = 1.0 if cfg.loss == "balanced_softmax" else cfg.tau
    steps_per_epoch = max(1, math.ceil(len(real.labels) / cfg.batch_size),
                          math.ceil(cfg.min_steps / cfg.epochs))
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total)
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    mean_values, std_values = input_normalization(model, cfg)
    mean = torch.tensor(mean_values).view(1, 3, 1, 1)
    std = torch.tensor(std_values).view(1, 3, 1, 1)
    start_epoch = _load_checkpoint(out, model, optimizer, generator, ranks.rank) if cfg.checkpoint_every else 0
    core = model  # the plain module: evaluated and saved by one process, outside DDP's collectives
    if ranks.accelerator is not None:
        model, optimizer = ranks.accelerator.prepare(model, optimizer)
    batch_size = cfg.batch_size // ranks.world
    summary_path = out / "summary.csv"
    rows = _read_summary(summary_path)[:start_epoch]
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="train-classifier",
               disable=not cfg.progress or not ranks.main, dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        model.train(not cfg.freeze_backbone)
        running = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            lr = cfg.learning_rate * ((step + 1) / warmup if step < warmup else
                                      0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels, labels, weights = sampler.draw(batch_size, generator)
            x = ((augment_batch(pixels, cfg, generator) - mean) / std).to(device)
            logits = adjusted_logits(model(x), log_prior, tau)
            losses = F.cross_entropy(logits, labels.to(device), label_smoothing=cfg.label_smoothing,
                                     reduction="none")
            weights = weights.to(device)
            loss = (losses * weights).sum() / weights.sum().clamp(min=1e-8)
            require_finite(loss, step, cfg.output)
            optimizer.zero_grad(set_to_none=True)
            if ranks.accelerator is not None:
                ranks.accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            running += float(loss.detach())
            bar.update(1)
        if not ranks.main:
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs:
                _save_rank_rng(out, ranks.rank, epoch + 1, generator)
            ranks.barrier()  # the main process checkpoints after every process's stream is on disk
            continue
        test_scores = score(predict(core, test.pixels, device, mean, std), test.labels, class_names,
                            real_counts, cfg.many_threshold, cfg.few_threshold)
        rows.append({"epoch": epoch + 1, "train_loss": round(running / steps_per_epoch, 5),
                     "test_accuracy": test_scores["accuracy"], "balanced_accuracy": test_scores["balanced_accuracy"],
                     "lr": round(lr, 8)})
        bar.set_postfix(loss=f"{rows[-1]['train_loss']:.3f}", test=f"{test_scores['accuracy']:.3f}", refresh=False)
        _write_summary(summary_path, rows)
        ranks.barrier()
        if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs:
            _save_checkpoint(out, epoch + 1, core, optimizer, generator)
    bar.close()
    final = score(predict(core, test.pixels, device, mean, std), test.labels, class_names, real_counts,
                  cfg.many_threshold, cfg.few_threshold)
    train_images = {"real": int(len(real.labels)), "extra": int(len(extra.labels)) if extra is not None else 0}
    result = ClassifierResult(out, final["accuracy"], final["balanced_accuracy"], final["buckets"],
                              final["per_class"], train_images, round(time.time() - started, 2), total, rows)
    ranks.barrier()
    if not ranks.main:
        return result
    from safetensors.torch import save

    atomic_write_bytes(out / "model.safetensors",
                       save({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}))
    atomic_write_json(out / "final.json", {
        **final, "train_images": train_images, "class_names": class_names, "image_size": size,
        "arch": cfg.arch, "mean": mean_values, "std": std_values,
        "train_counts": real_counts.tolist(), "steps": total, "seconds": result.seconds,
        "config": config_to_dict(cfg)})
    (out / "checkpoint.safetensors").unlink(missing_ok=True)
    shutil.rmtree(out / "rank-rng", ignore_errors=True)
    record.finish({"accuracy": final["accuracy"], "balanced_accuracy": final["balanced_accuracy"],
                   "buckets": final["buckets"], "resumed_from_epoch": start_epoch, "processes": ranks.world})
    return result


class LoadedClassifier(NamedTuple):
    model: torch.nn.Module  # in eval mode
    class_names: list[str]
    image_size: int
    mean: torch.Tensor  # (1, 3, 1, 1): inputs are (pixels / 255 - mean) / std
    std: torch.Tensor


def load_classifier(folder: str | Path, device: str = "cpu") -> LoadedClassifier:
    """The model, class names, image size and input normalization of a finished train-classifier run."""
    from ..artefacts import read_json_object, read_safetensors

    folder = Path(folder)
    if not (folder / "final.json").is_file() or not (folder / "model.safetensors").is_file():
        raise DataError("not a finished train-classifier run (final.json or model.safetensors missing)",
                        where=str(folder), fix="train one with `genaug train-classifier`")
    final = read_json_object(folder / "final.json", "classifier record")
    model = create_classifier(final["arch"], len(final["class_names"]), int(final["image_size"]))
    weights, _ = read_safetensors(folder / "model.safetensors")
    model.load_state_dict(weights)
    from ..pretrain.data import CLIP_MEAN, CLIP_STD

    # Runs from before pretrained backbones all normalized with CLIP's statistics.
    mean, std = final.get("mean", list(CLIP_MEAN)), final.get("std", list(CLIP_STD))
    return LoadedClassifier(model.to(device).eval(), list(final["class_names"]), int(final["image_size"]),
                            torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))


def _finished_run(cfg: ClassifierConfig) -> ClassifierResult | None:
    """The result of a run that already finished in ``cfg.output`` asking for the same settings (options
    added to genaug since at their defaults), so that a rerun, like a resumed one, does no work twice."""
    out = Path(cfg.output)
    try:
        final = json.loads((out / "final.json").read_text())
    except (OSError, ValueError):
        return None
    if not (out / "model.safetensors").is_file() or not same_settings(final.get("config"), cfg):
        return None
    print(f"train-classifier: {out} already holds this finished run (test accuracy {final['accuracy']}); "
          "delete it to train again", file=sys.stderr)
    return ClassifierResult(out, final["accuracy"], final["balanced_accuracy"], final["buckets"],
                            final["per_class"], final["train_images"], final["seconds"], final["steps"],
                            _read_summary(out / "summary.csv"))


def _read_summary(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
