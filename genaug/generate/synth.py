"""The synthesis engine: plan every image up front, then generate the missing ones in batches.

Planning is deterministic: each planned image has an id, a label, a prompt and its own seed
(derived from the run seed and the id), so image ``i`` comes out the same whatever the batch
size or resume point. Generation skips ids the output dataset already holds, so a killed run
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artefacts import (METADATA, DatasetWriter, GenaugDataset, discard_partial_writes, read_dataset,
                         read_metadata_lines, safe_child, slugify)
from ..budget import check_budget, images_per_class_budget
from ..config import option
from ..errors import ConfigError, ModelError
from ..models.loading import compile_unet, default_resolution, load_pipeline, pipeline_family, resolve_device
from ..runs import RunRecord
from .prompts import DEFAULT_TEMPLATES, fill
from .sampler import PIPELINE_STATE, Conditioning, Sampler, to_pil


def item_seed(run_seed: int, item_id: str) -> int:
    """A 63-bit seed from the run seed and the item id: stable across batching, sharding and resume."""
    digest = hashlib.sha256(f"{run_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


AUGCOND_PARTS = ("none", "pixel_mixup", "pixel_cutmix", "embed_mixup", "embed_cutmix", "embed_dropout", "img2img")


@dataclass
class SynthConfig:
    """Generate a synthetic dataset (genaug/imagefolder format) with a diffusion model."""

    model: str = option("models/tiny-sd15", "generator: a diffusers folder or a cached hub id")
    output: str = option("datasets/synth", "output dataset folder (resumed if it exists)")
    method: str = option("text", "synthesis method (registry name); see `genaug synth --list-methods`")
    real_data: str | None = option(None, "real dataset (genaug or imagefolder); sets the classes and the budget")
    class_names: list[str] = option(help="class names, when no real dataset is given", factory=list)
    images_per_class: int = option(0, "budget: this many images for every class")
    per_real: int = option(0, "budget: M images per real training image (DA-Fusion's M)")
    balance_to: int = option(0, "budget: top every class up to N images counting the real ones (long-tail)")
    prompt_templates: list[str] = option(help="prompt templates, '{}' is the class name", factory=lambda: list(DEFAULT_TEMPLATES))
    negative_prompt: str = option("", "negative prompt for every image")
    guidance_scale: float = option(7.5, "classifier-free guidance scale")
    strength: float = option(0.5, "img2img/diagen: SDEdit strength (share of the denoising steps run)")
    strength_choices: list[float] = option(help="img2img/diagen: draw each image's strength from these instead "
                                                "(DA-Fusion's random strength, e.g. 0.25,0.5,0.75,1.0)",
                                           factory=list)
    augcond_mode: str = option("cutmix+dropout", "augcond: conditioning augmentation, '+'-joined from none, "
                                                 "pixel_mixup, pixel_cutmix, embed_mixup, embed_cutmix, "
                                                 "embed_dropout, img2img (SDEdit from the augmented image)")
    mix_alpha: float = option(1.0, "augcond: MixUp/CutMix lambda ~ Beta(alpha, alpha)")
    embed_dropout: float = option(0.4, "augcond: embedding dropout probability")
    image_noise_level: int = option(0, "augcond: unCLIP noise level added to the image embedding (0-999)")
    embedding_noise_std: float = option(0.01, "diagen: std of the Gaussian noise on the class-name token "
                                              "embeddings (DIAGen: 0.005/0.01/0.025)")
    spectrum_levels: list[float] = option(help="spectrum: image-guidance levels; level l runs img2img at "
                                               "strength 1 - l (0: text only, 1: the real image)",
                                          factory=lambda: [0.0, 0.1, 0.3, 0.5, 1.0])
    num_inference_steps: int = option(25, "denoising steps per image")
    resolution: int | None = option(None, "output size in pixels (default: the model's native size)")
    batch_size: int = option(8, "images per pipeline call")
    seed: int = option(0, "run seed; each image's seed derives from it and the image id")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto (fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16")
    xformers: bool = option(False, "use xformers attention (CUDA only; torch SDPA is the default)")
    writer_threads: int = option(2, "threads that encode and write PNGs while the next batch denoises "
                                    "(0: each batch is on disk before the next starts)")
    trace_unet: bool = option(True, "run the UNet as a TorchScript trace (made in about 0.5 s at the first call): "
                                    "the same ops and outputs without diffusers' Python between them, and without "
                                    "the GIL, so worker threads overlap (benchmarks/RESULTS.md); ignored with compile")
    compile: bool = option(False, "torch.compile the UNet: a one-off compile (44 s on 2 CPU cores for the embedded "
                                  "model, seconds with a warm cache) for 1.3x cheaper steps; pays from about 2,400 "
                                  "images cold (benchmarks/RESULTS.md)")
    adapters: list[str] = option(help="adapter folders to load (LoRA, textual inversion, merged), e.g. DA-Fusion's "
                                      "per-class tokens", factory=list)
    adapter_weights: list[float] = option(help="one weight per adapter (LoRA scale; default 1)", factory=list)
    class_adapters: str | None = option(None, "DA-Fusion: a folder written by `genaug train-ti --per-class`; loads "
                                              "every class's inversion and writes each class with its tokens")
    class_words: dict = option(help="words that stand for a class in prompts, e.g. {'dotted star': '<star>'} "
                                    "(default: the class name)", factory=dict)
    shard: str = option("", "i/N: generate only the i-th of N interleaved shares of the plan, into "
                            "OUTPUT/shards/; 'auto' takes i and N from accelerate/torchrun (RANK, WORLD_SIZE)")
    merge_shards: int = option(0, "N: merge the N finished shards in OUTPUT/shards/ into OUTPUT (no generation)")
    workers: int = option(0, "workers on this machine that draw batches at once from one queue, each with an "
                             "equal share of torch's threads (same dataset as 1 worker). 0: auto, 2 on a CPU with 2 "
                             "or more torch threads, else 1 (and 1 with compile or on a GPU). On a CPU, small UNets "
                             "use threads poorly: on 2 cores at batch 24, 2 workers x 1 thread draw 1.4x as fast as "
                             "1 x 2 threads (benchmarks/RESULTS.md)")
    worker_kind: str = option("threads", "threads: the workers are threads of this process sharing one model (no "
                                         "extra memory; batches written in plan order); processes: this process and "
                                         "N-1 spawned ones, each loading the model, merged at the end")

    def __post_init__(self) -> None:
        self.images_per_class = check_budget(self.images_per_class, self.per_real, self.balance_to,
                                             bool(self.real_data))
        if not self.real_data and not self.class_names:
            raise ValueError("give real_data or class_names")
        for name in ("guidance_scale",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be >= 1")
        if self.writer_threads < 0:
            raise ValueError("writer_threads must be >= 0")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError("resolution must be a multiple of 8, at least 8")
        for t in self.prompt_templates:
            fill(t, "x")  # raises on a template without '{}'
        for value in [self.strength, *self.strength_choices, *self.spectrum_levels]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"strengths and spectrum levels must be in [0, 1], got {value}")
        if self.method in ("img2img", "augcond", "spectrum", "diagen") and not self.real_data:
            raise ValueError(f"method {self.method!r} needs real_data (it starts from real images)")
        unknown = set(_augcond_parts(self.augcond_mode)) - set(AUGCOND_PARTS)
        if unknown:
            raise ValueError(f"unknown augcond_mode part(s) {sorted(unknown)}; use {', '.join(AUGCOND_PARTS)}")
        if self.adapter_weights and len(self.adapter_weights) != len(self.adapters):
            raise ValueError("give one adapter weight per adapter (or none)")
        unknown_words = {k: v for k, v in self.class_words.items() if not isinstance(v, str)}
        if unknown_words:
            raise ValueError(f"class_words values must be strings, got {unknown_words}")
        if self.shard and self.shard != "auto":
            parse_shard(self.shard)
        if self.merge_shards < 0:
            raise ValueError("merge_shards must not be negative")
        if self.workers < 0:
            raise ValueError("workers must not be negative (0: auto)")
        if self.worker_kind not in ("threads", "processes"):
            raise ValueError(f"worker_kind must be threads or processes, got {self.worker_kind!r}")
        if self.workers > 1 and self.worker_kind == "processes" and (self.shard or self.merge_shards):
            raise ValueError("worker processes shard and merge by themselves: leave shard and merge_shards unset")
        if self.workers > 1 and self.worker_kind == "threads" and self.compile:
            raise ValueError("a compiled UNet draws in one thread: use workers 1, or worker_kind processes")
        if self.embedding_noise_std < 0:
            raise ValueError("embedding_noise_std must not be negative")
        if not self.mix_alpha > 0 or not 0.0 <= self.embed_dropout < 1.0 or not 0 <= self.image_noise_level < 1000:
            raise ValueError("mix_alpha must be > 0, embed_dropout in [0, 1), image_noise_level in [0, 999]")


@dataclass
class SynthItem:
    """One planned image: everything needed to generate it and to record its provenance."""

    id: str
    label: int
    class_name: str
    prompt: str
    seed: int
    negative_prompt: str = ""
    source: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SynthResult:
    output: Path
    method: str
    planned: int
    generated: int
    skipped_existing: int
    seconds: float
    images_per_second: float


def class_budget(cfg: SynthConfig, class_names: list[str], real: GenaugDataset | None) -> list[int]:
    """How many synthetic images each class gets under the configured budget."""
    counts = real.class_counts().tolist() if real is not None else [0] * len(class_names)
    return images_per_class_budget(counts, images_per_class=cfg.images_per_class, per_real=cfg.per_real,
                                   balance_to=cfg.balance_to)


def plan_text(cfg: SynthConfig, class_names: list[str], real: GenaugDataset | None) -> list[SynthItem]:
    items = []
    for label, (name, n) in enumerate(zip(class_names, class_budget(cfg, class_names, real))):
        for j in range(n):
            item_id = f"{label:04d}-{slugify(name, 32)}-{j:06d}"
            template = cfg.prompt_templates[j % len(cfg.prompt_templates)]
            items.append(SynthItem(item_id, label, name, fill(template, cfg.class_words.get(name, name)), item_seed(cfg.seed, item_id),
                                   cfg.negative_prompt, params={"template": template}))
    return items


def generate_text(pipe, items: list[SynthItem], cfg: SynthConfig, size: int, real: "RealImages | None" = None):
    """Text-to-image; unCLIP-style models sample with the null image condition (text only)."""
    generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
    if pipeline_family(pipe) == "sdxl":
        out = pipe(prompt=[it.prompt for it in items], negative_prompt=[it.negative_prompt for it in items],
                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   height=size, width=size, generator=generators, output_type="pil")
        return out.images
    sampler = Sampler(pipe)
    pos, neg = sampler.encode_text([it.prompt for it in items], [it.negative_prompt for it in items])
    labels = sampler.class_labels(None, 0, generators, len(items))
    cond = Conditioning(pos, neg, labels)
    return to_pil(sampler.sample(cond, generators, size=size, num_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale))


# --------------------------------------------------------------------------- image-based methods
class RealImages:
    """The real dataset's images by record id, resized to the generation size."""

    def __init__(self, real: GenaugDataset):
        self.real = real
        self.index = {self.record_id(i): i for i in range(len(real))}

    def record_id(self, i: int) -> str:
        record = self.real.records[i]
        return str(record.get("id", record["file_name"]))

    def members(self, label: int) -> list[int]:
        return [i for i, r in enumerate(self.real.records) if int(r["label"]) == label]

    def pil(self, record_id: str, size: int):
        from PIL import Image

        image = self.real.image(self.index[record_id])
        return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)

    def unit(self, record_ids: list[str], size: int) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, size, size)."""
        arrays = [np.asarray(self.pil(r, size), dtype=np.float32) for r in record_ids]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _plan_from_real(cfg: SynthConfig, class_names: list[str], real: GenaugDataset | None,
                    extra: Callable[[np.random.Generator, int, int, list[int], RealImages], dict[str, Any]]
                    ) -> list[SynthItem]:
    """Items that each start from a real image: class c's j-th item uses its (j mod n_c)-th real image."""
    if real is None:
        raise ConfigError(f"method {cfg.method!r} needs real images", where="real_data", fix="pass --real-data")
    images = RealImages(real)
    items = []
    for label, (name, n) in enumerate(zip(class_names, class_budget(cfg, class_names, real))):
        members = images.members(label)
        if not members:
            continue  # nothing to start from: the class keeps only what other methods give it
        for j in range(n):
            source = images.record_id(members[j % len(members)])
            item_id = f"{label:04d}-{slugify(name, 32)}-{j:06d}"
            seed = item_seed(cfg.seed, item_id)
            rng = np.random.default_rng(seed)
            template = cfg.prompt_templates[j % len(cfg.prompt_templates)]
            params = {"template": template, **extra(rng, label, j, members, images)}
            items.append(SynthItem(item_id, label, name, fill(template, cfg.class_words.get(name, name)), seed, cfg.negative_prompt,
                                   source=source, params=params))
    return items


