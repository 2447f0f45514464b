"""The procedural world: determinism, held-out novel concepts, long-tail and few-shot splits, loading."""

from __future__ import annotations

from functools import partial

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from genaug.artefacts import read_dataset, read_manifest
from genaug.errors import DataError
from genaug.world import WorldConfig, build_world
from genaug.world.build import NOVEL_CONCEPTS, bucket_of, longtail_counts
from genaug.world.render import (ALL_PATTERNS, ALL_SHAPES, BASE_PATTERNS, BASE_SHAPES, NOVEL_PATTERNS, NOVEL_SHAPES,
                                 SceneOptions, render_scene, sample_scene)

TINY = dict(pool_size=200, train_max=12, train_min=2, test_per_class=3, val_per_class=2, fewshot_k=[1, 2],
            fewshot_trials=2, fewshot_candidates=4, oracle_per_class=2, novel_refs=3, novel_pair_images=1,
            progress=False)
NOVEL_WORDS = set(NOVEL_SHAPES) | set(NOVEL_PATTERNS)


def tiny(output: Path, **overrides) -> WorldConfig:
    return WorldConfig(output=str(output), **{**TINY, **overrides})


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    build_world(tiny(root, workers=0))
    return root


def test_same_seed_is_byte_identical_whatever_the_workers(world, tmp_path):
    other = tmp_path / "again"
    result = build_world(tiny(other, workers=2))
    assert result.rendered == result.num_images
    assert file_hashes(world) == file_hashes(other)


def test_different_seed_gives_a_different_world(world, tmp_path):
    other = tmp_path / "seed1"
    build_world(tiny(other, seed=1, workers=0))
    mine, theirs = file_hashes(world), file_hashes(other)
    assert mine["world.json"] != theirs["world.json"]
    # Long-tail counts and few-shot picks move with the seed, so compare the images both worlds hold.
    shared = [k for k in mine if k.endswith(".png") and k in theirs]
    assert len(shared) > 0.5 * len(mine) and all(mine[k] != theirs[k] for k in shared)


def test_pool_never_shows_novel_shapes_or_patterns(world):
    pool = rows(world / "pool" / "train")
    assert len(pool) == TINY["pool_size"]
    for row in pool:
        assert row["shape"] in BASE_SHAPES and row["pattern"] in BASE_PATTERNS
        assert row["second_shape"] in BASE_SHAPES + ("",)
        words = set(re.findall(r"[a-z]+", row["caption"]))
        assert not words & NOVEL_WORDS, row["caption"]
        # Captions name the main object so a text-to-image model can learn it from text.
        assert row["shape"] in words and (row["pattern"] in words or row["pattern"] == "plain")
        assert row["class_name"] == row["shape"]


def test_benchmark_has_novel_classes_absent_from_the_pool(world):
    info = json.loads((world / "world.json").read_text())
    classes = info["benchmark"]["classes"]
    assert len(classes) >= 20
    novel = [c for c in classes if c["novel_concept"]]
    assert novel and all(c["shape"] in NOVEL_SHAPES or c["pattern"] in NOVEL_PATTERNS for c in novel)
    assert info["shapes"]["novel"] == list(NOVEL_SHAPES) and "output" not in info["config"]


def test_longtail_profile_and_buckets(world):
    counts = longtail_counts(24, 500, 5, seed=0)
    ranked = sorted(counts, reverse=True)
    assert ranked[0] == 500 and ranked[-1] == 5 and ranked == sorted(ranked, reverse=True)
    assert counts != ranked  # the head class is a random one, not label 0
    assert longtail_counts(24, 500, 5, seed=1) != counts
    buckets = {bucket_of(n) for n in counts}
    assert buckets == {"many", "medium", "few"}
    assert bucket_of(101) == "many" and bucket_of(100) == "medium" and bucket_of(20) == "medium"
    assert bucket_of(19) == "few"

    manifest = read_manifest(world / "bench")
    train = read_dataset(world / "bench", "train")
    actual = dict(zip(train.class_names, train.class_counts().tolist()))
    assert manifest["info"]["train_counts"] == actual
    assert max(actual.values()) == TINY["train_max"] and min(actual.values()) == TINY["train_min"]
    assert manifest["info"]["buckets"] == {name: bucket_of(n) for name, n in actual.items()}


