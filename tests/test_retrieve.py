"""Retrieval baseline: pool readers, index build/resume/tuning, per-class retrieval, no test leakage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from genaug.artefacts import DatasetWriter, load_hf_dataset, read_dataset
from genaug.cli import main
from genaug.errors import ConfigError, DataError
from genaug.retrieve import IndexConfig, RetrieveConfig, build_index, choose_index_spec, retrieve
from genaug.retrieve.index import build_faiss_index, load_embeddings, tune_search_depth
from genaug.retrieve.pool import open_pool
from genaug.retrieve.retrieve import nearest_pixel_distance, thumbnail

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def draw(name: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    colour, shape = name.split()
    background = tuple(int(v) for v in rng.integers(60, 200, 3))
    im = Image.new("RGB", (size, size), background)
    x0, y0 = rng.integers(2, 10, 2)
    x1, y1 = x0 + rng.integers(14, 20), y0 + rng.integers(14, 20)
    box = [int(x0), int(y0), int(x1), int(y1)]
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return im


def write_split(root, split: str, per_class: int, seed: int, extra: list[tuple[str, Image.Image, int]] = ()):
    rng = np.random.default_rng(seed)
    with DatasetWriter(root, CLASSES, split=split) as writer:
        for label, name in enumerate(CLASSES):
            for j in range(per_class):
                writer.add(f"{split}-{label}-{j}", draw(name, rng), label, caption=f"a photo of a {name}")
        for item_id, image, label in extra:
            writer.add(item_id, image, label, caption=f"a photo of a {CLASSES[label]}")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real dataset (train + test) and a pool that also holds copies of test images."""
    root = tmp_path_factory.mktemp("retr")
    real = root / "real"
    write_split(real, "train", 3, seed=1)
    write_split(real, "test", 4, seed=2)
    test = read_dataset(real, "test")
    leaks = []
    for i in range(0, len(test), 2):  # every other test image: an exact copy and a noisy near-copy
        image = test.image(i)
        noisy = np.asarray(image, dtype=np.int16) + np.random.default_rng(i).integers(-6, 7, (32, 32, 3))
        leaks.append((f"leak-exact-{i}", image, int(test.records[i]["label"])))
        leaks.append((f"leak-noisy-{i}", Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
                      int(test.records[i]["label"])))
    pool = write_split(root / "pool", "train", 10, seed=3, extra=leaks)
    return {"root": root, "real": real, "pool": pool, "leak_ids": {x[0] for x in leaks}}


@pytest.fixture(scope="module")
def built(world, kit):
    # The kit's CLIP is random: its embeddings barely separate images, so near-duplicates are
    # found by the pixel check alone (dedup_cosine=1 in every retrieval below).
    cfg = IndexConfig(pool=str(world["pool"]), output=str(world["root"] / "index"), model=str(kit("clip")),
                      shard_size=16, batch_size=8, device="cpu")
    return cfg, build_index(cfg)


