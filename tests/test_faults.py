"""Crash safety: kill -9 at random moments, a full disk, two writers on one folder.

Every stage that writes files must survive SIGKILL at any moment: rerunning the same command
completes with exactly what an uninterrupted run writes — nothing lost, duplicated or half-written.
A "random moment" is a seeded random *commit event* of the uninterrupted run (an fsync, rename or
replace under the output folder; see faultkit.py), killed just before or just after it. Killed runs
are separate processes (forked from a server that imported torch & co. once); the uninterrupted
references and the reruns run in this process. GENAUG_FAULT_SEED=<int> moves every test to other
kill points: ``for s in 1 2 3; do GENAUG_FAULT_SEED=$s pytest tests/test_faults.py; done`` fuzzes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from faultkit import (Fault, Hooks, Runner, assert_same_dataset, check_dataset, debris, distinct_images, fault_seed,
                      pick, snapshot)
from genaug.artefacts import DatasetWriter, folder_lock, read_safetensors
from genaug.cli import main
from test_retrieve import CLASSES, draw

KILLED = -signal.SIGKILL


def flags(command: list[str], **options) -> list[str]:
    """``command --a-b value ...`` from keyword options (a_b=value)."""
    argv = list(command)
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def one_error_line(err: str, command: str) -> str:
    """The one line a failing command printed besides its progress bars; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]  # bars redraw with \r
    assert len(lines) == 1 and lines[0].startswith(f"genaug {command}: "), err
    return lines[0]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """Forks the killed runs; they use as many torch threads as this process (equal numerics)."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    try:
        runner = Runner(tmp_path_factory.mktemp("runs"))
        runner.warm()  # imports in the background while the first reference runs
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(name, make_argv)`` -> (output folder, commit events) of one uninterrupted in-process run."""
    cache: dict[str, tuple[Path, list]] = {}

    def get(name, make_argv):
        if name not in cache:
            out = tmp_path_factory.mktemp("ref") / name
            with Hooks(out) as hooks:
                assert main(make_argv(out)) == 0
            cache[name] = (out, hooks.events)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """24 captioned images of six classes: the pool to index and retrieve from."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(5)
    with DatasetWriter(root, CLASSES, split="train") as writer:
        for label, name in enumerate(CLASSES):
            for j in range(4):
                writer.add(f"pool-{label}-{j}", draw(name, rng), label, caption=f"a photo of a {name}")
    return root


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    """Four images of one toy concept (as conftest's shape_images, once per module)."""
    folder = tmp_path_factory.mktemp("concept")
    for i in range(4):
        im = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(im).ellipse([4 + i, 4, 26, 26 + i], fill=(220, 30, 30))
        im.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A train/test dataset of the six classes for the classifier."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(7)
    for split, per_class in (("train", 4), ("test", 2)):
        with DatasetWriter(root, CLASSES, split=split) as writer:
            for label, name in enumerate(CLASSES):
                for j in range(per_class):
                    writer.add(f"{split}-{label}-{j}", draw(name, rng), label)
    return root


# --------------------------------------------------------------------------- the stages
@dataclass
class Stage:
    """How to run a stage into a folder, check a partial folder, and compare two finished ones."""

    command: str
    argv: Callable[[Path], list[str]]
    compare: Callable[[Path, Path], None]
    locks: str  # the folder the stage locks, relative to its output
    doing: str  # "another genaug process is <doing> this folder"
    check_partial: Callable[[Path], None]  # what a killed run left must be whole (possibly incomplete)


def partial_dataset(out: Path) -> None:
    if (out / "genaug.json").is_file():
        check_dataset(out, complete=None)  # complete if it died after the last image


def partial_index(out: Path) -> None:
    for path in (out / "embeddings").glob("*.npy"):
        np.load(path, allow_pickle=False)
    if (out / "index.json").is_file():  # written last: it marks a complete build
        assert (out / "index.faiss").is_file() and len(list((out / "embeddings").glob("image-*.npy"))) == 3


def partial_training(out: Path) -> None:
    """Every checkpoint, adapter or model file that is there reads whole."""
    for path in [*out.glob("*.safetensors"), *out.glob("checkpoints/step-*/*.safetensors")]:
        read_safetensors(path)
    for path in [*out.glob("*.json"), *out.glob("checkpoints/step-*/*.json"), *out.glob("run/*.json")]:
        json.loads(path.read_text())


def synth_argv(kit, out, **options):
    base = dict(model=kit("sd15"), output=out, class_names="red circle,blue square", images_per_class=4,
                num_inference_steps=2, batch_size=1, device="cpu", seed=0)
    return flags(["synth"], **{**base, **options})


def compare_datasets(count: int, **kwargs):
    def compare(ref: Path, out: Path) -> None:
        assert distinct_images(ref) == count  # distinct images: their equality below means something
        assert assert_same_dataset(ref, out, **kwargs) == count
        assert (out / "run" / "metrics.json").is_file()

    return compare


def compare_index(ref: Path, out: Path) -> None:
    from genaug.retrieve.index import load_embeddings

    def outputs(folder: Path) -> dict:
        info = json.loads((folder / "index.json").read_text())
        for key in ("seconds", "queries_per_second", "embedding_images_per_second"):
            info.pop(key)
        info["config"].pop("output")
        return {"info": info, "image": load_embeddings(folder, "image"), "caption": load_embeddings(folder, "caption"),
                "faiss": (folder / "index.faiss").read_bytes(), "rows": (folder / "metadata.parquet").read_bytes(),
                "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())}

    want, got = outputs(ref), outputs(out)
    assert want["image"].shape == (24, want["info"]["dim"]) and len(np.unique(want["image"], axis=0)) == 24
    for key in ("image", "caption"):
        assert np.array_equal(want[key], got[key]), key
    for key in ("info", "faiss", "rows", "files"):
        assert want[key] == got[key], key


def compare_lora(ref: Path, out: Path) -> None:
    want, _ = read_safetensors(ref / "pytorch_lora_weights.safetensors")
    got, _ = read_safetensors(out / "pytorch_lora_weights.safetensors")
    assert want.keys() == got.keys() and len(want) > 0
    assert any(float(t.abs().max()) > 0 for t in want.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (ref, out)]
    for config in configs:
        config["config"].pop("output")
    assert configs[0] == configs[1]
    assert (out / "run" / "metrics.json").is_file()
    assert debris(out) == []


def compare_ti(ref: Path, out: Path) -> None:
    want, _ = read_safetensors(ref / "learned_embeds.safetensors")
    got, _ = read_safetensors(out / "learned_embeds.safetensors")
    assert list(want) == list(got) == ["<toy>"] and want["<toy>"].shape[0] == 2
    torch.testing.assert_close(got["<toy>"], want["<toy>"], atol=1e-6, rtol=0)
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (ref, out)]
    for config in configs:
        config["config"].pop("output")
    assert configs[0] == configs[1]
    assert debris(out) == []


def compare_classifier(ref: Path, out: Path) -> None:
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    weights, _ = read_safetensors(out / "model.safetensors")
    assert len(weights) > 0 and any(float(t.float().abs().max()) > 0 for t in weights.values())
    assert (ref / "summary.csv").read_text() == (out / "summary.csv").read_text()
    finals = [json.loads((folder / "final.json").read_text()) for folder in (ref, out)]
    for final in finals:
        final.pop("seconds")
        final["config"].pop("output")
    assert finals[0] == finals[1]
    assert not (out / "checkpoint.safetensors").exists()
    assert (out / "metrics.json").is_file()
    assert debris(out) == []


@pytest.fixture(scope="module")
def stages(kit, pool, concept, labelled, reference) -> dict[str, Stage]:
    def index_argv(out):
        return flags(["index", "build"], pool=pool, output=out, model=kit("clip"), shard_size=8, batch_size=8,
                     device="cpu")

    def retrieve_argv(out):
        index, _ = reference("index", index_argv)
        return flags(["retrieve"], index=index, output=out, class_names=",".join(CLASSES), images_per_class=2,
                     dedup_cosine=1, device="cpu")

    def lora_argv(out):
        return flags(["train-lora"], model=kit("sd15"), instance_data=concept, output=out, max_train_steps=6,
                     train_batch_size=2, learning_rate=1e-2, checkpointing_steps=2, device="cpu", seed=0)

    def ti_argv(out):
        return flags(["train-ti"], model=kit("sd15"), instance_data=concept, output=out, max_train_steps=6,
                     train_batch_size=2, learning_rate=5e-2, num_vectors=2, placeholder_token="<toy>",
                     initializer_token="object", checkpointing_steps=2, device="cpu", seed=0)

    def classifier_argv(out):
        return flags(["train-classifier"], real_data=labelled, output=out, epochs=3, min_steps=6, batch_size=16,
                     checkpoint_every=1, device="cpu", seed=0) + ["--no-progress"]

    return {
        "synth": Stage("synth", lambda out: synth_argv(kit, out, workers=1), compare_datasets(8), "train", "writing",
                       partial_dataset),
        # two threads drawing batches at once: written in plan order, so a kill leaves a start of the plan
        "synth-threads": Stage("synth", lambda out: synth_argv(kit, out, workers=2), compare_datasets(8), "train",
                               "writing", partial_dataset),
        "index": Stage("index", index_argv, compare_index, ".", "building an index in", partial_index),
        "retrieve": Stage("retrieve", retrieve_argv, compare_datasets(12), "train", "writing", partial_dataset),
        "train-lora": Stage("train-lora", lora_argv, compare_lora, ".", "training an adapter in", partial_training),
        "train-classifier": Stage("train-classifier", classifier_argv, compare_classifier, ".",
                                  "training a classifier in", partial_training),
        "train-ti": Stage("train-ti", ti_argv, compare_ti, ".", "training an adapter in", partial_training),
    }


STAGE_SEEDS = [("synth", 11), ("synth-threads", 13), ("index", 41), ("retrieve", 51), ("train-lora", 61),
               ("train-classifier", 71), ("train-ti", 81)]


# --------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("name,seed", STAGE_SEEDS)
def test_killed_at_a_random_moment_the_rerun_completes_like_an_uninterrupted_run(stages, runner, reference, tmp_path,
                                                                                 name, seed):
    stage = stages[name]
    ref, events = reference(name, stage.argv)
    out = tmp_path / "out"
    fault = pick(events, fault_seed(seed))
    runner.run_killed(stage.argv(out), out, fault, events)
    stage.check_partial(out)  # consistent even right after the kill
    assert main(stage.argv(out)) == 0, fault.describe(events)
    stage.compare(ref, out)


def test_synth_killed_mid_batch_resumes_within_two_levels(kit, runner, reference, tmp_path):
    """Batches of one (above) give bit-identical images; batched kernels round differently once a
    resume regroups the batches, so a batched run comes back within 2 levels (metadata identical).
    Written without writer threads, so that the kill falls inside the second batch's writes."""
    argv = lambda out: synth_argv(kit, out, batch_size=2, writer_threads=0)  # noqa: E731
    ref, events = reference("synth-b2", argv)
    out = tmp_path / "syn"
    fault = pick(events, fault_seed(12), when="after", kinds=("replace",), match="/train/images/0000-red-circle-000003")
    runner.run_killed(argv(out), out, fault, events)
    assert len(check_dataset(out, complete=False)) == 3  # died inside the second batch: the rerun regroups
    assert main(argv(out)) == 0
    compare_datasets(8, max_level_diff=2)(ref, out)


def test_synth_killed_between_an_image_and_its_metadata_line_while_a_second_writer_is_refused(
        stages, runner, reference, tmp_path, capsys):
    """The dangerous window: an image renamed into place, its metadata line not written yet. Then
    a second `genaug synth` into the folder is refused and touches nothing; then the kill. Without
    writer threads, so that the pause freezes the whole writer (with them the window is the same)."""
    stage = stages["synth"]
    argv = lambda out: [*stage.argv(out), "--writer-threads", "0"]  # noqa: E731
    ref, events = reference("synth-t0", argv)
    out = tmp_path / "syn"
    fault = pick(events, fault_seed(21), action="pause", when="after", kinds=("replace",), match="/train/images/",
                 ready=str(tmp_path / "paused"))
    first = runner.start(argv(out), out, fault)
    image = Path(first.wait_ready()["path"])
    assert image.is_file() and image.suffix == ".png"
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv(out)) == 1
    line = one_error_line(capsys.readouterr().err, "synth")
    assert "another genaug process is writing this folder" in line, line
    assert snapshot(out) == before, "the refused writer touched the folder"

    assert first.kill() == KILLED
    rows = check_dataset(out, complete=False)
    assert image.stem not in {r["id"] for r in rows}  # it died inside the window
    assert main(argv(out)) == 0
    stage.compare(ref, out)


