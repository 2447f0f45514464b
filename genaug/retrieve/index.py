"""``genaug index build``: reader -> embedder -> writer over an image pool, then a faiss index.

The output folder holds:
* ``metadata.parquet`` — one row per pool image (row, id, ref, caption, label, class_name);
* ``embeddings/image-NNNNN.npy`` (and ``caption-NNNNN.npy`` when the pool has captions) — unit
  float32 vectors in shards of ``shard_size`` rows, each written atomically, so a killed build
  resumes at the first missing shard;
* ``index.faiss`` — a faiss index over the image embeddings (inner product = cosine);
* ``index.json`` — the pool, the encoder, the index type and its search parameters, the measured
  recall@10 against exact search, and per-phase timings. Written last: it marks a complete build.

The index type follows the pool size unless set: exact search up to ``exact_max`` vectors, an
IVF index above that (IVF-PQ above ``pq_min``), or HNSW on request. Search depth (``nprobe`` /
``efSearch``) is tuned on held-out queries to the smallest value that reaches ``target_recall``.
"""

from __future__ import annotations

import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..artefacts import (atomic_write_bytes, atomic_write_json, discard_partial_writes, folder_lock,
                         read_json_object)
from ..config import config_to_dict, option
from ..errors import ConfigError, DataError
from ..runs import RunRecord

INDEX_JSON = "index.json"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "hnsw")


@dataclass
class IndexConfig:
    """Embed an image pool with a CLIP encoder and index it with faiss for retrieval."""

    action: str = option("build", "what to do: build (embed + index; resumes) or info (print index.json)",
                         positional=True)
    pool: str = option("worlds/default/pool", "image pool: genaug/imagefolder dataset, saved HF dataset, or "
                                              "a parquet with a path column (and caption/label columns)")
    split: str = option("train", "split of a genaug dataset pool")
    output: str = option("indexes/pool", "index folder (resumed if it exists)")
    model: str = option("embedded:clip", "CLIP encoder: embedded:clip or a transformers CLIP folder / cached hub id")
    index_type: str = option("auto", "auto (by pool size), flat (exact), ivf, ivfpq or hnsw")
    exact_max: int = option(200_000, "auto: exact search up to this many vectors")
    pq_min: int = option(5_000_000, "auto: IVF-PQ (compressed) from this many vectors on")
    nlist: int = option(0, "IVF lists (0: about sqrt(N), a power of two)")
    pq_m: int = option(0, "IVF-PQ sub-quantizers (0: dim/4, rounded to a divisor of dim)")
    hnsw_m: int = option(32, "HNSW neighbours per node")
    search_depth: int = option(0, "nprobe (IVF) or efSearch (HNSW); 0 tunes it to reach target_recall")
    target_recall: float = option(0.95, "recall@10 against exact search the tuned search depth must reach")
    tune_queries: int = option(500, "held-out queries used to tune and measure recall@10")
    captions: bool = option(True, "also embed the pool's captions (caption-NNNNN.npy), when it has them")
    shard_size: int = option(10_000, "rows per embedding shard")
    batch_size: int = option(256, "images per encoder call")
    read_threads: int = option(4, "threads decoding images")
    skip_unreadable: bool = option(True, "pool images that cannot be read get a zero embedding, are listed in "
                                         "index.json and are never retrieved (off: refuse the pool)")
    limit: int = option(0, "index only the first N pool rows (0: all)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    seed: int = option(0, "seed of the IVF training sample and the tuning queries")

    def __post_init__(self) -> None:
        if self.action not in ("build", "info"):
            raise ValueError(f"unknown action {self.action!r}; use build or info")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")
        for name in ("shard_size", "batch_size", "read_threads", "hnsw_m", "tune_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("nlist", "pq_m", "search_depth", "limit", "exact_max", "pq_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")


@dataclass
class IndexResult:
    output: Path
    num_vectors: int
    dim: int
    index_spec: dict[str, Any]
    recall_at_10: float | None
    queries_per_second: float
    seconds: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0


# --------------------------------------------------------------------------- index choice and tuning
def choose_index_spec(n: int, dim: int, cfg: IndexConfig) -> dict[str, Any]:
    """The faiss index for ``n`` vectors of ``dim``: its type and build parameters."""
    kind = cfg.index_type
    if kind == "auto":
        kind = "flat" if n <= cfg.exact_max else "ivfpq" if n >= cfg.pq_min else "ivf"
    if kind == "flat":
        return {"type": "flat"}
    if kind == "hnsw":
        return {"type": "hnsw", "M": cfg.hnsw_m, "efConstruction": max(40, 2 * cfg.hnsw_m)}
    # IVF: about sqrt(N) lists (a power of two), at least 39 training points per list (faiss's floor).
    nlist = cfg.nlist or 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
    spec: dict[str, Any] = {"type": kind, "nlist": int(nlist)}
    if kind == "ivfpq":
        m = cfg.pq_m or max(1, dim // 4)
        while dim % m:
            m -= 1
        spec.update(m=int(m), nbits=8)
    return spec


def build_faiss_index(vectors: np.ndarray, spec: dict[str, Any], seed: int = 0):
    import faiss

    n, dim = vectors.shape
    metric = faiss.METRIC_INNER_PRODUCT
    if spec["type"] == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec["type"] == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(spec["M"]), metric)
        index.hnsw.efConstruction = int(spec["efConstruction"])
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if spec["type"] == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, int(spec["nlist"]), metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, int(spec["nlist"]), int(spec["m"]), int(spec["nbits"]), metric)
        # k-means on a sample: 64 points per list is plenty and keeps training to seconds.
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(n, size=min(n, 64 * int(spec["nlist"])), replace=False)]
        index.cp.seed = seed
        index.train(np.ascontiguousarray(sample))
    index.add(np.ascontiguousarray(vectors))
    return index