def test_test_split_is_balanced_and_distinct_from_train_and_pool(world):
    test = read_dataset(world / "bench", "test")
    assert set(test.class_counts().tolist()) == {TINY["test_per_class"]}
    def image_hashes(folder: Path) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "images").glob("*.png")}
    test_images = image_hashes(world / "bench" / "test")
    assert len(test_images) == len(test)
    assert not test_images & image_hashes(world / "bench" / "train")
    assert not test_images & image_hashes(world / "pool" / "train")
    assert not test_images & image_hashes(world / "oracle" / "train")


def test_fewshot_splits_hold_exactly_k_per_class(world):
    num_classes = len(read_manifest(world / "bench")["class_names"])
    for k in TINY["fewshot_k"]:
        for trial in range(TINY["fewshot_trials"]):
            split = read_dataset(world / "fewshot" / f"k{k}-trial{trial}", "train")
            assert split.class_counts().tolist() == [k] * num_classes
            assert all(r["id"].startswith("cand-") for r in split.records)  # not the long-tail train


def test_novel_references_and_pairs(world):
    for concept in NOVEL_CONCEPTS:
        refs = read_dataset(world / "novel" / concept.slug, "train")
        assert len(refs) == TINY["novel_refs"]
        for row in refs.records:
            assert row["concept"] == concept.name and row["class_word"] == concept.kind
            assert row[concept.kind] == concept.word and row["second_shape"] == ""
    pairs = rows(world / "novel-pairs" / "train")
    assert len(pairs) == len(NOVEL_CONCEPTS) * (len(NOVEL_CONCEPTS) - 1) // 2 * TINY["novel_pair_images"]
    for row in pairs:
        assert len(set(row["concepts"])) == 2 and row["caption"]


def test_huggingface_imagefolder_loads_the_benchmark(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(world / "bench"), cache_dir=str(tmp_path / "hf"))
    assert {"train", "test"} <= set(loaded)
    for split in ("train", "test"):
        assert {"image", "label", "caption"} <= set(loaded[split].column_names)
        assert len(loaded[split]) == len(read_dataset(world / "bench", split))
    first = loaded["test"][0]
    assert first["image"].size == (32, 32) and isinstance(first["caption"], str)


def test_resume_completes_a_partial_build_identically(world, tmp_path):
    partial = tmp_path / "partial"
    build_world(tiny(partial, workers=0))
    meta = partial / "pool" / "train" / "metadata.jsonl"
    lines = meta.read_text().splitlines(keepends=True)
    meta.write_text("".join(lines[:50]) + lines[50][:20])  # as if killed mid-line
    result = build_world(tiny(partial, workers=0))
    assert result.rendered == TINY["pool_size"] - 50
    assert file_hashes(partial) == file_hashes(world)
    with pytest.raises(DataError):
        build_world(tiny(partial, seed=7, workers=0))


def test_every_shape_and_pattern_renders_at_64_pixels():
    options = SceneOptions(image_size=64)
    rng = np.random.default_rng(0)
    for shape in ALL_SHAPES:
        for pattern in ALL_PATTERNS:
            image = render_scene(sample_scene(rng, options, shape, pattern), options.supersample)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 5


@pytest.mark.parametrize("change", [
    {"pool_size": -1}, {"pool_size": 0}, {"image_size": 8}, {"supersample": 0}, {"train_min": 0},
    {"train_max": 3, "train_min": 5}, {"test_per_class": -2}, {"fewshot_k": []}, {"fewshot_k": [0, 2]},
    {"fewshot_k": [2, 2]}, {"fewshot_candidates": 1}, {"fewshot_trials": 0}, {"oracle_per_class": 0},
    {"novel_refs": 0}, {"second_object_prob": 1.5}, {"occlusion_prob": -0.1}, {"nuisance_strength": -1.0},
    {"workers": -1}, {"seed": -1}, {"bench_shapes": ["star"]}, {"bench_shapes": []},
    {"bench_patterns": ["plain", "plain"]}, {"novel_classes": ["striped circle"]},
    {"novel_classes": ["zigzag star"]}, {"novel_classes": ["star"]}, {"novel_classes": ["glowing star"]},
    {"output": ""},
])
def test_bad_config_values_raise_value_error(change):
    with pytest.raises(ValueError):
        WorldConfig(**{**TINY, **change})


def test_config_fields_have_help_and_simple_types():
    for f in dataclasses.fields(WorldConfig):
        assert f.metadata.get("help"), f.name
        assert f.type in ("str", "int", "float", "bool", "list[int]", "list[str]"), (f.name, f.type)


