"""Small, fast CNN backbones for 32-64 px images, registered in timm.

Importing this module registers ``genaug_cnn_tiny`` and ``genaug_cnn_small``, so
``timm.create_model("genaug_cnn_small", num_classes=24)`` builds one like any timm model, with
``forward_features`` / ``forward_head(pre_logits=True)``, ``reset_classifier`` and
``features_only=True``. They are ResNet-style: a full-resolution stem (stripes and dots a few
pixels apart must survive it), three stages of basic residual blocks that halve the resolution,
BatchNorm, global average pooling. There are no pretrained weights.

Unlike timm's ResNets, each block's last BatchNorm starts at one, not zero (``zero_init_last``,
timm's name, turns the zero start on). The zero start (Goyal et al., 2017, for large-batch SGD on
ImageNet) made these nets learn the embedded world's shapes much more slowly from scratch: the
long-tail real-only classifier scored 0.207 with it and 0.326 without (3 seeds, the reduced
``embedded-longtail`` recipe), the oracle 0.850 and 0.956 in 30 epochs (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..pretrain.data import CLIP_MEAN, CLIP_STD


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class GenaugCNN(nn.Module):
    """A ResNet-style CNN for tiny images, following timm's model interface."""

    def __init__(self, stem_channels: int = 24, channels: tuple[int, ...] = (48, 96, 192),
                 depths: tuple[int, ...] = (1, 1, 1), num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg", zero_init_last: bool = False):
        super().__init__()
        if len(channels) != len(depths) or not channels or min(depths) < 1:
            raise ValueError(f"channels {channels} and depths {depths} must be non-empty, of equal length, "
                             f"with depths >= 1")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        # One cheap full-resolution conv sees patterns a few pixels apart; every stage then halves
        # the resolution, so the last one (4x4 at 32 px) sees the whole object's silhouette.
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))
        stages = []
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=stem_channels, reduction=1, module="stem.2")]
        in_channels, reduction = stem_channels, 1
        for index, (width, depth) in enumerate(zip(channels, depths)):
            reduction *= 2
            blocks = [BasicBlock(in_channels, width, stride=2)] + [BasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{index}"))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_channels
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:  # every block starts as an identity (Goyal et al.); slower here, see the docstring
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, num_features, H', W')."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (N, num_features) with ``pre_logits``, else class logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def takes_zero_init_last(name: str) -> bool:
    """Whether timm architecture ``name`` takes ``zero_init_last`` (genaug_cnn_* and timm's ResNets);
    raises timm's RuntimeError for an unknown name."""
    from timm.models import model_entrypoint

    return model_entrypoint(name).__module__ in (__name__, "timm.models.resnet")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 1000, "input_size": (3, 32, 32), "pool_size": (4, 4), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CLIP_MEAN, "std": CLIP_STD, "first_conv": "stem.0",
            "classifier": "fc", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({"genaug_cnn_tiny": _cfg(), "genaug_cnn_small": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> GenaugCNN:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights: it is trained from scratch by genaug")
    return build_model_with_cfg(GenaugCNN, variant, pretrained=False,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


@register_model
def genaug_cnn_tiny(pretrained: bool = False, **kwargs: Any) -> GenaugCNN:
    """~0.16M parameters: stem 16, stages (32, 64, 96), one block each."""
    return _create("genaug_cnn_tiny", pretrained,
                   **dict(dict(stem_channels=16, channels=(32, 64, 96), depths=(1, 1, 1)), **kwargs))


@register_model
def genaug_cnn_small(pretrained: bool = False, **kwargs: Any) -> GenaugCNN:
    """~0.7M parameters: stem 24, stages (48, 96, 192), one block each."""
    return _create("genaug_cnn_small", pretrained,
                   **dict(dict(stem_channels=24, channels=(48, 96, 192), depths=(1, 1, 1)), **kwargs))


__all__ = ["GenaugCNN", "BasicBlock", "genaug_cnn_tiny", "genaug_cnn_small", "takes_zero_init_last"]
