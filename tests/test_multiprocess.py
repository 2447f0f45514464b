"""genaug under a real multi-process launcher (torchrun; ``accelerate launch`` sets the same RANK / WORLD_SIZE
on GPUs): ``synth --shard auto`` writes a shard per process and merges to the one-process result;
``train-lora`` trains data-parallel (DDP over gloo on CPU) with only the main process writing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genaug.artefacts import read_dataset
from genaug.generate.synth import SynthConfig, synthesize


TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")


def free_port() -> str:
    import socket

    with socket.socket() as s:  # a process group needs a real port (torchrun's 0 is not passed on)
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@needs_torchrun
def test_two_launched_processes_shard_and_merge_to_the_single_process_result(kit, tmp_path):
    common = dict(model=str(kit("sd15")), class_names=["red circle", "blue square"], images_per_class=3,
                  num_inference_steps=2, batch_size=2, device="cpu", seed=0)
    whole = synthesize(SynthConfig(output=str(tmp_path / "whole"), **common))
    argv = [TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), "-m", "genaug.cli", "synth",
            "--model", common["model"], "--class-names", "red circle,blue square", "--images-per-class", "3",
            "--num-inference-steps", "2", "--batch-size", "2", "--device", "cpu", "--seed", "0",
            "--output", str(tmp_path / "launched"), "--shard", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "launched" / "shards").iterdir())
    assert shards == ["00000-of-00002", "00001-of-00002"]
    assert [len(read_dataset(tmp_path / "launched" / "shards" / s)) for s in shards] == [3, 3]
    merged = synthesize(SynthConfig(output=str(tmp_path / "launched"), merge_shards=2, **common))
    assert merged.generated == whole.generated == 6
    a, b = read_dataset(tmp_path / "whole"), read_dataset(tmp_path / "launched")
    assert [r["id"] for r in a.records] == [r["id"] for r in b.records]
    for i in range(len(a)):
        assert np.abs(np.asarray(a.image(i), dtype=int) - np.asarray(b.image(i), dtype=int)).max() <= 2


@needs_torchrun
def test_lora_trains_data_parallel_with_one_writer(kit, shape_images, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    argv = [TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), "-m", "genaug.cli", "train-lora",
            "--model", str(kit("sd15")), "--instance-data", str(shape_images), "--output", str(out),
            "--max-train-steps", "4", "--train-batch-size", "2", "--checkpointing-steps", "2", "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "another genaug process" not in done.stderr  # only the main process holds the folder
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    pipe = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a photo of sks object", num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(out))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4


@needs_torchrun
def test_classifier_trains_data_parallel_and_resumes_after_a_kill(tmp_path):
    import contextlib
    import json
    import signal
    import time

    from test_classifier import write

    real = write(tmp_path / "real", "train", [6, 5, 4, 3, 2, 2], 1)
    write(real, "test", [3] * 6, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def argv(out):
        return [TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), "-m", "genaug.cli",
                "train-classifier", "--real-data", str(real), "--output", str(out), "--epochs", "12",
                "--min-steps", "48", "--batch-size", "8", "--checkpoint-every", "1", "--device", "cpu",
                "--no-progress"]

    whole = subprocess.run(argv(tmp_path / "whole"), capture_output=True, text=True, timeout=300, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "another genaug process" not in whole.stderr  # only the main process holds the folder
    final = json.loads((tmp_path / "whole" / "final.json").read_text())
    assert final["steps"] == 48 and not (tmp_path / "whole" / "rank-rng").exists()

    # Kill every process (-9) once a mid-run checkpoint exists, then relaunch: it resumes there.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(argv(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not (killed / "checkpoint.safetensors").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in [*_children(proc.pid), proc.pid]:  # torchrun's workers live in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not [pid for pid in _children(proc.pid)], "a worker survived the kill"
    assert not (killed / "final.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(argv(killed), capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["processes"] == 2 and 0 < metrics["resumed_from_epoch"] < 12
    assert (killed / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (killed / "summary.csv").read_text() == (tmp_path / "whole" / "summary.csv").read_text()


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.append(int(status.parent.name))
    return found
