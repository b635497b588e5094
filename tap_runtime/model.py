"""TapModel: a loaded TAP checkpoint with its tokenizer, routing controls and measured generate.

The transformers model stays reachable as ``.model`` (it works with ``generate``, pipelines,
KV caches); TapModel adds the parts a user of TAP asks for: which precision each token ran at,
and what that cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from .allocation import allocate_min_tiers, average_bits
from .checkpoint import Checkpoint
from .decode import FastDecoder, fast_decode_unsupported
from .graph_decode import GraphDecoder, graph_decode_unsupported
from .kv_cache import KV_CACHE_KINDS
from .errors import InvalidConfigError
from .layers import TapLinear
from .metrics import FirstTokenClock, GenerationMetrics, PeakMemory, shares_for_bits, weight_bits_read
from .router import DEFAULT_ROUTING, TokenRouter

__all__ = ["TapModel", "Generation", "DECODE_PATHS"]

# auto: on CUDA the captured graph step (tap_runtime.graph_decode) when it supports the request,
# else the lean loop (tap_runtime.decode) when that does, else transformers' generate.
DECODE_PATHS = ("auto", "graph", "fast", "eager")


@dataclass
class Generation:
    """The result of :meth:`TapModel.generate`: decoded text, token ids and metrics."""

    text: str
    token_ids: list[int]
    metrics: GenerationMetrics


class TapModel:
    """A TAP checkpoint ready to run.

    Example:
        >>> m = tap_runtime.load("./smollm2-tap")          # doctest: +SKIP
        >>> out = m.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
        >>> out.text, out.metrics.tier_share                # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, checkpoint: Checkpoint):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self._fast_decoder: FastDecoder | None = None
        self._graph_decoder: GraphDecoder | None = None
        # The modules' policies as converted: set_routing's promote starts from them (0 restores them).
        self._converted_linear = dict(checkpoint.table.linear)

    @property
    def router(self) -> TokenRouter:
        return self.model.tap_router

    @property
    def table(self):
        return self.checkpoint.table

    @property
    def kernel(self):
        """The kernel the linears multiply with (one per load), for its run-time switches, e.g.
        ``model.kernel.lane_residuals = False`` on ``cpu-vnni``."""
        for module in self.model.modules():
            if isinstance(module, TapLinear) and module.kernel is not None:
                return module.kernel
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def set_routing(
        self,
        mode: str = DEFAULT_ROUTING,
        tier: int | None = None,
        shares: tuple[float, ...] | None = None,
        seed: int = 0,
        score: str = "learned",
        sign: float = 1.0,
        bits: float | None = None,
        promote: float | None = None,
    ) -> None:
        """``budget`` (default: the learned score, share held at the converted one on any text),
        ``learned`` (the learned score against fixed calibrated thresholds: the share follows the
        text), ``fixed`` with ``tier``, ``random`` or ``topk`` (see TokenRouter.set_mode).

        ``bits`` (budget, random, topk): instead of ``shares``, the average weight bits read per
        token to spend; the fitted shares are scaled to meet it exactly (``shares_for_bits``),
        e.g. ``set_routing("budget", bits=4.6)`` to compare with 4.6-bit quantizers.

        ``promote`` (with ``bits``): the fraction of the bits above the base tier spent on whole
        modules before the routing spends the rest on tokens. The modules whose recorded
        calibration error falls most per extra bit run the top tier for every token (the
        converter's ``--target-bits`` rule, :func:`tap_runtime.allocation.allocate_min_tiers`).
        0 restores the converted modules' tiers; None (default) leaves the modules as they are.
        """
        if bits is not None:
            if shares is not None:
                raise InvalidConfigError("give shares or bits, not both")
            if mode not in ("budget", "random", "topk"):
                raise InvalidConfigError(f"bits sets the routed share of budget, random or topk routing, not of {mode!r}")
        if promote is not None:
            if bits is None:
                raise InvalidConfigError("promote spends a fraction of a bit budget: give bits too")
            self._promote_modules(float(bits), float(promote))
        if bits is not None:
            fitted = tuple(float(self.table.router.tier_shares.get(str(t), 0.0)) for t in self.table.tiers[1:])
            shares = shares_for_bits(self.table, float(bits), fitted)
        self.router.set_mode(mode, tier=tier, shares=shares, seed=seed, score=score, sign=sign)

    def set_min_tiers(self, min_tiers: dict[str, int]) -> None:
        """Override modules' ``min_tier`` (e.g. a static per-layer mix for an ablation).

        Modules not named go back to their base tier; metrics follow the new policy.
        """
        linear = {}
        for name, policy in self.table.linear.items():
            linear[name] = replace(policy, min_tier=min_tiers.get(name, policy.tiers[0]))
        self._set_linear_policies(linear)

    def _promote_modules(self, bits: float, fraction: float) -> None:
        """Promote whole modules (from their converted tiers) until ``fraction`` of the bits
        between the converted modules' and ``bits`` is spent."""
        if not 0.0 <= fraction <= 1.0:
            raise InvalidConfigError(f"promote is a fraction of the bits above the base tier, in [0, 1], not {fraction}")
        converted = self._converted_linear
        no_routing = {str(t): 0.0 for t in self.table.tiers[1:]}
        base = average_bits(converted, no_routing)
        if bits < base - 1e-9:
            raise InvalidConfigError(
                f"{bits} bits per weight is below this checkpoint's base tier ({base:.3f} bits read per token); "
                f"the lowest budget is the base tier alone."
            )
        if fraction > 0 and not any(p.sensitivity for p in converted.values()):
            raise InvalidConfigError(
                "this checkpoint records no per-module calibration sensitivity (routing_table.json, linear.*.sensitivity), "
                "so there is nothing to choose the promoted modules by; convert it again with tap-convert"
            )
        target = base + fraction * (bits - base)
        self._set_linear_policies(allocate_min_tiers(converted, no_routing, target, f"set_routing(bits={bits:g}, promote={fraction:g})"))

    def _set_linear_policies(self, linear: dict) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, TapLinear) and name in linear:
                module.policy = linear[name]
        self.checkpoint = replace(self.checkpoint, table=replace(self.table, linear=linear))

    def encode(self, prompt: str, chat: bool = False) -> torch.Tensor:
        if chat and getattr(self.tokenizer, "chat_template", None):
            encoded = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            return encoded["input_ids"]
        return self.tokenizer(prompt, return_tensors="pt")["input_ids"]

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        chat: bool = False,
        decode: str = "auto",
        kv_cache: str = "float",
        **generate_kwargs: Any,
    ) -> Generation:
        """Generate from a prompt (or ids) and measure the call.

        Args:
            prompt: text; with ``chat=True`` it is wrapped in the tokenizer's chat template.
            input_ids: (1, seq) ids instead of a prompt.
            max_new_tokens: upper bound on new tokens.
            decode: ``auto`` (on CUDA the graph step when the request allows it, else the lean
                static-cache loop when the model and options allow it, else transformers'
                ``generate``), ``graph`` (greedy decode steps replayed as one CUDA graph with the
                routing decided on the GPU; on the CPU the same step runs eagerly, for checking),
                ``fast`` (the lean loop or an error saying why not), ``eager`` (always
                transformers' ``generate``; for debugging and comparison).
            kv_cache: ``float`` (the compute dtype) or ``int8`` (per-vector dynamic scales, 27% of
                float32's bytes; the lean loop only, see :mod:`tap_runtime.kv_cache`).
            generate_kwargs: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
                ``seed`` (lean loop and transformers) or any other ``generate`` option (transformers).
        Returns:
            :class:`Generation` with the new text, new token ids and :class:`GenerationMetrics`.
        """
        if input_ids is None:
            if prompt is None:
                raise ValueError("generate needs a prompt or input_ids")
            input_ids = self.encode(prompt, chat=chat)
        if decode not in DECODE_PATHS:
            raise InvalidConfigError(f"decode={decode!r} is unknown; expected one of {list(DECODE_PATHS)}.")
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        generate_kwargs.setdefault("do_sample", False)
        if self.tokenizer is not None and self.tokenizer.pad_token_id is None:
            generate_kwargs.setdefault("pad_token_id", self.tokenizer.eos_token_id)
        max_length = input_ids.shape[1] + max_new_tokens
        why_not = fast_decode_unsupported(self.model, input_ids.shape[0], generate_kwargs, max_length)
        if decode == "fast" and why_not is not None:
            raise InvalidConfigError(f"decode='fast' cannot run this request: {why_not}. Use decode='auto' or 'eager'.")
        why_not_graph = None
        if decode == "graph" or (decode == "auto" and device.type == "cuda"):
            why_not_graph = graph_decode_unsupported(self.model, self.router, generate_kwargs, max_length, kv_cache)
            if input_ids.shape[0] != 1 and why_not_graph is None:
                why_not_graph = f"batch {input_ids.shape[0]}: the graph step decodes one sequence"
        if decode == "graph" and why_not_graph is not None:
            raise InvalidConfigError(f"decode='graph' cannot run this request: {why_not_graph}. Use decode='auto' or 'fast'.")
        if decode == "graph" or (decode == "auto" and device.type == "cuda" and why_not_graph is None):
            path = "graph"
        else:
            path = "eager" if decode == "eager" or why_not is not None else "fast"
        if kv_cache not in KV_CACHE_KINDS:
            raise InvalidConfigError(f"kv_cache={kv_cache!r} is unknown; expected one of {list(KV_CACHE_KINDS)}.")
        if kv_cache != "float" and path == "eager":
            reason = "decode='eager' was asked for" if decode == "eager" else why_not
            raise InvalidConfigError(
                f"kv_cache={kv_cache!r} is the lean decode loop's, which cannot run this request ({reason}); "
                f"use kv_cache='float' with transformers' generate."
            )
        self.router.begin_sequence()
        self.router.reset_counts()
        with PeakMemory() as memory:
            if path == "graph":
                if self._graph_decoder is None:
                    self._graph_decoder = GraphDecoder(self.model)
                result = self._graph_decoder.generate(input_ids, max_new_tokens, **generate_kwargs)
                new_ids, start, first, end = result.token_ids, result.start, result.first_token_time, result.end
            elif path == "fast":
                if self._fast_decoder is None:
                    self._fast_decoder = FastDecoder(self.model, kv_cache=kv_cache)
                self._fast_decoder.use_kv_cache(kv_cache)
                result = self._fast_decoder.generate(input_ids, max_new_tokens, **generate_kwargs)
                new_ids, start, first, end = result.token_ids, result.start, result.first_token_time, result.end
            else:
                seed = generate_kwargs.pop("seed", None)
                if seed is not None:
                    torch.manual_seed(seed)
                clock = FirstTokenClock()
                start = time.perf_counter()
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    streamer=clock,
                    **generate_kwargs,
                )
                end = time.perf_counter()
                new_ids = output[0, input_ids.shape[1] :].tolist()
                first = clock.first_token_time or end
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        metrics = self._metrics(input_ids.shape[1], len(new_ids), start, first, end, memory)
        metrics.extra["decode_path"] = path
        if path in ("fast", "graph"):
            decoder = self._fast_decoder if path == "fast" else self._graph_decoder.fast
            metrics.extra["kv_cache"] = kv_cache
            metrics.extra["kv_cache_bytes"] = decoder.cache.nbytes
        if path == "graph":
            metrics.extra["graph_branches"] = self._graph_decoder.branch_mode
        if why_not is not None:
            metrics.extra["fast_decode_unavailable"] = why_not
        return Generation(text=text, token_ids=new_ids, metrics=metrics)

    def _metrics(self, prompt_tokens: int, new_tokens: int, start: float, first: float, end: float, memory: PeakMemory) -> GenerationMetrics:
        counts = self.router.counts.clone()
        per_tier = self.router.tier_counts()
        decisions = sum(per_tier.values()) or 1
        num_layers = max(self.router.num_layers, 1)
        bits = weight_bits_read(self.table, counts)
        prefill_s = first - start
        decode_s = end - first
        # The first new token comes out of prefill; decode produced the remaining ones.
        decoded = max(new_tokens - 1, 0)
        return GenerationMetrics(
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            wall_seconds=end - start,
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            decode_tokens_per_second=decoded / decode_s if decode_s > 0 else 0.0,
            prefill_tokens_per_second=prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
            tier_token_layer_counts=per_tier,
            tokens_per_tier={t: c / num_layers for t, c in per_tier.items()},
            tier_share={t: c / decisions for t, c in per_tier.items()},
            avg_weight_bits_per_token=bits["avg_weight_bits_per_token"],
            weight_bytes_read_per_token=bits["weight_bytes_read_per_token"],
            peak_rss_bytes=memory.peak_rss_bytes,
            peak_rss_method=memory.method,
            cuda_peak_bytes=memory.cuda_peak_bytes,
            checkpoint_bytes=self.checkpoint.total_bytes,
            routing_mode=self.router.mode,
        )
