"""Online estimators behind SLO admission: how long a prefill takes, how long a decode step.

A prefill's time to first token is close to ``overhead + seconds_per_token × work``, where
``work`` is the prefill tokens queued ahead of it on its instance plus its own new tokens,
and ``overhead`` is what every request pays whatever its length (routing, the first step,
the round trips). Dividing tokens by elapsed time instead would charge that overhead to
each token: a few short prompts would make every long one look hopeless, and admission
would refuse requests that meet their SLO. ``LinearFit`` learns both terms.
"""

from __future__ import annotations

import math


class Ewma:
    """An exponentially weighted moving average (None until the first sample)."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        """Fold in one sample."""
        self.value = sample if self.value is None else (1 - self.weight) * self.value + self.weight * sample


class LinearFit:
    """Least squares ``y ≈ intercept + slope × x`` over exponentially decayed samples.

    ``predict`` is None until ``min_samples`` samples spanning two different ``x`` values
    came in (an estimate from one point would be a guess). Both terms are kept ≥ 0.
    """

    def __init__(self, decay: float = 0.95, min_samples: int = 4):
        self.decay, self.min_samples = decay, min_samples
        self.n = self.sx = self.sy = self.sxx = self.sxy = self.syy = 0.0
        self.samples = 0

    def add(self, x: float, y: float) -> None:
        """Fold in one observation (older ones weigh ``decay`` times less each time)."""
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy, self.syy = d * self.sxx + x * x, d * self.sxy + x * y, d * self.syy + y * y
        self.samples += 1

    def terms(self) -> tuple[float, float] | None:
        """``(intercept, slope)``, or None while there is too little to fit."""
        if self.samples < self.min_samples:
            return None
        spread = self.n * self.sxx - self.sx * self.sx
        if spread <= 1e-9 * max(1.0, self.sxx * self.n):
            return None
        slope = max(0.0, (self.n * self.sxy - self.sx * self.sy) / spread)
        intercept = max(0.0, (self.sy - slope * self.sx) / self.n)
        return intercept, slope

    def predict(self, x: float) -> float | None:
        """The fitted ``y`` at ``x``, or None (see ``terms``)."""
        terms = self.terms()
        return None if terms is None else terms[0] + terms[1] * x

    def predict_quantile(self, x: float, z: float) -> float | None:
        """The fitted ``y`` at ``x`` plus ``z`` standard deviations of the (decayed) residuals:
        an upper quantile when the scatter around the line is roughly normal (``z = 1.28``:
        p90). None like ``predict``."""
        terms = self.terms()
        if terms is None:
            return None
        a, b = terms
        # Σ(y - a - b·x)² from the running sums, whatever a and b are (they may be clamped).
        squares = (self.syy - 2 * a * self.sy - 2 * b * self.sxy + a * a * self.n
                   + 2 * a * b * self.sx + b * b * self.sxx)
        return a + b * x + z * math.sqrt(max(0.0, squares) / self.n)
