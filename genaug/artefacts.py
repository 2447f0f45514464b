"""The artefacts stages hand each other on disk: datasets, adapters and reports.

A genaug dataset is a folder that ``datasets.load_dataset("imagefolder", data_dir=...)`` loads::

    <root>/genaug.json                 class names, splits, provenance (written last, atomically)
    <root>/<split>/metadata.jsonl      one JSON object per image, keyed by "file_name"
    <root>/<split>/images/<id>.png

Every image is written to a temporary file and renamed into place before its metadata line is
appended, so a crash leaves at most an orphan image (overwritten on resume) and never a line
that points at a half-written file. A writer resumes by reading the ids already listed.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError, ModelError

FORMAT = "genaug-dataset"
FORMAT_VERSION = 1
MANIFEST = "genaug.json"
METADATA = "metadata.jsonl"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Refuse decompression bombs: 64 MP is far above any image genaug trains on.
MAX_IMAGE_PIXELS = 64_000_000
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def _renamed_into_place(tmp: str | Path, path: Path) -> Iterator[None]:
    """Rename ``tmp`` onto ``path`` once the block has filled it; remove it if the block fails."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with _renamed_into_place(tmp, path):
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def link_or_copy(source: str | Path, path: str | Path) -> None:
    """Put ``source``'s bytes at ``path`` atomically: a hard link through a temporary name, or a copy (fsynced)
    where the file system refuses links."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"  # the name discard_partial_writes clears
    with _renamed_into_place(tmp, path):
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())


def discard_partial_writes(*folders: str | Path) -> None:
    """Remove what killed writes leave directly inside ``folders``: ``atomic_write_bytes``'s
    ``.<name>.<random>.tmp`` files and ``.partial-*`` folders (checkpoints, adapters being saved).
    Call it only while holding the folders' lock (``folder_lock``): another writer's are in flight."""
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
        for path in folder.glob(".partial-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def safe_child(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that would land outside ``root``."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise DataError(f"path {relative!r} escapes its folder", where=str(root), fix="use plain relative names")
    return candidate


def slugify(text: str, max_len: int = 64) -> str:
    """A filesystem-safe, human-readable slug (class names can hold '/', '..', unicode)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (slug or "x")[:max_len]


def safe_id(text: str) -> str:
    """``text`` if it is already a safe item id, else a readable slug plus a short hash (still unique)."""
    if _SAFE_ID.match(text):
        return text
    import hashlib

    return f"{slugify(text, 48)}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


# --------------------------------------------------------------------------- images
def open_image(path: str | Path, *, header_only: bool = False) -> Image.Image | None:
    """Open an image safely as RGB: size-capped, EXIF-rotated, any mode converted; one-line errors.

    ``header_only`` checks the format and size without decoding the pixels (and returns None).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image is {im.width}x{im.height}, above the {MAX_IMAGE_PIXELS} pixel limit",
                                where=str(path), fix="resize it or remove it")
            if header_only:
                return None
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image ({type(exc).__name__}: {exc})", where=str(path),
                        fix="replace or remove the file") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: worlds hold tens of thousands
    return buf.getvalue()


# --------------------------------------------------------------------------- locking
@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "writing") -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` so two processes never write it at once."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".genaug.lock"
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another genaug process is {what} this folder", where=str(folder),
                            fix="wait for it to finish, or write to another folder") from None
        yield
    finally:
        fh.close()


# --------------------------------------------------------------------------- manifest
def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"corrupt manifest ({exc})", where=str(path), fix="delete it and rebuild the dataset") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError("not a genaug dataset manifest", where=str(path))
    names = data.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError("manifest 'class_names' must be a list of strings", where=str(path))
    return data


def _update_manifest(root: Path, class_names: list[str], split: str | None, split_info: dict, info: dict) -> None:
    # Writers of different splits share the manifest: read-modify-write it under a blocking lock
    # so one writer's update never overwrites another's.
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".genaug-manifest.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        for stale in root.glob(f".{MANIFEST}.*.tmp"):  # a killed update's temporary
            stale.unlink(missing_ok=True)
        manifest = read_manifest(root) or {"format": FORMAT, "version": FORMAT_VERSION, "class_names": class_names,
                                           "splits": {}, "info": {}}
        if manifest["class_names"] != class_names:
            raise DataError("class names differ from the ones this dataset was written with", where=str(root),
                            fix="write to a new folder")
        manifest["splits"][split or ""] = split_info
        manifest["info"].update(info)
        atomic_write_json(root / MANIFEST, manifest)


# --------------------------------------------------------------------------- dataset writer
def read_metadata_lines(path: Path, *, tolerate_partial_tail: bool) -> list[dict[str, Any]]:
    """Parse metadata.jsonl; a crash can leave a partial last line, dropped only when tolerated."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            last = number == len(lines) and not raw.endswith(b"\n")
            if last and tolerate_partial_tail:
                break
            raise DataError(f"line {number} is not a JSON object ({exc})", where=str(path),
                            fix="repair or delete that line") from None
        rows.append(row)
    return rows


