"""A tiny CLIP-style dual encoder trained from scratch on a captioned image pool.

The model is a plain ``transformers.CLIPModel`` built from a small config, trained with CLIP's
symmetric InfoNCE loss and learnable temperature, and saved as a standard transformers folder
(weights, tokenizer, image processor), so every consumer loads it exactly like a real CLIP
checkpoint: ``CLIPModel.from_pretrained(folder)``, ``CLIPTokenizer.from_pretrained(folder)``,
``CLIPImageProcessor.from_pretrained(folder)``. :func:`export_encoders` splits it into the two
towers a diffusion model consumes (text hidden states for cross-attention, projected image
embeddings for unCLIP-style conditioning).
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artefacts import atomic_write_json
from ..config import config_to_dict, option
from ..errors import ModelError
from .data import CLIP_MEAN, CLIP_STD, ImageSplit

DUAL_ENCODER_JSON = "genaug_dual_encoder.json"


@dataclass
class DualEncoderConfig:
    """Architecture and training settings of the embedded CLIP-style dual encoder."""

    image_size: int = option(32, "image side in pixels the vision tower takes")
    patch_size: int = option(4, "vision patch side in pixels (image_size must be a multiple)")
    vision_width: int = option(128, "hidden size of the vision transformer")
    vision_layers: int = option(4, "transformer layers of the vision tower")
    vision_heads: int = option(4, "attention heads of the vision tower")
    text_width: int = option(128, "hidden size of the text transformer")
    text_layers: int = option(4, "transformer layers of the text tower")
    text_heads: int = option(4, "attention heads of the text tower")
    mlp_ratio: int = option(4, "MLP hidden size as a multiple of the width, in both towers")
    projection_dim: int = option(64, "size of the shared image-text embedding space")
    max_text_length: int = option(32, "tokens per caption, BOS and EOS included (longer captions are cut)")
    steps: int = option(1000, "optimizer steps (1000 x 128 pairs: ~10 min on 2 CPU cores)")
    batch_size: int = option(128, "image-caption pairs per step (also the number of negatives)")
    learning_rate: float = option(2e-3, "peak AdamW learning rate")
    warmup_steps: int = option(50, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = option(0.05, "learning rate at the end of the cosine, as a fraction of the peak")
    weight_decay: float = option(0.1, "AdamW weight decay on weight matrices (not on norms, biases, "
                                      "embeddings or the temperature)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 turns clipping off)")
    init_temperature: float = option(0.07, "initial softmax temperature (CLIP's 0.07)")
    max_logit_scale: float = option(100.0, "upper bound on the learned inverse temperature (CLIP's 100)")
    crop_scale_min: float = option(0.8, "random resized crop keeps at least this fraction of the image area "
                                        "(mild: captions name the object's size; 1 turns cropping off)")
    hard_negatives: bool = option(True, "add one attribute-swapped caption per image as an extra negative "
                                        "(NegCLIP): the main object's shape or pattern word replaced by another "
                                        "one from the pool; needs 'shape'/'pattern' labels in the pool metadata")
    attribute_loss_weight: float = option(0.5, "weight of an auxiliary loss that classifies the main object's "
                                               "labelled attributes (attribute_keys) from the image embedding; "
                                               "a ViT this small learns shape far faster with it (0 turns it off)")
    attribute_keys: list[str] = option(help="pool metadata keys the auxiliary loss predicts (when present)",
                                       factory=lambda: ["shape", "pattern"])
    horizontal_flip: bool = option(True, "flip images left-right at random (shape and pattern names are "
                                         "flip-invariant)")
    bf16: bool = option(True, "train under bfloat16 autocast where the CPU or GPU computes bf16 natively "
                              "(weights and the loss stay float32); ignored elsewhere")
    attention: str = option("auto", "attention kernel while training: eager, sdpa, or auto (eager on the CPU, "
                                    "where PyTorch's fused SDPA backward costs over 10x its forward at these "
                                    "17-20 token sequences; sdpa elsewhere); the saved model loads with the default")
    seed: int = option(0, "seed of initialization, batch order and augmentation")
    progress: bool = option(True, "show a progress bar with the loss")

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                     "text_layers", "text_heads", "mlp_ratio", "projection_dim", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width ({self.vision_width}) must be divisible by vision_heads "
                             f"({self.vision_heads})")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width ({self.text_width}) must be divisible by text_heads ({self.text_heads})")
        if not 3 <= self.max_text_length <= 512:
            raise ValueError(f"max_text_length must be in [3, 512], got {self.max_text_length}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2: a contrastive batch needs negatives")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.attribute_loss_weight < 0:
            raise ValueError(f"attribute_loss_weight must be non-negative, got {self.attribute_loss_weight}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be non-negative")
        if not 0.0 < self.init_temperature < 1.0:
            raise ValueError(f"init_temperature must be in (0, 1), got {self.init_temperature}")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ValueError(f"max_logit_scale ({self.max_logit_scale}) must be >= 1/init_temperature")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")


@dataclass
class DualEncoderResult:
    """What training produced: where it is saved, how it went, what the held-out split scored."""

    out_dir: str
    steps: int
    seconds: float
    num_parameters: int
    final_loss: float
    logit_scale: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    # What the towers computed in: `bf16` is honoured only where the hardware computes bf16 natively,
    # so the same config trains at different precision (and to different weights) on other CPUs.
    precision: str = "float32"
    attention: str = "sdpa"  # the attention kernel training ran ("auto" resolved)


# --------------------------------------------------------------------------- model
def build_dual_encoder(cfg: DualEncoderConfig, vocab_size: int, *, bos_token_id: int | None = None,
                       eos_token_id: int | None = None, pad_token_id: int | None = None):
    """A randomly initialized ``CLIPModel`` of ``cfg``'s size for a tokenizer of ``vocab_size`` tokens.

    The special ids default to the layout of :func:`genaug.models.tokenizer.build_clip_tokenizer`
    (``<|startoftext|>``, ``<|endoftext|>`` last, padding with ``<|endoftext|>``). They matter: the
    text tower pools at the *first* EOS id, so a wrong ``eos_token_id`` silently pools a random token.
    """
    from transformers import CLIPConfig, CLIPModel

    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    bos = vocab_size - 2 if bos_token_id is None else bos_token_id
    pad = eos if pad_token_id is None else pad_token_id
    if eos == 2:
        # transformers treats eos_token_id == 2 as a legacy config and pools at argmax(input_ids).
        raise ValueError("eos_token_id 2 is reserved by transformers' legacy CLIP pooling; use another id")
    text_config = dict(vocab_size=vocab_size, hidden_size=cfg.text_width,
                       intermediate_size=cfg.text_width * cfg.mlp_ratio, num_hidden_layers=cfg.text_layers,
                       num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_text_length,
                       projection_dim=cfg.projection_dim, hidden_act="gelu",
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    vision_config = dict(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_width * cfg.mlp_ratio,
                         num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                         image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                         projection_dim=cfg.projection_dim, hidden_act="gelu")
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=cfg.projection_dim,
                        logit_scale_init_value=math.log(1.0 / cfg.init_temperature))
    # Initialization draws from the global generator: seed a forked copy, leave the caller's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return CLIPModel(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_encoders(model) -> tuple[Any, Any]:
    """Copies of the two towers as ``(CLIPTextModel, CLIPVisionModelWithProjection)``, in eval mode.

    The diffusion model reads the text tower's ``last_hidden_state`` (cross-attention) and the
    vision tower's projected ``image_embeds`` (unCLIP-style image conditioning); their outputs
    equal ``model``'s own text hidden states and ``get_image_features``.
    """
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text_config = copy.deepcopy(model.config.text_config)
    vision_config = copy.deepcopy(model.config.vision_config)
    vision_config.projection_dim = model.config.projection_dim
    text = CLIPTextModel(text_config)
    text.load_state_dict(model.text_model.state_dict())
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    dtype = next(model.parameters()).dtype
    return text.to(dtype).eval(), vision.to(dtype).eval()


def build_image_processor(image_size: int):
    """A ``CLIPImageProcessor`` that maps an image to the dual encoder's input (size and CLIP normalization)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
                              crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                              image_std=list(CLIP_STD), do_convert_rgb=True)


