"""The oracle: a classifier trained on balanced real images that judges generated ones.

It is trained on the world's balanced ``oracle`` split with ``bench/val`` for model selection
(the epoch with the best validation accuracy is kept), and saved as ``model.safetensors`` plus a
``config.json`` that holds everything needed to rebuild and feed it (architecture, classes,
image size, normalization). :func:`load_oracle` reads only safetensors weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artefacts import atomic_write_bytes, atomic_write_json, read_json_object
from ..config import config_to_dict, option
from ..errors import DataError, ModelError
from .clip import autocast_precision, bf16_autocast, param_groups, random_crop_flip, random_rotate90
from .data import CLIP_MEAN, CLIP_STD, ImageSplit

ORACLE_FORMAT = "genaug-oracle"
ORACLE_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class OracleConfig:
    """Training settings of the oracle classifier."""

    arch: str = option("genaug_cnn_small", "timm architecture (genaug_cnn_tiny, genaug_cnn_small or any timm "
                                           "model name; always trained from scratch)")
    epochs: int = option(80, "passes over the training images (80 x 7,200 images: ~12 min on one CPU core)")
    batch_size: int = option(64, "images per optimizer step")
    learning_rate: float = option(3e-3, "peak AdamW learning rate, decayed to zero by a cosine")
    warmup_epochs: float = option(1.0, "epochs of linear warmup before the cosine")
    weight_decay: float = option(0.05, "AdamW weight decay on conv and linear weights")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    crop_scale_min: float = option(0.7, "random resized crop keeps at least this fraction of the image area "
                                        "(1 turns cropping off)")
    horizontal_flip: bool = option(True, "flip left-right at random (shapes and patterns are flip-invariant)")
    rotate90: bool = option(True, "rotate by a random multiple of 90 degrees (objects are drawn at any angle)")
    zero_init_last: bool = option(True, "start each residual block's last BatchNorm at zero, as the shipped oracle "
                                        "did (genaug_cnn_* and timm ResNets). Off, the oracle reached 0.956 "
                                        "validation accuracy in 30 epochs against 0.850 on (benchmarks/RESULTS.md)")
    permute_channels: bool = option(False, "shuffle the RGB channels at random, for a judge that ignores colour "
                                           "entirely (costs ~4 points of test accuracy at 40 epochs)")
    bf16: bool = option(True, "train under bfloat16 autocast where the CPU or GPU computes bf16 natively "
                              "(about 1.5x faster on AVX512-BF16 CPUs); ignored elsewhere")
    seed: int = option(0, "seed of initialization, batch order and augmentation")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not self.arch.strip():
            raise ValueError("arch must name a timm architecture")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


@dataclass
class OracleResult:
    """Where the oracle is saved, its selected epoch's validation accuracy and the training time."""

    out_dir: str
    val_accuracy: float
    best_epoch: int
    seconds: float
    num_parameters: int
    history: list[dict[str, float]] = field(default_factory=list)