def set_search_depth(index, depth: int) -> None:
    import faiss

    base = faiss.extract_index_ivf(index) if _is_ivf(index) else index
    if _is_ivf(index):
        base.nprobe = int(depth)
    elif hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(depth)


def _is_ivf(index) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, TypeError):
        return False


def recall_at_10(index, vectors: np.ndarray, query_rows: np.ndarray, exact: np.ndarray) -> float:
    """Mean overlap of the index's top 10 with the exact top 10 (each query's own row left out)."""
    _, found = index.search(np.ascontiguousarray(vectors[query_rows]), 11)
    hits = 0
    for row, got, truth in zip(query_rows, found, exact):
        got = [i for i in got if i != row][:10]
        hits += len(set(got) & set(truth.tolist()))
    return hits / (10 * len(query_rows))


def exact_neighbours(vectors: np.ndarray, query_rows: np.ndarray) -> np.ndarray:
    """Exact top 10 by inner product for each query row, its own row left out (brute force)."""
    import faiss

    _, ids = faiss.knn(np.ascontiguousarray(vectors[query_rows]), np.ascontiguousarray(vectors), 11,
                       metric=faiss.METRIC_INNER_PRODUCT)
    return np.stack([[i for i in row if i != q][:10] for q, row in zip(query_rows, ids)])


def tune_search_depth(index, spec: dict[str, Any], vectors: np.ndarray, cfg: IndexConfig,
                      rng: np.random.Generator) -> tuple[int | None, float, float]:
    """``(depth, recall@10, queries/s)``: the smallest depth (doubling) that reaches ``target_recall``."""
    n = len(vectors)
    query_rows = rng.choice(n, size=min(cfg.tune_queries, n), replace=False)
    exact = exact_neighbours(vectors, query_rows) if n > 1 else None
    if spec["type"] == "flat" or exact is None:
        t0 = time.perf_counter()
        recall = recall_at_10(index, vectors, query_rows, exact) if exact is not None else 1.0
        return None, recall, len(query_rows) / max(time.perf_counter() - t0, 1e-9)
    limit = int(spec["nlist"]) if spec["type"] != "hnsw" else 4096
    depths = [cfg.search_depth] if cfg.search_depth else [2 ** k for k in range(int(math.log2(limit)) + 1)]
    if not cfg.search_depth and depths[-1] != limit:
        depths.append(limit)
    if spec["type"] == "hnsw" and not cfg.search_depth:
        depths = [d for d in depths if d >= 16]
    for depth in depths:
        set_search_depth(index, depth)
        t0 = time.perf_counter()
        recall = recall_at_10(index, vectors, query_rows, exact)
        qps = len(query_rows) / max(time.perf_counter() - t0, 1e-9)
        if recall >= cfg.target_recall:
            break
    return depth, recall, qps


