"""Loading adapter folders into a pipeline without trusting them.

Adapter files come from other people. genaug reads their tensors itself (safetensors only; a
pickle only with ``genaug --allow-pickle``, and then through ``torch.load(weights_only=True)``),
checks them against the base model (family, widths, LoRA ranks) and hands diffusers plain
state dicts, so nothing in a file's metadata decides how it is loaded, and a file that does not
fit is one clear error rather than a page of ``load_state_dict`` output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..artefacts import read_weights
from ..errors import ModelError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TI_WEIGHTS = "learned_embeds.safetensors"
_DOWN_SUFFIXES = (".lora.down.weight", ".lora_A.weight", ".lora_down.weight")
_UP_SUFFIXES = (".lora.up.weight", ".lora_B.weight", ".lora_up.weight")


def base_model_info(pipe) -> dict[str, Any]:
    """What an adapter trained on ``pipe`` depends on; stored in its adapter_config.json."""
    from ..models.loading import pipeline_family

    return {"base_family": pipeline_family(pipe), "text_hidden_size": int(pipe.text_encoder.config.hidden_size),
            "cross_attention_dim": int(pipe.unet.config.cross_attention_dim)}


def check_base_model(config: dict[str, Any], pipe, folder: str | Path) -> None:
    """Refuse an adapter recorded as trained on another kind of base model."""
    here = base_model_info(pipe)
    for key, label in (("base_family", "a {} model"), ("text_hidden_size", "text width {}"),
                       ("cross_attention_dim", "cross-attention width {}")):
        if key in config and config[key] != here[key]:
            raise ModelError(f"adapter does not fit this base model: trained on {label.format(config[key])}, "
                             f"this one has {label.format(here[key])}", where=str(folder),
                             fix=f"use it with the base model it was trained on ({config.get('base_model', '?')})")


def _layer(key: str, suffixes: tuple[str, ...]) -> str | None:
    return next((key[: -len(s)] for s in suffixes if key.endswith(s)), None)


def read_lora(folder: str | Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of an adapter folder, checked (down/up ranks agree) and with alpha/rank folded in."""
    folder = Path(folder)
    tensors = read_weights(weights_file(folder, config.get("lora_weights", LORA_WEIGHTS)))
    downs = {layer: t for k, t in tensors.items() if (layer := _layer(k, _DOWN_SUFFIXES)) is not None}
    ups = {layer: (k, t) for k, t in tensors.items() if (layer := _layer(k, _UP_SUFFIXES)) is not None}
    if not downs or downs.keys() != ups.keys():
        raise ModelError("not a LoRA: down/up weight pairs missing", where=str(folder),
                         fix="give a folder written by train-lora, train-ti --pivotal or merge-lora")
    for layer, down in downs.items():
        _, up = ups[layer]
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
            raise ModelError(f"LoRA rank mismatch in {layer}: down has rank {down.shape[0]}, up has "
                             f"{up.shape[1] if up.ndim > 1 else '?'}", where=str(folder),
                             fix="the file is corrupt or was edited; retrain or re-export it")
    rank, alpha = config.get("rank"), config.get("alpha")
    if isinstance(rank, (int, float)) and isinstance(alpha, (int, float)) and rank > 0 and alpha != rank:
        # diffusers infers alpha = rank from a bare state dict; fold the trained scale into "up".
        scale = float(alpha) / float(rank)
        for key, up in ups.values():
            tensors[key] = up * scale
    return tensors


def load_lora(pipe, folder: str | Path, config: dict[str, Any], adapter_name: str) -> None:
    tensors = read_lora(folder, config)
    try:
        pipe.load_lora_weights(tensors, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise ModelError(f"adapter does not fit this base model ({_first_line(exc)})", where=str(folder),
                         fix="use it with the base model it was trained on") from None


def load_textual_inversion(pipe, path: str | Path, token: str | None = None) -> list[str]:
    """Add ``{token: embedding}`` from a TI file to the pipeline's tokenizer and text encoder."""
    path = Path(path)
    tensors = read_weights(path)
    if len(tensors) != 1:
        raise ModelError(f"a textual-inversion file holds one token, this one holds {len(tensors)}", where=str(path))
    (name, embedding), = tensors.items()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if embedding.ndim not in (1, 2) or embedding.shape[-1] != width:
        raise ModelError(f"adapter does not fit this base model: embedding width {embedding.shape[-1]}, the "
                         f"text encoder's is {width}", where=str(path), fix="use it with the base model it was "
                         "trained on")
    token = token or name
    try:
        pipe.load_textual_inversion({token: embedding}, token=token)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot add the token ({_first_line(exc)})", where=str(path)) from None
    return [token]


def weights_file(folder: str | Path, name: str) -> Path:
    """``folder/name``, or its pickle twin (``.bin``) when only that exists: read_weights decides about it."""
    path = Path(folder) / name
    if not path.is_file() and path.suffix == ".safetensors" and path.with_suffix(".bin").is_file():
        return path.with_suffix(".bin")
    return path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
