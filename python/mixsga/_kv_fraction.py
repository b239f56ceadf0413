from __future__ import annotations

from collections.abc import Sequence

from ._checks import check_group_sizes, check_ratios


def kv_fraction(group_sizes: Sequence[int], ratios: Sequence[float]) -> float:
    """Fraction of the base model's KV cache a configuration keeps (METHOD.md step 7):
    sum_e ratios[e] / group_sizes[e]. E.g. kv_fraction((1, 2, 4), (0.3, 0.1, 0.6)) == 0.5.

    Raises ValueError for invalid group sizes (not strictly increasing, < 1) or ratios (not in [0, 1],
    not summing to 1, not one per expert)."""
    groups = check_group_sizes(group_sizes)
    values = check_ratios(ratios, len(groups))
    return sum(r / g for r, g in zip(values, groups))