class DatasetWriter:
    """Append images with metadata to a genaug dataset split; resumable and crash-safe.

    Use as a context manager; ``done_ids`` lists what an earlier (possibly killed) run wrote.
    With ``threads > 0`` image files are written by a thread pool (each fsync waits for a journal
    commit; concurrent ones share it), while metadata lines are still appended strictly in call
    order and only once their image is in place: the files are byte-identical to ``threads=0``.
    """

    def __init__(self, root: str | Path, class_names: list[str], *, split: str | None = "train",
                 info: dict[str, Any] | None = None, threads: int = 0, in_flight: int = 64):
        self.root = Path(root)
        self.split = split
        self.class_names = list(class_names)
        self.info = dict(info or {})
        self.folder = self.root / split if split else self.root
        self.threads, self.in_flight = threads, in_flight
        self._lock: contextlib.ExitStack | None = None
        self._meta_fh: io.FileIO | None = None
        self._meta_size = 0  # bytes of whole lines in metadata.jsonl
        self._executor: ThreadPoolExecutor | None = None
        self._queued: deque[tuple[Future | None, str, bytes]] = deque()
        self.done_ids: set[str] = set()
        self.count = 0

    def __enter__(self) -> "DatasetWriter":
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(folder_lock(self.folder))
        discard_partial_writes(self.folder, self.folder / "images")  # what a killed writer left half-done
        meta_path = self.folder / METADATA
        rows = read_metadata_lines(meta_path, tolerate_partial_tail=True)
        # Rewrite the file without a torn tail so appends start on a clean line.
        if meta_path.is_file():
            clean = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            if clean.encode("utf-8") != meta_path.read_bytes():
                atomic_write_text(meta_path, clean)
        self.done_ids = {str(r.get("id")) for r in rows}
        self.count = len(rows)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        _update_manifest(self.root, self.class_names, self.split, {"num_items": self.count, "complete": False}, self.info)
        # Unbuffered: every line goes to the file whole or, on a failed write (a full disk), is cut off again.
        self._meta_fh = open(meta_path, "ab", buffering=0)
        self._meta_size = meta_path.stat().st_size
        if self.threads:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="genaug-writer")
        return self

    def add(self, item_id: str, image: Image.Image, label: int, **metadata: Any) -> str:
        """Write one image and its metadata line; returns its ``file_name``."""
        return self._queue(item_id, label, metadata, lambda target: atomic_write_bytes(target, encode_png(to_rgb(image))))

    def add_file(self, item_id: str, png: str | Path, label: int, **metadata: Any) -> str:
        """Like ``add`` for an image already encoded as PNG on disk (a shard's, during a merge): the file is
        hard-linked into place, or copied where links fail, so its bytes are kept and nothing is re-encoded."""
        return self._queue(item_id, label, metadata, lambda target: link_or_copy(png, target))

    def _queue(self, item_id: str, label: int, metadata: dict[str, Any], write: Callable[[Path], None]) -> str:
        if self._meta_fh is None:
            raise RuntimeError("DatasetWriter.add outside its `with` block")
        if not _SAFE_ID.match(item_id):
            raise DataError(f"unsafe item id {item_id!r}", where=str(self.folder),
                            fix="ids may hold letters, digits, '_', '-', '.'")
        if not 0 <= int(label) < len(self.class_names):
            raise DataError(f"label {label} out of range for {len(self.class_names)} classes", where=str(self.folder))
        file_name = f"images/{item_id}.png"
        target = safe_child(self.folder, file_name)
        row = {"file_name": file_name, "id": item_id, "label": int(label),
               "class_name": self.class_names[int(label)], **metadata}
        line = (json.dumps(row, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
        if self._executor is None:
            write(target)
            self._queued.append((None, item_id, line))
            self._settle(keep=0)
        else:
            self._queued.append((self._executor.submit(write, target), item_id, line))
            if len(self._queued) >= self.in_flight:
                self._settle(keep=self.in_flight // 2)
        return file_name

    def _settle(self, keep: int) -> None:
        """Append the metadata lines of the oldest queued images, each once its file is on disk."""
        while len(self._queued) > keep:
            future, item_id, line = self._queued[0]
            if future is not None:
                future.result()  # re-raises a failed write before its line could point at nothing
            self._queued.popleft()
            self._append(line)
            self.done_ids.add(item_id)
            self.count += 1

    def _append(self, line: bytes) -> None:
        """Append one metadata line entirely, or leave the file as it was (no torn line on ENOSPC)."""
        view = memoryview(line)
        try:
            while view:
                written = self._meta_fh.write(view)
                view = view[written or 0:]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._meta_fh.fileno(), self._meta_size)
            raise
        self._meta_size += len(line)

    def _settle_written(self) -> None:
        """After a failure, keep the lines of the images written before the first failed one."""
        while self._queued:
            future, item_id, line = self._queued.popleft()
            if future is not None and (future.cancelled() or future.exception() is not None):
                break
            try:
                self._append(line)
            except OSError:  # the disk is full: keep the lines already written
                break
            self.done_ids.add(item_id)
            self.count += 1
        self._queued.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._meta_fh is not None:
                self._settle(keep=0)
        except BaseException as error:
            exc_type = type(error)
            raise
        finally:
            # Each step in its own try, so a failure here (a full disk) still releases the folder.
            try:
                if self._executor is not None:
                    # Let queued writes finish even after a failure: an interrupted run keeps every image
                    # it had handed over (each write is atomic; a failed one stops _settle_written there).
                    self._executor.shutdown(wait=True, cancel_futures=False)
                    self._executor = None
                if self._meta_fh is not None:
                    try:
                        if exc_type is not None:
                            self._settle_written()
                        os.fsync(self._meta_fh.fileno())
                    finally:
                        self._meta_fh.close()
                        self._meta_fh = None
                complete = exc_type is None
                _update_manifest(self.root, self.class_names, self.split,
                                 {"num_items": self.count, "complete": complete}, self.info)
            finally:
                if self._lock is not None:
                    self._lock.close()
                    self._lock = None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --------------------------------------------------------------------------- dataset reader
@dataclass
class GenaugDataset:
    """A dataset split read from disk: records (metadata rows) plus class names."""

    root: Path
    folder: Path
    split: str | None
    class_names: list[str]
    records: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([int(r["label"]) for r in self.records], dtype=np.int64)

    def image_path(self, index: int) -> Path:
        return safe_child(self.folder, self.records[index]["file_name"])

    def image(self, index: int) -> Image.Image:
        return open_image(self.image_path(index))

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.class_names))