# --------------------------------------------------------------------------- augmentation
def random_crop_flip(images: torch.Tensor, generator: torch.Generator, *, scale_min: float = 0.8,
                     ratio: tuple[float, float] = (0.9, 1.1), flip: bool = True) -> torch.Tensor:
    """Random resized crop (area fraction in [scale_min, 1]) and left-right flip of a float batch.

    One ``affine_grid`` + ``grid_sample`` call for the whole batch: per-image PIL transforms would
    cost more than the forward pass of a model this small.
    """
    n = images.shape[0]
    if scale_min >= 1.0 and not flip:
        return images
    area = scale_min + (1.0 - scale_min) * torch.rand(n, generator=generator)
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    # Crop centres stay inside the image; grid coordinates run over [-1, 1].
    cx = (1.0 - width) * (2.0 * torch.rand(n, generator=generator) - 1.0)
    cy = (1.0 - height) * (2.0 * torch.rand(n, generator=generator) - 1.0)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_rotate90(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each square image by a random multiple of 90 degrees (exact: no interpolation).

    With a random flip this covers the 8 symmetries of the square; shapes and patterns keep their
    names under all of them, and objects in the world are drawn at random angles anyway.
    """
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator)
    out = images.clone()
    for k in range(1, 4):
        chosen = (turns == k).nonzero().flatten()
        if len(chosen):
            out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


# --------------------------------------------------------------------------- training
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (emulated bf16 on older CPUs is slower than fp32).

    oneDNN reports bf16 "supported" on any AVX-512 CPU, where it is emulated and ~2x slower than
    float32 (measured); only AVX512_BF16 or AMX make it pay, so the CPU flags decide.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_autocast(enabled: bool, device: torch.device):
    """A bfloat16 autocast context when asked for and native on ``device``, else a no-op context."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and native_bf16(device))


ATTENTION_CHOICES = ("auto", "eager", "sdpa")


def training_attention(choice: str, device: torch.device) -> str:
    """The attention kernel to train with: ``choice``, with "auto" resolved for ``device``.

    On the CPU, PyTorch's fused SDPA backward is far slower than plain matmul attention at the
    embedded models' short sequences (measured in ``benchmarks/pretrain_step_costs.py``); on a GPU
    the fused kernels win.
    """
    if choice == "auto":
        return "eager" if torch.device(device).type == "cpu" else "sdpa"
    return choice


def autocast_precision(enabled: bool, device: torch.device) -> str:
    """What :func:`bf16_autocast` computes in on ``device``: "bfloat16" or "float32" (for run records)."""
    return "bfloat16" if enabled and native_bf16(device) else "float32"


def contrastive_loss(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, *, bf16: bool = False,
                     negative_ids: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (see :func:`contrastive_loss_and_embeds`)."""
    return contrastive_loss_and_embeds(model, input_ids, pixel_values, bf16=bf16, negative_ids=negative_ids)[0]


def contrastive_loss_and_embeds(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, *, bf16: bool = False,
                                negative_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE loss with the model's learnable temperature, and the unit image embeddings.

    Without ``negative_ids`` it is the value of ``model(..., return_loss=True).loss``, but only the
    towers run under bf16 autocast: the normalized similarities and the softmax stay float32, where
    bf16's 8-bit mantissa would blur the small logit gaps between near-duplicate captions.
    ``negative_ids`` (NegCLIP) are extra captions that describe no image of the batch; they join the
    image-to-text softmax as negatives only.
    """
    with bf16_autocast(bf16, pixel_values.device):
        image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
        if negative_ids is not None:
            # One text pass for both: pad the shorter id block with its own last column (padding).
            width = max(input_ids.shape[1], negative_ids.shape[1])
            both = torch.cat([_pad_ids(input_ids, width), _pad_ids(negative_ids, width)])
            all_text = model.get_text_features(input_ids=both).pooler_output
            text_embeds, negative_embeds = all_text[: len(input_ids)], all_text[len(input_ids):]
        else:
            text_embeds = model.get_text_features(input_ids=input_ids).pooler_output
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    scale = model.logit_scale.exp()
    logits_per_text = scale * text_embeds @ image_embeds.T
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    logits_per_image = logits_per_text.T
    if negative_ids is not None:
        negatives = F.normalize(negative_embeds.float(), dim=-1)
        logits_per_image = torch.cat([logits_per_image, scale * image_embeds @ negatives.T], dim=1)
    loss = 0.5 * (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_image, targets))
    return loss, image_embeds


def _pad_ids(ids: torch.Tensor, width: int) -> torch.Tensor:
    if ids.shape[1] >= width:
        return ids
    return torch.cat([ids, ids[:, -1:].expand(-1, width - ids.shape[1])], dim=1)


def attribute_swapped_caption(caption: str, shape: str, pattern: str, shapes: list[str], patterns: list[str],
                              rng: torch.Generator) -> str | None:
    """``caption`` with its main object's shape or pattern word replaced by another one (a NegCLIP negative).

    The main object is named first in every caption, so the first whole-word match is its word. A
    plain object whose caption leaves "plain" unsaid gets a pattern word put before its shape.
    Returns None when the caption does not name ``shape`` (nothing safe to swap).
    """
    match = re.search(rf"\b(?:(\w+) )?{re.escape(shape)}\b", caption)
    if match is None:
        return None
    other_shapes = [s for s in shapes if s != shape]
    other_patterns = [p for p in patterns if p != pattern]
    swap_shape = not other_patterns or (other_shapes and torch.rand(1, generator=rng).item() < 0.5)
    if swap_shape:
        if not other_shapes:
            return None
        new = other_shapes[int(torch.randint(len(other_shapes), (1,), generator=rng))]
        start, end = match.start() + (len(match.group(1)) + 1 if match.group(1) else 0), match.end()
        return caption[:start] + new + caption[end:]
    new = other_patterns[int(torch.randint(len(other_patterns), (1,), generator=rng))]
    if match.group(1) == pattern:  # "red striped circle" -> "red dotted circle"
        return caption[:match.start()] + new + caption[match.start() + len(pattern):]
    start = match.end() - len(shape)  # pattern left unsaid: "red circle" -> "red dotted circle"
    return caption[:start] + new + " " + caption[start:]


def attribute_targets(split: ImageSplit, keys: list[str]) -> dict[str, tuple[list[str], torch.Tensor]]:
    """``{key: (value names, per-image value index)}`` for each of ``keys`` every record of ``split`` carries."""
    targets = {}
    for key in keys:
        if split.records and all(key in r for r in split.records):
            values = sorted({str(r[key]) for r in split.records})
            lookup = {v: i for i, v in enumerate(values)}
            targets[key] = (values, torch.tensor([lookup[str(r[key])] for r in split.records]))
    return targets


def hard_negative_captions(split: ImageSplit, seed: int) -> list[str] | None:
    """One attribute-swapped caption per image of ``split``, or None when it lacks shape/pattern labels.

    Images whose caption cannot be swapped keep their own caption as a stand-in negative: the
    positive is then also present among the negatives, which only weakens that one term.
    """
    if not split.records or not all("shape" in r and "pattern" in r for r in split.records):
        return None
    shapes = sorted({str(r["shape"]) for r in split.records})
    patterns = sorted({str(r["pattern"]) for r in split.records})
    rng = torch.Generator().manual_seed(seed + 7919)
    negatives = []
    for caption, record in zip(split.captions, split.records):
        swapped = attribute_swapped_caption(caption, str(record["shape"]), str(record["pattern"]), shapes, patterns,
                                            rng)
        negatives.append(caption if swapped is None else swapped)
    return negatives


def tokenize_captions(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All captions as ``(input_ids (N, max_length), lengths (N,))``; padding is the tokenizer's pad id."""
    encoded = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"].sum(dim=1)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups that decay weight matrices and conv kernels only.

    Decaying norm gains, biases, position/token embeddings or the temperature would pull them
    toward meaningless zeros.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim >= 2 and "embedding" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, cfg: DualEncoderConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def train_dual_encoder(cfg: DualEncoderConfig, pool: ImageSplit, tokenizer, out_dir: str | Path,
                       eval_split: ImageSplit | None = None,
                       device: str | torch.device = "cpu") -> DualEncoderResult:
    """Train a dual encoder on ``pool``'s image-caption pairs and save it to ``out_dir``.

    ``eval_split`` (held-out captioned images) is scored after training: text-to-image recall@1/5/10
    and zero-shot accuracy over its class names. Same config, data, seed and thread count give the
    same weights. The tokenizer's ``model_max_length`` is set to ``cfg.max_text_length``. Batches
    are drawn and augmented on the CPU and trained on ``device``; the saved model is on the CPU.
    """
    from ..evaluate.metrics import clip_image_features, clip_text_features, recall_at_k, zero_shot_accuracy

    if len(pool) < 2:
        raise ValueError("the pool needs at least 2 image-caption pairs")
    if tuple(pool.images.shape[-2:]) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"pool images are {tuple(pool.images.shape[-2:])}, the config expects "
                         f"{cfg.image_size}x{cfg.image_size}")
    started = time.perf_counter()
    tokenizer.model_max_length = cfg.max_text_length
    tokenizer.init_kwargs["model_max_length"] = cfg.max_text_length  # so save_pretrained keeps it
    model = build_dual_encoder(cfg, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = torch.device(device)
    model.to(device)
    default_attention = model.config._attn_implementation
    attention = training_attention(cfg.attention, device)
    model.set_attn_implementation(attention)
    input_ids, lengths = tokenize_captions(tokenizer, pool.captions, cfg.max_text_length)
    negatives = hard_negative_captions(pool, cfg.seed) if cfg.hard_negatives else None
    if negatives is not None:
        negative_ids, negative_lengths = tokenize_captions(tokenizer, negatives, cfg.max_text_length)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    # Auxiliary attribute heads read the unit image embedding; they are dropped after training.
    attributes = attribute_targets(pool, cfg.attribute_keys) if cfg.attribute_loss_weight > 0 else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        heads = torch.nn.ModuleDict({key: torch.nn.Linear(cfg.projection_dim, len(values))
                                     for key, (values, _) in attributes.items()}).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay) + [{"params": list(heads.parameters()),
                                  "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, len(pool))
    max_log_scale = math.log(cfg.max_logit_scale)
    order = torch.randperm(len(pool), generator=generator)
    cursor = 0
    history: list[tuple[int, float]] = []
    smoothed = float("nan")
    model.train()
    bar = tqdm(range(cfg.steps), desc="dual encoder", disable=not cfg.progress, mininterval=1.0)
    for step in bar:
        if cursor + batch_size > len(pool):  # a new epoch: reshuffle, drop the ragged tail
            order = torch.randperm(len(pool), generator=generator)
            cursor = 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        pixels = random_crop_flip(pool.images[index].float() / 255.0, generator, scale_min=cfg.crop_scale_min,
                                  flip=cfg.horizontal_flip)
        pixels = ((pixels - mean) / std).to(device)
        # Every caption ends at its first EOS and the mask is causal, so the padding past the
        # batch's longest caption cannot change a pooled feature: cut it off to save compute.
        ids = input_ids[index, : int(lengths[index].max())].to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        negative_batch = None
        if negatives is not None:
            negative_batch = negative_ids[index, : int(negative_lengths[index].max())].to(device)
        loss, image_embeds = contrastive_loss_and_embeds(model, ids, pixels, bf16=cfg.bf16,
                                                         negative_ids=negative_batch)
        for key, (_, labels) in attributes.items():
            # The head sees a temperature-free unit embedding: scale its logits like CLIP's.
            logits = heads[key](image_embeds) * 10.0
            target = labels[index].to(device)
            loss = loss + cfg.attribute_loss_weight / len(attributes) * F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_log_scale)
        value = float(loss.detach())
        smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
        if step % 10 == 0 or step == cfg.steps - 1:
            history.append((step, round(value, 5)))
            bar.set_postfix(loss=f"{smoothed:.3f}", T=f"{1 / model.logit_scale.exp().item():.3f}", refresh=False)
    bar.close()
    model.to("cpu").eval()
    model.set_attn_implementation(default_attention)  # what from_pretrained gives: evaluate as users will run it
    train_seconds = time.perf_counter() - started

    metrics: dict[str, float] = {}
    if eval_split is not None and len(eval_split) > 0:
        image_feats = clip_image_features(model, eval_split.images)
        text_feats = clip_text_features(model, tokenizer, eval_split.captions)
        for k in (1, 5, 10):
            metrics[f"recall@{k}"] = recall_at_k(text_feats, image_feats, k)
        metrics["zero_shot_top1"] = zero_shot_accuracy(model, tokenizer, eval_split.images, eval_split.labels,
                                                       eval_split.class_names)
        metrics["eval_images"] = float(len(eval_split))

    result = DualEncoderResult(out_dir=str(out_dir), steps=cfg.steps, seconds=round(train_seconds, 2),
                               num_parameters=count_parameters(model), final_loss=history[-1][1] if history else
                               float("nan"), logit_scale=float(model.logit_scale.detach().exp()), loss_history=history,
                               eval_metrics=metrics,
                               precision=autocast_precision(cfg.bf16, device), attention=attention)
    save_dual_encoder(model, tokenizer, out_dir, cfg, result)
    return result


def save_dual_encoder(model, tokenizer, out_dir: str | Path, cfg: DualEncoderConfig | None = None,
                      result: DualEncoderResult | None = None) -> Path:
    """Write a standard transformers CLIP folder: safetensors weights, tokenizer, image processor.

    genaug's own record (training config and result) goes last, so its presence marks a complete folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    build_image_processor(model.config.vision_config.image_size).save_pretrained(out_dir)
    record: dict[str, Any] = {"format": "genaug-dual-encoder", "version": 1}
    if cfg is not None:
        record["config"] = config_to_dict(cfg)
    if result is not None:
        record["result"] = {k: v for k, v in result.__dict__.items() if k != "loss_history"}
    atomic_write_json(out_dir / DUAL_ENCODER_JSON, record)
    return out_dir


def load_dual_encoder(folder: str | Path):
    """``(CLIPModel, CLIPTokenizer)`` from a saved folder, in eval mode; weights from safetensors only."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise ModelError("no model.safetensors in the folder", where=str(folder),
                         fix="train it with genaug pretrain (only safetensors weights are loaded)")
    model = CLIPModel.from_pretrained(folder, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


__all__ = ["DualEncoderConfig", "DualEncoderResult", "build_dual_encoder", "train_dual_encoder", "export_encoders",
           "save_dual_encoder", "load_dual_encoder", "build_image_processor", "random_crop_flip",
           "random_rotate90", "contrastive_loss", "contrastive_loss_and_embeds", "attribute_targets",
           "attribute_swapped_caption", "hard_negative_captions", "tokenize_captions", "count_parameters",
           "param_groups",
           "autocast_precision", "bf16_autocast", "native_bf16", "training_attention", "ATTENTION_CHOICES"]
