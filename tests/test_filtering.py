"""Filtering and weighting of synthetic data: CLIP score, DIAGen confidence weights, test near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from genaug.artefacts import DatasetWriter, read_dataset
from genaug.generate.filtering import FilterConfig, confidence_weights, filter_dataset
from test_classifier import write
from test_retrieve import CLASSES, draw


def test_confidence_weights_follow_diagen():
    w = confidence_weights(np.array([0.9, 0.5, 0.25, 0.0]))
    raw = np.array([1.0, 1.0, 0.5, 0.0])
    assert np.allclose(w, raw / raw.mean()) and w.mean() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, kit):
    from genaug.evaluate.classifier import ClassifierConfig, train_classifier

    root = tmp_path_factory.mktemp("filt")
    real = write(root / "real", "train", [6] * 6, 1)
    write(real, "test", [3] * 6, 2)
    test = read_dataset(real, "test")
    rng = np.random.default_rng(5)
    with DatasetWriter(root / "synth", CLASSES, info={"real_data": str(real)}) as writer:
        for label, name in enumerate(CLASSES):
            for j in range(3):
                writer.add(f"s-{label}-{j}", draw(name, rng), label, prompt=f"a photo of a {name}",
                           sample_weight=1.0)
        writer.add("copy-of-test", test.image(0), int(test.records[0]["label"]), prompt="x", sample_weight=1.0)
    run = root / "clf"
    train_classifier(ClassifierConfig(real_data=str(real), output=str(run), epochs=2, min_steps=4, batch_size=8,
                                      progress=False, device="cpu", checkpoint_every=0))
    return {"root": root, "synth": root / "synth", "clf": run, "clip": kit("clip")}


def test_filter_scores_weights_and_drops_test_copies(setup, tmp_path):
    result = filter_dataset(FilterConfig(input=str(setup["synth"]), output=str(tmp_path / "out"),
                                         clip_model=str(setup["clip"]), classifier=str(setup["clf"]),
                                         dedup_cosine=1.0, device="cpu"))
    ds = read_dataset(tmp_path / "out")
    assert result.dropped["near_duplicate"] == 1 and "copy-of-test" not in {r["id"] for r in ds.records}
    assert len(ds) == result.kept == 18
    weights = np.array([r["sample_weight"] for r in ds.records])
    assert weights.mean() == pytest.approx(1.0, abs=1e-4)
    assert all({"clip_score", "classifier_confidence", "prompt"} <= set(r) for r in ds.records)
    conf = np.array([r["classifier_confidence"] for r in ds.records])
    expected = confidence_weights(conf)
    assert np.allclose(weights, expected, atol=1e-4)


def test_thresholds_drop_low_scores(setup, tmp_path):
    scored = filter_dataset(FilterConfig(input=str(setup["synth"]), output=str(tmp_path / "all"),
                                         clip_model=str(setup["clip"]), dedup_cosine=1.0, device="cpu"))
    scores = sorted(r["clip_score"] for r in read_dataset(tmp_path / "all").records)
    cut = scores[len(scores) // 2]
    half = filter_dataset(FilterConfig(input=str(setup["synth"]), output=str(tmp_path / "half"),
                                       clip_model=str(setup["clip"]), min_clip_score=cut, dedup_cosine=1.0,
                                       device="cpu"))
    assert half.kept == sum(s >= cut for s in scores) < scored.kept
    assert half.dropped["clip_score"] == scored.kept - half.kept
