"""Evaluation metrics: distribution distances (FID, KID) and CLIP-space scores.

Distances take plain feature arrays, so the same code scores Inception, oracle or CLIP features.
CLIP helpers take a ``transformers.CLIPModel`` (and its tokenizer) and uint8 images (N, 3, H, W);
they run batched under ``torch.no_grad`` and return L2-normalized features.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..pretrain.data import clip_normalize

# Prompt templates for zero-shot classification, phrased like the world's captions.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a {}",
    "a picture of a {}",
    "an image showing a {}",
    "a close-up photo of a {}",
    "a rendering of a {}",
)


# --------------------------------------------------------------------------- distribution distances
def _as_features(feats, name: str) -> np.ndarray:
    array = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, features), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on Inception features).

    ``tr(sqrtm(S_a S_b))`` is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``sqrt(S_a) S_b sqrt(S_a)`` (same spectrum as ``S_a S_b``). Unlike a general
    ``sqrtm`` of the non-symmetric product, this never yields complex parts or NaNs for the
    singular covariances that small sample sets give.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least 2 samples")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)  # rounding can leave -1e-12 for identical sets


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    # KID's kernel k(x, y) = (x.y / d + 1)^3; the unbiased estimator drops the diagonal terms.
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    sum_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    sum_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD² with a cubic polynomial kernel, as ``(mean, std)`` over random subsets.

    Each subset draws ``min(subset_size, len(a), len(b))`` samples without replacement from each
    set. Unbiased, so it is ≈ 0 (and can be slightly negative) for two samples of one distribution.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    values = [_polynomial_mmd2_unbiased(a[rng.choice(len(a), size, replace=False)],
                                        b[rng.choice(len(b), size, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------- CLIP features
def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projection; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_image_features(model, images_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalized projected image embeddings (N, D) on the CPU; images are resized to the model's size."""
    if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images_uint8.shape)}")
    size = model.config.vision_config.image_size
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images_uint8), batch):
        pixels = clip_normalize(images_uint8[start:start + batch])
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        feats = _pooled(model.get_image_features(pixel_values=pixels.to(device, dtype)))
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.config.projection_dim)


@torch.no_grad()
def clip_text_features(model, tokenizer, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
    """L2-normalized projected text embeddings (N, D) on the CPU (texts cut at the tokenizer's length)."""
    device = _device_of(model)
    max_length = min(int(tokenizer.model_max_length), model.config.text_config.max_position_embeddings)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(list(texts[start:start + batch]), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        feats = _pooled(model.get_text_features(input_ids=encoded["input_ids"].to(device),
                                                attention_mask=encoded["attention_mask"].to(device)))
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.config.projection_dim)


def zero_shot_classifier(model, tokenizer, class_names: Sequence[str],
                         templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """One unit vector per class (C, D): the mean of its prompts' text features (prompt ensembling)."""
    if not class_names or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    prompts = [t.format(name) for name in class_names for t in templates]
    feats = clip_text_features(model, tokenizer, prompts).view(len(class_names), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def zero_shot_predict(model, tokenizer, images_uint8: torch.Tensor, class_names: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES, batch: int = 256) -> torch.Tensor:
    """Predicted class index per image: the class whose prompt ensemble is most similar."""
    weights = zero_shot_classifier(model, tokenizer, class_names, templates)
    return (clip_image_features(model, images_uint8, batch) @ weights.T).argmax(dim=1)


def zero_shot_accuracy(model, tokenizer, images_uint8: torch.Tensor, labels, class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES, batch: int = 256) -> float:
    """Top-1 zero-shot accuracy over ``class_names`` with prompts ensembled over ``templates``."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(images_uint8):
        raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("zero-shot accuracy needs at least one image")
    predictions = zero_shot_predict(model, tokenizer, images_uint8, class_names, templates, batch)
    return float((predictions == labels).float().mean())


# --------------------------------------------------------------------------- CLIP-space scores
def _unit(feats) -> torch.Tensor:
    return F.normalize(torch.as_tensor(feats).float(), dim=-1)


@torch.no_grad()
def recall_at_k(text_feats, image_feats, k: int, block: int = 1024) -> float:
    """Text-to-image recall@k: the fraction of captions whose own image (same index) ranks in the top k.

    A caption's rank counts the images scored strictly higher than its own, so ties count in its favour.
    """
    text, image = _unit(text_feats), _unit(image_feats)
    if text.shape != image.shape:
        raise ValueError(f"text and image features must pair up one to one, got {tuple(text.shape)} and "
                         f"{tuple(image.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(text) == 0:
        raise ValueError("recall needs at least one pair")
    hits = 0
    for start in range(0, len(text), block):
        sims = text[start:start + block] @ image.T
        own = sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))]
        rank = (sims > own[:, None]).sum(dim=1)
        hits += int((rank < k).sum())
    return hits / len(text)


@torch.no_grad()
def clip_t(image_feats, text_feats) -> float:
    """CLIP-T: mean cosine similarity of each image with its own prompt (pairs by index)."""
    image, text = _unit(image_feats), _unit(text_feats)
    if image.shape != text.shape:
        raise ValueError(f"image and text features must pair up, got {tuple(image.shape)} and {tuple(text.shape)}")
    return float((image * text).sum(dim=-1).mean())


@torch.no_grad()
def clip_i(image_feats, reference_feats) -> float:
    """CLIP-I: mean cosine similarity over all pairs of (generated image, reference image), as in DreamBooth."""
    image, reference = _unit(image_feats), _unit(reference_feats)
    if image.ndim != 2 or reference.ndim != 2 or image.shape[1] != reference.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {tuple(image.shape)} and "
                         f"{tuple(reference.shape)}")
    return float((image @ reference.T).mean())


__all__ = ["DEFAULT_TEMPLATES", "frechet_distance", "kernel_inception_distance", "clip_image_features",
           "clip_text_features", "zero_shot_classifier", "zero_shot_predict", "zero_shot_accuracy", "recall_at_k",
           "clip_t", "clip_i"]
