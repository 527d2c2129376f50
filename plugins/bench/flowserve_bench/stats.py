"""The project's one percentile definition: numpy's default (``method="linear"``).

``flowserve bench``, the scripts under ``benchmarks/`` and the reliability scripts all call
``percentile`` from here, so a p99 in one report means the same as a p99 in another, and
the same as in ``vllm bench serve`` (which calls ``np.percentile``). It is plain Python, so
the plugin needs no numpy; a test holds it equal to numpy's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` (any order), numpy's default definition:
    linear interpolation between the two closest ranks, at position ``(n - 1) * q / 100``.

    :raises ValueError: for no values, or ``q`` outside [0, 100].
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"a percentile is between 0 and 100, got {q}")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    """The 50th percentile (the mean of the two middle values for an even count)."""
    return percentile(values, 50.0)


def std(values: Sequence[float]) -> float:
    """The population standard deviation (numpy's ``np.std`` default, ``ddof=0``), as
    ``vllm bench serve`` reports ``std_*_ms``."""
    if not values:
        raise ValueError("standard deviation of no values")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def percentile_key(q: float) -> str:
    """How ``vllm bench serve`` names a percentile in its keys: ``99`` → ``"99"``,
    ``99.9`` → ``"99.9"`` (as in ``p99.9_ttft_ms``)."""
    return str(int(q)) if int(q) == q else str(q)


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` → ``[50.0, 90.0, 99.0]``; each must be in [0, 100].

    :raises ValueError: naming the item that is not a percentile.
    """
    found = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            q = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number") from None
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"{item!r} is not between 0 and 100")
        found.append(q)
    if not found:
        raise ValueError(f"{text!r} names no percentile")
    return found