def test_a_resumed_dataset_keeps_no_temporary_file_of_a_killed_write(stages, reference, tmp_path):
    stage = stages["synth"]
    ref, _ = reference("synth", stage.argv)
    out = tmp_path / "syn"
    shutil.copytree(ref, out)
    # What a kill between atomic_write_bytes's fsync and its os.replace leaves behind.
    (out / "train" / "images" / ".0000-red-circle-000001.png.k1ll3d00.tmp").write_bytes(b"\x89PNG half")
    assert main(stage.argv(out)) == 0
    assert debris(out / "train") == []


def test_two_concurrent_shards_merge_to_the_single_run(kit, stages, runner, reference, tmp_path):
    ref, _ = reference("synth", stages["synth"].argv)
    out = tmp_path / "syn"
    release = tmp_path / "release"
    # Shard 0 (another process) stops after its second image until shard 1, here, has finished.
    hold = Fault("pause", 2, "after", match="/train/images/", kinds=("replace",), ready=str(tmp_path / "paused"),
                 release=str(release))
    first = runner.start(synth_argv(kit, out, shard="0/2"), out, hold)
    first.wait_ready()
    assert main(synth_argv(kit, out, shard="1/2")) == 0
    release.touch()
    assert first.join() == 0, first.output()
    assert main(synth_argv(kit, out, merge_shards=2)) == 0
    compare_datasets(8, ignore_info=("merged_shards",))(ref, out)


