"""The synthesis engine: plan every image up front, then generate the missing ones in batches.

Planning is deterministic: each planned image has an id, a label, a prompt and its own seed
(derived from the run seed and the id), so image ``i`` comes out the same whatever the batch
size or resume point. Generation skips ids the output dataset already holds, so a killed run
continues where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..artefacts import METADATA, DatasetWriter, GenaugDataset, read_dataset, read_metadata_lines, slugify
from ..budget import check_budget, images_per_class_budget
from ..config import option
from ..errors import ConfigError
from ..models.loading import default_resolution, load_pipeline, pipeline_family
from ..runs import RunRecord
from .prompts import DEFAULT_TEMPLATES, fill
from .sampler import Conditioning, Sampler, to_pil


def item_seed(run_seed: int, item_id: str) -> int:
    """A 63-bit seed from the run seed and the item id: stable across batching, sharding and resume."""
    digest = hashlib.sha256(f"{run_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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
    num_inference_steps: int = option(25, "denoising steps per image")
    resolution: int | None = option(None, "output size in pixels (default: the model's native size)")
    batch_size: int = option(8, "images per pipeline call")
    seed: int = option(0, "run seed; each image's seed derives from it and the image id")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto (fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16")
    xformers: bool = option(False, "use xformers attention (CUDA only; torch SDPA is the default)")

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
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError("resolution must be a multiple of 8, at least 8")
        for t in self.prompt_templates:
            fill(t, "x")  # raises on a template without '{}'


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
            items.append(SynthItem(item_id, label, name, fill(template, name), item_seed(cfg.seed, item_id),
                                   cfg.negative_prompt, params={"template": template}))
    return items


def generate_text(pipe, items: list[SynthItem], cfg: SynthConfig, size: int):
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


def create_method(name: str) -> SynthMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown synthesis method {name!r}", where="method", fix=f"use one of {sorted(METHODS)}")
    return METHODS[name]


def synthesize(cfg: SynthConfig) -> SynthResult:
    """Plan, then generate every planned image not yet in ``cfg.output``, batch by batch."""
    method = create_method(cfg.method)
    real = read_dataset(cfg.real_data) if cfg.real_data else None
    class_names = real.class_names if real is not None else list(cfg.class_names)
    items = method.plan(cfg, class_names, real)

    out = Path(cfg.output)
    already = {str(r.get("id")) for r in read_metadata_lines(out / "train" / METADATA, tolerate_partial_tail=True)}
    todo = [it for it in items if it.id not in already]
    # Load the model before touching the output, so a bad model path leaves nothing behind.
    pipe = load_pipeline(cfg.model, device=cfg.device, dtype=cfg.dtype, xformers=cfg.xformers) if todo else None
    record = RunRecord.start(out / "run", "synth", cfg)
    info = {"method": cfg.method, "model": cfg.model, "real_data": cfg.real_data}
    with DatasetWriter(out, class_names, split="train", info=info) as writer:
        todo = [it for it in items if it.id not in writer.done_ids]
        skipped = len(items) - len(todo)
        t0 = time.time()
        if todo:
            size = cfg.resolution or default_resolution(pipe)
            bar = tqdm(total=len(todo), desc=f"synth:{cfg.method}", unit="img", dynamic_ncols=True)
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start : start + cfg.batch_size]
                images = method.generate(pipe, batch, cfg, size)
                for it, image in zip(batch, images):
                    writer.add(it.id, image, it.label, method=cfg.method, prompt=it.prompt,
                               negative_prompt=it.negative_prompt, seed=it.seed, source=it.source,
                               guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
                               model=cfg.model, sample_weight=1.0, **it.params)
                bar.update(len(batch))
            bar.close()
        seconds = time.time() - t0
    result = SynthResult(out, cfg.method, len(items), len(todo), skipped, round(seconds, 3),
                         round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0)
    record.finish({"planned": result.planned, "generated": result.generated, "skipped_existing": skipped,
                   "images_per_second": result.images_per_second})
    return result