def test_threaded_writer_matches_the_plain_writer(tmp_path):
    from PIL import Image

    from genaug.artefacts import DatasetWriter

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(150)]
    for name, writer_class in (("plain", DatasetWriter), ("threaded", partial(DatasetWriter, threads=4))):
        with writer_class(tmp_path / name, ["a", "b"], split="train", info={"x": 1}) as writer:
            for i, image in enumerate(images):
                writer.add(f"item-{i:03d}", image, i % 2, caption=f"caption {i}", value=i / 7)
    assert file_hashes(tmp_path / "plain") == file_hashes(tmp_path / "threaded")


def _recoloured_pixels(spec, index: int) -> np.ndarray:
    """Pixels that change when object ``index`` is recoloured (blur off and contrast 1: contrast works around the
    frame's mean colour, and blur spreads a change, so either would move pixels outside the object)."""
    spec = dataclasses.replace(spec, blur_radius=0.0, contrast=1.0, objects=list(spec.objects))
    before = render_scene(spec).astype(int)
    obj = spec.objects[index]
    spec.objects[index] = dataclasses.replace(obj, rgb=tuple(255.0 - c for c in obj.rgb),
                                              secondary_rgb=tuple(255.0 - c for c in obj.secondary_rgb))
    return np.abs(render_scene(spec).astype(int) - before).max(axis=-1) > 0


def test_object_masks_are_what_each_object_shows():
    from genaug.world.render import object_masks

    options = SceneOptions(image_size=64, second_object_prob=1.0, occlusion_prob=1.0)
    rng = np.random.default_rng(3)
    for _ in range(6):
        spec = sample_scene(rng, options, "star", "striped")
        assert len(spec.objects) == 2 and spec.occluder is not None
        masks = object_masks(spec)
        for index, mask in enumerate(masks):
            changed = _recoloured_pixels(spec, index)
            assert mask.shape == (64, 64) and mask.max() > 0.5
            assert not (changed & (mask == 0)).any()       # nothing outside the mask belongs to the object
            assert changed[mask >= 0.5].all()                # every mostly-covered pixel does
        x0, y0, x1, y1 = spec.occluder[:4]
        assert masks[0][y0:y1, x0:x1].max() == 0 and masks[1][y0:y1, x0:x1].max() == 0
        assert (masks[1][masks[0] == 1] == 0).all()         # the main object is drawn over the second


def test_world_object_masks_rederive_a_built_worlds_scenes(world):
    from PIL import Image

    from genaug.world import world_object_masks
    from genaug.world.build import _task_scene, plan_world
    from genaug.world.render import object_masks

    bench = read_dataset(world / "bench", "train")
    ids = [r["id"] for r in bench.records[:5]]
    masks = world_object_masks(world, "bench/train", ids)
    assert list(masks) == ids and all(m[0].max() > 0.5 for m in masks.values())
    cfg = tiny(world)
    entries = {e.item_id: e for p in plan_world(cfg, json.loads((world / "world.json").read_text()))
               if p.name == "bench/train" for e in p.entries}
    for i, item_id in enumerate(ids):  # the scene behind each mask is the one on disk
        spec, _ = _task_scene(entries[item_id].task, cfg.seed, cfg.scene_options())
        np.testing.assert_array_equal(render_scene(spec), np.asarray(Image.open(bench.image_path(i)).convert("RGB")))
        np.testing.assert_array_equal(object_masks(spec)[0], masks[item_id][0])
    pair = read_dataset(world / "novel-pairs", "train").records[0]["id"]
    assert len(world_object_masks(world, "novel-pairs", [pair])[pair]) == 2
    with pytest.raises(DataError, match="not in bench/train"):
        world_object_masks(world, "bench/train", ["nope"])
    with pytest.raises(DataError, match="no dataset"):
        world_object_masks(world, "bench/nope", ids)


def test_written_masks_read_back_as_train_loras_masks(world, tmp_path):
    from genaug.personalize.lora import load_masks
    from genaug.world import world_object_masks, write_masks

    ids = [r["id"] for r in read_dataset(world / "bench", "train").records[:3]]
    masks = world_object_masks(world, "bench/train", ids)
    folder = write_masks(tmp_path / "masks", {f"mask-{i}": masks[i][0] for i in ids})
    loaded = load_masks(str(folder), 32, "masks")
    expected = np.stack([masks[i][0] for i in ids])
    # Where the coverage is clearly in or out, the mask read back agrees (edges are antialiased grey).
    clear = np.abs(expected - 0.5) > 0.1
    np.testing.assert_array_equal(loaded[:, 0].numpy()[clear], (expected > 0.5)[clear])
