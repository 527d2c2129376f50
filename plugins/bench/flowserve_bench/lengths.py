"""Length specs for prompts and outputs: a fixed count, a uniform range, or a mixture.

==============================  =============================================================
spec                            meaning
==============================  =============================================================
``128``                         always 128 tokens
``uniform:64:256``              uniform integer in [64, 256], both ends included
``mix:0.2@1500,0.8@100``        1500 with weight 0.2, 100 with weight 0.8 (weights are
                                normalized); a part may itself be ``uniform:LO:HI``, as in
                                ``mix:0.3@uniform:1000:2000,0.7@100``
==============================  =============================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from flowserve_bench.errors import BenchError


class LengthSpecError(BenchError, ValueError):
    """A length spec that does not parse, naming the spec and the accepted forms."""


FORMS = "N, uniform:LO:HI or mix:W@SPEC,W@SPEC,… (e.g. 128, uniform:64:256, mix:0.2@1500,0.8@100)"


@dataclass(frozen=True)
class Fixed:
    """Always ``n`` tokens."""

    n: int

    def sample(self, rng: random.Random) -> int:
        """Return ``n``."""
        return self.n


@dataclass(frozen=True)
class Uniform:
    """A uniform integer in ``[low, high]``."""

    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        """Draw one length."""
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Mixture:
    """Pick a part with probability proportional to its weight, then draw from it."""

    weights: tuple[float, ...]
    parts: tuple[Fixed | Uniform, ...]

    def sample(self, rng: random.Random) -> int:
        """Draw one length."""
        (part,) = rng.choices(self.parts, weights=self.weights)
        return part.sample(rng)


LengthDistribution = Fixed | Uniform | Mixture


def parse_length(spec: str | int, *, what: str = "length") -> LengthDistribution:
    """Parse a length spec (see the module docstring); ``what`` names the option in errors."""
    text = str(spec).strip()
    if text.startswith("mix:"):
        weights, parts = [], []
        for item in text[4:].split(","):
            weight, at, part = item.partition("@")
            if not at:
                raise LengthSpecError(f"{what} {text!r}: mixture part {item!r} is not WEIGHT@SPEC; use {FORMS}")
            try:
                weights.append(float(weight))
            except ValueError:
                raise LengthSpecError(f"{what} {text!r}: weight {weight!r} is not a number") from None
            parts.append(_parse_simple(part.strip(), text, what))
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise LengthSpecError(f"{what} {text!r}: mixture weights must be >= 0 and not all 0")
        return Mixture(tuple(weights), tuple(parts))
    return _parse_simple(text, text, what)


def _parse_simple(part: str, whole: str, what: str) -> Fixed | Uniform:
    low_text, sep, high_text = part.removeprefix("uniform:").partition(":")
    try:
        if part.startswith("uniform:") and sep:
            low, high = int(low_text), int(high_text)
        else:
            low = high = int(part)
    except ValueError:
        raise LengthSpecError(f"{what} {whole!r} is not a length spec; use {FORMS}") from None
    if low < 1:
        raise LengthSpecError(f"{what} {whole!r}: a length must be at least 1, got {low}")
    if part.startswith("uniform:"):
        if low > high:
            raise LengthSpecError(f"{what} {whole!r}: uniform needs 1 <= LO <= HI, got {low}..{high}")
        return Uniform(low, high)
    return Fixed(low)