def list_splits(root: str | Path) -> list[str]:
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is not None:
        return [s for s in manifest.get("splits", {})]
    return sorted(p.parent.name for p in root.glob(f"*/{METADATA}"))


def read_dataset(root: str | Path, split: str | None = "train") -> GenaugDataset:
    """Read a genaug dataset, a metadata.jsonl imagefolder, or a plain ``class/image`` imagefolder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", where=str(root), fix="check the path")
    manifest = read_manifest(root)
    folder = root / split if split and (root / split).is_dir() else root
    meta_path = folder / METADATA
    if meta_path.is_file():
        rows = read_metadata_lines(meta_path, tolerate_partial_tail=False)
        for i, row in enumerate(rows, start=1):
            if "file_name" not in row or "label" not in row:
                raise DataError(f"line {i} lacks 'file_name' or 'label'", where=str(meta_path),
                                fix="every line needs both keys")
            if isinstance(row["label"], bool) or not isinstance(row["label"], int):
                raise DataError(f"line {i}: label {row['label']!r} is not an integer", where=str(meta_path))
            safe_child(folder, str(row["file_name"]))
        if manifest is not None:
            class_names = list(manifest["class_names"])
        else:
            n = max((int(r["label"]) for r in rows), default=-1) + 1
            names = {int(r["label"]): str(r.get("class_name", r["label"])) for r in rows}
            class_names = [names.get(i, str(i)) for i in range(n)]
        bad = [r["label"] for r in rows if not 0 <= int(r["label"]) < len(class_names)]
        if bad:
            raise DataError(f"label {bad[0]} out of range for {len(class_names)} classes", where=str(meta_path))
        split_name = folder.name if folder != root else None
        return GenaugDataset(root, folder, split_name, class_names, rows, (manifest or {}).get("info", {}))
    # A plain imagefolder: one sub-folder per class, labels in sorted order like torchvision's;
    # a flat folder of images is one class named after the folder.
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not p.is_symlink())
    if flat and not class_dirs:
        rows = [{"file_name": p.name, "id": safe_id(f"0-{p.stem}"), "label": 0, "class_name": folder.name}
                for p in flat]
        return GenaugDataset(root, folder, None, [folder.name], rows, {})
    rows = []
    for label, cdir in enumerate(class_dirs):
        found = [img for img in sorted(cdir.iterdir())
                 if img.suffix.lower() in IMAGE_EXTENSIONS and img.is_file() and not img.is_symlink()]
        if not found and class_dirs:
            # A class with no images would train (and score) as if it did not exist.
            raise DataError(f"class folder {cdir.name!r} has no images", where=str(folder),
                            fix="add images to it or remove the folder")
        rows.extend({"file_name": f"{cdir.name}/{img.name}", "id": safe_id(f"{label}-{img.stem}"), "label": label,
                     "class_name": cdir.name} for img in found)
    if not rows:
        raise DataError(f"no {METADATA} and no class folders with images", where=str(folder),
                        fix="point at a genaug dataset or an imagefolder (one folder per class)")
    return GenaugDataset(root, folder, None, [d.name for d in class_dirs], rows, {})


def load_hf_dataset(root: str | Path):
    """The same folder as a Hugging Face ``datasets`` object (imagefolder builder)."""
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(root))


# --------------------------------------------------------------------------- adapters & reports
ADAPTER_CONFIG = "adapter_config.json"


def write_adapter(folder: str | Path, weights_name: str, tensors: dict, config: dict[str, Any],
                  metadata: dict[str, str] | None = None) -> Path:
    """Save an adapter folder: ``weights_name`` (safetensors) plus ``adapter_config.json``."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(folder / weights_name, save(tensors, metadata=metadata))
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    return folder / weights_name


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE_ENV = "GENAUG_ALLOW_PICKLE"


