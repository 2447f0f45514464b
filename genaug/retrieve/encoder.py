"""A CLIP image/text encoder for retrieval: the embedded dual encoder or any transformers CLIP folder.

Images go through the checkpoint's own ``CLIPImageProcessor`` (a real CLIP resizes and
centre-crops to 224 px; the embedded one to 32 px), texts through its tokenizer, and both come
out as unit vectors in the shared space, so inner product is cosine similarity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ModelError
from ..models.embedded import resolve_model
from ..models.loading import resolve_device


class ClipEncoder:
    """``encode_images(list[PIL]) -> (N, D) float32`` and ``encode_texts(list[str])``, unit-normalized."""

    def __init__(self, model: str = "embedded:clip", device: str = "auto", batch_size: int = 256):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.name = model
        path = resolve_model(model)
        local = Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
        if local and not (Path(path) / "config.json").is_file():
            raise ModelError("no CLIP checkpoint here (config.json missing)", where=path,
                             fix="use embedded:clip, or a transformers CLIP folder with safetensors weights")
        self.device = resolve_device(device)
        try:
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True, local_files_only=local)
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=local)
            self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load the CLIP model ({first})", where=path,
                             fix="give a transformers CLIP folder with safetensors weights (no hub access here)"
                             ) from None
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.dim = int(self.model.config.projection_dim)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.model.config.text_config.max_position_embeddings))

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")
            feats = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
            out.append(F.normalize(_pooled(feats).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            feats = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                 attention_mask=enc["attention_mask"].to(self.device))
            out.append(F.normalize(_pooled(feats).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def text_query(self, class_name: str, templates: Sequence[str]) -> np.ndarray:
        """One unit vector for a class: the mean of its prompts' embeddings (prompt ensembling)."""
        feats = self.encode_texts([t.replace("{}", class_name) for t in templates])
        mean = feats.mean(axis=0)
        return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; older versions a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output
