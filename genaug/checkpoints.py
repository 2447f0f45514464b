"""Resumable training state in safetensors: parameters, AdamW moments and the step.

Training loops in genaug draw every random number of step ``s`` from a generator seeded by
``(seed, s)``, so this is all a resume needs to continue exactly like an uninterrupted run.
A checkpoint folder is written under a temporary name and renamed into place, so a kill
mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .artefacts import read_adapter_config, read_safetensors, write_adapter
from .errors import ModelError

STATE_FILE = "state.safetensors"


def require_finite(loss: torch.Tensor, step: int, where: str) -> None:
    """Stop a diverged run with one line, before the NaN reaches the weights or a checkpoint."""
    if not torch.isfinite(loss):
        raise ModelError(f"loss became {float(loss.detach())} at step {step}", where=where,
                         fix="lower the learning rate (or train in fp32); a rerun resumes from the last checkpoint")


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + step)


def list_checkpoints(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def save_training_state(folder: str | Path, step: int, params: dict[str, torch.Tensor], optimizer=None,
                        extra_tensors: dict[str, torch.Tensor] | None = None, info: dict | None = None,
                        keep: int = 2) -> Path:
    """Write ``folder/step-NNNNNNN`` atomically; keep only the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{k}": v.detach() for k, v in params.items()}
    tensors.update({f"extra/{k}": v.detach() for k, v in (extra_tensors or {}).items()})
    if optimizer is not None:
        for k, p in params.items():
            state = optimizer.state.get(p, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    tensors[f"{name}/{k}"] = state[name]
            if "step" in state:
                tensors[f"step/{k}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".partial-"))
    write_adapter(tmp, STATE_FILE, tensors, {"step": step, **(info or {})})
    final = folder / f"step-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(path: str | Path, params: dict[str, torch.Tensor], optimizer=None,
                        extra_tensors: dict[str, torch.Tensor] | None = None) -> int:
    """Restore parameters (and optimizer moments, extra tensors) in place; returns the step."""
    path = Path(path)
    tensors, _ = read_safetensors(path / STATE_FILE)
    step = int(read_adapter_config(path)["step"])
    with torch.no_grad():
        for k, p in params.items():
            if f"param/{k}" not in tensors:
                raise ModelError(f"checkpoint lacks {k}", where=str(path), fix="delete the checkpoint folder")
            p.copy_(tensors[f"param/{k}"])
            if optimizer is not None and f"exp_avg/{k}" in tensors:
                optimizer.state[p] = {"exp_avg": tensors[f"exp_avg/{k}"].clone(),
                                      "exp_avg_sq": tensors[f"exp_avg_sq/{k}"].clone(),
                                      "step": tensors[f"step/{k}"].reshape(()).clone()}
        for k, t in (extra_tensors or {}).items():
            t.copy_(tensors[f"extra/{k}"])
    return step