def test_index_build_writes_shards_metadata_and_an_exact_index(built):
    cfg, result = built
    info = json.loads((result.output / "index.json").read_text())
    pool_size = 6 * 10 + 24  # 10 per class + an exact and a noisy copy of 12 test images
    assert result.num_vectors == info["num_vectors"] == pool_size
    assert info["index"] == {"type": "flat"} and info["recall_at_10"] == 1.0
    assert set(info["seconds"]) >= {"read_images", "embed", "index_build", "tune"}
    assert len(list((result.output / "embeddings").glob("image-*.npy"))) == 6  # ceil(84 / 16)
    vectors = load_embeddings(result.output, "image")
    assert vectors.shape == (pool_size, result.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert load_embeddings(result.output, "caption").shape == vectors.shape
    assert main(["index", "info", "--output", str(result.output)]) == 0


def test_index_build_resumes_without_re_embedding(built, monkeypatch):
    cfg, result = built
    shards = sorted((result.output / "embeddings").glob("image-*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[2].unlink()  # as if killed before this shard was written
    calls = []
    from genaug.retrieve import encoder as encoder_module

    original = encoder_module.ClipEncoder.encode_images
    monkeypatch.setattr(encoder_module.ClipEncoder, "encode_images",
                        lambda self, images: calls.append(len(images)) or original(self, images))
    build_index(cfg)
    assert sum(calls) == 16  # only the missing shard
    assert all(p.stat().st_mtime_ns == stamps[p] for p in shards if p != shards[2])


def test_index_refuses_a_folder_built_for_another_pool(built, world, kit):
    cfg, _ = built
    with pytest.raises(ConfigError, match="another pool"):
        build_index(IndexConfig(pool=str(world["real"]), output=cfg.output, model=cfg.model, device="cpu"))


def test_index_choice_follows_pool_size():
    cfg = IndexConfig(exact_max=1000, pq_min=100_000)
    assert choose_index_spec(1000, 64, cfg) == {"type": "flat"}
    ivf = choose_index_spec(50_000, 64, cfg)
    assert ivf["type"] == "ivf" and ivf["nlist"] == 256  # ~sqrt(N), a power of two
    pq = choose_index_spec(200_000, 512, cfg)
    assert pq["type"] == "ivfpq" and 512 % pq["m"] == 0
    assert choose_index_spec(10, 8, IndexConfig(index_type="hnsw"))["type"] == "hnsw"
    assert choose_index_spec(100, 8, IndexConfig(index_type="ivf", nlist=1000))["nlist"] == 2  # >= 39 per list


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_depth_is_tuned_to_the_target_recall(kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    vectors = centres[rng.integers(0, 40, 6000)] + 0.4 * rng.normal(size=(6000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    cfg = IndexConfig(index_type=kind, target_recall=0.95, tune_queries=200)
    spec = choose_index_spec(len(vectors), 32, cfg)
    index = build_faiss_index(vectors, spec, seed=0)
    depth, recall, qps = tune_search_depth(index, spec, vectors, cfg, np.random.default_rng(1))
    assert recall >= 0.95 and qps > 0
    # A shallower search than the tuned one falls short (otherwise tuning would have stopped there).
    if depth > (16 if kind == "hnsw" else 1):
        shallow_cfg = IndexConfig(index_type=kind, search_depth=depth // 2, tune_queries=200)
        _, shallow, _ = tune_search_depth(index, spec, vectors, shallow_cfg, np.random.default_rng(1))
        assert shallow < 0.95


def test_text_retrieval_writes_a_loadable_dataset_without_test_leaks(built, world, tmp_path):
    cfg, result = built
    out = tmp_path / "retrieved"
    res = retrieve(RetrieveConfig(index=str(result.output), output=str(out), real_data=str(world["real"]),
                                  images_per_class=8, device="cpu", dedup_cosine=1.0))
    ds = read_dataset(out)
    rows = [r["pool_row"] for r in ds.records]
    assert len(rows) == len(set(rows)) == res.planned  # no pool image twice
    assert res.planned == 8 * len(CLASSES) and not res.shortfall
    assert not {r["pool_id"] for r in ds.records} & world["leak_ids"]  # no test image or near-copy
    assert res.rejected_near_duplicates > 0  # the leaks were close enough to be found and refused
    first = ds.records[0]
    assert first["method"] == "retrieval" and first["query_type"] == "text" and "score" in first
    hf = load_hf_dataset(out)["train"]
    assert len(hf) == res.planned and {"pool_row", "query", "score", "caption"} <= set(hf.column_names)
    # Resume: a rerun writes nothing new.
    again = retrieve(RetrieveConfig(index=str(result.output), output=str(out), real_data=str(world["real"]),
                                    images_per_class=8, device="cpu", dedup_cosine=1.0))
    assert again.written == 0 and again.skipped_existing == res.planned


def test_leaks_come_back_when_the_exclusion_is_off(built, world, tmp_path):
    """The leak test above can fail: without the exclusion, the copies of test images are retrieved."""
    cfg, result = built
    res = retrieve(RetrieveConfig(index=str(result.output), output=str(tmp_path / "open"),
                                  class_names=CLASSES, images_per_class=12, device="cpu"))
    ds = read_dataset(tmp_path / "open")
    assert res.rejected_near_duplicates == 0
    assert {r["pool_id"] for r in ds.records} & world["leak_ids"]


def test_image_queries_round_robin_over_real_images(built, world, tmp_path):
    cfg, result = built
    out = tmp_path / "by-image"
    retrieve(RetrieveConfig(index=str(result.output), output=str(out), real_data=str(world["real"]), per_real=2,
                            query="image", device="cpu", dedup_cosine=1.0))
    ds = read_dataset(out)
    real = read_dataset(world["real"])
    assert len(ds) == 2 * len(real)
    sources = [r["source"] for r in ds.records]
    assert {r["id"] for r in real.records} == set(sources)  # every real image queried
    assert all(sources.count(s) == 2 for s in set(sources))


def test_retrieve_errors_are_clear(tmp_path, capsys):
    with pytest.raises(DataError, match="index.json missing"):
        retrieve(RetrieveConfig(index=str(tmp_path / "none"), output=str(tmp_path / "o"), class_names=["a"]))
    with pytest.raises(ValueError, match="needs real_data"):
        RetrieveConfig(class_names=["a"], query="image")
    assert main(["retrieve", "--index", str(tmp_path / "none"), "--class-names", "a", "--output",
                 str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index.json missing" in err[0]
    assert not (tmp_path / "o").exists()


def test_pool_readers_parquet_and_hf(world, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = read_dataset(world["real"], "train")
    table = pa.table({"path": [str(ds.image_path(i)) for i in range(len(ds))],
                      "caption": [r["caption"] for r in ds.records], "label": ds.labels.tolist()})
    pq.write_table(table, tmp_path / "pool.parquet")
    pool = open_pool(tmp_path / "pool.parquet")
    assert pool.kind == "parquet" and len(pool) == len(ds) and pool.captions[0] == ds.records[0]["caption"]
    assert pool.image(0).size == (32, 32)
    hf = datasets.Dataset.from_dict({"image": [ds.image(i) for i in range(4)], "text": ["a", "b", "c", "d"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    hf.save_to_disk(str(tmp_path / "hf"))
    pool = open_pool(tmp_path / "hf")
    assert pool.kind == "hf" and pool.captions == ["a", "b", "c", "d"] and pool.image(3).mode == "RGB"
    with pytest.raises(DataError, match="path column"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
        open_pool(tmp_path / "bad.parquet")


def test_pixel_check_sees_near_copies_only():
    rng = np.random.default_rng(0)
    a = draw("red circle", rng)
    noisy = Image.fromarray(np.clip(np.asarray(a, np.int16) + rng.integers(-6, 7, (32, 32, 3)), 0, 255)
                            .astype(np.uint8))
    others = np.stack([thumbnail(draw(name, rng)) for name in CLASSES for _ in range(5)])
    reference = thumbnail(a)[None]
    assert nearest_pixel_distance(thumbnail(a), reference) == 0
    assert nearest_pixel_distance(thumbnail(noisy), reference) <= 8
    assert nearest_pixel_distance(thumbnail(a.resize((64, 64))), reference) <= 8
    assert nearest_pixel_distance(thumbnail(a), others) > 8  # 30 unrelated drawings: none that close


def test_auto_falls_back_to_exact_search_on_structureless_data():
    from genaug.retrieve.index import build_and_tune

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((4000, 64)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    _, spec, depth, recall, _, _, _ = build_and_tune(noise, IndexConfig(exact_max=100, tune_queries=100))
    assert spec["type"] == "flat" and spec["fallback_from"]["type"] == "ivf" and recall == 1.0 and depth is None
