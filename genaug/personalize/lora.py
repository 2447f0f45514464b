"""DreamBooth-LoRA, after diffusers' ``examples/dreambooth/train_dreambooth_lora.py``.

peft LoRA on the UNet's attention projections (optionally the text encoder's), an instance
prompt with a rare token and a class word, optional prior preservation with class images the
base model draws itself. Differences from the example, for speed and reproducibility:

* latents and (frozen) text embeddings are computed once and cached;
* every random draw of step ``s`` (batch indices, noise, timesteps) comes from a generator seeded
  by ``(seed, s)``, so a run resumed from a checkpoint continues bit-for-bit like an
  uninterrupted one — the checkpoint needs only the LoRA weights, optimizer state and step;
* checkpoints and the final adapter are safetensors written atomically.

Output: ``pytorch_lora_weights.safetensors`` (diffusers/peft keys, loadable with
``pipe.load_lora_weights``) plus ``adapter_config.json``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artefacts import atomic_write_json, discard_partial_writes, folder_lock, read_dataset, read_safetensors
from ..checkpoints import list_checkpoints, load_training_state, require_finite, save_training_state, step_generator
from ..config import config_to_dict, option
from ..errors import ConfigError, DataError, ModelError
from ..models.loading import default_resolution, load_pipeline, pipeline_family
from ..runs import RunRecord
from .adapters import LORA_WEIGHTS, base_model_info

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# LoCon-style (kohya / LyCORIS): every projection and convolution of the UNet, not only attention.
# A UNet that cannot yet draw a concept's shape needs its convolutions adapted to learn it.
UNET_TARGETS_ALL = UNET_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                                   "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out"]
UNET_TARGET_PRESETS = {"attention": UNET_TARGETS, "all": UNET_TARGETS_ALL}


@dataclass
class LoraTrainConfig:
    """Train a DreamBooth-LoRA adapter on a few images of one concept."""

    model: str = option("models/tiny-sd15", "base model: a diffusers folder or a cached hub id")
    instance_data: str = option("", "images of the concept: a genaug/imagefolder dataset or a flat folder of images")
    instance_class: str | None = option(None, "use only this class of instance_data (by class name)")
    instance_prompt: str = option("a photo of sks object", "prompt with the rare identifier and the class word")
    caption_column: str | None = option(
        None, "metadata column of instance_data holding each image's own prompt, with the identifier (diffusers' "
              "--caption_column): what else each image shows (its colour, its background) is then named by "
              "its own words instead of being learned into the identifier; instance_prompt is kept for the record")
    instance_mask_data: str | None = option(
        None, "optional concept masks, one per instance image in the same order (white = concept): the "
              "diffusion loss then covers only the concept, as in Break-A-Scene, so the backgrounds of the few "
              "training images are not learned (with background_data they cut the concept out instead)")
    mask_background_weight: float = option(
        0.0, "with instance masks: weight of a term that holds the adapted UNet's prediction outside the mask to "
             "the base model's (adapter off) on the same input, so the adapter learns the concept without "
             "repainting the backgrounds; 0 leaves the background out of the loss")
    background_data: str | None = option(
        None, "with instance masks: a folder of scene images (no concept in them). Each instance image's concept is "
              "cut out by its mask and pasted onto backgrounds_per_image of them, drawn at random, as BLIP-Diffusion "
              "composes its subjects onto random backgrounds: the identifier then meets many scenes, not the few "
              "training images' own. The loss covers the whole frame, and the originals are kept")
    background_caption_column: str | None = option(
        None, "metadata column of background_data naming each scene (\"on sand\"): appended to the instance "
              "prompt of that scene's composites, so scene words train beside the identifier")
    backgrounds_per_image: int = option(8, "composites per instance image, with background_data")
    output: str = option("adapters/lora", "adapter folder to write")
    with_prior_preservation: bool = option(False, "add the prior-preservation loss on class images")
    class_prompt: str = option("a photo of an object", "prompt for the class images (prior preservation)")
    class_caption_column: str | None = option(
        None, "metadata column of class_data holding each class image's own prompt (prior preservation on "
              "captioned real images, as Custom Diffusion regularizes with captioned LAION images); the class "
              "images are then the user's, never drawn, and class_prompt is unused")
    class_data: str | None = option(None, "folder of class images; drawn by the base model when missing")
    num_class_images: int = option(50, "class images to use (generated if class_data has fewer)")
    prior_loss_weight: float = option(1.0, "weight of the prior-preservation loss")
    rank: int = option(4, "LoRA rank")
    alpha: float | None = option(None, "LoRA alpha (default: equal to the rank, scale 1)")
    unet_targets: Literal["attention", "all"] = option(
        "attention", "UNet layers that get LoRA: attention (q/k/v/out, diffusers' DreamBooth-LoRA) or all "
                     "(also the convolutions, feed-forwards and projections, kohya's LoCon); stock diffusers and "
                     "kohya load both")
    use_dora: bool = option(False, "DoRA (Liu et al. 2024, peft's use_dora): each adapted weight's direction gets the "
                                   "low-rank update and its per-channel magnitude is learned on its own; stock "
                                   "diffusers loads it; no kohya export or merge-lora")
    train_text_encoder: bool = option(False, "also put LoRA on the text encoder's attention")
    learning_rate: float = option(1e-4, "AdamW learning rate")
    max_train_steps: int = option(200, "optimizer steps")
    train_batch_size: int = option(4, "instance images per step (as many class images are added with prior preservation)")
    resolution: int | None = option(None, "training resolution (default: the model's native size)")
    random_flip: bool = option(True, "horizontal flips of the instance images (cached both ways)")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "mixed precision (GPU)")
    gradient_checkpointing: bool = option(False, "trade compute for memory in the UNet")
    checkpointing_steps: int = option(0, "save a resumable checkpoint every N steps (0: never)")
    resume: bool = option(True, "resume from the newest checkpoint in output/checkpoints if there is one")
    validation_prompt: str | None = option(None, "prompt for validation images")
    validation_steps: int = option(0, "draw validation images every N steps (0: only at the end if a prompt is set)")
    num_validation_images: int = option(4, "validation images per validation")
    kohya_export: bool = option(False, "also write the adapter with kohya-ss key names (lora_unet_*, .alpha)")
    seed: int = option(0, "seed for initialization and every random draw")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.max_train_steps < 1 or self.train_batch_size < 1:
            raise ValueError("max_train_steps and train_batch_size must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if min(self.checkpointing_steps, self.validation_steps, self.num_class_images) < 0:
            raise ValueError("checkpointing_steps, validation_steps and num_class_images must be >= 0")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError("resolution must be a multiple of 8")
        if self.unet_targets not in UNET_TARGET_PRESETS:
            raise ValueError(f"unet_targets must be one of {', '.join(UNET_TARGET_PRESETS)}, got {self.unet_targets!r}")
        if self.mask_background_weight < 0:
            raise ValueError("mask_background_weight must be >= 0")
        if self.mask_background_weight and not self.instance_mask_data:
            raise ValueError("mask_background_weight needs instance_mask_data (the background is outside the masks)")
        if self.mask_background_weight and self.train_text_encoder:
            # The base prediction would need the text encoder without its LoRA as well: one more forward per step.
            raise ValueError("mask_background_weight works with a frozen text encoder: turn off train_text_encoder")
        if self.background_data and not self.instance_mask_data:
            raise ValueError("background_data needs instance_mask_data (the masks cut the concept out)")
        if self.background_data and self.mask_background_weight:
            raise ValueError("background_data trains on the whole frame: drop mask_background_weight")
        if self.background_caption_column and not self.background_data:
            raise ValueError("background_caption_column needs background_data")
        if self.backgrounds_per_image < 1:
            raise ValueError("backgrounds_per_image must be >= 1")
        if self.class_caption_column and not (self.with_prior_preservation and self.class_data):
            raise ValueError("class_caption_column needs with_prior_preservation and class_data (captioned images)")
        if self.use_dora and (self.kohya_export or self.train_text_encoder):
            # kohya's converter has no DoRA magnitudes, and stock diffusers drops the text encoder's on load.
            raise ValueError("use_dora works on the UNet alone: turn off kohya_export and train_text_encoder")


@dataclass
class LoraTrainResult:
    output: Path
    weights: Path
    steps: int
    resumed_from: int
    final_loss: float
    seconds: float
    steps_per_second: float


def _image_tensor(image, size: int) -> torch.Tensor:
    image = image.resize((size, size), resample=3)  # bicubic, as torchvision's Resize
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)


def _class_indices(ds, folder: str, class_name: str | None, where: str) -> list[int]:
    """Indices of ``ds`` to train on: all of them, or those of one class."""
    indices = list(range(len(ds)))
    if class_name is not None:
        if class_name not in ds.class_names:
            raise DataError(f"class {class_name!r} not in the dataset", where=folder,
                            fix=f"use one of {ds.class_names[:10]}")
        label = ds.class_names.index(class_name)
        indices = [i for i in indices if int(ds.records[i]["label"]) == label]
    if not indices:
        raise DataError("no images to train on", where=f"{where}={folder}")
    return indices


def _load_images(folder: str, class_name: str | None, size: int, where: str) -> torch.Tensor:
    ds = read_dataset(folder)
    return torch.stack([_image_tensor(ds.image(i), size) for i in _class_indices(ds, folder, class_name, where)])


def _load_captions(folder: str, class_name: str | None, column: str, where: str) -> list[str]:
    """Each image's own prompt, in ``_load_images``' order."""
    ds = read_dataset(folder)
    captions = []
    for i in _class_indices(ds, folder, class_name, where):
        caption = ds.records[i].get(column)
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"image {ds.records[i].get('file_name', i)!r} has no {column!r} caption",
                            where=f"{where}={folder}", fix=f"give every image a non-empty {column!r} in "
                                                           "metadata.jsonl, or drop the caption column")
        captions.append(caption)
    return captions


def load_masks(folder: str, size: int, where: str, class_name: str | None = None) -> torch.Tensor:
    """Binary ``(N, 1, size, size)`` masks from a folder of mask images (white, > 50% grey, = inside)."""
    ds = read_dataset(folder)
    indices = range(len(ds))
    if class_name is not None and class_name in ds.class_names:
        label = ds.class_names.index(class_name)
        indices = [i for i in indices if int(ds.records[i]["label"]) == label]
    if not indices:
        raise DataError("no mask images", where=f"{where}={folder}")
    masks = [torch.from_numpy(np.asarray(ds.image(i).convert("L").resize((size, size), resample=2),
                                         dtype=np.float32) / 255.0) for i in indices]
    return (torch.stack(masks)[:, None] > 0.5).float()


def composite_on_backgrounds(instance: torch.Tensor, masks: torch.Tensor, backgrounds: torch.Tensor, per_image: int,
                             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each instance image's masked concept pasted onto ``per_image`` backgrounds (distinct while there are enough):
    ``(composites, background index of each)``, image by image."""
    g = torch.Generator().manual_seed(seed)
    if per_image <= len(backgrounds):
        picks = torch.stack([torch.randperm(len(backgrounds), generator=g)[:per_image] for _ in instance])
    else:
        picks = torch.randint(0, len(backgrounds), (len(instance), per_image), generator=g)
    inside = masks[:, None]  # (N, 1, 1, H, W) against (N, K, 3, H, W) scenes
    composites = inside * instance[:, None] + (1 - inside) * backgrounds[picks]
    return composites.flatten(0, 1), picks.flatten()


