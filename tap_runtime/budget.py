"""Budget routing's decode thresholds: the top share of each layer's recent decode scores.

Budget routing promises a routed share, not a score threshold, because a text's scores differ
from the calibration text's. A pass of many tokens (prefill) routes exactly its own top share
and leaves the threshold at that cut. One token at a time (decode) there is nothing to rank a
token against but the tokens decoded before it, and a model's own generation scores lower
than the prompt it read: so each layer keeps its last BUDGET_WINDOW decode scores, and once it
holds enough of them (1 / share, so the top share is at least one score) a token is routed
when it reaches that window's top share: its (1 - share) quantile, interpolated as numpy's
default does.

The controller this replaces nudged the threshold by a fixed step per decode token. Its
long-run share was right, but at a 10% share it moved down nine times slower than up: after a
32-token prompt, 128 tokens of Qwen2.5-1.5B's own generation were routed at 2.4%, not 10%
(README, "Budget routing in decode").
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence

__all__ = ["BUDGET_WINDOW", "BudgetWindow", "min_scores", "window_quantile"]

BUDGET_WINDOW = 100


def min_scores(share: float) -> int:
    """Decode scores a window needs before its quantile replaces the prefill's cut for ``share``."""
    if share <= 0.0 or share >= 1.0:
        return 1
    return min(BUDGET_WINDOW, math.ceil(1.0 / share))


def window_quantile(ordered: Sequence[float], share: float) -> float:
    """The score that the top ``share`` of ``ordered`` (ascending, non-empty) reaches: +inf for
    no share, -inf for all. The same arithmetic as the device router's tensor version."""
    if share <= 0.0:
        return math.inf
    if share >= 1.0:
        return -math.inf
    count = len(ordered)
    position = (1.0 - share) * (count - 1)
    low = math.floor(position)
    high = min(low + 1, count - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


class BudgetWindow:
    """One layer's current thresholds (one per tier above the base) and last decode scores."""

    def __init__(self, thresholds: Sequence[float], shares: Sequence[float]):
        self.shares = tuple(float(s) for s in shares)
        self.thresholds = [float(t) for t in thresholds]
        self.recent: deque[float] = deque(maxlen=BUDGET_WINDOW)  # oldest first
        self.ordered: list[float] = []

    def set_cut(self, thresholds: Sequence[float]) -> None:
        """A prefill pass's exact cut: decode starts from it."""
        self.thresholds[:] = [float(t) for t in thresholds]

    def add(self, score: float) -> None:
        """Take one decode score in (dropping the oldest when full); the thresholds follow."""
        if len(self.recent) == BUDGET_WINDOW:
            del self.ordered[bisect.bisect_left(self.ordered, self.recent[0])]
        self.recent.append(score)
        bisect.insort(self.ordered, score)
        self._update()

    def replace(self, scores: Sequence[float]) -> None:
        """The window as the device router left it (oldest first)."""
        self.recent = deque((float(s) for s in list(scores)[-BUDGET_WINDOW:]), maxlen=BUDGET_WINDOW)
        self.ordered = sorted(self.recent)
        self._update()

    def _update(self) -> None:
        # In place: callers hold the list (the router's per-layer rows).
        for k, share in enumerate(self.shares):
            if len(self.ordered) >= min_scores(share):
                self.thresholds[k] = window_quantile(self.ordered, share)
