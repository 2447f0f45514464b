"""Textual inversion, after diffusers' ``examples/textual_inversion/textual_inversion.py``.

New placeholder tokens (``num_vectors`` of them: ``<tok>``, ``<tok>_1``, ...) are added to the
tokenizer, their input embeddings start from an initializer word's, and only those rows are
trained with the diffusion loss on the concept's images under object templates ("a photo of a
{}"). Every other embedding row is restored after each step, as in the example. DA-Fusion learns
one such token per class; DIAGen adds noise to them at generation time.

Pivotal tuning (``--pivotal``): a UNet LoRA is trained jointly with the embeddings.

Output: ``learned_embeds.safetensors`` ``{placeholder: (num_vectors, dim)}`` — loadable with
``pipe.load_textual_inversion(folder)`` — plus ``adapter_config.json``; with pivotal tuning also
``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights``. As in train-lora, each step's
random draws come from a generator seeded by ``(seed, step)``, so a resumed run is exact.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..artefacts import ADAPTER_CONFIG, discard_partial_writes, folder_lock, write_adapter
from ..checkpoints import list_checkpoints, load_training_state, require_finite, save_training_state, step_generator
from ..config import config_to_dict, option
from ..errors import ConfigError
from ..models.loading import default_resolution, resolve_device
from ..runs import RunRecord
from .adapters import TI_WEIGHTS, base_model_info
from .lora import (LORA_WEIGHTS, UNET_TARGET_PRESETS, _encode_latents, _load_images, load_base_for_personalization,
                   save_diffusers_lora)

OBJECT_TEMPLATES = ["a photo of a {}", "a rendering of a {}", "a close-up photo of a {}", "a photo of the {}",
                    "a bright photo of a {}", "a dark photo of a {}", "a photo of a small {}", "a photo of a large {}",
                    "a cropped photo of a {}", "a good photo of a {}"]


@dataclass
class TextualInversionConfig:
    """Learn new token embeddings for a concept from a few images (textual inversion)."""

    model: str = option("embedded", "base model: a diffusers folder, a cached hub id, or embedded")
    instance_data: str = option("", "images of the concept: a genaug/imagefolder dataset or a flat folder")
    instance_class: str | None = option(None, "use only this class of instance_data (by class name)")
    placeholder_token: str = option("<sks>", "the new token (extra vectors get _1, _2, ... suffixes)")
    initializer_token: str = option("object", "a single-token word whose embedding starts every new vector")
    num_vectors: int = option(4, "vectors per concept (DA-Fusion: 4)")
    templates: list[str] = option(help="training prompt templates, '{}' is the placeholder",
                                  factory=lambda: list(OBJECT_TEMPLATES))
    output: str = option("adapters/ti", "adapter folder to write")
    learning_rate: float = option(5e-3, "AdamW learning rate of the embeddings")
    max_train_steps: int = option(300, "optimizer steps")
    train_batch_size: int = option(4, "images per step")
    pivotal: bool = option(False, "pivotal tuning: train a UNet LoRA jointly with the embeddings")
    rank: int = option(4, "pivotal tuning: LoRA rank")
    lora_learning_rate: float = option(1e-4, "pivotal tuning: LoRA learning rate")
    unet_targets: Literal["attention", "all"] = option(
        "attention", "pivotal tuning: UNet layers that get LoRA, attention or all (LoCon: also the convolutions and "
                     "feed-forwards), as in train-lora")
    resolution: int | None = option(None, "training resolution (default: the model's native size)")
    random_flip: bool = option(True, "horizontal flips of the instance images")
    checkpointing_steps: int = option(0, "save a resumable checkpoint every N steps (0: never)")
    resume: bool = option(True, "resume from the newest checkpoint in output/checkpoints")
    seed: int = option(0, "seed of every random draw")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    per_class: bool = option(False, "DA-Fusion: one inversion per class of instance_data, into OUTPUT/<class>/ "
                                    "with the token <class>; OUTPUT/class_adapters.json maps classes to them "
                                    "(for `genaug synth --class-adapters OUTPUT`)")
    class_batch: int = option(8, "per_class: train this many classes together, one UNet pass per step for all "
                                 "of them; each class still gets exactly its own run's draws, loss and Adam "
                                 "updates (1: one class after another; pivotal tuning always runs one by one)")

    def __post_init__(self) -> None:
        if min(self.num_vectors, self.max_train_steps, self.train_batch_size, self.rank, self.class_batch) < 1:
            raise ValueError("num_vectors, max_train_steps, train_batch_size, rank and class_batch must be >= 1")
        if not self.learning_rate > 0 or not self.lora_learning_rate > 0:
            raise ValueError("learning rates must be > 0")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("every template needs a '{}' for the placeholder")
        if self.unet_targets not in UNET_TARGET_PRESETS:
            raise ValueError(f"unet_targets must be one of {', '.join(UNET_TARGET_PRESETS)}, got {self.unet_targets!r}")
        if not self.placeholder_token.strip() or " " in self.placeholder_token:
            raise ValueError("placeholder_token must be one word without spaces")
        if self.checkpointing_steps < 0:
            raise ValueError("checkpointing_steps must be >= 0")


@dataclass
class TextualInversionResult:
    output: Path
    weights: Path
    tokens: list[str]
    steps: int
    resumed_from: int
    final_loss: float
    seconds: float


def add_placeholder_tokens(tokenizer, text_encoder, placeholder: str, initializer: str,
                           num_vectors: int) -> list[int]:
    """Add ``placeholder`` (+ ``_1``...) to the tokenizer, embeddings initialized from ``initializer``."""
    tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
    if tokenizer.add_tokens(tokens) != num_vectors:
        raise ConfigError(f"the tokenizer already has {placeholder!r}", where="placeholder_token",
                          fix="choose a token the base model does not know, e.g. <my-concept>")
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(f"initializer {initializer!r} is {len(init_ids)} tokens, not one", where="initializer_token",
                          fix="use a single-token word such as object, shape, dog")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set just below
    ids = tokenizer.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[ids] = weight[init_ids[0]].clone()
    return ids


class TrainableRows:
    """Only some rows of the token embedding learn: the rest are put back after every optimizer step."""

    def __init__(self, text_encoder, token_ids: list[int]):
        self.weight = text_encoder.get_input_embeddings().weight
        self.weight.requires_grad_(True)
        self.original = self.weight.detach().clone()
        self.fixed = torch.ones(len(self.original), dtype=torch.bool)
        self.fixed[token_ids] = False

    @torch.no_grad()
    def restore(self) -> None:
        self.weight[self.fixed] = self.original[self.fixed].to(self.weight)


@dataclass
class ClassAdaptersResult:
    output: Path
    classes: dict[str, dict[str, str]]
    seconds: float


CLASS_ADAPTERS = "class_adapters.json"


def train_per_class(cfg: TextualInversionConfig) -> ClassAdaptersResult:
    """One textual inversion per class (DA-Fusion), each resumable; the map is written last.

    Classes train ``class_batch`` at a time in one loop (:func:`_train_class_group`): a tiny UNet costs
    several times less per row at 32 rows than at 4, and DA-Fusion's protocol trains one inversion per
    class for every few-shot trial."""
    from ..artefacts import atomic_write_json, read_dataset, slugify

    t0 = time.time()
    classes = read_dataset(cfg.instance_data).class_names
    out = Path(cfg.output)
    mapping, todo = {}, []
    for name in classes:
        slug = slugify(name)
        token = f"<{slug}>"
        class_cfg = dataclasses.replace(cfg, per_class=False, instance_class=name, placeholder_token=token,
                                        output=str(out / slug))
        if not (out / slug / ADAPTER_CONFIG).is_file():
            todo.append(class_cfg)
        words = " ".join([token] + [f"{token}_{i}" for i in range(1, cfg.num_vectors)])
        mapping[name] = {"adapter": slug, "words": words}
    group = 1 if cfg.pivotal else cfg.class_batch  # a shared LoRA would couple the classes
    for i in range(0, len(todo), group):
        if group == 1:
            train_textual_inversion(todo[i])
        else:
            _train_class_group(cfg, todo[i: i + group])
    atomic_write_json(out / CLASS_ADAPTERS, {"format": "genaug-class-adapters", "classes": mapping,
                                             "model": cfg.model, "instance_data": cfg.instance_data})
    return ClassAdaptersResult(out, mapping, round(time.time() - t0, 3))


def read_class_adapters(folder: str | Path) -> tuple[list[str], dict[str, str]]:
    """``(adapter folders, {class: words})`` of a folder written by ``train-ti --per-class``."""
    from ..artefacts import read_json_object, safe_child

    folder = Path(folder)
    data = read_json_object(folder / CLASS_ADAPTERS, "per-class adapters (train-ti --per-class)")
    classes = data.get("classes")
    if data.get("format") != "genaug-class-adapters" or not isinstance(classes, dict):
        raise ConfigError("not a per-class adapter map", where=str(folder / CLASS_ADAPTERS))
    adapters, words = [], {}
    for name, entry in classes.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("adapter"), str) \
                or not isinstance(entry.get("words"), str):
            raise ConfigError(f"bad entry for class {name!r}", where=str(folder / CLASS_ADAPTERS))
        adapters.append(str(safe_child(folder, entry["adapter"])))
        words[name] = entry["words"]
    return adapters, words


def train_textual_inversion(cfg: TextualInversionConfig) -> TextualInversionResult | ClassAdaptersResult:
    if cfg.per_class:
        return train_per_class(cfg)

    device = resolve_device(cfg.device)
    pipe, family = load_base_for_personalization(cfg.model, cfg.instance_data, "train-ti", str(device))
    size = cfg.resolution or default_resolution(pipe)
    out = Path(cfg.output)
    pixels = _load_images(cfg.instance_data, cfg.instance_class, size, "instance_data")
    if cfg.random_flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    token_ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, cfg.placeholder_token, cfg.initializer_token,
                                       cfg.num_vectors)
    placeholder_text = " ".join(pipe.tokenizer.convert_ids_to_tokens(token_ids))
    # Two runs training into one folder would mix their checkpoints: hold it before writing anything.
    with folder_lock(out, "training an adapter in"):
        discard_partial_writes(out, out / "run", out / "checkpoints")  # a killed run's temporaries
        return _train_ti_locked(cfg, pipe, family, device, size, out, pixels, token_ids, placeholder_text)


def _step_draws(cfg: TextualInversionConfig, step: int, latent_mean: torch.Tensor, latent_std: torch.Tensor,
                scaling: float, noise_scheduler, placeholder_text: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, list[str]]:
    """A step's random draws (images, latents, noise, timesteps, prompts) from a generator seeded by
    ``(seed, step)``: a resumed run, and a class trained in a group, draw exactly what a lone run draws."""
    g = step_generator(cfg.seed, step)
    idx = torch.randint(0, len(latent_mean), (cfg.train_batch_size,), generator=g)
    latents = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)) * scaling
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
    templates = torch.randint(0, len(cfg.templates), (len(latents),), generator=g).tolist()
    return latents, noise, timesteps, [cfg.templates[t].format(placeholder_text) for t in templates]


def _squared_errors(pipe, noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prompts: list[str], class_dim: int | None) -> torch.Tensor:
    """Elementwise squared error of the UNet's prediction (noise or velocity) on one step's draws, float32."""
    device = pipe.unet.device
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(device)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, timesteps)
    labels = torch.zeros(len(latents), class_dim, device=device) if class_dim else None
    pred = pipe.unet(noisy, timesteps.to(device), pipe.text_encoder(ids)[0], class_labels=labels).sample
    return (pred.float() - target.to(device).float()).pow(2)


def _adapter_config(cfg: TextualInversionConfig, pipe, token_ids: list[int], prompt_text: str, final_loss: float,
                    size: int) -> dict:
    """``adapter_config.json`` of one inversion: base model, tokens, training settings, final loss."""
    return {"type": "textual_inversion", "format": "diffusers", "base_model": cfg.model, **base_model_info(pipe),
            "placeholder_token": cfg.placeholder_token, "tokens": pipe.tokenizer.convert_ids_to_tokens(token_ids),
            "prompt_text": prompt_text, "num_vectors": cfg.num_vectors, "pivotal": cfg.pivotal,
            "steps": cfg.max_train_steps, "final_loss": final_loss, "resolution": size, "config": config_to_dict(cfg)}


def _train_ti_locked(cfg: TextualInversionConfig, pipe, family: str, device, size: int, out: Path,
                     pixels: torch.Tensor, token_ids: list[int], placeholder_text: str) -> TextualInversionResult:
    """``train_textual_inversion`` from the first write on, with the output folder locked."""
    from diffusers import DDPMScheduler

    text_encoder, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    record = RunRecord.start(out / "run", "train-ti", cfg)
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    rows = TrainableRows(text_encoder, token_ids)
    embeddings = rows.weight
    latent_mean, latent_std = _encode_latents(vae, pixels)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = {"text_encoder.embeddings": embeddings}
    groups = [{"params": [embeddings], "lr": cfg.learning_rate, "weight_decay": 0.0}]
    if cfg.pivotal:
        from peft import LoraConfig

        torch.manual_seed(cfg.seed)
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                    target_modules=UNET_TARGET_PRESETS[cfg.unet_targets]))
        lora = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
        params.update(lora)
        groups.append({"params": list(lora.values()), "lr": cfg.lora_learning_rate})
    optimizer = torch.optim.AdamW(groups)
    start = 0
    if cfg.resume and list_checkpoints(out / "checkpoints"):
        start = load_training_state(list_checkpoints(out / "checkpoints")[-1], params, optimizer)
    class_dim = unet.config.projection_class_embeddings_input_dim if family == "unclip" else None
    scaling = vae.config.scaling_factor
    text_encoder.train()
    unet.train()
    t0 = time.time()
    loss_value = float("nan")
    bar = tqdm(range(start, cfg.max_train_steps), desc="train-ti", unit="step", dynamic_ncols=True)
    for step in bar:
        latents, noise, timesteps, prompts = _step_draws(cfg, step, latent_mean, latent_std, scaling,
                                                         noise_scheduler, placeholder_text)
        loss = _squared_errors(pipe, noise_scheduler, latents, noise, timesteps, prompts, class_dim).mean()
        require_finite(loss, step, cfg.output)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rows.restore()  # only the placeholder rows learn
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            save_training_state(out / "checkpoints", done, params, optimizer, info={"loss": loss_value})
    bar.close()
    learned = embeddings.detach()[token_ids].cpu()
    config = _adapter_config(cfg, pipe, token_ids, placeholder_text, loss_value, size)
    if cfg.pivotal:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet_sd = get_peft_model_state_dict(unet)
        if cfg.unet_targets == "attention":  # LoCon keeps peft's key names, as train-lora's does (see there)
            unet_sd = convert_state_dict_to_diffusers(unet_sd)
        save_diffusers_lora(pipe, out, unet_sd, None)
        config["lora_weights"] = LORA_WEIGHTS
    weights = write_adapter(out, TI_WEIGHTS, {cfg.placeholder_token: learned}, config)
    seconds = round(time.time() - t0, 3)
    record.finish({"final_loss": loss_value, "steps": cfg.max_train_steps, "seconds": seconds})
    return TextualInversionResult(out, weights, config["tokens"], cfg.max_train_steps, start, loss_value, seconds)


def _train_class_group(cfg: TextualInversionConfig, classes: list[TextualInversionConfig]) -> None:
    """Train several per-class inversions (``classes``: each one's own config) in one loop.

    Each step runs every class's rows through the text encoder and UNet at once, and the loss is the
    sum of the classes' own mean losses. A class's tokens appear only in its own prompts, so their
    gradient is that of its lone run; AdamW (no weight decay on embeddings) updates each element from
    its own gradient alone; and each class draws from ``(seed, step)`` exactly as a lone run does. So
    every adapter equals the one ``class_batch: 1`` trains, up to float rounding of the larger batch.
    """
    import contextlib
    import hashlib

    from diffusers import DDPMScheduler

    device = resolve_device(cfg.device)
    pipe, family = load_base_for_personalization(cfg.model, cfg.instance_data, "train-ti", str(device))
    size = cfg.resolution or default_resolution(pipe)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    posteriors, token_ids, texts = [], [], []
    for c in classes:
        pixels = _load_images(c.instance_data, c.instance_class, size, "instance_data")
        if c.random_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        posteriors.append(_encode_latents(vae, pixels))
        ids = add_placeholder_tokens(tokenizer, text_encoder, c.placeholder_token, c.initializer_token, c.num_vectors)
        token_ids.append(ids)
        texts.append(" ".join(tokenizer.convert_ids_to_tokens(ids)))
    folders = [Path(c.output) for c in classes]
    key = hashlib.sha1("\n".join(c.instance_class or "" for c in classes).encode()).hexdigest()[:12]
    checkpoints = Path(cfg.output) / "checkpoints" / f"classes-{key}"
    with contextlib.ExitStack() as locks:
        for folder in folders:
            locks.enter_context(folder_lock(folder, "training an adapter in"))
            discard_partial_writes(folder, folder / "run")
        discard_partial_writes(checkpoints)  # the group's own: holding its classes' locks means holding it
        records = [RunRecord.start(folder / "run", "train-ti", c) for folder, c in zip(folders, classes)]
        rows = TrainableRows(text_encoder, [i for ids in token_ids for i in ids])
        embeddings = rows.weight
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        params = {"text_encoder.embeddings": embeddings}
        optimizer = torch.optim.AdamW([{"params": [embeddings], "lr": cfg.learning_rate, "weight_decay": 0.0}])
        start = 0
        if cfg.resume and list_checkpoints(checkpoints):
            start = load_training_state(list_checkpoints(checkpoints)[-1], params, optimizer)
        class_dim = unet.config.projection_class_embeddings_input_dim if family == "unclip" else None
        scaling = vae.config.scaling_factor
        text_encoder.train()
        unet.train()
        t0 = time.time()
        losses = torch.full((len(classes),), float("nan"))
        bar = tqdm(range(start, cfg.max_train_steps), desc=f"train-ti ({len(classes)} classes)", unit="step",
                   dynamic_ncols=True)
        for step in bar:
            draws = [_step_draws(c, step, mean, std, scaling, noise_scheduler, text)
                     for c, (mean, std), text in zip(classes, posteriors, texts)]
            latents, noise, timesteps = (torch.cat([d[i] for d in draws]) for i in range(3))
            prompts = [p for d in draws for p in d[3]]
            errors = _squared_errors(pipe, noise_scheduler, latents, noise, timesteps, prompts, class_dim)
            per_class = errors.view(len(classes), -1).mean(dim=1)
            loss = per_class.sum()
            require_finite(loss, step, cfg.output)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows.restore()
            losses = per_class.detach().cpu()
            bar.set_postfix(loss=f"{float(losses.mean()):.4f}")
            done = step + 1
            if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
                save_training_state(checkpoints, done, params, optimizer, info={"loss": losses.tolist()})
        bar.close()
        seconds = round(time.time() - t0, 3)
        for c, folder, ids, text, record, loss_value in zip(classes, folders, token_ids, texts, records,
                                                            losses.tolist()):
            config = {**_adapter_config(c, pipe, ids, text, loss_value, size),
                      "trained_with_classes": [k.instance_class for k in classes]}
            write_adapter(folder, TI_WEIGHTS, {c.placeholder_token: embeddings.detach()[ids].cpu()}, config)
            record.finish({"final_loss": loss_value, "steps": c.max_train_steps, "seconds": seconds,
                           "classes_in_group": len(classes)})