def _add_composites(cfg: LoraTrainConfig, instance: torch.Tensor, captions: list[str], masks: torch.Tensor,
                    size: int) -> tuple[torch.Tensor, list[str]]:
    """The instance images followed by their composites on ``background_data``, with each one's prompt."""
    where = f"background_data={cfg.background_data}"
    if not Path(cfg.background_data).exists():
        raise DataError("background folder not found", where=where, fix="pass a folder of scene images")
    backgrounds = _load_images(cfg.background_data, None, size, "background_data")
    scene_words = (_load_captions(cfg.background_data, None, cfg.background_caption_column, "background_data")
                   if cfg.background_caption_column else None)
    composites, picks = composite_on_backgrounds(instance, masks, backgrounds, cfg.backgrounds_per_image, cfg.seed)
    prompts = [f"{cfg.instance_prompt} {scene_words[i]}" if scene_words else cfg.instance_prompt
               for i in picks.tolist()]
    return torch.cat([instance, composites]), captions + prompts


def latent_masks(masks: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Masks at the latent grid: a latent cell is inside if any of its pixels is (the VAE mixes a cell's pixels)."""
    return (F.interpolate(masks, size=latent_size, mode="area") > 0).float()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the mask's cells and every channel, averaged over the batch."""
    error = ((pred - target) ** 2 * mask).sum(dim=(1, 2, 3))
    return (error / (mask.sum(dim=(1, 2, 3)) * pred.shape[1]).clamp(min=1)).mean()


@torch.no_grad()
def _encode_latents(vae, pixels: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache the VAE posterior (mean, std) so each step samples latents without running the encoder."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i : i + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _prompt_ids(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with one row per distinct prompt, and each item's row: each distinct prompt is embedded once."""
    distinct = sorted(set(prompts))
    ids = pipe.tokenizer(distinct, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return ids, torch.tensor([distinct.index(p) for p in prompts], dtype=torch.long)


def _ensure_class_images(cfg: LoraTrainConfig, out: Path, size: int) -> str:
    """Class images for prior preservation: the user's, topped up by the base model's own drawings."""
    from ..generate.synth import SynthConfig, synthesize

    folder = cfg.class_data or str(out / "class_images")
    have = len(read_dataset(folder)) if Path(folder).is_dir() and any(Path(folder).iterdir()) else 0
    if have < cfg.num_class_images:
        if cfg.class_data and (have or cfg.class_caption_column):  # captioned class images are never drawn
            raise DataError(f"{have} class images, {cfg.num_class_images} asked for", where=folder,
                            fix="add images or lower num_class_images")
        synthesize(SynthConfig(model=cfg.model, output=folder, class_names=[cfg.class_prompt], prompt_templates=["{}"],
                               images_per_class=cfg.num_class_images, seed=cfg.seed, resolution=size,
                               device=cfg.device))
    return folder


def load_base_for_personalization(model: str, instance_data: str, command: str, device: str):
    """Check the concept images exist, load the base model in float32, check its layout: ``(pipe, family)``."""
    if not instance_data:
        raise ConfigError("instance_data is required", fix="pass --instance-data <folder of concept images>")
    if not Path(instance_data).exists():
        raise DataError("instance data folder not found", where=instance_data)
    pipe = load_pipeline(model, device=device, dtype="float32")
    family = pipeline_family(pipe)
    if family not in ("sd", "unclip"):
        raise ModelError(f"{command} supports SD 1.x/2.x and SD 2.1-unCLIP layouts, not {family}", where=model,
                         fix="use an SD 1.5/2.x or unCLIP checkpoint (or the embedded generator)")
    return pipe, family


def train_lora(cfg: LoraTrainConfig) -> LoraTrainResult:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    pipe, family = load_base_for_personalization(cfg.model, cfg.instance_data, "train-lora",
                                                 str(accelerator.device) if cfg.device == "auto" else cfg.device)
    size = cfg.resolution or default_resolution(pipe)
    out = Path(cfg.output)

    # 1. Data: cache latents (both flips) and prompt ids once.
    instance = _load_images(cfg.instance_data, cfg.instance_class, size, "instance_data")
    captions = (_load_captions(cfg.instance_data, cfg.instance_class, cfg.caption_column, "instance_data")
                if cfg.caption_column else [cfg.instance_prompt] * len(instance))
    masks = None
    if cfg.instance_mask_data:
        if not Path(cfg.instance_mask_data).exists():
            raise DataError("mask folder not found", where=f"instance_mask_data={cfg.instance_mask_data}",
                            fix="pass a folder with one mask image per instance image")
        masks = load_masks(cfg.instance_mask_data, size, "instance_mask_data", cfg.instance_class)
        if len(masks) != len(instance):
            raise DataError(f"{len(masks)} masks for {len(instance)} instance images",
                            where=f"instance_mask_data={cfg.instance_mask_data}",
                            fix="give one mask per instance image, in the instance images' order")
        empty = (masks.sum(dim=(1, 2, 3)) == 0).nonzero().flatten().tolist()
        if empty:
            raise DataError(f"mask {empty[0]} is empty (all black)", where=f"instance_mask_data={cfg.instance_mask_data}",
                            fix="white marks the concept: every instance image needs some of it")
    if cfg.background_data:
        instance, captions = _add_composites(cfg, instance, captions, masks, size)
        masks = None  # the composites' scenes vary, so nothing is left out of the loss
    if cfg.random_flip:
        instance = torch.cat([instance, instance.flip(-1)])
        captions = captions + captions
        masks = torch.cat([masks, masks.flip(-1)]) if masks is not None else None
    # Two runs training into one folder would mix their checkpoints: hold it before writing anything.
    # Under `accelerate launch` only the main process writes (and locks); the others train beside it.
    lock = folder_lock(out, "training an adapter in") if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        return _train_lora_locked(cfg, accelerator, pipe, family, size, out, instance, captions, masks)


def _train_lora_locked(cfg: LoraTrainConfig, accelerator, pipe, family: str, size: int, out: Path,
                       instance: torch.Tensor, captions: list[str], masks: torch.Tensor | None) -> LoraTrainResult:
    """``train_lora`` from the first write on, with the output folder locked."""
    from diffusers import DDPMScheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    main = accelerator.is_main_process
    if main:
        discard_partial_writes(out, out / "run", out / "checkpoints")  # a killed run's temporaries
    class_pixels, class_captions = None, []
    if cfg.with_prior_preservation:
        if main:  # the base model draws missing class images once, for every process
            _ensure_class_images(cfg, out, size)
        accelerator.wait_for_everyone()
        class_folder = cfg.class_data or str(out / "class_images")
        class_pixels = _load_images(class_folder, None, size, "class_data")[: cfg.num_class_images]
        class_captions = [cfg.class_prompt] * len(class_pixels)
        if cfg.class_caption_column:
            class_captions = _load_captions(class_folder, None, cfg.class_caption_column, "class_data")
            class_captions = class_captions[: cfg.num_class_images]
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord.start(out / "run", "train-lora", cfg) if main else None
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
    unet_config = unet.config
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    inst_mean, inst_std = _encode_latents(vae, instance)
    inst_mask = latent_masks(masks, inst_mean.shape[-2:]) if masks is not None else None
    cls_mean = cls_std = None
    if class_pixels is not None:
        cls_mean, cls_std = _encode_latents(vae, class_pixels)
    inst_ids, inst_row = _prompt_ids(pipe, captions)  # a single row without captions
    cls_ids, cls_row = _prompt_ids(pipe, class_captions) if class_captions else (None, None)
    scaling = pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # 2. LoRA layers (peft), seeded so two runs start from the same weights.
    torch.manual_seed(cfg.seed)
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    unet_targets = UNET_TARGET_PRESETS[cfg.unet_targets]
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=unet_targets,
                                use_dora=cfg.use_dora))
    if cfg.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                            target_modules=TEXT_TARGETS))  # use_dora is refused with it
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    params.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate)
    # As in diffusers' script: a frozen text encoder stays out of prepare() (DDP refuses a module with nothing
    # to train).
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    start_step = 0
    if cfg.resume and list_checkpoints(out / "checkpoints"):
        start_step = load_training_state(list_checkpoints(out / "checkpoints")[-1], params, optimizer)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return text_encoder(ids.to(accelerator.device))[0]

    # Frozen text encoder: embed each prompt once.
    with torch.no_grad():
        inst_emb = embed(inst_ids) if not cfg.train_text_encoder else None
        cls_emb = embed(cls_ids) if cls_ids is not None and not cfg.train_text_encoder else None

    # 3. Train.
    unet.train()
    t0 = time.time()
    loss_value = float("nan")
    bar = tqdm(range(start_step, cfg.max_train_steps), desc="train-lora", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    for step in bar:
        # Each process draws its own share of the step's samples (one process: the plain stream).
        g = step_generator(cfg.seed, step * accelerator.num_processes + accelerator.process_index)
        idx = torch.randint(0, len(inst_mean), (cfg.train_batch_size,), generator=g)
        mean, std = inst_mean[idx], inst_std[idx]
        n_inst = len(idx)
        if cls_mean is not None:
            cidx = torch.randint(0, len(cls_mean), (cfg.train_batch_size,), generator=g)
            mean, std = torch.cat([mean, cls_mean[cidx]]), torch.cat([std, cls_std[cidx]])
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * scaling
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        dev = accelerator.device
        cond = (embed(inst_ids) if cfg.train_text_encoder else inst_emb)[inst_row[idx]]
        if cls_mean is not None:
            cls_e = embed(cls_ids) if cfg.train_text_encoder else cls_emb
            cond = torch.cat([cond, cls_e[cls_row[cidx]]])
        # unCLIP layouts learn the concept from text alone: the image condition is the null one
        # (zeros), exactly what text-only sampling feeds the UNet.
        class_labels = None
        if family == "unclip":
            class_labels = torch.zeros(len(noisy), unet_config.projection_class_embeddings_input_dim, device=dev)
        with accelerator.autocast():
            pred = unet(noisy.to(dev), timesteps.to(dev), cond, class_labels=class_labels).sample
        pred, target = pred.float(), target.to(dev).float()
        if inst_mask is not None:
            mask = inst_mask[idx].to(dev)
            loss = masked_mse(pred[:n_inst], target[:n_inst], mask)
            if cfg.mask_background_weight:
                base_unet = accelerator.unwrap_model(unet)
                base_unet.disable_adapters()
                with torch.no_grad(), accelerator.autocast():
                    labels = class_labels[:n_inst] if class_labels is not None else None
                    base = base_unet(noisy[:n_inst].to(dev), timesteps[:n_inst].to(dev), cond[:n_inst],
                                     class_labels=labels).sample.float()
                base_unet.enable_adapters()
                loss = loss + cfg.mask_background_weight * masked_mse(pred[:n_inst], base, 1.0 - mask)
        else:
            loss = F.mse_loss(pred[:n_inst], target[:n_inst])
        if cls_mean is not None:  # the prior covers the class images' whole frame
            loss = loss + cfg.prior_loss_weight * F.mse_loss(pred[n_inst:], target[n_inst:])
        require_finite(loss, step, cfg.output)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if main and cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            save_training_state(out / "checkpoints", done, params, optimizer, info={"loss": loss_value})
        if main and cfg.validation_prompt and cfg.validation_steps and done % cfg.validation_steps == 0:
            _validate(pipe, cfg, out, done, size)
    bar.close()
    seconds = time.time() - t0
    accelerator.wait_for_everyone()
    steps_run = cfg.max_train_steps - start_step
    result = LoraTrainResult(out, out / LORA_WEIGHTS, cfg.max_train_steps, start_step, loss_value, round(seconds, 3),
                             round(steps_run / seconds, 3) if seconds > 0 else 0.0)
    if not main:
        return result

    # 4. Save in diffusers format (+ kohya on request), atomically.
    unet_sd = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    if cfg.unet_targets == "attention":
        # The attention-only adapter keeps the classic diffusers key names (lora.down/up). That
        # conversion knows only attention layers, so a LoCon adapter keeps peft's names (lora_A/B),
        # which load_lora_weights reads as well; half-converted keys would be dropped on load.
        unet_sd = convert_state_dict_to_diffusers(unet_sd)
    te_sd = (convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(text_encoder)))
             if cfg.train_text_encoder else None)
    weights = save_diffusers_lora(pipe, out, unet_sd, te_sd)
    adapter_config = {
        "type": "lora", "format": "diffusers", "base_model": cfg.model, **base_model_info(pipe), "rank": cfg.rank,
        "alpha": alpha,
        "unet_target_modules": unet_targets, "text_encoder_target_modules": TEXT_TARGETS if cfg.train_text_encoder else [],
        "instance_prompt": cfg.instance_prompt, "steps": cfg.max_train_steps, "final_loss": loss_value,
        "resolution": size, "config": config_to_dict(cfg),
    }
    atomic_write_json(out / "adapter_config.json", adapter_config)
    if cfg.kohya_export:
        export_kohya(weights, out / "kohya_lora.safetensors", alpha)
    if cfg.validation_prompt:
        _validate(pipe, cfg, out, cfg.max_train_steps, size)
    record.finish({"final_loss": loss_value, "steps": cfg.max_train_steps, "resumed_from": start_step,
                   "steps_per_second": result.steps_per_second})
    return result


