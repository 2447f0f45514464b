"""How many extra images each class gets: shared by synthesis and retrieval so their budgets match."""

from __future__ import annotations

from typing import Sequence


def images_per_class_budget(real_counts: Sequence[int], *, images_per_class: int = 0, per_real: int = 0,
                            balance_to: int = 0) -> list[int]:
    """Extra images per class under one budget.

    ``per_real``: M per real training image (DA-Fusion's M); ``balance_to``: top every class up to
    N images counting its real ones (long-tail); otherwise ``images_per_class`` for every class.
    """
    if per_real:
        return [per_real * int(c) for c in real_counts]
    if balance_to:
        return [max(0, balance_to - int(c)) for c in real_counts]
    return [images_per_class] * len(real_counts)


def check_budget(images_per_class: int, per_real: int, balance_to: int, has_real_data: bool) -> int:
    """Validate a budget triple; returns ``images_per_class`` (8 when no budget is set)."""
    if any(b < 0 for b in (images_per_class, per_real, balance_to)):
        raise ValueError("budgets (images_per_class, per_real, balance_to) must not be negative")
    budgets = [b for b in (images_per_class, per_real, balance_to) if b]
    if len(budgets) > 1:
        raise ValueError("set only one budget: images_per_class, per_real or balance_to")
    if (per_real or balance_to) and not has_real_data:
        raise ValueError("per_real and balance_to need real_data")
    return images_per_class if budgets else 8
