"""Stage 1 — personalize a generator on a few images of a concept."""

from .lora import LoraTrainConfig, LoraTrainResult, train_lora

__all__ = ["LoraTrainConfig", "LoraTrainResult", "train_lora"]
