"""Measurements of one generate call: tokens per tier, bits read, time and peak memory.

Every figure here is measured or derived from counts taken during the call; nothing is a
constant. Peak RSS uses the kernel's own high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) where Linux allows it, and falls back to sampling otherwise; the
result says which.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers.generation.streamers import BaseStreamer

from .errors import InvalidConfigError
from .format import RoutingTable

__all__ = ["PeakMemory", "FirstTokenClock", "GenerationMetrics", "weight_bits_read"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_bytes() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


class PeakMemory:
    """Peak resident memory (and CUDA peak when present) inside a ``with`` block."""

    def __init__(self, sample_interval_s: float = 0.005):
        self.sample_interval_s = sample_interval_s
        self.peak_rss_bytes = 0
        self.method = ""
        self.cuda_peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled"
            process = psutil.Process()
            self.peak_rss_bytes = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(self.sample_interval_s):
                    self.peak_rss_bytes = max(self.peak_rss_bytes, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.method == "VmHWM":
            self.peak_rss_bytes = _vm_hwm_bytes() or psutil.Process().memory_info().rss
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_rss_bytes = max(self.peak_rss_bytes, psutil.Process().memory_info().rss)
        if torch.cuda.is_available():
            self.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())


class FirstTokenClock(BaseStreamer):
    """A ``generate`` streamer that timestamps the first new token, splitting prefill from decode.

    transformers calls ``put`` once with the prompt, then once per new token.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def weight_bits_read(table: RoutingTable, counts: torch.Tensor) -> dict[str, float]:
    """Average stored bits per weight that the routed linears read, given per-layer tier counts.

    counts: (num_layers, len(tiers)) token-layer decisions. Returns the average over tokens of
    the bits a token reads from the routed linears, and the bytes that implies per token
    (plus the 8-bit output head, which a decode step reads once per token).
    """
    tiers = table.tiers
    layer_bits = torch.zeros(counts.shape, dtype=torch.float64)  # bits read per tier per layer
    layer_weights = torch.zeros(counts.shape[0], dtype=torch.float64)
    for policy in table.linear.values():
        if policy.layer_index is None:
            continue
        layer_weights[policy.layer_index] += policy.num_weights
        for k, tier in enumerate(tiers):
            layer_bits[policy.layer_index, k] += policy.bits_at_tier(tier) * policy.num_weights
    tokens_per_layer = counts.sum(dim=1).to(torch.float64)
    num_tokens = float(tokens_per_layer.max()) if counts.numel() else 0.0
    if num_tokens == 0:
        return {"avg_weight_bits_per_token": 0.0, "weight_bytes_read_per_token": 0.0}
    total_bits = float((counts.to(torch.float64) * layer_bits).sum())
    avg_bits = total_bits / (num_tokens * float(layer_weights.sum()))
    head_bits = sum(
        e.stored_bits_per_weight() * e.num_weights for e in table.embeddings.values() if e.role == "head"
    )
    return {
        "avg_weight_bits_per_token": avg_bits,
        "weight_bytes_read_per_token": (total_bits / num_tokens + head_bits) / 8.0,
    }


def shares_for_bits(table: RoutingTable, target_bits: float, fitted: tuple[float, ...]) -> tuple[float, ...]:
    """Shares above the base tier (one per tier, nested) whose average weight bits read per
    token, as :func:`weight_bits_read` counts them, equal ``target_bits``.

    The fitted shares are scaled by one factor, so their ratios between tiers are kept; with no
    fitted share above the base, each tier gets the same one. Bits read are linear in the
    shares, so the factor is exact. Raises InvalidConfigError below the base tier's bits; at or
    above the top tier's, every token goes to the top tier.
    """
    levels = len(table.tiers)
    if len(fitted) != levels - 1:
        raise InvalidConfigError(f"expected {levels - 1} fitted shares, got {len(fitted)}")
    direction = tuple(fitted) if any(s > 0 for s in fitted) else (1.0,) * (levels - 1)

    def bits(shares: tuple[float, ...]) -> float:
        # Nested shares: "at or above tier k+1". Tokens at tier k = share_k - share_{k+1}.
        at_or_above = (1.0, *shares, 0.0)
        counts = torch.tensor([[at_or_above[k] - at_or_above[k + 1] for k in range(levels)]], dtype=torch.float64)
        per_layer = counts.expand(table.num_layers, levels) * 1e6  # any common token count
        return weight_bits_read(table, per_layer)["avg_weight_bits_per_token"]

    base, top = bits((0.0,) * (levels - 1)), bits((1.0,) * (levels - 1))
    if target_bits < base - 1e-9:
        raise InvalidConfigError(
            f"{target_bits} bits per weight is below this checkpoint's base tier ({base:.3f} bits read per token); "
            f"the lowest budget is the base tier alone."
        )
    if target_bits >= top:
        return (1.0,) * (levels - 1)
    limit = 1.0 / max(direction)  # the largest factor that keeps every share <= 1
    slope = bits(tuple(limit * d for d in direction)) - base
    factor = min(limit, (target_bits - base) / slope * limit) if slope > 0 else 0.0
    return tuple(min(1.0, factor * d) for d in direction)


@dataclass
class GenerationMetrics:
    """What one generate call measured. Keys are documented in the README's metrics table."""

    prompt_tokens: int
    new_tokens: int
    wall_seconds: float
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    tier_token_layer_counts: dict[int, int]
    tokens_per_tier: dict[int, float]
    tier_share: dict[int, float]
    avg_weight_bits_per_token: float
    weight_bytes_read_per_token: float
    peak_rss_bytes: int
    peak_rss_method: str
    cuda_peak_bytes: int | None
    checkpoint_bytes: int
    routing_mode: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        tiers = ", ".join(f"tier {t}: {self.tier_share[t]:.1%}" for t in self.tier_share)
        return (
            f"{self.new_tokens} new tokens in {self.wall_seconds:.2f}s "
            f"(decode {self.decode_tokens_per_second:.1f} tok/s, prefill {self.prefill_tokens_per_second:.1f} tok/s); "
            f"{tiers}; {self.avg_weight_bits_per_token:.2f} weight bits/token; "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )

