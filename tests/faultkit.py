"""Fault injection for the crash-safety tests (tests/test_faults.py).

A *commit event* is a call to ``os.replace`` / ``os.rename`` whose destination lies under a watched
folder, or a call to ``os.fsync`` on a file under it. Every durable step genaug takes goes through
one of them (``atomic_write_bytes`` fsyncs a temporary file then ``os.replace``-s it; checkpoints
``Path.rename`` a folder; ``DatasetWriter`` fsyncs metadata.jsonl), so "the N-th commit event" is a
deterministic, fast stand-in for "a random moment": the hooks below count them, SIGKILL the
process just before or just after the N-th one, pause there (holding whatever locks the stage
holds) until the test kills it, or fail it and every later one with ENOSPC (a full disk).

Killed runs must be separate processes. Starting ``python`` and importing torch, diffusers, faiss
and transformers costs seconds per run, so they are forked from a multiprocessing *forkserver* that
imports all that once per test session (it runs no torch op, so forking it is safe); each run is a
fresh child process that runs ``genaug.cli.main(argv)`` exactly as the ``genaug`` command does.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

KINDS = ("replace", "rename", "fsync")
# What the stages import lazily; preloaded in the forkserver so a forked run starts in milliseconds.
PRELOAD = [
    "torch", "numpy", "PIL.Image", "safetensors.torch", "tqdm.auto", "faiss", "pyarrow.parquet", "timm",
    "accelerate", "peft", "transformers", "transformers.models.clip.modeling_clip",
    "diffusers", "diffusers.pipelines.pipeline_utils", "diffusers.models.autoencoders", "diffusers.models.unets",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "genaug.cli", "genaug.config", "genaug.generate.synth", "genaug.personalize.lora", "genaug.evaluate.classifier",
    "genaug.evaluate.backbones", "genaug.retrieve.index", "genaug.retrieve.retrieve", "genaug.retrieve.encoder",
    "genaug.pretrain.clip", "genaug.pretrain.data", "faultkit",
]


# --------------------------------------------------------------------------- hooks
@dataclass(frozen=True)
class Fault:
    """What to do at commit event ``n`` (1-based) among those whose path contains ``match``.

    ``action``: ``count`` (nothing), ``kill`` (SIGKILL), ``pause`` (write ``ready``, then sleep until
    killed or until ``release`` exists) or ``enospc`` (raise ``OSError(ENOSPC)`` instead of event
    ``n`` and every later one: the disk stays full).
    ``when``: ``before`` or ``after`` the real call (``enospc`` is always instead of it).
    """

    action: str = "count"
    n: int = 0
    when: str = "before"
    match: str = ""
    ready: str | None = None
    release: str | None = None  # pause: go on once this file exists (else wait to be killed)
    kinds: tuple[str, ...] = KINDS  # only these kinds of commit event count

    def counts(self, kind: str, path: str) -> bool:
        return kind in self.kinds and self.match in path

    def describe(self, events: list[tuple[str, str]] | None = None) -> str:
        text = f"{self.action} {self.when} commit event {self.n}"
        if self.match:
            text += f" matching {self.match!r}"
        if self.kinds != KINDS:
            text += f" of kind {'/'.join(self.kinds)}"
        if events:
            chosen = [e for e in events if self.counts(*e)]
            if 0 < self.n <= len(chosen):
                text += f" ({chosen[self.n - 1][0]} {chosen[self.n - 1][1]}, of {len(chosen)})"
        return text


class Hooks:
    """Patch ``os.replace``, ``os.rename`` and ``os.fsync`` to see commit events under ``root``."""

    def __init__(self, root: str | os.PathLike, fault: Fault = Fault()):
        self.root = os.path.realpath(root) + os.sep
        self.fault = fault
        self.events: list[tuple[str, str]] = []  # (kind, path) of every commit event under root
        self.matched = 0
        self._lock = threading.Lock()
        self._real: dict[str, Callable] = {}

    def _path(self, kind: str, args: tuple) -> str | None:
        if kind == "fsync":
            fd = args[0].fileno() if hasattr(args[0], "fileno") else args[0]
            try:
                return os.readlink(f"/proc/self/fd/{int(fd)}")
            except OSError:
                return None
        return os.path.realpath(os.fspath(args[1]))

    def _wrap(self, kind: str) -> Callable:
        real = self._real[kind]

        def hooked(*args, **kwargs):
            path = self._path(kind, args)
            if path is None or not path.startswith(self.root):
                return real(*args, **kwargs)
            with self._lock:
                self.events.append((kind, path))
                if self.fault.counts(kind, path):
                    self.matched += 1
                    k = self.matched
                else:
                    k = 0
            fault = self.fault
            if fault.action == "enospc" and k >= fault.n > 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            hit = k == fault.n > 0 and fault.action in ("kill", "pause")
            if hit and fault.when == "before":
                self._fire(kind, path)
            result = real(*args, **kwargs)
            if hit and fault.when == "after":
                self._fire(kind, path)
            return result

        return hooked

    def _fire(self, kind: str, path: str) -> None:
        if self.fault.action == "pause":
            ready = Path(self.fault.ready)
            ready.with_suffix(".part").write_text(json.dumps({"pid": os.getpid(), "kind": kind, "path": path}))
            self._real["replace"](ready.with_suffix(".part"), ready)  # whole, for wait_ready to read
            while self.fault.release is None or not Path(self.fault.release).exists():
                time.sleep(0.02)
            return
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self) -> "Hooks":
        for kind in KINDS:
            self._real[kind] = getattr(os, kind)
            setattr(os, kind, self._wrap(kind))
        return self

    def __exit__(self, *exc) -> None:
        for kind, real in self._real.items():
            setattr(os, kind, real)


def pick(events: list[tuple[str, str]], seed: int, *, action: str = "kill", when: str | None = None,
         **fault: Any) -> Fault:
    """A seeded random one of ``events`` that ``Fault(**fault)`` counts, before or after it at random."""
    rng = random.Random(seed)
    probe = Fault(action, 0, when or rng.choice(["before", "after"]), **fault)
    total = sum(probe.counts(kind, path) for kind, path in events)
    assert total > 0, f"no commit event fits {probe}: {events}"
    return dataclasses.replace(probe, n=rng.randint(1, total))


def fault_seed(default: int) -> int:
    """GENAUG_FAULT_SEED=<int> moves every test to other kill points (to fuzz: loop over seeds)."""
    return default + int(os.environ.get("GENAUG_FAULT_SEED", "0"))


# --------------------------------------------------------------------------- running stages
def _child(argv: list[str], root: str, fault: Fault, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from genaug.cli import main

    with Hooks(root, fault):
        code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


@dataclass
class Run:
    process: Any
    log: Path
    fault: Fault

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for a paused run to reach its pause point; its report (pid, kind, path)."""
        deadline = time.monotonic() + timeout
        ready = Path(self.fault.ready)
        while not ready.is_file():
            if not self.process.is_alive():
                raise AssertionError(f"the run ended ({self.process.exitcode}) before pausing:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the run did not pause within {timeout}s:\n{self.output()}")
            time.sleep(0.02)
        return json.loads(ready.read_text())

    def kill(self) -> int:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()
        return self.process.exitcode

    def join(self, timeout: float = 300.0) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise AssertionError(f"the run did not finish within {timeout}s:\n{self.output()}")
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


