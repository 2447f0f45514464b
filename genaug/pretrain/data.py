"""Whole-split tensors for pretraining: tiny images fit in memory, so decode them once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artefacts import GenaugDataset, read_dataset

# CLIP's pixel normalization (OpenAI), used by the embedded dual encoder as by real CLIP.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageSplit:
    """A dataset split decoded into memory: uint8 images (N, 3, H, W), labels, captions."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    class_names: list[str]
    records: list[dict]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "ImageSplit":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSplit(self.images[idx], self.labels[idx], [self.captions[i] for i in idx.tolist()],
                          self.class_names, [self.records[i] for i in idx.tolist()])


def load_split(root: str | Path, split: str | None = "train", limit: int | None = None,
               progress: bool = True) -> ImageSplit:
    ds: GenaugDataset = read_dataset(root, split)
    n = len(ds) if limit is None else min(limit, len(ds))

    def load(i: int) -> np.ndarray:
        return np.asarray(ds.image(i), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(tqdm(pool.map(load, range(n), chunksize=256), total=n, desc=f"load {Path(root).name}",
                           disable=not progress, unit="img"))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    records = ds.records[:n]
    captions = [str(r.get("caption", r.get("prompt", r.get("class_name", "")))) for r in records]
    labels = torch.as_tensor([int(r["label"]) for r in records], dtype=torch.long)
    return ImageSplit(images, labels, captions, ds.class_names, records)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float in [-1, 1] (the VAE's range)."""
    return images.float() / 127.5 - 1.0


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) -> CLIP-normalized float, the input of the embedded image encoder."""
    x = images.float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