def build_and_tune(vectors: np.ndarray, cfg: IndexConfig):
    """``(index, spec, depth, recall@10, queries/s, build seconds, tune seconds)`` for ``vectors``.

    When reaching the target recall takes every IVF list, the data has no structure IVF can use
    (isotropic noise, say) and probing all lists is slower than exact search: ``auto`` then falls
    back to exact search and says so in the spec.
    """
    spec = choose_index_spec(len(vectors), vectors.shape[1], cfg)
    t0 = time.perf_counter()
    index = build_faiss_index(vectors, spec, cfg.seed)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    depth, recall, qps = tune_search_depth(index, spec, vectors, cfg, np.random.default_rng(cfg.seed))
    if cfg.index_type == "auto" and spec["type"] in ("ivf", "ivfpq") and depth is not None and depth >= spec["nlist"]:
        spec = {"type": "flat", "fallback_from": spec}
        index = build_faiss_index(vectors, spec, cfg.seed)
        depth, recall, qps = tune_search_depth(index, spec, vectors, cfg, np.random.default_rng(cfg.seed))
    return index, spec, depth, recall, qps, build_s, time.perf_counter() - t0


# --------------------------------------------------------------------------- embedding shards
def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def unreadable_path(shard: Path) -> Path:
    return shard.with_name(shard.stem.replace("image-", "unreadable-") + ".json")


def read_json_list(path: Path) -> list[int]:
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not all(isinstance(r, int) for r in data):
        raise DataError("corrupt list of unreadable rows", where=str(path), fix="delete it and its .npy shard")
    return data


def shard_paths(folder: Path, kind: str, num_rows: int, shard_size: int) -> list[Path]:
    return [folder / "embeddings" / f"{kind}-{s:05d}.npy" for s in range(math.ceil(num_rows / shard_size))]


def load_embeddings(folder: str | Path, kind: str = "image") -> np.ndarray:
    """All shards of ``kind`` (image or caption) of a built index, concatenated (N, D) float32."""
    folder = Path(folder)
    info = read_index_info(folder)
    paths = shard_paths(folder, kind, info["num_vectors"], info["shard_size"])
    if not paths or not all(p.is_file() for p in paths):
        raise DataError(f"the index has no complete {kind} embeddings", where=str(folder),
                        fix="rebuild it with `genaug index build`" + (" --captions" if kind == "caption" else ""))
    return np.concatenate([load_npy(p) for p in paths])