class Runner:
    """Runs ``genaug <argv>`` in forked child processes with a fault armed."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.count = 0
        self.runs: list[Run] = []

    def warm(self) -> None:
        """Start the forkserver (it imports PRELOAD) now, in the background of whatever runs next."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def start(self, argv: list[str], root: str | os.PathLike, fault: Fault) -> Run:
        self.count += 1
        log = self.workdir / f"run-{self.count}.log"
        process = self.ctx.Process(target=_child, args=(list(argv), str(root), fault, str(log)), daemon=True)
        process.start()
        self.runs.append(Run(process, log, fault))
        return self.runs[-1]

    def close(self) -> None:
        """Kill what a failed test left running (a paused run holds its folder's lock)."""
        for run in self.runs:
            if run.process.exitcode is None:
                run.kill()

    def run(self, argv: list[str], root: str | os.PathLike, fault: Fault, timeout: float = 300.0) -> Run:
        run = self.start(argv, root, fault)
        run.join(timeout)
        return run

    def run_killed(self, argv: list[str], root: str | os.PathLike, fault: Fault, events=None) -> Run:
        """Run with a ``kill`` fault and check the process really died of SIGKILL there."""
        assert fault.action == "kill"
        run = self.run(argv, root, fault)
        assert run.process.exitcode == -signal.SIGKILL, (
            f"expected death by SIGKILL at {fault.describe(events)}, got exit code {run.process.exitcode}:\n"
            f"{run.output()[-3000:]}")
        return run


