"""Budget routing's decode thresholds: the top share of each layer's recent decode scores.

Budget routing promises a routed share, not a score threshold, because a text's scores differ
from the calibration text's. A pass of many tokens (prefill) routes exactly its own top share
and leaves the threshold at that cut. One token at a time (decode) there is nothing to rank a
token against but the tokens decoded before it, and a model's own generation scores lower
than the prompt it read: so each layer keeps its last BUDGET_WINDOW decode scores, and once it
holds enough of them (1 / share, so the top share is at least one score) a token is routed
when it reaches that window's top share: its (1 - share) quantile, interpolated as numpy's
default does.

A window alone still under-spends when the scores keep falling, as they do in a greedy
repetition loop (each repeat a little more certain than the last): the newest score then sits
below the older ones that set the quantile. So the share asked of the window carries the
sequence's running deficit: share + (share x decoded - routed) / BUDGET_HORIZON, within [0, 1].

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

__all__ = ["BUDGET_HORIZON", "BUDGET_WINDOW", "BudgetWindow", "effective_share", "min_scores", "window_quantile"]

# Decode scores a layer ranks a token against, and the decode tokens over which a deficit (or
# surplus) of routed tokens is made up. Chosen on one 128-token generation per model from a
# WikiText prompt (SmolLM2-135M, Qwen2.5-1.5B: 100 / 32 left Qwen at 5.9%, 50 / 8 at 9.5%), then
# checked on C4 prompts (README, "Budget routing in decode").
BUDGET_WINDOW = 50
BUDGET_HORIZON = 8


def min_scores(share: float) -> int:
    """Decode scores a window needs before its quantile replaces the prefill's cut for ``share``."""
    if share <= 0.0 or share >= 1.0:
        return 1
    return min(BUDGET_WINDOW, math.ceil(1.0 / share))


def effective_share(share: float, decoded: int, routed: float) -> float:
    """The share asked of the window: ``share`` plus the deficit spread over BUDGET_HORIZON."""
    if share <= 0.0 or share >= 1.0:
        return share
    return min(max(share + (share * decoded - routed) / BUDGET_HORIZON, 0.0), 1.0)


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
        self.decoded = 0  # decode tokens of this sequence so far
        self.routed = [0.0] * len(self.shares)  # of them, those at or above each tier

    def set_cut(self, thresholds: Sequence[float]) -> None:
        """A prefill pass's exact cut: decode starts from it."""
        self.thresholds[:] = [float(t) for t in thresholds]

    def add(self, score: float, tier_index: int) -> None:
        """Take one decode token's score and tier in (dropping the oldest score when full); the
        thresholds follow."""
        self.decoded += 1
        for k in range(len(self.shares)):
            if tier_index > k:
                self.routed[k] += 1.0
        if len(self.recent) == BUDGET_WINDOW:
            del self.ordered[bisect.bisect_left(self.ordered, self.recent[0])]
        self.recent.append(score)
        bisect.insort(self.ordered, score)
        self._update()

    def replace(self, scores: Sequence[float], decoded: int, routed: Sequence[float]) -> None:
        """The window and counts as the device router left them (scores oldest first)."""
        self.decoded, self.routed = int(decoded), [float(r) for r in routed]
        self.recent = deque((float(s) for s in list(scores)[-BUDGET_WINDOW:]), maxlen=BUDGET_WINDOW)
        self.ordered = sorted(self.recent)
        self._update()

    def _update(self) -> None:
        # In place: callers hold the list (the router's per-layer rows).
        for k, share in enumerate(self.shares):
            if len(self.ordered) >= min_scores(share):
                self.thresholds[k] = window_quantile(self.ordered, effective_share(share, self.decoded, self.routed[k]))
        for k in range(1, len(self.thresholds)):
            # Nested: a higher tier never asks less (its own deficit must not route tokens the
            # lower tier's surplus holds back).
            self.thresholds[k] = max(self.thresholds[k], self.thresholds[k - 1])