def save_diffusers_lora(pipe, out: Path, unet_sd: dict, te_sd: dict | None) -> Path:
    """``save_lora_weights`` into a temp folder, then an atomic rename of the file into ``out``."""
    def peft_metadata(model):  # lets stock diffusers restore lora_alpha (a bare state dict means alpha = rank)
        config = getattr(model, "peft_config", {}).get("default")
        return config.to_dict() if config is not None else None

    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        type(pipe).save_lora_weights(tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                     unet_lora_adapter_metadata=peft_metadata(pipe.unet),
                                     text_encoder_lora_adapter_metadata=peft_metadata(pipe.text_encoder) if te_sd
                                     else None, safe_serialization=True)
        (Path(tmp) / LORA_WEIGHTS).replace(out / LORA_WEIGHTS)
    return out / LORA_WEIGHTS


def export_kohya(weights: Path, target: Path, alpha: float) -> Path:
    """Rewrite a diffusers LoRA with kohya-ss key names (``lora_unet_*``, ``lora_te_*``, ``.alpha``)."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import save

    from ..artefacts import atomic_write_bytes

    tensors, _ = read_safetensors(weights)
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(tensors))
    # convert_state_dict_to_kohya writes alpha = rank; keep the trained alpha instead.
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(alpha))
    atomic_write_bytes(target, save({k: v.contiguous() for k, v in kohya.items()}))
    return target


@torch.no_grad()
def _validate(pipe, cfg: LoraTrainConfig, out: Path, step: int, size: int) -> Path:
    from PIL import Image

    from ..artefacts import atomic_write_bytes, encode_png

    pipe.unet.eval()
    from ..generate.sampler import Conditioning, Sampler, to_pil

    generators = [torch.Generator("cpu").manual_seed(cfg.seed + i) for i in range(cfg.num_validation_images)]
    # genaug's sampler draws text-only samples from SD and unCLIP layouts alike (the stock unCLIP
    # pipeline insists on an image).
    sampler = Sampler(pipe)
    pos, neg = sampler.encode_text([cfg.validation_prompt] * len(generators))
    cond = Conditioning(pos, neg, sampler.class_labels(None, 0, generators, len(generators)))
    images = to_pil(sampler.sample(cond, generators, size=size, num_steps=25, guidance_scale=7.5))
    pipe.unet.train()
    grid = Image.new("RGB", (size * len(images), size))
    for i, im in enumerate(images):
        grid.paste(im, (i * size, 0))
    path = out / "validation" / f"step-{step:07d}.png"
    atomic_write_bytes(path, encode_png(grid))
    return path

