"""Which backups a sampled verify re-reads (plain Python, no Prefect).

A sample is a fraction of the backups (``0.1``, ``10%``) or a count
(``20``), or every backup (``all``). The newest backup of every VM is
always in it, whatever the size asked for: it is the one a restore would
use. The rest is drawn at random, so successive runs cover the repository.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InvalidInputError
from .retention import Dated


@dataclass(frozen=True)
class Sample:
    """``fraction`` in (0, 1] or ``count`` >= 1; neither: every backup."""

    fraction: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and self.count is not None:
            raise InvalidInputError("a sample is a fraction or a count, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise InvalidInputError(f"a sample fraction must be in (0, 1], not {self.fraction}")
        if self.count is not None and self.count < 1:
            raise InvalidInputError(f"a sample count must be at least 1, not {self.count}")

    @property
    def everything(self) -> bool:
        return self.count is None and (self.fraction is None or self.fraction == 1)

    def size(self, total: int) -> int:
        if self.everything:
            return total
        if self.count is not None:
            return min(self.count, total)
        return min(total, math.ceil((self.fraction or 1) * total))

    def describe(self) -> str:
        if self.everything:
            return "all"
        return f"{self.count}" if self.count is not None else f"{(self.fraction or 1) * 100:g}%"


def parse_sample(text: str | float | int | None) -> Sample:
    """``None``/``all``: every backup; ``N`` (an integer): N backups;
    ``0.25`` or ``25%``: that fraction. ``InvalidInputError`` otherwise."""
    if text is None:
        return Sample()
    if isinstance(text, bool):
        raise InvalidInputError(f"--sample: {text!r} is not a count, a fraction or 'all'")
    if isinstance(text, int):
        return Sample(count=text)
    if isinstance(text, float):
        return Sample(fraction=text)
    t = text.strip().lower()
    try:
        if t == "all":
            return Sample()
        if t.endswith("%"):
            return Sample(fraction=float(t[:-1]) / 100)
        if t.isdigit():
            return Sample(count=int(t))
        return Sample(fraction=float(t))
    except ValueError:
        raise InvalidInputError(f"--sample: {text!r} is not a count, a fraction (0.1, 10%) or 'all'") from None


def choose_sample(backups: Iterable[Dated], sample: Sample, rng: random.Random | None = None) -> list[str]:
    """The ids to verify: every VM's newest backup, then others at random up
    to the sample's size. Returned oldest first (the repository's order)."""
    items: Sequence[Dated] = sorted(backups, key=lambda b: (b.created_unix, b.id))
    newest: dict[str, Dated] = {}
    for b in items:
        newest[b.vm] = b  # the last one seen is the newest
    chosen = {b.id for b in newest.values()}
    rest = [b.id for b in items if b.id not in chosen]
    want = sample.size(len(items)) - len(chosen)
    if want > 0:
        chosen |= set((rng or random.Random()).sample(rest, min(want, len(rest))))
    return [b.id for b in items if b.id in chosen]
