"""``genaug pretrain``: train the embedded model family on a procedural world, measure it, card it.

Stages, each skipped when its output folder is already complete (so a killed run resumes):
1. a CLIP-style dual encoder on the pool's image-caption pairs (``clip/``);
2. the unCLIP-layout diffusion model on the same pool, conditioned by the frozen dual encoder
   (``generator/``);
3. an oracle classifier on the world's large balanced sample, the judge of generated images
   (``oracle/``);
4. figures (``figures.json``), sample grids and model cards.
The last ``holdout`` pool images are never trained on: they measure text-to-image recall.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artefacts import atomic_write_json, read_dataset
from ..config import config_from_dict, config_to_dict, option
from ..errors import DataError
from ..models.tokenizer import build_clip_tokenizer
from ..runs import RunRecord
from .data import load_split

STAGES = ("clip", "generator", "oracle", "evaluate")


@dataclass
class PretrainConfig:
    """Train, measure and card the embedded model family on a world made by `genaug world`."""

    world: str = option("worlds/default", "world folder written by `genaug world`")
    output: str = option("models/embedded", "folder of the model family (clip/, generator/, oracle/, cards)")
    stages: list[str] = option(help="stages to run, in order: clip, generator, oracle, evaluate",
                               factory=lambda: list(STAGES))
    holdout: int = option(1000, "last pool images kept out of training, for text-to-image recall@10")
    clip: dict = option(help="DualEncoderConfig overrides (see genaug.pretrain.clip)", factory=dict)
    generator: dict = option(help="GeneratorConfig overrides (see genaug.pretrain.diffusion)", factory=dict)
    oracle: dict = option(help="OracleConfig overrides (see genaug.pretrain.oracle)", factory=dict)
    eval_images_per_class: int = option(24, "generated images per class for the figures")
    eval_guidance_scale: float = option(4.0, "guidance scale used for the figures (and recommended)")
    eval_steps: int = option(25, "DDIM steps used for the figures")
    device: str = option("auto", "where to train: auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    num_threads: int = option(0, "torch CPU threads (0: torch's default)")
    seed: int = option(0, "seed of every stage")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.holdout < 0 or self.eval_images_per_class < 1 or self.eval_steps < 1:
            raise ValueError("holdout must be >= 0, eval_images_per_class and eval_steps >= 1")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def clip_config(self):
        from .clip import DualEncoderConfig

        return config_from_dict(DualEncoderConfig, {"seed": self.seed, "progress": self.progress, **self.clip},
                                source="pretrain config: clip")

    def generator_config(self):
        from .diffusion import GeneratorConfig

        return config_from_dict(GeneratorConfig, {"seed": self.seed, **self.generator},
                                source="pretrain config: generator")

    def oracle_config(self):
        from .oracle import OracleConfig

        # The oracle has its own progress bar; --no-progress turns it off too unless `oracle:` says otherwise.
        return config_from_dict(OracleConfig, {"seed": self.seed, "progress": self.progress, **self.oracle},
                                source="pretrain config: oracle")


@dataclass
class PretrainResult:
    output: Path
    stages_run: list[str]
    seconds: dict[str, float]
    figures: dict[str, Any] = field(default_factory=dict)


def _world_file(world: Path, part: str) -> Path:
    folder = world / part
    if not folder.is_dir():
        raise DataError(f"world has no {part}/ folder", where=str(world), fix="generate it with `genaug world`")
    return folder


def _tokenizer_corpus(world: Path, pool_captions: list[str]) -> list[str]:
    """Every caption plus every class and attribute name of the world: the words users will type."""
    import json

    corpus = list(pool_captions)
    info = json.loads((world / "world.json").read_text()) if (world / "world.json").is_file() else {}

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    corpus += [s for s in strings(info) if len(s) < 64 and not s.startswith(("/", "."))]
    corpus += read_dataset(world / "bench", "test").class_names
    return corpus


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    world, out = Path(cfg.world), Path(cfg.output)
    pool_dir = _world_file(world, "pool")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Validate every sub-config before any work.
    clip_cfg, gen_cfg, oracle_cfg = cfg.clip_config(), cfg.generator_config(), cfg.oracle_config()
    device = cfg.torch_device()
    record = RunRecord.start(out / "run", "pretrain", cfg)
    seconds: dict[str, float] = {}
    stages_run: list[str] = []
    pool = None

    def get_pool():
        nonlocal pool
        if pool is None:
            pool = load_split(pool_dir, "train", progress=cfg.progress)
        return pool

    # 1. Dual encoder.
    from .clip import DUAL_ENCODER_JSON, load_dual_encoder, train_dual_encoder

    clip_dir = out / "clip"
    if "clip" in cfg.stages and not (clip_dir / DUAL_ENCODER_JSON).is_file():
        t0 = time.time()
        data = get_pool()
        n_train = len(data) - cfg.holdout
        tokenizer = build_clip_tokenizer(out / ".work" / "tokenizer", model_max_length=clip_cfg.max_text_length,
                                         corpus=_tokenizer_corpus(world, data.captions))
        train_dual_encoder(clip_cfg, data.subset(range(n_train)), tokenizer, clip_dir,
                           eval_split=data.subset(range(n_train, len(data))) if cfg.holdout else None,
                           device=device)
        seconds["clip"] = round(time.time() - t0, 1)
        stages_run.append("clip")

    # 2. Generator.
    gen_dir = out / "generator"
    if "generator" in cfg.stages and not (gen_dir / "model_index.json").is_file():
        from .clip import build_image_processor, export_encoders
        from .diffusion import store_unet, train_generator

        t0 = time.time()
        data = get_pool()
        model, tokenizer = load_dual_encoder(clip_dir)
        text_encoder, image_encoder = export_encoders(model)
        result = train_generator(gen_cfg, data.subset(range(len(data) - cfg.holdout)), text_encoder, image_encoder,
                                 tokenizer, build_image_processor(clip_cfg.image_size), out / ".work" / "generator",
                                 progress=cfg.progress, device=device)
        staging = out / ".work" / "generator-final"
        if staging.exists():
            shutil.rmtree(staging)
        result.pipeline.save_pretrained(staging, safe_serialization=True)
        if gen_cfg.unet_storage_dtype != "float32":
            store_unet(result.pipeline.unet, staging / "unet", gen_cfg.unet_storage_dtype)
        atomic_write_json(staging / "genaug_generator.json", {
            "format": "genaug-generator", "config": config_to_dict(gen_cfg), "vae_psnr": result.vae_psnr,
            "unet_parameters": result.unet_parameters, "vae_parameters": result.vae_parameters,
            "vae_seconds": result.vae_seconds, "unet_seconds": result.unet_seconds, "final_loss": result.final_loss,
            "precision": result.precision, "attention": result.attention,
            "recommended": {"guidance_scale": cfg.eval_guidance_scale, "num_inference_steps": cfg.eval_steps},
        })
        if gen_dir.exists():
            shutil.rmtree(gen_dir)
        staging.rename(gen_dir)
        seconds["generator"] = round(time.time() - t0, 1)
        stages_run.append("generator")

    # 3. Oracle.
    oracle_dir = out / "oracle"
    if "oracle" in cfg.stages and not (oracle_dir / "config.json").is_file():
        from .oracle import train_oracle

        t0 = time.time()
        train = load_split(_world_file(world, "oracle"), "train", progress=cfg.progress)
        val = load_split(_world_file(world, "bench"), "val", progress=cfg.progress)
        train_oracle(oracle_cfg, train, val, oracle_dir, device=device)
        seconds["oracle"] = round(time.time() - t0, 1)
        stages_run.append("oracle")

    # 4. Figures, grids, cards.
    figures: dict[str, Any] = {}
    if "evaluate" in cfg.stages:
        from .figures import evaluate_family, write_model_cards

        t0 = time.time()
        figures = evaluate_family(cfg, world, out, pool=get_pool() if cfg.holdout else None)
        figures["device"] = str(device)
        seconds["evaluate"] = round(time.time() - t0, 1)
        figures["training_seconds"] = {**figures.get("training_seconds", {}), **seconds}
        atomic_write_json(out / "figures.json", figures)
        write_model_cards(cfg, out, figures)
        stages_run.append("evaluate")
    record.finish({"stages_run": stages_run, "seconds": seconds})
    return PretrainResult(out, stages_run, seconds, figures)