def read_index_info(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / INDEX_JSON
    if not path.is_file():
        raise DataError("not a built index (index.json missing)", where=str(folder),
                        fix="build it with `genaug index build --output " + str(folder) + "`")
    return read_json_object(path, "index description")


def _write_metadata(folder: Path, pool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "row": np.arange(len(pool), dtype=np.int64),
        "id": pool.ids,
        "ref": pool.refs,
        "caption": pool.captions if pool.captions is not None else [""] * len(pool),
        "label": np.asarray(pool.labels, dtype=np.int64),
        "class_name": [pool.class_names[i] if 0 <= i < len(pool.class_names) else str(i) for i in pool.labels],
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(folder / METADATA_FILE, buffer.getvalue())


def read_metadata(folder: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(Path(folder) / METADATA_FILE).to_pylist()


# --------------------------------------------------------------------------- build
def build_index(cfg: IndexConfig) -> IndexResult | dict[str, Any]:
    """Embed the pool shard by shard (resuming), build and tune the faiss index, write index.json last."""
    import faiss

    out = Path(cfg.output)
    if cfg.action == "info":
        return read_index_info(out)
    from ..models.embedded import resolve_model
    from .encoder import ClipEncoder
    from .pool import open_pool

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pool = open_pool(cfg.pool, cfg.split)
    if cfg.limit:
        from .pool import Pool

        n = min(cfg.limit, len(pool))
        pool = Pool(pool.kind, pool.location, pool.split, pool.ids[:n],
                    pool.captions[:n] if pool.captions is not None else None, pool.labels[:n], pool.class_names,
                    pool.refs[:n], pool._image)
    if len(pool) == 0:
        raise DataError("the pool is empty", where=cfg.pool, fix="index a pool with at least one image")
    timings["read_listing"] = time.perf_counter() - t0
    encoder = ClipEncoder(cfg.model, cfg.device, cfg.batch_size)  # before touching the output
    fingerprint = {"pool": pool.spec(), "num_rows": len(pool), "model": resolve_model(cfg.model),
                   "shard_size": cfg.shard_size}
    with folder_lock(out, "building an index in"):
        started_file = out / "embeddings" / "build.json"
        if started_file.is_file():
            previous = read_json_object(started_file, "index build record")
            if previous != fingerprint:
                raise ConfigError("the output folder holds an index of another pool, model or shard size",
                                  where=str(out), fix="choose a new --output or delete the folder")
        record = RunRecord.start(out / "run", "index", cfg)  # once the folder is ours
        # A killed build's temporaries (nobody else writes here while we hold the lock).
        discard_partial_writes(out, out / "run", out / "embeddings")
        (out / f"{INDEX_FILE}.tmp").unlink(missing_ok=True)
        atomic_write_json(started_file, fingerprint)
        (out / INDEX_JSON).unlink(missing_ok=True)  # rebuilt below: the old one no longer describes it
        _write_metadata(out, pool)

        # 1. Embeddings, shard by shard.
        with_captions = cfg.captions and pool.captions is not None
        image_paths = shard_paths(out, "image", len(pool), cfg.shard_size)
        caption_paths = shard_paths(out, "caption", len(pool), cfg.shard_size) if with_captions else []
        embed_seconds, read_seconds, embedded_rows = 0.0, 0.0, 0
        # The bar as a context manager: a failure closes it, so the error prints on a line of its own.
        placeholder = Image.new("RGB", (8, 8))

        def read(row: int):
            """A pool image, or None for one that cannot be read (a scraped pool always has some)."""
            try:
                return pool.image(row)
            except DataError:
                if not cfg.skip_unreadable:
                    raise
                return None

        with ThreadPoolExecutor(cfg.read_threads) as readers, \
                tqdm(total=len(pool), desc="index:embed", unit="img", dynamic_ncols=True) as bar:
            for s, path in enumerate(image_paths):
                rows = range(s * cfg.shard_size, min(len(pool), (s + 1) * cfg.shard_size))
                need_captions = with_captions and not caption_paths[s].is_file()
                if path.is_file() and not need_captions:
                    bar.update(len(rows))
                    continue
                if not path.is_file():
                    parts, unreadable = [], []
                    for start in range(rows.start, rows.stop, cfg.batch_size):
                        t_read = time.perf_counter()
                        batch = range(start, min(rows.stop, start + cfg.batch_size))
                        images = list(readers.map(read, batch))
                        bad = [i for i, image in enumerate(images) if image is None]
                        unreadable += [batch[i] for i in bad]
                        images = [placeholder if image is None else image for image in images]
                        t_embed = time.perf_counter()
                        vectors = encoder.encode_images(images)
                        vectors[bad] = 0.0  # matches nothing; the row is never retrieved either
                        parts.append(vectors)
                        read_seconds += t_embed - t_read
                        embed_seconds += time.perf_counter() - t_embed
                        embedded_rows += len(images)
                        bar.update(len(images))
                    # The list first: a shard counts as done once its .npy exists.
                    atomic_write_json(unreadable_path(path), unreadable)
                    _save_npy(path, np.concatenate(parts).astype(np.float32))
                else:
                    bar.update(len(rows))
                if need_captions:
                    t_embed = time.perf_counter()
                    _save_npy(caption_paths[s], encoder.encode_texts([pool.captions[i] for i in rows]))
                    embed_seconds += time.perf_counter() - t_embed
        timings["read_images"] = read_seconds
        timings["embed"] = embed_seconds
        unreadable_rows = sorted(r for p in image_paths if unreadable_path(p).is_file()
                                 for r in read_json_list(unreadable_path(p)))
        if unreadable_rows:
            print(f"index: {len(unreadable_rows)} pool images could not be read and will never be retrieved "
                  f"(rows listed in index.json: unreadable_rows)")

        # 2. Index over the image embeddings, tuned against exact search.
        vectors = np.concatenate([load_npy(p) for p in image_paths]).astype(np.float32)
        index, spec, depth, recall, qps, build_s, tune_s = build_and_tune(vectors, cfg)
        timings["index_build"], timings["tune"] = build_s, tune_s
        if depth is not None:
            set_search_depth(index, depth)
        tmp = out / (INDEX_FILE + ".tmp")
        faiss.write_index(index, str(tmp))
        tmp.replace(out / INDEX_FILE)
        timings = {k: round(v, 3) for k, v in timings.items()}
        images_per_second = round(embedded_rows / max(read_seconds + embed_seconds, 1e-9), 1) if embedded_rows else 0.0
        info = {
            "format": "genaug-index", "version": 1, "pool": pool.spec(), "model": cfg.model,
            "model_path": resolve_model(cfg.model), "num_vectors": int(len(vectors)), "dim": int(vectors.shape[1]),
            "shard_size": cfg.shard_size, "captions": bool(with_captions), "index": spec, "search_depth": depth,
            "recall_at_10": round(float(recall), 4) if len(vectors) > 1 else None,
            "target_recall": cfg.target_recall, "queries_per_second": round(qps, 1), "seconds": timings,
            "embedding_images_per_second": images_per_second, "unreadable_rows": unreadable_rows,
            "config": config_to_dict(cfg),
        }
        atomic_write_json(out / INDEX_JSON, info)
    result = IndexResult(out, int(len(vectors)), int(vectors.shape[1]), {**spec, "search_depth": depth},
                         info["recall_at_10"], info["queries_per_second"], timings, images_per_second)
    record.finish({k: v for k, v in info.items() if k not in ("config", "pool")})
    return result


class PoolIndex:
    """A built index opened for search: faiss index, per-row metadata, image embeddings, the pool reader."""

    def __init__(self, folder: str | Path):
        import faiss

        from .pool import open_pool

        self.folder = Path(folder)
        self.info = read_index_info(self.folder)
        if not (self.folder / INDEX_FILE).is_file():
            raise DataError("index.faiss is missing", where=str(self.folder), fix="rebuild with `genaug index build`")
        # faiss's own binary format: no pickle involved.
        self.index = faiss.read_index(str(self.folder / INDEX_FILE))
        if self.info.get("search_depth"):
            set_search_depth(self.index, int(self.info["search_depth"]))
        self.metadata = read_metadata(self.folder)
        self.image_embeddings = load_embeddings(self.folder, "image")
        self.unreadable = set(self.info.get("unreadable_rows") or [])
        spec = self.info["pool"]
        self.pool = open_pool(spec["location"], spec.get("split"), spec["kind"])
        if len(self.pool) < len(self.metadata):
            raise DataError("the pool has fewer rows than when it was indexed", where=spec["location"],
                            fix="rebuild the index with `genaug index build`")

    def __len__(self) -> int:
        return len(self.metadata)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the top ``k`` pool rows for each unit query vector; -1 rows pad short lists."""
        k = max(1, min(k, len(self)))
        return self.index.search(np.ascontiguousarray(queries.astype(np.float32)), k)


def format_info(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