# --------------------------------------------------------------------------- two writers
@pytest.mark.parametrize("name", ["synth", "index", "retrieve", "train-lora", "train-classifier", "train-ti"])
def test_a_second_writer_is_refused_with_one_line_and_touches_nothing(stages, reference, tmp_path, capsys, name):
    """Another process holds the output folder (here: this test holds its lock)."""
    stage = stages[name]
    if name == "retrieve":
        reference("index", stages["index"].argv)
    out = tmp_path / "out"
    with folder_lock(out / stage.locks, "writing"):
        before = snapshot(out)
        capsys.readouterr()
        assert main(stage.argv(out)) == 1
        line = one_error_line(capsys.readouterr().err, stage.command)
        assert f"another genaug process is {stage.doing} this folder" in line, line
        assert snapshot(out) == before, "the refused run touched the folder"


# --------------------------------------------------------------------------- full disk
def _tmpfs_works(probe: Path) -> bool:
    probe.mkdir(exist_ok=True)
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{probe}'"],
                          capture_output=True)
    return done.returncode == 0


def test_full_disk_tmpfs_fails_cleanly_and_resumes(stages, reference, tmp_path):
    """The real CLI writing to a 32 KiB tmpfs (in a private mount namespace), then a rerun with space."""
    if not _tmpfs_works(tmp_path / "probe"):
        pytest.skip("no unshare/tmpfs here; test_full_disk_injected_* covers ENOSPC")
    stage = stages["synth"]
    ref, _ = reference("synth", stage.argv)
    mount, saved = tmp_path / "mnt", tmp_path / "saved"
    mount.mkdir()
    saved.mkdir()
    script = ('mnt=$1; saved=$2; shift 2; mount -t tmpfs -o size=32k tmpfs "$mnt" || exit 97; '
              '"$@"; rc=$?; cp -a "$mnt/." "$saved/" || exit 98; exit $rc')
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(mount), str(saved), sys.executable,
                           "-m", "genaug.cli", *stage.argv(mount / "syn")],
                          capture_output=True, env=env, timeout=300)  # bytes: keep the bars' \r
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 1, stderr
    line = one_error_line(stderr, "synth")
    assert "No space left on device" in line or "disk full" in line, line
    partial = saved / "syn"  # copied out of the tmpfs, as it was when the disk was full
    rows = check_dataset(partial, complete=False)
    assert 0 < len(rows) < 8, "the disk should fill up in the middle of the run"
    assert main(stage.argv(partial)) == 0  # the same command, now with space
    stage.compare(ref, partial)


