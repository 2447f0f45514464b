"""Evaluation metrics, the timm backbones and the oracle."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch

from genaug.errors import ModelError
from genaug.evaluate import backbones  # noqa: F401  (registers genaug_cnn_* in timm)
from genaug.evaluate.metrics import (clip_i, clip_image_features, clip_t, clip_text_features, frechet_distance,
                                     kernel_inception_distance, recall_at_k, zero_shot_accuracy, zero_shot_predict)
from genaug.pretrain.clip import load_dual_encoder
from genaug.pretrain.oracle import OracleConfig, load_oracle, train_oracle
from test_pretrain_clip import one_thread, toy_split, trained_toy_model  # noqa: F401  (one_thread: autouse)


# --------------------------------------------------------------------------- FID / KID
def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_mean_shift():
    feats = np.random.default_rng(0).normal(size=(300, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(feats, feats + s) for s in (0.5, 1.0, 2.0)]
    # Equal covariances leave only the squared mean difference: 16 * s^2.
    assert shifts == pytest.approx([16 * 0.25, 16 * 1.0, 16 * 4.0], rel=1e-6)


def test_frechet_distance_matches_the_textbook_formula_and_survives_singular_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(0)).sum()  # same spectrum as sqrtm's
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # Fewer samples than dimensions: rank-deficient covariances, still a finite non-negative number.
    few = rng.normal(size=(5, 32))
    value = frechet_distance(few, few + 0.1)
    assert np.isfinite(value) and value == pytest.approx(32 * 0.01, rel=1e-4)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


def test_kernel_inception_distance_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same_mean, same_std = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted_mean, _ = kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 0.01
    assert shifted_mean > 10 * abs(same_mean) and shifted_mean > 0.1
    assert kernel_inception_distance(a, b, num_subsets=3, subset_size=50) == \
           kernel_inception_distance(a, b, num_subsets=3, subset_size=50)  # seeded


# --------------------------------------------------------------------------- CLIP-space scores
def test_recall_at_k():
    feats = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    assert recall_at_k(feats, feats, 1) == 1.0
    assert recall_at_k(feats, feats.roll(1, dims=0), 1) < 0.5
    # Three captions; the second's own image ranks second, the third's ranks third.
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    images = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    assert [recall_at_k(text, images, k) for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_clip_t_and_clip_i():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert clip_t(a, a) == pytest.approx(1.0)
    assert clip_t(a, torch.tensor([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.5)
    assert clip_i(a, a) == pytest.approx(0.5)  # all pairs: two identical, two orthogonal


@pytest.fixture(scope="module")
def dual_encoder(tmp_path_factory):
    out, _, toy, _ = trained_toy_model(tmp_path_factory)
    model, tokenizer = load_dual_encoder(out)
    return model, tokenizer, toy


def test_clip_features_are_unit_length_and_batch_independent(dual_encoder):
    model, tokenizer, toy = dual_encoder
    whole = clip_image_features(model, toy.images)
    batched = clip_image_features(model, toy.images, batch=5)
    assert torch.allclose(whole, batched, atol=1e-5)
    assert torch.allclose(whole.norm(dim=-1), torch.ones(len(whole)), atol=1e-5)
    text = clip_text_features(model, tokenizer, toy.captions, batch=3)
    assert text.shape == whole.shape
    # Images of another size are resized to the model's.
    assert clip_image_features(model, torch.nn.functional.interpolate(toy.images.float(), size=32).byte()).shape \
           == whole.shape


def test_zero_shot_on_a_toy_set(dual_encoder):
    model, tokenizer, toy = dual_encoder
    accuracy = zero_shot_accuracy(model, tokenizer, toy.images, toy.labels, toy.class_names)
    assert accuracy >= 0.75
    predictions = zero_shot_predict(model, tokenizer, toy.images, toy.class_names, templates=["a {}"])
    assert predictions.shape == toy.labels.shape
    with pytest.raises(ValueError):
        zero_shot_accuracy(model, tokenizer, toy.images, toy.labels[:3], toy.class_names)


# --------------------------------------------------------------------------- backbones and oracle
@pytest.mark.parametrize("arch", ["genaug_cnn_small", "genaug_cnn_tiny"])
def test_timm_creates_the_backbones(arch):
    model = timm.create_model(arch, num_classes=24).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 24)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 24)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(arch, pretrained=True)


def test_oracle_trains_saves_loads_and_refuses_pickles(tmp_path):
    train, val = toy_split(per_class=6, seed=0), toy_split(per_class=2, seed=1)
    cfg = OracleConfig(arch="genaug_cnn_tiny", epochs=3, batch_size=16, learning_rate=0.05, progress=False)
    result = train_oracle(cfg, train, val, tmp_path / "oracle")
    assert 1 <= result.best_epoch <= 3 and 0.0 <= result.val_accuracy <= 1.0 and len(result.history) == 3

    oracle = load_oracle(tmp_path / "oracle")
    assert oracle.class_names == train.class_names
    labels, probs = oracle.predict(val.images)
    assert labels.shape == (len(val),) and probs.shape == (len(val), len(train.class_names))
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(val)), atol=1e-5)
    assert float((labels == val.labels).float().mean()) == pytest.approx(result.val_accuracy)
    features = oracle.features(val.images)
    assert features.shape == (len(val), oracle.model.num_features)
    again = load_oracle(tmp_path / "oracle")
    assert torch.equal(again.features(val.images), features)
    assert oracle.predict(torch.nn.functional.interpolate(val.images.float(), size=32).byte())[1].shape == probs.shape

    # A pickle under the safetensors name is refused, never unpickled.
    (tmp_path / "oracle" / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelError, match="safetensors"):
        load_oracle(tmp_path / "oracle")
    torch.save(oracle.model.state_dict(), tmp_path / "oracle" / "model.safetensors")
    with pytest.raises(ModelError, match="safetensors"):
        load_oracle(tmp_path / "oracle")
    with pytest.raises(ModelError):
        load_oracle(tmp_path / "missing")