def pickle_allowed() -> bool:
    """Whether the user opted in to pickle checkpoints (``genaug --allow-pickle``)."""
    return os.environ.get(ALLOW_PICKLE_ENV) == "1"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9:
        return False
    return 8 + int.from_bytes(head[:8], "little") <= size and head[8:9] == b"{"


def read_safetensors(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Load tensors and metadata from a safetensors file, refusing anything else (e.g. pickles).

    The metadata is returned as plain strings; genaug never lets it decide how a file is loaded.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ModelError("file not found", where=str(path), fix="check the path")
    data = path.read_bytes()
    if not _looks_like_safetensors(data[:9], len(data)):
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise ModelError("this is a pickle/zip checkpoint, which genaug does not unpickle", where=str(path),
                             fix="convert it to safetensors")
        raise ModelError("not a safetensors file", where=str(path), fix="replace it with the adapter's safetensors file")
    try:
        tensors = load(data)
        import safetensors

        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelError(f"not a valid safetensors file ({exc})", where=str(path)) from None
    return tensors, metadata


def read_weights(path: str | Path) -> dict:
    """Tensors of a weights file: safetensors always; a pickle (.bin/.pt/.ckpt) only when the user opted in
    (``genaug --allow-pickle``), and then through ``torch.load(weights_only=True)``, which runs no code."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_safetensors(path)[0]
    if not pickle_allowed():
        raise ModelError(f"{path.name} is a pickle checkpoint; genaug does not unpickle files unless asked",
                         where=str(path.parent), fix="convert it to safetensors, or rerun as `genaug --allow-pickle "
                         "...` to load it with torch.load(weights_only=True)")
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler's refusal is the message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"torch.load(weights_only=True) refused it ({first})", where=str(path),
                         fix="only plain tensor checkpoints load; convert it to safetensors") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ModelError("not a mapping of names to tensors", where=str(path), fix="convert it to safetensors")
    return data


def read_json_object(path: Path, what: str, error: type[Exception] = DataError) -> dict[str, Any]:
    """A JSON object from ``path``, or one clear ``error`` naming ``what`` it should have been."""
    if not path.is_file():
        raise error(f"{path.name} missing", where=str(path.parent), fix=f"point at a {what} folder genaug wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"corrupt {what} file ({exc})", where=str(path)) from None
    if not isinstance(data, dict):
        raise error(f"{path.name} must hold a JSON object", where=str(path))
    return data


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    return read_json_object(Path(folder) / ADAPTER_CONFIG, "adapter", ModelError)


def write_report(folder: str | Path, results: dict[str, Any], markdown: str) -> Path:
    """A report folder: ``report.json`` (machine-readable) and ``report.md`` (for people)."""
    folder = Path(folder)
    atomic_write_json(folder / "report.json", results)
    atomic_write_text(folder / "report.md", markdown)
    return folder


def read_report(folder: str | Path) -> dict[str, Any]:
    """The machine-readable half of a report folder (``report.json``)."""
    return read_json_object(Path(folder) / "report.json", "report")
