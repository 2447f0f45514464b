"""``--shard auto`` under a real multi-process launcher (torchrun; ``accelerate launch`` sets the same
RANK / WORLD_SIZE on GPUs): each process writes its own shard, and the merge equals one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from genaug.artefacts import read_dataset
from genaug.generate.synth import SynthConfig, synthesize


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_launched_processes_shard_and_merge_to_the_single_process_result(kit, tmp_path):
    common = dict(model=str(kit("sd15")), class_names=["red circle", "blue square"], images_per_class=3,
                  num_inference_steps=2, batch_size=2, device="cpu", seed=0)
    whole = synthesize(SynthConfig(output=str(tmp_path / "whole"), **common))
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = [torchrun, "--nproc_per_node", "2", "--master_port", "0", "-m", "genaug.cli", "synth",
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