# --------------------------------------------------------------------------- checking folders
def snapshot(folder: str | os.PathLike) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder`` by relative path: its bytes, inode and mtime (a rewrite with the
    same bytes still shows)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def debris(folder: str | os.PathLike) -> list[str]:
    """Temporary files and folders a killed write can leave behind (``.name.XXXX.tmp``, ``.partial-*``, ...)."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".partial-"))


def check_dataset(root: str | os.PathLike, split: str = "train", *, complete: bool | None) -> list[dict[str, Any]]:
    """A genaug dataset folder is consistent: manifest parses, every metadata line is whole, ids are
    unique and each line's file exists and decodes; ``complete`` says what the manifest must claim
    (None: either; one that claims complete must list every image it holds). Returns the rows."""
    from genaug.artefacts import read_dataset, read_manifest, read_metadata_lines

    root = Path(root)
    manifest = read_manifest(root)
    assert manifest is not None, f"{root}: genaug.json missing"
    if complete is not None:
        assert manifest["splits"][split]["complete"] is complete, manifest
    complete = manifest["splits"][split]["complete"]
    rows = read_metadata_lines(root / split / "metadata.jsonl", tolerate_partial_tail=False)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicate ids in {root}: {sorted(i for i in ids if ids.count(i) > 1)}"
    ds = read_dataset(root, split)
    for i in range(len(ds)):
        ds.image(i)  # raises DataError when missing or undecodable
    if complete:
        assert manifest["splits"][split]["num_items"] == len(rows), manifest
        listed = {r["file_name"].split("/", 1)[1] for r in rows}
        on_disk = {p.name for p in (root / split / "images").iterdir() if not p.name.startswith(".")}
        assert on_disk == listed, f"unlisted images {sorted(on_disk - listed)}, missing {sorted(listed - on_disk)}"
    return rows


def assert_same_dataset(a: str | os.PathLike, b: str | os.PathLike, split: str = "train", *, max_level_diff: int = 0,
                        ignore_info: tuple[str, ...] = ()) -> int:
    """Equal metadata (same lines, same order) and manifest, images byte-equal (or, with
    ``max_level_diff``, equal within that many 0-255 levels); returns the number of images."""
    a_rows, b_rows = check_dataset(a, split, complete=True), check_dataset(b, split, complete=True)
    assert a_rows == b_rows
    for row in a_rows:
        name = row["file_name"]
        bytes_a, bytes_b = (Path(a) / split / name).read_bytes(), (Path(b) / split / name).read_bytes()
        if max_level_diff:
            pixels = []
            for root in (a, b):
                with Image.open(Path(root) / split / name) as image:
                    pixels.append(np.asarray(image, dtype=int))
            assert np.abs(pixels[0] - pixels[1]).max() <= max_level_diff, name
        else:
            assert bytes_a == bytes_b, name
    manifests = [json.loads((Path(root) / "genaug.json").read_text()) for root in (a, b)]
    for manifest in manifests:
        for key in ignore_info:
            manifest["info"].pop(key, None)
    assert manifests[0] == manifests[1]
    return len(a_rows)


def distinct_images(root: str | os.PathLike, split: str = "train") -> int:
    """How many different images a dataset holds (a comparison of blank images would prove nothing)."""
    folder = Path(root) / split / "images"
    images = set()
    for path in folder.glob("*.png"):
        with Image.open(path) as image:
            images.add(image.tobytes())
    return len(images)
