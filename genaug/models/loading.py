"""One loading path for every generator: a diffusers folder (tiny kit, embedded family, a real
checkpoint on disk) or a hub id the user has cached. Weights load from safetensors only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artefacts import pickle_allowed
from ..errors import ModelError

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableUnCLIPImg2ImgPipeline": "unclip",
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}", fix="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for but no GPU is visible", fix="use --device cpu or auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}", fix=f"use auto or one of {sorted(table)}")
    return table[dtype]


def model_class_name(model: str) -> str | None:
    index = Path(model) / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text())["_class_name"]
        except (json.JSONDecodeError, KeyError):
            raise ModelError("model_index.json is malformed", where=str(index)) from None
    return None


def load_pipeline(model: str, *, device: str = "auto", dtype: str = "auto", xformers: bool = False):
    """Load a diffusers pipeline from a local folder or a cached hub id, on ``device`` in ``dtype``."""
    from diffusers import DiffusionPipeline

    from .embedded import resolve_model

    model = resolve_model(model)
    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        raise ModelError("no diffusers model here (model_index.json missing)", where=model,
                         fix="build one with `genaug kit`, or point at a diffusers checkpoint folder")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        # Pickled (.bin) weights only on opt-in; diffusers then loads them with torch.load(weights_only=True).
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype,
                                                 use_safetensors=None if pickle_allowed() else True,
                                                 local_files_only=looks_local)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the model ({first})", where=model,
                         fix="give a local diffusers folder with safetensors weights (no hub access here)") from None
    if type(pipe).__name__ not in FAMILIES:
        raise ModelError(f"unsupported pipeline {type(pipe).__name__}", where=model,
                         fix=f"genaug supports {sorted(set(FAMILIES))}")
    pipe = pipe.to(dev)
    if xformers:
        if dev.type != "cuda":
            raise ModelError("xformers attention needs a CUDA GPU", fix="drop --xformers (torch SDPA is the default)")
        pipe.enable_xformers_memory_efficient_attention()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_unet(pipe, batch_size: int | None = None) -> None:
    """``torch.compile`` the pipeline's UNet in place (inductor), for static shapes.

    The one-off compile costs 44 s on 2 CPU cores for the embedded model (seconds with inductor's on-disk cache
    warm from an earlier run); then every denoising step is cheaper, so it pays on long jobs. Static graphs: a dynamic
    batch dimension measured slower than the eager UNet on the CPU. With ``batch_size`` the shared sampler pads
    each call to a few fixed sizes (quarters of the batch; img2img's active set and a last partial batch vary),
    so at most four graphs are compiled.
    """
    import os
    import shutil

    import torch._dynamo

    unet = pipe.unet
    # Inductor compiles C++ for the CPU; without a compiler it would fail at the first step, mid-run.
    if unet.device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++", "clang++"))):
        raise ModelError("--compile on the CPU needs a C++ compiler (g++ or clang++), and none is on PATH",
                         fix="install one (e.g. apt-get install g++), set CXX, or drop --compile")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8)
    unet.forward = torch.compile(unet.forward, dynamic=False)
    unet.genaug_padded_batch = batch_size


def pipeline_family(pipe) -> str:
    return FAMILIES[type(pipe).__name__]


def default_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
