"""genaug under a real multi-process launcher (torchrun; ``accelerate launch`` sets the same RANK / WORLD_SIZE
on GPUs): ``synth --shard auto`` writes a shard per process and merges to the one-process result;
``train-lora`` trains data-parallel (DDP over gloo on CPU) with only the main process writing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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
