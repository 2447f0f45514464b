"""Shared fixtures: tiny seeded models from the kit, saved once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from genaug.models.kit import KitConfig, save_kit_model


def pytest_collection_modifyitems(config, items):
    # Slow tests run only when asked for: GENAUG_SLOW=1 or `-m slow`.
    if os.environ.get("GENAUG_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow; run with GENAUG_SLOW=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    """``kit(arch)`` -> path of a tiny random diffusers/transformers folder, built once."""
    root = tmp_path_factory.mktemp("kit")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = save_kit_model(KitConfig(arch=arch, output=str(root / arch), seed=0)).path
        return cache[arch]

    return get


@pytest.fixture
def shape_images(tmp_path) -> Path:
    """A flat folder of four 32x32 images of one toy concept."""
    folder = tmp_path / "concept"
    folder.mkdir()
    for i in range(4):
        im = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(im).ellipse([4 + i, 4, 26, 26 + i], fill=(220, 30, 30))
        im.save(folder / f"{i}.png")
    return folder
