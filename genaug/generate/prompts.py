"""Prompt templates for class-conditioned generation.

The bank follows CLIP's zero-shot templates (short, photographic, varied) so that text
synthesis sees more than one phrasing per class; ``{}`` is replaced by the class name.
"""

from __future__ import annotations

DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}",
    "a {}",
    "a close-up photo of a {}",
    "a bright photo of a {}",
    "a dark photo of a {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a cropped photo of a {}",
]


def fill(template: str, class_name: str) -> str:
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
    return template.replace("{}", class_name)
