"""The seed's API: ``TAPEngine(config=TAPConfig(...)).load_model(...)`` then ``generate``.

A thin layer over :func:`tap_runtime.load` and :class:`TapModel`: it maps ``precision_levels``
and ``precision_thresholds`` (importance quantiles) onto the checkpoint's stored tiers, converts
an un-converted model in memory with a short calibration when asked to load one, and returns
metrics as the nested dict documented in :meth:`TAPEngine.generate`.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .energy import EnergyEstimator, EnergyMonitor, WorkCounts
from .errors import InvalidConfigError
from .format import ROUTING_FILE
from .load import load
from .metrics import GenerationMetrics, weight_bits_read
from .model import TapModel

__all__ = ["PrecisionMode", "TAPConfig", "TAPEngine"]

_log = logging.getLogger(__name__)
_LEVELS = (4, 8, 16, 32)


class PrecisionMode(str, enum.Enum):
    """ADAPTIVE: routed per token. FIXED: every token at ``fixed_level``. HIGHEST: the highest stored tier."""

    ADAPTIVE = "adaptive"
    FIXED = "fixed"
    HIGHEST = "highest"


@dataclass
class TAPConfig:
    """Run-time choices; ``None`` levels/thresholds mean the checkpoint's own (calibrated) ones.

    precision_levels: ascending bit widths from {4, 8, 16, 32}. A level the checkpoint does not
        store (e.g. 32: TAP never stores float32 linears) runs at the highest stored tier below
        it; :attr:`TAPEngine.level_to_tier` records the mapping.
    precision_thresholds: importance quantiles in (0, 1), ascending, one fewer than the levels:
        a token whose router score is above quantile ``t[k]`` of the calibration scores (per
        layer) runs at ``levels[k+1]`` or higher.
    """

    precision_mode: PrecisionMode = PrecisionMode.ADAPTIVE
    precision_levels: list[int] | None = None
    precision_thresholds: list[float] | None = None
    fixed_level: int | None = None
    memory_efficient_mode: bool = False  # residual planes stay in the shards until routed tokens need them
    residual_cache_mb: float = 64.0  # memory_efficient_mode's budget for packed residual planes
    offload_to_cpu: bool = False  # on a GPU: layers beyond max_gpu_memory_mb keep their planes in host memory
    max_gpu_memory_mb: float | None = None  # offload_to_cpu's budget for packed decoder planes; None: 80% of free
    device: str = "cpu"
    calib: str = "wikitext"
    calib_samples: int = 16
    calib_seq_len: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        mode = PrecisionMode(self.precision_mode)
        levels = self.precision_levels
        if levels is not None:
            if not levels or any(level not in _LEVELS for level in levels) or list(levels) != sorted(set(levels)):
                raise InvalidConfigError(f"precision_levels {levels} are invalid; expected ascending distinct values from {list(_LEVELS)}.")
        thresholds = self.precision_thresholds
        if thresholds is not None:
            if levels is None:
                raise InvalidConfigError("precision_thresholds need precision_levels (one threshold fewer than levels).")
            if len(thresholds) != len(levels) - 1:
                raise InvalidConfigError(
                    f"precision_thresholds has {len(thresholds)} values for {len(levels)} levels; expected {len(levels) - 1} "
                    f"(one boundary between each pair of levels)."
                )
            if any(not 0.0 < t < 1.0 for t in thresholds) or list(thresholds) != sorted(thresholds):
                raise InvalidConfigError(f"precision_thresholds {thresholds} must be ascending quantiles in (0, 1).")
        if mode == PrecisionMode.FIXED and self.fixed_level is None:
            raise InvalidConfigError("precision_mode FIXED needs fixed_level (e.g. 4 or 8).")
        if self.memory_efficient_mode and self.device != "cpu":
            raise InvalidConfigError(
                f"memory_efficient_mode pages residual planes in from the shards on the CPU; device {self.device!r} "
                f"needs memory_efficient_mode=False."
            )
        if self.offload_to_cpu and not str(self.device).startswith("cuda"):
            raise InvalidConfigError(
                f"offload_to_cpu keeps the layers that do not fit a GPU in host memory; device {self.device!r} is not a GPU. "
                f"Use device='cuda', or memory_efficient_mode=True on the CPU to keep residual planes out of memory until needed."
            )


def _is_tap_checkpoint(path_or_repo_id: str) -> bool:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return (path / ROUTING_FILE).is_file()
    from huggingface_hub import hf_hub_download

    config = json.loads(Path(hf_hub_download(str(path_or_repo_id), "config.json")).read_text())
    return config.get("quantization_config", {}).get("quant_method") == "tap"


class TAPEngine:
    """Load a TAP checkpoint (or convert a plain model) and generate with per-token precision."""

    def __init__(self, config: TAPConfig | None = None):
        self.config = config or TAPConfig()
        self.config.validate()
        self.model: TapModel | None = None
        self.level_to_tier: dict[int, int] = {}
        self.converted_in_memory = False

    def load_model(self, path_or_repo_id: str | os.PathLike) -> TapModel:
        """A TAP checkpoint directory or Hub repo, or a plain HF model (converted here, briefly)."""
        source = str(path_or_repo_id)
        memory = dict(memory_efficient=self.config.memory_efficient_mode, residual_cache_mb=self.config.residual_cache_mb)
        if self.config.offload_to_cpu:
            memory.update(offload_to_cpu=True, max_gpu_memory_mb=self.config.max_gpu_memory_mb)
        if _is_tap_checkpoint(source):
            self.model = load(source, device=self.config.device, **memory)
        else:
            from tap_convert import ConvertOptions, convert

            print(
                f"{source} is not a TAP checkpoint: converting it in memory with a short calibration "
                f"({self.config.calib_samples} x {self.config.calib_seq_len} tokens of {self.config.calib}); "
                f"for a full-quality checkpoint run tap-convert once and load its output."
            )
            options = ConvertOptions(
                calib=self.config.calib,
                num_samples=self.config.calib_samples,
                seq_len=self.config.calib_seq_len,
                router_samples=max(2, self.config.calib_samples // 2),
                tiers=self._tiers_to_convert(),
            )
            work = tempfile.TemporaryDirectory(prefix="tap-engine-")
            convert(source, Path(work.name) / "checkpoint", options)
            self.model = load(Path(work.name) / "checkpoint", device=self.config.device, **memory)
            if self.config.memory_efficient_mode:
                # Residual planes are read from the shards on demand: the files live with the engine.
                self._work_directory = work
            else:
                work.cleanup()  # load() copied everything it keeps off the files
            self.converted_in_memory = True
        self._apply_precision()
        return self.model

    def _tiers_to_convert(self) -> tuple[int, ...]:
        levels = self.config.precision_levels or [4, 8]
        return (4, 8, 16) if any(level >= 16 for level in levels) else (4, 8)

    def _apply_precision(self) -> None:
        model, config = self.model, self.config
        tiers = model.table.tiers
        levels = config.precision_levels or list(tiers)
        self.level_to_tier = {level: max([t for t in tiers if t <= level] or [tiers[0]]) for level in levels}
        for level, tier in self.level_to_tier.items():
            if level != tier:
                _log.warning("precision level %d is not stored in this checkpoint; it runs at tier %d", level, tier)
        mode = PrecisionMode(config.precision_mode)
        if mode == PrecisionMode.HIGHEST:
            model.set_routing("fixed", tier=tiers[-1])
        elif mode == PrecisionMode.FIXED:
            if config.fixed_level not in self.level_to_tier and config.fixed_level not in tiers:
                raise InvalidConfigError(f"fixed_level {config.fixed_level} is not among the levels {levels} or tiers {list(tiers)}.")
            model.set_routing("fixed", tier=self.level_to_tier.get(config.fixed_level, config.fixed_level))
        elif config.precision_thresholds is None:
            model.set_routing()  # the default: learned score, share held at the converted one
        else:
            model.set_routing("learned")  # the caller's quantiles as fixed thresholds
            if config.precision_thresholds is not None:
                model.router.set_thresholds(model.table.router.thresholds_for_quantiles(self._tier_quantiles(tiers, levels)))

    def _tier_quantiles(self, tiers: tuple[int, ...], levels: list[int]) -> list[float]:
        """For each tier above the base: the lowest quantile boundary whose level maps to it or higher."""
        boundaries = self.config.precision_thresholds
        quantiles = []
        for tier in tiers[1:]:
            reaching = [boundaries[k] for k in range(len(boundaries)) if self.level_to_tier[levels[k + 1]] >= tier]
            quantiles.append(min(reaching) if reaching else 1.0)
        return quantiles

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 64, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        """Generate and measure. Returns ``(text, metrics)``.

        ``metrics["precision"]``: ``tokens_per_tier`` (token-layer decisions / layers per tier),
        ``tier_share``, ``avg_weight_bits_per_token`` (bits of weights read per token, tier mix
        included), ``energy_saved_pct`` (against every token on the highest stored tier, same
        tokens), ``energy_method`` (``estimated``: from bytes read and MACs with the constants
        in ``energy_source``), ``energy_joules`` (this call: measured when a counter exists, see
        ``energy_joules_method``), ``level_to_tier``.
        ``metrics["memory"]``: ``peak_rss_bytes`` (and its ``peak_rss_method``), ``cuda_peak_bytes``,
        ``checkpoint_bytes``, ``bytes_vs_fp16`` (checkpoint / fp16 size of the source model).
        ``metrics["timing"]``: ``prefill_seconds``, ``decode_seconds``, ``tokens_per_second``
        (decode), ``prefill_tokens_per_second``, ``new_tokens``, ``prompt_tokens``.
        """
        if self.model is None:
            raise RuntimeError("call load_model() before generate()")
        monitor = EnergyMonitor(self.config.device)
        monitor.begin_window("generate")
        out = self.model.generate(prompt, max_new_tokens=max_new_tokens, **kwargs)
        metrics = out.metrics
        work, highest = self._work_counts(metrics)
        reading = monitor.end_window("generate", work=work)
        estimator = EnergyEstimator()
        estimated, reference = estimator.joules(work), estimator.joules(highest)
        fp16_bytes = int(self.model.table.calibration.extra.get("fp16_bytes", 0)) or None
        return out.text, {
            "precision": {
                "tokens_per_tier": metrics.tokens_per_tier,
                "tier_share": metrics.tier_share,
                "avg_weight_bits_per_token": metrics.avg_weight_bits_per_token,
                "energy_saved_pct": 100.0 * (1.0 - estimated / reference) if reference > 0 else 0.0,
                "energy_method": "estimated",
                "energy_source": estimator.describe(),
                "energy_joules": reading.joules,
                "energy_joules_method": reading.method,
                "level_to_tier": dict(self.level_to_tier),
            },
            "memory": {
                "peak_rss_bytes": metrics.peak_rss_bytes,
                "peak_rss_method": metrics.peak_rss_method,
                "cuda_peak_bytes": metrics.cuda_peak_bytes,
                "checkpoint_bytes": metrics.checkpoint_bytes,
                "bytes_vs_fp16": metrics.checkpoint_bytes / fp16_bytes if fp16_bytes else None,
            },
            "timing": {
                "prefill_seconds": metrics.prefill_seconds,
                "decode_seconds": metrics.decode_seconds,
                "tokens_per_second": metrics.decode_tokens_per_second,
                "prefill_tokens_per_second": metrics.prefill_tokens_per_second,
                "new_tokens": metrics.new_tokens,
                "prompt_tokens": metrics.prompt_tokens,
            },
        }

    def _work_counts(self, metrics: GenerationMetrics) -> tuple[WorkCounts, WorkCounts]:
        """Weight bytes read and MACs of this call's tier mix, and of the same tokens on the top tier.

        Linear-layer MACs count as int4 per plane read, the head's as int8; attention and
        norms are the same in both and left out (they would only dilute the difference).
        """
        table = self.model.table
        counts = self.model.router.counts.clone()
        tokens = metrics.prompt_tokens + metrics.new_tokens
        top = torch.zeros_like(counts)
        top[:, -1] = counts.sum(dim=1)
        head_macs = sum(e.num_weights for e in table.embeddings.values() if e.role == "head")

        def work(layer_counts: torch.Tensor) -> WorkCounts:
            read = weight_bits_read(table, layer_counts)
            planes_read = 0.0
            for policy in table.linear.values():
                if policy.layer_index is None:
                    continue
                row = layer_counts[policy.layer_index].to(torch.float64)
                planes = torch.tensor([max(k + 1, policy.always_planes) for k in range(len(table.tiers))], dtype=torch.float64)
                planes_read += policy.num_weights * float((row * planes).sum())
            return WorkCounts(
                weight_bytes=read["weight_bytes_read_per_token"] * tokens,
                macs_by_dtype={"int4": planes_read, "int8": head_macs * tokens},
            )

        return work(counts), work(top)
