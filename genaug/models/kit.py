"""Tiny, seeded, random-weight models of every architecture genaug supports.

Each builder returns a stock diffusers pipeline (or a transformers CLIPModel) whose modules have
the real architecture at toy width, so tests exercise the very code paths a real SD 1.5,
SD 2.1-unCLIP or SDXL checkpoint takes. ``save_kit_model`` writes an ordinary diffusers folder,
so ``from_pretrained(<folder>)`` is the single loading path for tiny and real checkpoints alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from ..config import option
from .tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer

KitArch = Literal["sd15", "unclip", "sdxl", "clip"]


def _tokenizer(workdir: Path, pad_token: str = "<|endoftext|>"):
    return build_clip_tokenizer(workdir / "_clip_bpe", pad_token=pad_token)


def _text_config(hidden: int = 32, projection_dim: int = 32, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
        intermediate_size=hidden * 2, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=layers,
        vocab_size=CLIP_VOCAB_SIZE, projection_dim=projection_dim, max_position_embeddings=77, hidden_act="gelu",
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32,
    )


def _ddim(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def build_tiny_sd15(workdir: Path, seed: int = 0):
    """SD 1.5 layout: UNet2DConditionModel + AutoencoderKL + one CLIP text encoder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config())
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(workdir), unet=unet, scheduler=_ddim(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def build_tiny_unclip(workdir: Path, seed: int = 0):
    """SD 2.1-unCLIP layout: the CLIP image embedding (noise-augmented) enters the UNet's class embedding."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    embed_dim = 32
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=embed_dim, projection_dim=embed_dim, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, intermediate_size=64, patch_size=4,
    ))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), class_embed_type="projection",
        # the class embedding is [image embedding, noise-level embedding], each embed_dim wide
        projection_class_embeddings_input_dim=embed_dim * 2, cross_attention_dim=32, norm_num_groups=8,
        use_linear_projection=True,
    )
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=_tokenizer(workdir, pad_token="!"),
        text_encoder=CLIPTextModel(_text_config()),
        unet=unet, scheduler=_ddim("v_prediction"), vae=_vae(),
    )


def build_tiny_sdxl(workdir: Path, seed: int = 0):
    """SDXL layout: two text encoders (the second with projection) and text-time added conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 micro-conditions x 8 + pooled text (32)
        cross_attention_dim=64, norm_num_groups=8,  # the two encoders' hidden states concatenated: 32 + 32
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    tokenizer = _tokenizer(workdir)
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()), text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer=tokenizer, tokenizer_2=_tokenizer(workdir, pad_token="!"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


@dataclass
class TinyClip:
    """A tiny CLIP dual encoder with its tokenizer and image processor (what retrieval and metrics load)."""

    model: object
    tokenizer: object
    image_processor: object

    def save_pretrained(self, folder: str | Path, **kwargs) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def build_tiny_clip(workdir: Path, seed: int = 0) -> TinyClip:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, intermediate_size=64, patch_size=4)
    config = CLIPConfig(text_config=_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    processor = CLIPImageProcessor(crop_size=32, size=32)
    return TinyClip(CLIPModel(config), _tokenizer(workdir), processor)


BUILDERS: dict[str, Callable] = {
    "sd15": build_tiny_sd15,
    "unclip": build_tiny_unclip,
    "sdxl": build_tiny_sdxl,
    "clip": build_tiny_clip,
}


def build_kit_model(arch: str, workdir: str | Path, seed: int = 0):
    if arch not in BUILDERS:
        raise ValueError(f"unknown kit architecture {arch!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[arch](Path(workdir), seed=seed)


@dataclass
class KitConfig:
    """Build a tiny random model of a supported architecture and save it as a diffusers folder."""

    arch: KitArch = option("sd15", "architecture: sd15 (SD 1.5), unclip (SD 2.1-unCLIP), sdxl, or clip (dual encoder)")
    output: str = option("models/tiny-sd15", "folder to write the model to (a standard diffusers/transformers folder)")
    seed: int = option(0, "seed for the random weights")


@dataclass
class KitResult:
    arch: str
    path: Path
    num_parameters: int


def save_kit_model(cfg: KitConfig) -> KitResult:
    """Build ``cfg.arch`` and save it with safetensors; loading it back is plain ``from_pretrained``."""
    import shutil
    import tempfile

    out = Path(cfg.output)
    with tempfile.TemporaryDirectory(prefix="genaug-kit-") as tmp:
        model = build_kit_model(cfg.arch, tmp, seed=cfg.seed)
        staging = Path(tmp) / "model"
        model.save_pretrained(staging, safe_serialization=True)
        # Replace the destination only once the whole folder is written.
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(out))
    modules = [model.model] if isinstance(model, TinyClip) else [
        m for m in model.components.values() if isinstance(m, torch.nn.Module)]
    return KitResult(cfg.arch, out, sum(p.numel() for m in modules for p in m.parameters()))