def _strength(cfg: SynthConfig, rng: np.random.Generator) -> float:
    return float(rng.choice(cfg.strength_choices)) if cfg.strength_choices else cfg.strength


def plan_img2img(cfg: SynthConfig, class_names: list[str], real: GenaugDataset | None) -> list[SynthItem]:
    return _plan_from_real(cfg, class_names, real, lambda rng, *_: {"strength": _strength(cfg, rng)})


def plan_spectrum(cfg: SynthConfig, class_names: list[str], real: GenaugDataset | None) -> list[SynthItem]:
    levels = cfg.spectrum_levels

    def params(rng, label, j, members, images):
        level = float(levels[j % len(levels)])
        return {"image_guidance": level, "strength": round(1.0 - level, 6)}

    items = _plan_from_real(cfg, class_names, real, params)
    # Every level of one real image before the next image: source j // len(levels), not j.
    images = RealImages(real)
    for item in items:
        members = images.members(item.label)
        j = int(item.id.rsplit("-", 1)[1])
        item.source = images.record_id(members[(j // len(levels)) % len(members)])
    return items


def plan_augcond(cfg: SynthConfig, class_names: list[str], real: GenaugDataset | None) -> list[SynthItem]:
    mode = _augcond_parts(cfg.augcond_mode)

    def params(rng, label, j, members, images):
        partner = images.record_id(members[int(rng.integers(len(members)))])
        lam = float(rng.beta(cfg.mix_alpha, cfg.mix_alpha))
        out: dict[str, Any] = {"augcond_mode": "+".join(mode), "partner": partner, "mix_lambda": round(lam, 6),
                               "image_noise_level": cfg.image_noise_level}
        if "pixel_cutmix" in mode:
            out["cutmix_box"] = _cutmix_box(rng, lam)  # fractions of the side: x0, y0, x1, y1
        if "img2img" in mode:
            out["strength"] = _strength(cfg, rng)
        return out

    return _plan_from_real(cfg, class_names, real, params)


def _augcond_parts(mode: str) -> list[str]:
    """"cutmix+dropout" (the paper's default) is shorthand for pixel_cutmix+embed_dropout."""
    alias = {"cutmix": "pixel_cutmix", "mixup": "pixel_mixup", "dropout": "embed_dropout"}
    return [alias.get(part, part) for part in mode.split("+") if part and part != "none"]


def _cutmix_box(rng: np.random.Generator, lam: float) -> list[float]:
    """A box covering 1 - lam of the area (CutMix), as fractions of the side."""
    side = float(np.sqrt(1.0 - lam))
    cx, cy = rng.uniform(0, 1, 2)
    x0, x1 = np.clip([cx - side / 2, cx + side / 2], 0, 1)
    y0, y1 = np.clip([cy - side / 2, cy + side / 2], 0, 1)
    return [round(float(v), 6) for v in (x0, y0, x1, y1)]


def _sampler_for(pipe, method: str, needs_unclip: bool = False) -> Sampler:
    family = pipeline_family(pipe)
    if family == "sdxl":
        raise ModelError(f"method {method!r} runs on SD and unCLIP layouts, not SDXL",
                         fix="use method text with SDXL, or an SD 1.5/2.x or unCLIP model")
    if needs_unclip and family != "unclip":
        raise ModelError(f"method {method!r} conditions on image embeddings: it needs an unCLIP-style model",
                         fix="use the embedded generator or a StableUnCLIPImg2ImgPipeline checkpoint")
    return Sampler(pipe)


def _sample_img2img(sampler: Sampler, items: list[SynthItem], init_images: torch.Tensor, cfg: SynthConfig, size: int,
                    class_labels: torch.Tensor | None = None, strengths: list[float] | None = None):
    generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
    pos, neg = sampler.encode_text([it.prompt for it in items], [it.negative_prompt for it in items])
    if class_labels is None:
        class_labels = sampler.class_labels(None, 0, generators, len(items))
    strengths = torch.tensor(strengths if strengths is not None else [it.params["strength"] for it in items])
    init = sampler.encode_images(init_images, generators)
    cond = Conditioning(pos, neg, class_labels)
    return to_pil(sampler.sample(cond, generators, size=size, num_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale, init_latents=init, strengths=strengths))


def generate_img2img(pipe, items: list[SynthItem], cfg: SynthConfig, size: int, real: RealImages):
    """SDEdit from each item's real image at its own strength (DA-Fusion)."""
    sampler = _sampler_for(pipe, cfg.method)
    return _sample_img2img(sampler, items, real.unit([it.source for it in items], size), cfg, size)


def augment_embeddings(embeds: torch.Tensor, partner: torch.Tensor | None, lams: list[float], seeds: list[int],
                       mode: list[str], dropout: float) -> torch.Tensor:
    """Embedding-space augmentations of "Augmented Conditioning": MixUp, CutMix over feature dimensions, dropout.

    Row b only ever mixes with ``partner[b]`` (its same-class partner), never with another batch
    row: the authors' stored code slices the batch dimension for CutMix; this cuts features, as
    the paper describes. Every random draw comes from the item's own seed.
    """
    embeds = embeds.clone()
    lam = torch.tensor(lams, dtype=embeds.dtype).view(-1, 1)
    if "embed_mixup" in mode:
        embeds = lam * embeds + (1 - lam) * partner
    if "embed_cutmix" in mode:
        for b, (seed, value) in enumerate(zip(seeds, lams)):
            dims = torch.randperm(embeds.shape[1], generator=torch.Generator().manual_seed(seed + 1))
            dims = dims[: int(round((1 - value) * embeds.shape[1]))]
            embeds[b, dims] = partner[b, dims]
    if "embed_dropout" in mode and dropout > 0:
        keep = torch.stack([torch.rand(embeds.shape[1], generator=torch.Generator().manual_seed(seed + 2)) >= dropout
                            for seed in seeds]).to(embeds)
        embeds = embeds * keep / (1 - dropout)
    return embeds


def generate_augcond(pipe, items: list[SynthItem], cfg: SynthConfig, size: int, real: RealImages):
    """Condition on an augmented real image's CLIP embedding ("Augmented Conditioning Is Enough")."""
    sampler = _sampler_for(pipe, cfg.method, needs_unclip=True)
    mode = _augcond_parts(cfg.augcond_mode)
    first = real.unit([it.source for it in items], size)
    second = real.unit([it.params["partner"] for it in items], size)
    lam = torch.tensor([it.params["mix_lambda"] for it in items]).view(-1, 1, 1, 1)
    mixed = first.clone()
    if "pixel_mixup" in mode:
        mixed = lam * first + (1 - lam) * second
    if "pixel_cutmix" in mode:
        for b, it in enumerate(items):
            x0, y0, x1, y1 = (round(v * size) for v in it.params["cutmix_box"])
            mixed[b, :, y0:y1, x0:x1] = second[b, :, y0:y1, x0:x1]
    mixed_uint8 = ((mixed.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    embeds = sampler.image_embeddings(to_pil(mixed_uint8)).float()
    partner = None
    if "embed_mixup" in mode or "embed_cutmix" in mode:
        partner = sampler.image_embeddings([real.pil(it.params["partner"], size) for it in items]).float()
    embeds = augment_embeddings(embeds, partner, [it.params["mix_lambda"] for it in items],
                                [it.seed for it in items], mode, cfg.embed_dropout)
    generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
    labels = sampler.class_labels(embeds.to(sampler.dtype), cfg.image_noise_level, generators, len(items))
    if "img2img" in mode:
        return _sample_img2img(sampler, items, mixed, cfg, size, class_labels=labels)
    pos, neg = sampler.encode_text([it.prompt for it in items], [it.negative_prompt for it in items])
    # The generators go on from the embedding noise to the latents, the order of diffusers'
    # StableUnCLIPImg2ImgPipeline: with mode "none" the images equal the stock pipeline's.
    return to_pil(sampler.sample(Conditioning(pos, neg, labels), generators, size=size,
                                 num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale))


def plan_diagen(cfg: SynthConfig, class_names: list[str], real: GenaugDataset | None) -> list[SynthItem]:
    return _plan_from_real(cfg, class_names, real, lambda rng, *_: {"strength": _strength(cfg, rng),
                                                                    "embedding_noise_std": cfg.embedding_noise_std})


@torch.no_grad()
def encode_with_token_noise(pipe, items: list[SynthItem], std: float) -> torch.Tensor:
    """Prompt embeddings with Gaussian noise on the class-name tokens' input embeddings (DIAGen).

    A forward hook on the text encoder's token embedding adds each item's own noise (drawn from
    its seed) at the positions holding its class name's tokens; the weights are never touched.
    """
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer([it.prompt for it in items], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    class_ids = [set(tokenizer(it.class_name, add_special_tokens=False).input_ids) for it in items]
    mask = torch.tensor([[int(t) in cls for t in row] for row, cls in zip(ids.tolist(), class_ids)])
    dim = encoder.get_input_embeddings().embedding_dim
    noise = torch.stack([torch.randn(ids.shape[1], dim, generator=torch.Generator().manual_seed(it.seed + 3))
                         for it in items]) * std
    delta = (noise * mask.unsqueeze(-1)).to(encoder.device, encoder.dtype)

    def add_noise(module, inputs, output):
        return output + delta if output.shape[:2] == delta.shape[:2] else output

    handle = encoder.get_input_embeddings().register_forward_hook(add_noise)
    try:
        return encoder(ids.to(encoder.device))[0]
    finally:
        handle.remove()


def generate_diagen(pipe, items: list[SynthItem], cfg: SynthConfig, size: int, real: RealImages):
    """DIAGen: img2img from the real image with noisy class-token embeddings and a varied prompt."""
    sampler = _sampler_for(pipe, cfg.method)
    generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
    pos = encode_with_token_noise(pipe, items, cfg.embedding_noise_std)
    _, neg = sampler.encode_text([it.prompt for it in items], [it.negative_prompt for it in items])
    labels = sampler.class_labels(None, 0, generators, len(items))
    init = sampler.encode_images(real.unit([it.source for it in items], size), generators)
    strengths = torch.tensor([it.params["strength"] for it in items])
    return to_pil(sampler.sample(Conditioning(pos.to(neg.dtype), neg, labels), generators, size=size,
                                 num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                 init_latents=init, strengths=strengths))


@dataclass(frozen=True)
class SynthMethod:
    name: str
    plan: Callable[[SynthConfig, list[str], GenaugDataset | None], list[SynthItem]]
    generate: Callable[..., list]
    help: str


METHODS: dict[str, SynthMethod] = {}


def register_method(method: SynthMethod) -> SynthMethod:
    METHODS[method.name] = method
    return method


register_method(SynthMethod("text", plan_text, generate_text, "class-name prompts from a template bank"))
register_method(SynthMethod("img2img", plan_img2img, generate_img2img,
                            "SDEdit from each real image at a fixed or random strength (DA-Fusion)"))
register_method(SynthMethod("augcond", plan_augcond, generate_augcond,
                            "unCLIP conditioning on augmented real images: pixel/embedding MixUp, CutMix, dropout"))
register_method(SynthMethod("diagen", plan_diagen, generate_diagen,
                            "DIAGen: img2img with Gaussian noise on the class-token embeddings, varied prompts"))
register_method(SynthMethod("spectrum", plan_spectrum, generate_img2img,
                            "img2img at image-guidance levels (Diffusion Curriculum), level recorded per image"))


def create_method(name: str) -> SynthMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown synthesis method {name!r}", where="method", fix=f"use one of {sorted(METHODS)}")
    return METHODS[name]


def parse_shard(text: str) -> tuple[int, int]:
    """"i/N" -> (i, N) with 0 <= i < N."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, N), got {text!r}")
    return index, count


def resolve_shard(text: str) -> tuple[int, int]:
    """The configured shard; 'auto' reads the launcher's RANK / WORLD_SIZE (accelerate, torchrun)."""
    import os

    if text == "auto":
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return parse_shard(text) if text else (0, 1)


def shard_folder(output: str | Path, index: int, count: int) -> Path:
    return Path(output) / "shards" / f"{index:05d}-of-{count:05d}"


def synthesize(cfg: SynthConfig, *, progress: bool = True) -> SynthResult:
    """Plan, then generate every planned image not yet in ``cfg.output``, batch by batch.

    With a shard ``i/N`` only items ``i, i+N, i+2N, ...`` of the plan are generated, into
    ``OUTPUT/shards/``; every item keeps its id and seed, so the merged result equals an unsharded run.
    With ``workers > 1`` threads of this process (or, with ``worker_kind`` processes, this process and
    ``workers - 1`` spawned ones, then a merge) draw batches from one queue.
    """
    cfg = _with_class_adapters(cfg)
    method = create_method(cfg.method)
    real = read_dataset(cfg.real_data) if cfg.real_data else None
    class_names = real.class_names if real is not None else list(cfg.class_names)
    items = method.plan(cfg, class_names, real)
    if cfg.merge_shards:
        return merge_synth_shards(cfg, items, class_names)
    workers = resolve_workers(cfg)
    if workers > 1 and cfg.worker_kind == "processes":
        return _synthesize_in_workers(dataclasses.replace(cfg, workers=workers), items, class_names, progress)
    real_images = RealImages(real) if real is not None else None
    index, count = resolve_shard(cfg.shard)
    out = Path(cfg.output)
    if count > 1:
        # Items already merged into OUTPUT (a finished run whose budget grew) need no shard.
        merged = _done_ids(out)
        items = [it for it in items[index::count] if it.id not in merged]
        out = shard_folder(cfg.output, index, count)
    already = _done_ids(out)
    todo = [it for it in items if it.id not in already]
    # Load the model before touching the output, so a bad model path leaves nothing behind.
    pipe = _load_for(cfg, method) if todo else None
    # Writer threads encode and fsync a batch's PNGs while the next batch denoises (the same bytes as without);
    # a batch's metadata lines follow once the next batch is queued, so a kill loses at most about two batches.
    with _writer(cfg, out, class_names) as writer:
        # Only once the folder is ours: a refused second writer must not rewrite the run record.
        discard_partial_writes(out / "run")
        record = RunRecord.start(out / "run", "synth", cfg)
        todo = [it for it in items if it.id not in writer.done_ids]
        skipped = len(items) - len(todo)
        t0 = time.time()
        threads = min(workers, -(-len(todo) // cfg.batch_size))
        if todo:
            size = cfg.resolution or default_resolution(pipe)
            batches = [todo[start : start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
            # A context manager: a failure closes the bar, so the error prints on a line of its own.
            with tqdm(total=len(todo), desc=f"synth:{cfg.method}" + (f" ({threads} threads)" if threads > 1 else ""),
                      unit="img", dynamic_ncols=True, disable=not progress) as bar:
                if threads > 1:
                    _draw_in_threads(pipe, method, batches, cfg, size, real_images, writer, bar.update, threads)
                else:
                    for batch in batches:
                        _draw_batch(pipe, method, batch, cfg, size, real_images, writer)
                        bar.update(len(batch))
        seconds = time.time() - t0
    result = SynthResult(out, cfg.method, len(items), len(todo), skipped, round(seconds, 3),
                         round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0)
    record.finish({"planned": result.planned, "generated": result.generated, "skipped_existing": skipped,
                   "images_per_second": result.images_per_second,
                   **({"workers": threads, "worker_kind": "threads",
                       "threads_per_worker": max(1, torch.get_num_threads() // threads)} if threads > 1 else {})})
    return result


def resolve_workers(cfg: SynthConfig) -> int:
    """``cfg.workers``, or for 0 (auto): 2 on a CPU with at least 2 torch threads, where two batches at once with one
    thread each beat one batch with two; 1 on a GPU (not measured), with compile (one thread draws) and for a shard
    or a merge (several processes share the machine already)."""
    if cfg.workers:
        return cfg.workers
    if cfg.compile or cfg.shard or cfg.merge_shards or resolve_device(cfg.device).type != "cpu":
        return 1
    return min(2, torch.get_num_threads())


def _with_class_adapters(cfg: SynthConfig) -> SynthConfig:
    """``class_adapters`` resolved into adapters and class words."""
    if not cfg.class_adapters:
        return cfg
    from ..personalize.textual_inversion import read_class_adapters

    adapters, words = read_class_adapters(cfg.class_adapters)
    # The per-class inversions join the other adapters; explicit class_words still win.
    return dataclasses.replace(cfg, class_adapters=None, adapters=[*cfg.adapters, *adapters],
                               adapter_weights=[*cfg.adapter_weights, *[1.0] * len(adapters)]
                               if cfg.adapter_weights else [], class_words={**words, **cfg.class_words})


def _load_for(cfg: SynthConfig, method: SynthMethod):
    """The pipeline with its adapters (compiled if asked), refused here if the method cannot run on it."""
    pipe = load_pipeline(cfg.model, device=cfg.device, dtype=cfg.dtype, xformers=cfg.xformers)
    if cfg.adapters:
        from ..personalize.evaluate import load_adapters

        load_adapters(pipe, cfg.adapters, cfg.adapter_weights)
    if cfg.compile:
        compile_unet(pipe, cfg.batch_size)  # after the adapters, so the compiled graph includes them
    pipe.genaug_trace_unet = cfg.trace_unet  # traced at the first call: after the adapters, which stay as they are
    if method.name != "text":
        _sampler_for(pipe, method.name, needs_unclip=method.name == "augcond")
    return pipe


def _writer(cfg: SynthConfig, out: Path, class_names: list[str], in_flight: int | None = None,
            **info: Any) -> DatasetWriter:
    return DatasetWriter(out, class_names, split="train", threads=cfg.writer_threads,
                         in_flight=in_flight or 2 * cfg.batch_size,
                         info={"method": cfg.method, "model": cfg.model, "real_data": cfg.real_data, **info})


def _draw_batch(pipe, method: SynthMethod, batch: list[SynthItem], cfg: SynthConfig, size: int,
                real_images: RealImages | None, writer: DatasetWriter) -> None:
    _write_batch(writer, batch, method.generate(pipe, batch, cfg, size, real_images), cfg)


def _draw_in_threads(pipe, method: SynthMethod, batches: list[list[SynthItem]], cfg: SynthConfig, size: int,
                     real_images: RealImages | None, writer: DatasetWriter, on_written: Callable[[int], Any],
                     count: int) -> None:
    """``count`` threads claim ``batches`` in turn and draw them from the one ``pipe``, each with an equal share of
    torch's threads; small UNets on a CPU use one process's threads poorly, and a thread's share of the work needs
    no second model. Batches reach ``writer`` in plan order (one that finishes early waits in memory for those
    before it), so the dataset is byte for byte the one-thread run's, and a kill loses only unwritten batches.
    The first failure stops the others after their current batch and is raised here."""
    claim, order, stop = threading.Lock(), threading.Lock(), threading.Event()
    claimed = iter(range(len(batches)))
    finished: dict[int, list] = {}
    failures: list[BaseException] = []
    next_to_write = 0

    def draw() -> None:
        nonlocal next_to_write
        try:
            while not stop.is_set():
                with claim:
                    k = next(claimed, None)
                if k is None:
                    return
                # Preparing a batch touches shared state (tokenizer, hooks): one thread at a time; the sampler
                # lets go while it denoises.
                with PIPELINE_STATE.held():
                    images = method.generate(pipe, batches[k], cfg, size, real_images)
                with order:
                    finished[k] = images
                    while next_to_write in finished:
                        _write_batch(writer, batches[next_to_write], finished.pop(next_to_write), cfg)
                        on_written(len(batches[next_to_write]))
                        next_to_write += 1
        except BaseException as exc:  # noqa: BLE001 - raised in the calling thread
            failures.append(exc)
            stop.set()

    own_threads = torch.get_num_threads()
    # Threads started after this take it as their own intra-op count (torch reads it when a thread first runs an op).
    torch.set_num_threads(max(1, own_threads // count))
    workers = [threading.Thread(target=draw, name=f"genaug-synth-{i}", daemon=True) for i in range(count)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)  # a timeout, so that Ctrl-C reaches this thread
    except BaseException:
        stop.set()  # the others finish their batch; their writes are whole
        for worker in workers:
            worker.join()
        raise
    finally:
        torch.set_num_threads(own_threads)
    if failures:
        raise failures[0]


def _write_batch(writer: DatasetWriter, batch: list[SynthItem], images: list, cfg: SynthConfig) -> None:
    for it, image in zip(batch, images):
        writer.add(it.id, image, it.label, method=cfg.method, prompt=it.prompt,
                   negative_prompt=it.negative_prompt, seed=it.seed, source=it.source,
                   guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
                   model=cfg.model, adapters=cfg.adapters, sample_weight=1.0, **it.params)


def merge_synth_shards(cfg: SynthConfig, items: list[SynthItem], class_names: list[str]) -> SynthResult:
    """Link (or copy) N finished shards' images into ``cfg.output`` in plan order; refuses while any shard is
    incomplete."""
    t0 = time.time()
    folders = [shard_folder(cfg.output, i, cfg.merge_shards) for i in range(cfg.merge_shards)]
    rows = _shard_rows(cfg.output, items, folders,  # refuses before anything is written
                       refuse_missing=f"finish every shard (--shard i/{cfg.merge_shards}) with the same settings, "
                                      "then merge")
    with _writer(cfg, Path(cfg.output), class_names, in_flight=64, merged_shards=cfg.merge_shards) as writer:
        record = RunRecord.start(Path(cfg.output) / "run", "synth-merge", cfg)
        written = _merge_shards(writer, items, rows)
    result = SynthResult(Path(cfg.output), cfg.method, len(items), written, len(items) - written,
                         round(time.time() - t0, 3), 0.0)
    record.finish({"merged": written, "shards": cfg.merge_shards})
    return result


def _done_ids(folder: Path) -> set[str]:
    return {str(r.get("id")) for r in read_metadata_lines(folder / "train" / METADATA, tolerate_partial_tail=True)}


def _shard_rows(output: str | Path, items: list[SynthItem], folders: list[Path], *,
                refuse_missing: str | None = None) -> dict[str, tuple[Path, dict]]:
    """Each planned item's row in the shard ``folders`` (with the folder holding its image), if it is in one and not
    yet merged into OUTPUT. With ``refuse_missing`` (the fix to print), refuses while a planned item is in neither."""
    merged, planned = _done_ids(Path(output)), {it.id for it in items}
    rows: dict[str, tuple[Path, dict]] = {}
    for folder in folders:
        for row in read_metadata_lines(folder / "train" / METADATA, tolerate_partial_tail=True):
            if str(row["id"]) in planned and str(row["id"]) not in merged:
                rows[str(row["id"])] = (folder / "train", row)
    missing = [it.id for it in items if it.id not in rows and it.id not in merged] if refuse_missing else []
    if missing:
        raise ConfigError(f"{len(missing)} planned images are in no shard yet (first: {missing[0]})",
                          where=str(Path(output) / "shards"), fix=refuse_missing)
    return rows


def _merge_shards(writer: DatasetWriter, items: list[SynthItem], rows: dict[str, tuple[Path, dict]]) -> int:
    """Add every planned item not yet in ``writer`` from the shards' ``rows``, in plan order; returns how many.
    The shard's PNG is linked into place (copied where links fail): the bytes a one-process run writes."""
    written = 0
    for it in items:
        if it.id in writer.done_ids:
            continue
        folder, row = rows[it.id]
        meta = {k: v for k, v in row.items() if k not in ("file_name", "id", "label", "class_name")}
        writer.add_file(it.id, safe_child(folder, row["file_name"]), int(row["label"]), **meta)
        written += 1
    return written


def _exit_with_parent() -> None:
    """On Linux, a worker is killed when the process that started it dies (kill -9 included), so no orphan goes on
    writing a shard that the rerun wants to resume."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_folder(output: str | Path, index: int) -> Path:
    """Where process ``index`` of a ``--workers`` run writes the batches it draws, until the merge."""
    return Path(output) / "shards" / f"worker-{index:03d}"


def _worker_folders(output: str | Path) -> list[Path]:
    """Every worker folder under OUTPUT, a killed run's with more workers included."""
    return sorted(p for p in (Path(output) / "shards").glob("worker-*") if p.is_dir())


def _draw_claimed(cfg: SynthConfig, class_names: list[str], todo: list[SynthItem], index: int, next_batch,
                  on_batch: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Claim batches of ``todo`` from the shared counter ``next_batch`` until none is left, drawing each into this
    process's worker folder. Returns how many images it drew and its own clock (after the model loaded)."""
    method = create_method(cfg.method)
    pipe = _load_for(cfg, method)
    real_images = RealImages(read_dataset(cfg.real_data)) if cfg.real_data else None
    size = cfg.resolution or default_resolution(pipe)
    batches = [todo[s : s + cfg.batch_size] for s in range(0, len(todo), cfg.batch_size)]
    drawn, t0 = 0, time.time()
    with _writer(cfg, worker_folder(cfg.output, index), class_names) as writer:
        while True:
            with next_batch.get_lock():
                claimed = next_batch.value
                next_batch.value += 1
            if claimed >= len(batches):
                break
            _draw_batch(pipe, method, batches[claimed], cfg, size, real_images, writer)
            drawn += len(batches[claimed])
            on_batch()
    return {"generated": drawn, "seconds": time.time() - t0, "started": t0}


def _worker_main(cfg: SynthConfig, class_names: list[str], todo: list[SynthItem], index: int, threads: int,
                 next_batch, results) -> None:
    """A spawned worker; its outcome goes back through ``results``, a user-facing failure as its parts (no exception
    pickling)."""
    import traceback

    from .. import errors

    _exit_with_parent()
    torch.set_num_threads(threads)
    try:
        outcome = _draw_claimed(cfg, class_names, todo, index, next_batch)
    except errors.GenaugError as exc:
        outcome = {"error": type(exc).__name__, "what": exc.what, "where": exc.where, "fix": exc.fix}
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        outcome = {"crash": traceback.format_exc()}
    results.put((index, outcome))


def _raise_outcome(index: int, outcome: dict[str, Any]) -> None:
    from .. import errors

    if "error" in outcome:
        error_class = getattr(errors, outcome["error"], errors.GenaugError)
        raise error_class(outcome["what"], where=outcome["where"], fix=outcome["fix"])
    if "crash" in outcome:
        raise RuntimeError(f"synth worker {index} failed:\n{outcome['crash']}")


def _synthesize_in_workers(cfg: SynthConfig, items: list[SynthItem], class_names: list[str],
                           progress: bool) -> SynthResult:
    """This process and ``cfg.workers - 1`` spawned ones claim batches from one shared counter, each with an equal
    share of torch's threads, each writing its own folder under OUTPUT/shards/; then one merge into OUTPUT, and the
    shards are removed. This process draws from the start while the others are still importing, and whoever is free
    takes the next batch, so no process idles at the end. Per-item seeds make the images those of one process; a
    killed run's folders count as drawn, so a rerun continues where it stopped."""
    import multiprocessing
    import shutil

    from .. import errors

    count, out = cfg.workers, Path(cfg.output)
    threads = max(1, torch.get_num_threads() // count)
    merged = _done_ids(out)
    drawn_before = _shard_rows(out, items, _worker_folders(out))
    todo = [it for it in items if it.id not in merged and it.id not in drawn_before]
    if not todo and not drawn_before:  # nothing to draw or merge: no process to start
        return SynthResult(out, cfg.method, len(items), 0, len(items), 0.0, 0.0)
    metadata = [worker_folder(out, i) / "train" / METADATA for i in range(count)]
    offsets, new_lines = [_whole_lines_size(path) for path in metadata], [0] * count

    def drawn_now() -> int:
        """Images the workers added since the start; reads only what was appended since the last call."""
        for i, path in enumerate(metadata):
            if path.is_file():
                with open(path, "rb") as fh:
                    fh.seek(offsets[i])
                    chunk = fh.read()
                complete = chunk.rfind(b"\n") + 1
                new_lines[i] += chunk[:complete].count(b"\n")
                offsets[i] += complete
        return sum(new_lines)

    t0 = time.time()
    outcomes: dict[int, dict[str, Any]] = {}
    if todo:
        # spawn: a forked child would inherit this process's torch threads and locks.
        context = multiprocessing.get_context("spawn")
        next_batch, results = context.Value("q", 0), context.SimpleQueue()
        others = [context.Process(target=_worker_main, daemon=True, name=f"genaug-synth-worker-{i}",
                                  args=(cfg, class_names, todo, i, threads, next_batch, results))
                  for i in range(1, count)]

        def collect() -> None:
            """Take the finished workers' outcomes; a worker's failure, or death, stops this process's drawing too."""
            while not results.empty():
                index, outcome = results.get()
                _raise_outcome(index, outcome)
                outcomes[index] = outcome
            for i, process in enumerate(others, start=1):
                if process.exitcode is not None and i not in outcomes and results.empty():
                    raise errors.GenaugError(
                        f"synth worker {i} stopped (exit code {process.exitcode}) before it finished",
                        where=str(worker_folder(out, i)),
                        fix="rerun the same command: it keeps every image already drawn (if memory ran out, "
                            "use fewer --workers)")

        own_threads = torch.get_num_threads()
        try:
            for process in others:
                process.start()
            with tqdm(total=len(todo), desc=f"synth:{cfg.method} ({count} workers)", unit="img",
                      dynamic_ncols=True, disable=not progress) as bar:
                def on_batch() -> None:
                    collect()
                    bar.update(drawn_now() - bar.n)

                torch.set_num_threads(threads)
                try:
                    outcomes[0] = _draw_claimed(cfg, class_names, todo, 0, next_batch, on_batch)
                finally:
                    torch.set_num_threads(own_threads)
                while any(p.is_alive() for p in others) or not results.empty():
                    on_batch()
                    time.sleep(0.2)
                on_batch()
        finally:
            for process in others:  # after a failure here, the others stop too (their writes are atomic)
                if process.pid is not None:  # started
                    if process.is_alive():
                        process.terminate()
                    process.join()
    merge_start = time.time()
    rows = _shard_rows(out, items, _worker_folders(out), refuse_missing="rerun the same command to draw them")
    with _writer(cfg, out, class_names, in_flight=64) as writer:
        discard_partial_writes(out / "run")
        record = RunRecord.start(out / "run", "synth", cfg)
        _merge_shards(writer, items, rows)
    shutil.rmtree(out / "shards")
    generated = sum(o["generated"] for o in outcomes.values())
    seconds = time.time() - t0
    result = SynthResult(out, cfg.method, len(items), generated, len(items) - generated, round(seconds, 3),
                         round(generated / seconds, 3) if generated and seconds > 0 else 0.0)
    # The record starts at the merge (a failed worker leaves nothing behind); its seconds are the whole run's.
    record.finish({"seconds": result.seconds, "planned": result.planned, "generated": result.generated,
                   "skipped_existing": result.skipped_existing, "images_per_second": result.images_per_second,
                   "workers": count, "threads_per_worker": threads,
                   # each process's own clock (sampling and writing, after its model loaded), as a one-process run's
                   "slowest_worker_seconds": round(max((o["seconds"] for o in outcomes.values()), default=0.0), 3),
                   # when each process had its model and began to draw, and the merge's share of the clock
                   "worker_started_after_seconds": [round(outcomes[i]["started"] - t0, 3) for i in sorted(outcomes)],
                   "worker_images": [outcomes[i]["generated"] for i in sorted(outcomes)],
                   "merge_seconds": round(time.time() - merge_start, 3)})
    return result


def _whole_lines_size(path: Path) -> int:
    """Bytes of ``path`` up to its last newline (0 if it does not exist)."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    return data.rfind(b"\n") + 1
