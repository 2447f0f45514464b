"""Read an image pool row by row: a genaug/imagefolder dataset, a saved HF dataset, or a parquet of paths.

Every reader gives the same view: ``len``, per-row ``ids``, ``captions`` (or None), ``labels``,
``class_names``, ``refs`` (what to record as the row's origin) and ``image(i)`` (an RGB PIL image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..artefacts import open_image, read_dataset, to_rgb
from ..errors import DataError

CAPTION_KEYS = ("caption", "text", "prompt")
PATH_KEYS = ("path", "file_name", "image_path", "file")


@dataclass
class Pool:
    kind: str  # "dataset", "hf" or "parquet"
    location: str
    split: str | None
    ids: list[str]
    captions: list[str] | None
    labels: list[int]
    class_names: list[str]
    refs: list[str]
    _image: Callable[[int], Image.Image]

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> Image.Image:
        return self._image(index)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "split": self.split}


def _first_key(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in row), None)


def open_pool(location: str | Path, split: str | None = "train", kind: str = "auto") -> Pool:
    """Open ``location`` as a pool; ``kind`` is auto (by what the path holds), dataset, hf or parquet."""
    path = Path(location)
    if not path.exists():
        raise DataError("pool not found", where=str(path), fix="give a dataset folder, a saved HF dataset or a parquet")
    if kind == "auto":
        if path.is_file() and path.suffix == ".parquet":
            kind = "parquet"
        elif path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            kind = "hf"
        else:
            kind = "dataset"
    if kind == "parquet":
        return _parquet_pool(path)
    if kind == "hf":
        return _hf_pool(path)
    if kind == "dataset":
        return _dataset_pool(path, split)
    raise DataError(f"unknown pool kind {kind!r}", where=str(path), fix="use auto, dataset, hf or parquet")


def _dataset_pool(path: Path, split: str | None) -> Pool:
    ds = read_dataset(path, split)
    key = _first_key(ds.records[0], CAPTION_KEYS) if ds.records else None
    captions = [str(r.get(key, "")) for r in ds.records] if key else None
    ids = [str(r.get("id", i)) for i, r in enumerate(ds.records)]
    refs = [str(ds.image_path(i)) for i in range(len(ds))]
    return Pool("dataset", str(path.resolve()), ds.split, ids, captions, [int(r["label"]) for r in ds.records],
                ds.class_names, refs, ds.image)


def _hf_pool(path: Path) -> Pool:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError("the HF dataset has several splits", where=str(path),
                        fix="save one split (dataset['train'].save_to_disk(...)) or point at its folder")
    image_key = next((c for c in ds.column_names if isinstance(ds.features[c], datasets.Image)), None)
    if image_key is None:
        raise DataError("the HF dataset has no Image column", where=str(path), fix="add an Image feature")
    caption_key = next((c for c in CAPTION_KEYS if c in ds.column_names), None)
    captions = [str(c) for c in ds[caption_key]] if caption_key else None
    label_feature = ds.features.get("label")
    labels = [int(v) for v in ds["label"]] if "label" in ds.column_names else [0] * len(ds)
    class_names = list(getattr(label_feature, "names", None) or [str(i) for i in range(max(labels, default=0) + 1)])
    ids = [str(i) for i in range(len(ds))]
    return Pool("hf", str(path.resolve()), None, ids, captions, labels, class_names, [f"hf:{i}" for i in ids],
                lambda i: to_rgb(ds[int(i)][image_key]))


def _parquet_pool(path: Path) -> Pool:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = set(table.column_names)
    path_key = next((k for k in PATH_KEYS if k in columns), None)
    if path_key is None:
        raise DataError(f"the parquet has none of the path columns {list(PATH_KEYS)}", where=str(path),
                        fix="add a 'path' column (absolute, or relative to the parquet's folder)")
    rows = table.to_pylist()
    base = path.parent.resolve()
    files = [Path(str(r[path_key])) for r in rows]
    files = [f if f.is_absolute() else base / f for f in files]
    caption_key = next((k for k in CAPTION_KEYS if k in columns), None)
    captions = [str(r[caption_key] or "") for r in rows] if caption_key else None
    labels = [int(r["label"]) if r.get("label") is not None else 0 for r in rows]
    names = {int(r["label"]): str(r.get("class_name", r["label"])) for r in rows if r.get("label") is not None}
    class_names = [names.get(i, str(i)) for i in range(max(labels, default=0) + 1)]
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    return Pool("parquet", str(path.resolve()), None, ids, captions, labels, class_names, [str(f) for f in files],
                lambda i: open_image(files[i]))
