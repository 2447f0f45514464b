"""The embedded model family shipped inside the package (``genaug/embedded/``).

``--model embedded`` names its generator; ``embedded:clip`` and ``embedded:oracle`` its dual
encoder and oracle. Anything else is passed through as a folder path or hub id.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError

EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "embedded"
PARTS = ("generator", "clip", "oracle")


def embedded_path(part: str = "generator") -> Path:
    if part not in PARTS:
        raise ModelError(f"unknown embedded model part {part!r}", fix=f"use one of {', '.join(PARTS)}")
    path = EMBEDDED_ROOT / part
    if not path.is_dir():
        raise ModelError(f"the embedded {part} is not in this installation", where=str(path),
                         fix="train it with `genaug pretrain --output genaug/embedded`, or pass a model folder")
    return path


def resolve_model(model: str) -> str:
    """Map ``embedded`` / ``embedded:<part>`` to the shipped folders; leave other names alone."""
    if model == "embedded":
        return str(embedded_path("generator"))
    if model.startswith("embedded:"):
        return str(embedded_path(model.split(":", 1)[1]))
    return model