class Oracle:
    """A loaded oracle: ``predict`` and ``features`` take uint8 images (N, 3, H, W) of any size."""

    def __init__(self, model: torch.nn.Module, class_names: list[str], image_size: int,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        self.model = model.eval()
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "Oracle":
        self.model.to(device)
        return self

    def _inputs(self, images_uint8: torch.Tensor) -> torch.Tensor:
        if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images_uint8.shape)}")
        x = images_uint8.float() / 255.0
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        # channels_last: oneDNN's convolutions run ~1.4x faster on CPU in this layout.
        return ((x - self.mean) / self.std).to(self.device).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Class logits (N, C) on the CPU."""
        out = [self.model(self._inputs(images_uint8[i:i + batch])).float().cpu()
               for i in range(0, len(images_uint8), batch)]
        return torch.cat(out) if out else torch.empty(0, len(self.class_names))

    def predict(self, images_uint8: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels (N,), probabilities (N, C))``: the predicted class and the softmax over classes."""
        probs = self.logits(images_uint8, batch).softmax(dim=1)
        return probs.argmax(dim=1), probs

    @torch.no_grad()
    def features(self, images_uint8: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Penultimate (pooled, pre-logit) features (N, F) on the CPU, e.g. for FID/KID in the oracle's space."""
        out = [self.model.forward_head(self.model.forward_features(self._inputs(images_uint8[i:i + batch])),
                                       pre_logits=True).float().cpu()
               for i in range(0, len(images_uint8), batch)]
        return torch.cat(out) if out else torch.empty(0, self.model.num_features)


def _create_model(arch: str, num_classes: int, zero_init_last: bool = True) -> torch.nn.Module:
    import timm

    from ..evaluate.backbones import takes_zero_init_last  # (importing it registers genaug_cnn_* in timm)

    try:  # timm's "Unknown model" is a RuntimeError
        kwargs = {"zero_init_last": zero_init_last} if takes_zero_init_last(arch) else {}
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        raise ModelError(f"cannot build oracle architecture {arch!r} ({exc})",
                         fix="use genaug_cnn_small, genaug_cnn_tiny or a timm model name") from None


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to ``peak``, then a cosine down to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _augment(images_uint8: torch.Tensor, cfg: OracleConfig, generator: torch.Generator) -> torch.Tensor:
    x = random_crop_flip(images_uint8.float() / 255.0, generator, scale_min=cfg.crop_scale_min,
                         flip=cfg.horizontal_flip)
    if cfg.rotate90 and x.shape[-1] == x.shape[-2]:
        x = random_rotate90(x, generator)
    if cfg.permute_channels:
        # One of the 6 RGB orders per image, gathered in a single indexing op.
        orders = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
        chosen = orders[torch.randint(0, 6, (len(x),), generator=generator)]
        x = torch.gather(x, 1, chosen[:, :, None, None].expand(-1, -1, *x.shape[-2:]))
    return x


def train_oracle(cfg: OracleConfig, train: ImageSplit, val: ImageSplit, out_dir: str | Path,
                 device: str | torch.device = "cpu") -> OracleResult:
    """Train the oracle on ``train``, keep the epoch that scores best on ``val``, save it to ``out_dir``.

    Batches are drawn and augmented on the CPU (seeded, so the draws do not depend on ``device``)
    and then moved to ``device``.
    """
    device = torch.device(device)
    if train.class_names != val.class_names:
        raise DataError("train and validation splits have different class names",
                        fix="use splits of the same benchmark")
    if len(train) < 2 or len(val) < 1:
        raise DataError("the oracle needs at least 2 training and 1 validation image")
    if train.images.shape[-1] != train.images.shape[-2]:
        raise DataError(f"oracle images must be square, got {tuple(train.images.shape[-2:])}")
    started = time.perf_counter()
    num_classes = len(train.class_names)
    image_size = int(train.images.shape[-1])
    # Initialization draws from the global generator: seed a forked copy, leave the caller's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _create_model(cfg.arch, num_classes, cfg.zero_init_last)
    model = model.to(device, memory_format=torch.channels_last)
    oracle = Oracle(model, train.class_names, image_size)
    mean, std = oracle.mean, oracle.std
    train_labels = train.labels.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    # AdamW over SGD: on a few thousand steps it learns the shapes markedly faster here.
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch_size  # the ragged tail is dropped: BatchNorm dislikes tiny batches
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    best_state: dict[str, torch.Tensor] = {}
    best_accuracy, best_epoch, history = -1.0, 0, []
    step = 0
    bar = tqdm(total=total, desc="oracle", disable=not cfg.progress, mininterval=1.0)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        running = 0.0
        for batch_index in range(steps_per_epoch):
            index = order[batch_index * batch_size:(batch_index + 1) * batch_size]
            x = ((_augment(train.images[index], cfg, generator) - mean) / std).to(device).contiguous(
                memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, cfg.learning_rate)
            with bf16_autocast(cfg.bf16, x.device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), train_labels[index.to(device)], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach())
            step += 1
            bar.update(1)
        model.eval()
        predicted, _ = oracle.predict(val.images)
        accuracy = float((predicted == val.labels).float().mean())
        history.append({"epoch": epoch, "train_loss": round(running / steps_per_epoch, 5),
                        "val_accuracy": round(accuracy, 5)})
        bar.set_postfix(loss=f"{running / steps_per_epoch:.3f}", val=f"{accuracy:.3f}", refresh=False)
        if accuracy >= best_accuracy:  # ties go to the later epoch: it has seen more, at a lower lr
            best_accuracy, best_epoch = accuracy, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    model.load_state_dict(best_state)
    oracle.to("cpu")
    seconds = round(time.perf_counter() - started, 2)
    result = OracleResult(out_dir=str(out_dir), val_accuracy=best_accuracy, best_epoch=best_epoch, seconds=seconds,
                          num_parameters=sum(p.numel() for p in model.parameters()), history=history)
    save_oracle(oracle, out_dir, cfg.arch, extra={"train_config": config_to_dict(cfg),
                                                  "val_accuracy": best_accuracy, "best_epoch": best_epoch,
                                                  "train_images": len(train), "seconds": seconds,
                                                  "precision": autocast_precision(cfg.bf16, device)})
    return result


def save_oracle(oracle: Oracle, out_dir: str | Path, arch: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` then ``config.json`` (last, so its presence marks a complete folder)."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in oracle.model.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS, save(state, metadata={"format": ORACLE_FORMAT}))
    config = {"format": ORACLE_FORMAT, "version": ORACLE_VERSION, "arch": arch,
              "num_classes": len(oracle.class_names), "class_names": oracle.class_names,
              "image_size": oracle.image_size,
              "normalization": {"mean": oracle.mean.flatten().tolist(), "std": oracle.std.flatten().tolist()},
              **(extra or {})}
    atomic_write_json(out_dir / CONFIG, config)
    return out_dir


def load_oracle(folder: str | Path, device: str | torch.device = "cpu") -> Oracle:
    """Load an oracle saved by :func:`train_oracle`; only a real safetensors file is read as weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not weights_path.is_file():
        raise ModelError(f"an oracle folder needs {WEIGHTS}", where=str(folder),
                         fix="train one with genaug pretrain (only safetensors weights are loaded)")
    # config.json is written last, so its absence also marks an interrupted training run.
    config = read_json_object(config_path, "oracle", ModelError)
    if config.get("format") != ORACLE_FORMAT:
        raise ModelError("not a genaug oracle config", where=str(config_path))
    class_names = config.get("class_names")
    if not isinstance(class_names, list) or config.get("num_classes") != len(class_names):
        raise ModelError("class_names and num_classes disagree", where=str(config_path))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"not a valid safetensors file ({exc})", where=str(weights_path),
                         fix="only safetensors weights are loaded (never pickles); retrain the oracle") from None
    model = _create_model(str(config["arch"]), len(class_names))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"weights do not fit architecture {config['arch']!r} ({first})", where=str(weights_path),
                         fix="retrain the oracle") from None
    norm = config.get("normalization", {})
    oracle = Oracle(model, class_names, int(config["image_size"]), tuple(norm.get("mean", CLIP_MEAN)),
                    tuple(norm.get("std", CLIP_STD)))
    model.to(memory_format=torch.channels_last)
    return oracle.to(device)


__all__ = ["OracleConfig", "OracleResult", "Oracle", "train_oracle", "save_oracle", "load_oracle"]