@pytest.mark.parametrize("name,seed", [(name, seed + 100) for name, seed in STAGE_SEEDS])
def test_full_disk_injected_fails_cleanly_and_resumes(stages, reference, tmp_path, capsys, name, seed):
    """ENOSPC from a random commit on (the disk stays full), in this process; then a rerun with space."""
    stage = stages[name]
    ref, events = reference(name, stage.argv)
    out = tmp_path / "out"
    fault = pick(events, fault_seed(seed), action="enospc")
    capsys.readouterr()
    with Hooks(out, fault):
        assert main(stage.argv(out)) == 1, fault.describe(events)
    line = one_error_line(capsys.readouterr().err, stage.command)
    assert "No space left on device" in line or "disk full" in line, line
    stage.check_partial(out)
    assert main(stage.argv(out)) == 0, fault.describe(events)
    stage.compare(ref, out)


class FullDiskFile(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: a write past it writes what fits, the next fails
    with ENOSPC (what write(2) does on a full disk)."""

    def __init__(self, path, room: int):
        self.real, self.room = open(path, "ab", buffering=0), room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self.real.write(bytes(data[: self.room]))
        self.room -= written
        return written

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()
        super().close()


def test_disk_full_while_appending_metadata_leaves_only_whole_lines(stages, tmp_path, capsys, monkeypatch):
    import builtins

    import genaug.artefacts as artefacts

    out = tmp_path / "syn"
    opened = []

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("metadata.jsonl") and mode == "ab":
            opened.append(path)
            raw = FullDiskFile(path, room=1000)  # room for 2.5 lines
            return raw if kwargs.get("buffering", -1) == 0 else io.BufferedWriter(raw)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(artefacts, "open", open_on_a_full_disk, raising=False)
    assert main(stages["synth"].argv(out)) == 1
    monkeypatch.undo()
    assert opened, "the metadata file no longer opens through artefacts.open: update this test"
    assert "No space left on device" in one_error_line(capsys.readouterr().err, "synth")
    assert len(check_dataset(out, complete=False)) == 2  # fails: line 3 is torn


def test_a_failed_writer_releases_its_folder_for_a_retry_in_the_same_process(kit, tmp_path):
    from genaug.generate.synth import SynthConfig, synthesize

    cfg = SynthConfig(model=str(kit("sd15")), output=str(tmp_path / "syn"), class_names=["a", "b"],
                      images_per_class=2, num_inference_steps=1, device="cpu")
    with Hooks(tmp_path / "syn", Fault("enospc", 1, match="metadata.jsonl", kinds=("fsync",))):
        with pytest.raises(OSError) as failure:  # kept alive, as a notebook keeps sys.last_value
            synthesize(cfg)
    assert failure.value.errno == errno.ENOSPC
    assert synthesize(cfg).generated == 0  # fails: "another genaug process is writing this folder"


def test_disk_full_mid_training_prints_one_clean_actionable_line(stages, reference, tmp_path, capsys):
    stage = stages["train-classifier"]
    out = tmp_path / "out"
    argv = [a for a in stage.argv(out) if a != "--no-progress"]  # the bar is on by default
    with Hooks(out, Fault("enospc", 1, match="checkpoint.safetensors")):
        assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "train-classifier")
    assert "disk full" in line and "rerun the same command to resume" in line, line


def test_disk_full_error_is_one_actionable_line():
    from genaug.errors import GenaugError, disk_full_error, unexpected_error

    assert disk_full_error(ValueError("x")) is None
    assert disk_full_error(OSError(errno.EACCES, "Permission denied")) is None
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/train/images/a.png")
        except OSError:
            raise RuntimeError("while saving")  # found through the exception chain too
    except RuntimeError as exc:
        raised, error = exc, disk_full_error(exc)
    assert isinstance(error, GenaugError) and error.exit_code != 0
    line = error.one_line()
    assert "\n" not in line and "disk full" in line and "/data/out/train/images/a.png" in line
    assert "rerun the same command to resume" in line
    # The last-resort handlers (CLI and recipe workers) turn any exception into one line through it.
    assert unexpected_error(raised).one_line() == line
    other = unexpected_error(ValueError("no such column\nsecond line"))
    assert type(other) is GenaugError and other.one_line() == "internal error: ValueError: no such column"


def test_close_progress_bars_ends_the_line_of_an_open_bar():
    import io

    from tqdm import tqdm

    from genaug.errors import close_progress_bars

    stream = io.StringIO()
    bar = tqdm(total=4, file=stream, desc="work")
    bar.update(1)
    assert not stream.getvalue().endswith("\n")  # what a failure inside the loop leaves behind
    close_progress_bars()
    assert stream.getvalue().endswith("\n")
