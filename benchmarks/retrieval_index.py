"""Retrieval index benchmark: build time, queries/s and recall@10 against exact search.

Part 1 — synthetic vectors (default 1M x 512-d, unit norm), in two flavours:
  * ``gaussian``: isotropic random vectors, the worst case for any approximate index (no
    structure to exploit: reaching 0.95 recall means scanning much of the data);
  * ``clustered``: a mixture of 1000 Gaussian clusters, closer to real CLIP embeddings.
For each, the index genaug picks by size (``auto``) is built, its search depth tuned to the
target recall on held-out queries, and compared with exact search (faiss IndexFlatIP) on the same
queries: queries/s of both, their ratio, recall@10.

Part 2 — the embedded world's pool through ``genaug index build`` with the embedded dual encoder
(embedding images/s, build time, recall of the chosen index), when the pool and weights exist.

    python benchmarks/retrieval_index.py --n 1000000 --dim 512 [--pool worlds/default/pool]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic(n: int, dim: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((1000, dim), dtype=np.float32)
        x = centres[rng.integers(0, 1000, n)]
        x += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_vectors(n: int, dim: int, kind: str, queries: int) -> dict:
    import faiss

    from genaug.retrieve.index import (IndexConfig, build_faiss_index, choose_index_spec, exact_neighbours,
                                       recall_at_10, set_search_depth, tune_search_depth)

    vectors = synthetic(n, dim, kind, seed=0)
    cfg = IndexConfig(tune_queries=queries)
    spec = choose_index_spec(n, dim, cfg)
    t0 = time.perf_counter()
    index = build_faiss_index(vectors, spec, seed=0)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    depth, _, _ = tune_search_depth(index, spec, vectors, cfg, np.random.default_rng(1))
    tune_s = time.perf_counter() - t0
    if depth is not None:
        set_search_depth(index, depth)
    # Fresh held-out queries (not the tuning ones) for the reported figures.
    rows = np.random.default_rng(2).choice(n, size=queries, replace=False)
    exact = exact_neighbours(vectors, rows)
    t0 = time.perf_counter()
    recall = recall_at_10(index, vectors, rows, exact)
    ann_qps = queries / (time.perf_counter() - t0)
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    t0 = time.perf_counter()
    flat.search(np.ascontiguousarray(vectors[rows]), 11)
    exact_qps = queries / (time.perf_counter() - t0)
    return {"vectors": kind, "n": n, "dim": dim, "index": spec, "search_depth": depth,
            "build_seconds": round(build_s, 2), "tune_seconds": round(tune_s, 2), "recall_at_10": round(recall, 4),
            "queries_per_second": round(ann_qps, 1), "exact_queries_per_second": round(exact_qps, 1),
            "speedup_vs_exact": round(ann_qps / exact_qps, 2)}


def bench_pool(pool: str, model: str) -> dict:
    from genaug.retrieve.index import IndexConfig, build_index

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("auto", "ivf"):
            cfg = IndexConfig(pool=pool, output=str(Path(tmp) / "index"), model=model, index_type=kind,
                              device="cpu")
            t0 = time.perf_counter()
            r = build_index(cfg)  # the second build reuses the embeddings: it times the index alone
            results[kind] = {"index": r.index_spec, "num_vectors": r.num_vectors, "recall_at_10": r.recall_at_10,
                             "queries_per_second": r.queries_per_second, "seconds": r.seconds,
                             "embedding_images_per_second": r.images_per_second,
                             "wall_seconds": round(time.perf_counter() - t0, 1)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--kinds", nargs="+", default=["clustered", "gaussian"])
    parser.add_argument("--pool", default="worlds/default/pool")
    parser.add_argument("--model", default="embedded:clip")
    args = parser.parse_args()
    out = {"synthetic": [bench_vectors(args.n, args.dim, kind, args.queries) for kind in args.kinds]}
    for row in out["synthetic"]:
        print(json.dumps(row), flush=True)
    if Path(args.pool).is_dir():
        out["pool"] = bench_pool(args.pool, args.model)
        print(json.dumps(out["pool"]), flush=True)


if __name__ == "__main__":
    main()
