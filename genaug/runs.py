"""Run folders: every stage run keeps its resolved config, the versions that made it, and metrics."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artefacts import atomic_write_json, atomic_write_text
from .config import config_to_dict, dump_yaml

PACKAGES = ("genaug", "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "datasets",
            "safetensors", "timm", "faiss-cpu", "numpy", "pillow")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    """The git commit genaug runs from (with '+dirty' for local changes), or None outside a checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class RunRecord:
    """Writes ``config.yaml``, ``versions.json`` and ``metrics.json`` into a run folder."""

    folder: Path
    stage: str
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, folder: str | Path, stage: str, config: Any) -> "RunRecord":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = cls(folder, stage)
        atomic_write_text(folder / "config.yaml", dump_yaml({"stage": stage, **config_to_dict(config)}))
        atomic_write_json(folder / "versions.json", {
            **package_versions(), "git_revision": git_revision(), "command": sys.argv,
            "platform": platform.platform(),
        })
        return record

    def finish(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.folder / "metrics.json", {
            "stage": self.stage, "seconds": round(time.time() - self.started, 3), **metrics})

