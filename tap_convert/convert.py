"""Run the conversion steps in order: load, calibrate, quantize, fit the router, write.

Each step lives in its own module; this one only sequences them and records provenance.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from calibration.capture import MAX_HESSIAN_FEATURES, collect_input_stats, collect_layer_moments, collect_token_signals
from calibration.data import load_calibration_text, make_windows, tokenize_text
from calibration.probe import add_sensitivity, fit_sensitivity_probes
from calibration.stats import InputSecondMoment, token_log_frequency
from calibration.thresholds import fit_router, tier_shares
from tap_runtime.architectures import ArchitectureSpec, get_architecture
from tap_runtime.errors import InvalidConfigError
from tap_runtime.format import (
    EMBEDDING_BITS,
    FORMAT_VERSION,
    PLANE_BITS,
    ROUTER_TARGETS,
    TIER_CHOICES,
    CalibrationInfo,
    EmbeddingPolicy,
    KeptTensor,
    LinearPolicy,
    PlaneSpec,
    RoutingTable,
    embedding_tensor_name,
    encode_token_log_frequency,
    plane_tensor_name,
    quantization_config_dict,
    sensitivity_probe_name,
)
from tap_runtime.modeling import LinearSite, decoder_layers, iter_embeddings, iter_linear_sites, linear_weight, output_head
from tap_runtime.planes import dequantize_linear, dequantize_planes
from tap_runtime.rotation import ROTATIONS, rotate_mean_square, rotate_second_moment, rotate_weight, rotation_block

from .column_scales import choose_column_scales
from .levels import LEVEL_CHOICES, fit_levels
from .gptq import DAMPING, GPTQ_ORDERS, ROW_DAMPING, gptq_rows, gptq_tiers
from .hub import render_model_card
from .policy import allocate_min_tiers, average_bits, output_energy, relative_output_error
from .schemes import SCHEME_CHOICES, choose_scheme, scheme_errors
from .sketch import error_sketch_sites, error_sketches
from .quantize import quantize_rows, quantize_tiers
from .writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter

__all__ = ["ConvertOptions", "convert", "choose_group_size", "SCALE_BITS_CHOICES"]

_log = logging.getLogger(__name__)
_MIN_GROUP_SIZE = 32
METHODS = ("gptq", "rtn")
MAX_REFIT_ROUNDS = 8
SCALE_BITS_CHOICES = (8, 16)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``tap-convert`` can be told. Defaults are the documented CLI defaults."""

    calib: str = "wikitext"
    tiers: tuple[int, ...] = (4, 8)
    group_size: int = 64
    method: str = "gptq"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    high_precision_share: float = 0.1
    target_bits: float | None = None
    router_samples: int = 32
    router_target: str = "kl_impact"
    scheme: str = "auto"
    # Weight each window's first token by the window length in the key/value projections'
    # Hessians (the attention sink); off only for ablations.
    sink_weighting: bool = True
    # Per-column scales on the 8-bit embedding/head rows where they lower the rows' error;
    # off only for ablations.
    column_scales: bool = True
    # GPTQ's column order: "activation" (strongest input channels first, static groups) or
    # "column" (left to right, the order of format 2's first checkpoints).
    gptq_order: str = "activation"
    # GPTQ's damping of the planes' Hessians, as a fraction of their mean diagonal.
    gptq_damping: float = DAMPING
    # Rounds of refitting each group's scale and zero to the codes GPTQ chose, each followed by
    # another GPTQ pass with them (tap_convert.gptq.refit_group_parameters); 0 keeps the scales
    # chosen before compensation.
    gptq_refit_rounds: int = 0
    # Sweeps of cyclic coordinate descent over each plane's codes after GPTQ (and the refits),
    # against the same output error (tap_convert.gptq.descend_codes); 0: GPTQ's codes as chosen.
    gptq_descent_sweeps: int = 0
    # GPTQ also for linears wider than MAX_HESSIAN_FEATURES inputs, their Hessians gathered one
    # decoder layer at a time (calibration.capture.collect_layer_moments); off: round to nearest
    # with the importance-weighted clip search there. On Qwen2.5-1.5B's down projections (8,960
    # inputs), C4-calibrated, with gptq_wide_damping 1 it took 7-8% off the base tier's held-out KL
    # and 7-10% off the budget's at 4.6 bits, on WikiText and C4 (README, Qwen section).
    gptq_wide_layers: bool = True
    # GPTQ's damping for those wide linears (None: gptq_damping). With 1.8 calibration tokens per
    # input (16k tokens, 8,960 inputs), 0.01 fits the calibration text: tier 4's KL rose 5.6% and
    # tier 8's 23% end to end; 1.0 gave the lowest held-out output error of 0.01 / 0.1 / 1 on two
    # of Qwen's down projections (scripts/bench_wide_gptq.py) and the gains above.
    gptq_wide_damping: float | None = 1.0
    # The same for the output head's 8-bit rows (a tied embedding stores those rows too).
    head_damping: float = ROW_DAMPING
    # "hadamard": quantize W H, each linear's weight times a block Hadamard rotation of its input
    # (tap_runtime.rotation), wherever the width allows; "none": W itself (format 4's planes).
    rotation: str = "hadamard"
    # How group scales are stored: 8 (uint8 log codes under a per-plane reference, format 3) or
    # 16 (float16, as format 2 stored them; for ablations).
    scale_bits: int = 8
    # The asymmetric base plane's code values: "even" (codes 0..15, as up to format 6) or
    # "fitted" (one table of 16 non-uniform levels per model, tap_convert.levels; format 7).
    # Fitted levels lower the KL and the perplexity ratio at 4.6 bits in all four calibration ->
    # evaluation directions measured on gemma (README "Evaluation text read as text"). "even"
    # stays for AVX2-only CPUs, where the table costs a quarter of the base tier's prefill speed.
    base_levels: str = "fitted"
    base_model: str | None = None  # Hub id of the source, for the model card when converting a local copy
    batch_size: int = 4
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if tuple(self.tiers) not in TIER_CHOICES:
            raise InvalidConfigError(
                f"--tiers {','.join(map(str, self.tiers))} is not supported; expected one of "
                f"{[','.join(map(str, t)) for t in TIER_CHOICES]}."
            )
        if not 0.0 < self.high_precision_share < 1.0:
            raise InvalidConfigError(f"--high-precision-share must be in (0, 1); got {self.high_precision_share}.")
        if self.group_size < _MIN_GROUP_SIZE or self.group_size & (self.group_size - 1):
            raise InvalidConfigError(f"--group-size must be a power of two >= {_MIN_GROUP_SIZE}; got {self.group_size}.")
        if self.method not in METHODS:
            raise InvalidConfigError(f"--method {self.method!r} is unknown; expected one of {list(METHODS)}.")
        if self.target_bits is not None and not 4.0 <= self.target_bits <= 16.0:
            raise InvalidConfigError(f"--target-bits must be between 4 and 16; got {self.target_bits}.")
        if self.scheme not in SCHEME_CHOICES:
            raise InvalidConfigError(f"--scheme {self.scheme!r} is unknown; expected one of {list(SCHEME_CHOICES)}.")
        if self.gptq_order not in GPTQ_ORDERS:
            raise InvalidConfigError(f"--gptq-order {self.gptq_order!r} is unknown; expected one of {list(GPTQ_ORDERS)}.")
        dampings = (("--gptq-damping", self.gptq_damping), ("--head-damping", self.head_damping))
        if self.gptq_wide_damping is not None:
            dampings += (("--gptq-wide-damping", self.gptq_wide_damping),)
        for flag, damping in dampings:
            if not 0.0 < damping <= 100.0:
                raise InvalidConfigError(f"{flag} must be in (0, 100]; got {damping}.")
        for flag, count in (("--gptq-refit-rounds", self.gptq_refit_rounds), ("--gptq-descent-sweeps", self.gptq_descent_sweeps)):
            if not 0 <= count <= MAX_REFIT_ROUNDS:
                raise InvalidConfigError(f"{flag} must be between 0 and {MAX_REFIT_ROUNDS}; got {count}.")
        if self.rotation not in ROTATIONS:
            raise InvalidConfigError(f"--rotation {self.rotation!r} is unknown; expected one of {list(ROTATIONS)}.")
        if self.scale_bits not in SCALE_BITS_CHOICES:
            raise InvalidConfigError(f"--scale-bits {self.scale_bits!r} is unknown; expected one of {list(SCALE_BITS_CHOICES)}.")
        if self.base_levels not in LEVEL_CHOICES:
            raise InvalidConfigError(f"--base-levels {self.base_levels!r} is unknown; expected one of {list(LEVEL_CHOICES)}.")
        if self.router_target not in ROUTER_TARGETS:
            raise InvalidConfigError(f"--router-target {self.router_target!r} is unknown; expected one of {list(ROUTER_TARGETS)}.")
        if self.num_samples < 1 or self.router_samples < 1 or self.batch_size < 1:
            raise InvalidConfigError("--num-samples, --router-samples and --batch-size must be positive.")


def is_key_value_projection(site: LinearSite, spec: ArchitectureSpec) -> bool:
    """Whether ``site`` makes attention keys or values (its first-token error reaches every later token)."""
    return any(site.name.endswith("." + name) for name in spec.key_value_projections)


def choose_group_size(in_features: int, preferred: int) -> int | None:
    """The largest power-of-two group size <= ``preferred`` dividing ``in_features`` (>= 32), or None.

    SmolLM2's 576 = 9 x 64 takes 64 where 128 does not divide it.
    """
    size = preferred
    while size >= _MIN_GROUP_SIZE:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def _plane_specs(
    tiers: tuple[int, ...], group_size: int, base_symmetric: bool = False, scale_bits: int = 8,
    base_levels: tuple[int, ...] | None = None,
) -> tuple[PlaneSpec, ...]:
    # The base plane's scheme is chosen per layer; residuals are centred, hence symmetric and
    # even (the level table is fitted to whole weights' groups, not to what a base plane leaves).
    return tuple(
        PlaneSpec(
            bits=PLANE_BITS, group_size=group_size, symmetric=base_symmetric if i == 0 else True, scale_bits=scale_bits,
            levels=base_levels if i == 0 and not base_symmetric else None,
        )
        for i in range(len(tiers))
    )


def _tokenizer_adds_bos(tokenizer) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def convert(model_name_or_path: str, out_dir: str | Path, options: ConvertOptions = ConvertOptions()) -> RoutingTable:
    """Convert a transformers causal LM into a TAP checkpoint at ``out_dir``.

    Args:
        model_name_or_path: a local model directory or a Hub repo id.
        out_dir: where the checkpoint directory is created (atomically).
        options: see :class:`ConvertOptions`.
    Returns:
        the routing table written.
    Example:
        >>> convert("./SmolLM2-dir", "./smollm2-tap")      # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    options.validate()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    writer = CheckpointWriter(Path(out_dir), overwrite=options.overwrite, max_shard_bytes=options.max_shard_bytes)
    config = AutoConfig.from_pretrained(model_name_or_path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    spec = get_architecture(text_config.model_type, source=f"{model_name_or_path}/config.json")

    tick = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    timings["load_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    text = load_calibration_text(options.calib)
    token_ids = tokenize_text(tokenizer, text)
    bos = tokenizer.bos_token_id if (spec.needs_bos or _tokenizer_adds_bos(tokenizer)) else None
    windows = make_windows(token_ids, options.num_samples, options.seq_len, options.seed, bos, source=text.source)
    router_windows = windows[: min(options.router_samples, options.num_samples)]
    timings["tokenize_seconds"] = time.perf_counter() - tick

    sites = list(iter_linear_sites(model, spec))
    kept: dict[str, KeptTensor] = {}
    quantized_sites: list[LinearSite] = []
    group_sizes: dict[str, int] = {}
    for site in sites:
        group_size = choose_group_size(site.in_features, options.group_size)
        if group_size is None:
            reason = f"in_features={site.in_features} has no group size >= {_MIN_GROUP_SIZE} dividing it"
            _log.warning("%s stays in float32: %s", site.name, reason)
            kept[f"{site.name}.weight"] = KeptTensor(f"{site.name}.weight", 32, reason)
            continue
        group_sizes[site.name] = group_size
        quantized_sites.append(site)

    tick = time.perf_counter()
    head = output_head(model)
    head_moment = None
    if options.method == "gptq" and head is not None and head[1].weight.shape[1] <= MAX_HESSIAN_FEATURES:
        head_moment = InputSecondMoment(head[1].weight.shape[1])  # the head's input: final hidden states
    stats = collect_input_stats(
        model, quantized_sites, windows, options.batch_size, progress=options.progress, hessians=options.method == "gptq",
        output_moment=head_moment, max_hessian_features=MAX_HESSIAN_FEATURES,
    )
    timings["pass1_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    rotations = {
        site.name: rotation_block(site.in_features) if options.rotation == "hadamard" else 0 for site in quantized_sites
    }
    base_levels = None
    if options.base_levels == "fitted" and quantized_sites:
        base_levels = fit_levels(
            ((rotate_weight(linear_weight(site), rotations[site.name]), group_sizes[site.name]) for site in quantized_sites),
            len(quantized_sites), PLANE_BITS, seed=options.seed,
        )
        _log.info("base plane levels (eighths of a code step): %s", base_levels)
    timings["levels_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    planes = {}
    policies: dict[str, LinearPolicy] = {}
    # With gptq_wide_layers, sites pass 1 kept only the diagonal of (too wide for every layer's
    # Hessian at once) get theirs gathered and used one decoder layer at a time, after the others.
    wide_sites = [
        site for site in quantized_sites
        if options.method == "gptq" and options.gptq_wide_layers and not isinstance(stats[site.name], InputSecondMoment)
    ]
    wide_names = {site.name for site in wide_sites}
    site_moments = itertools.chain(
        ((site, stats[site.name]) for site in quantized_sites if site.name not in wide_names),
        collect_layer_moments(
            model, spec, wide_sites, windows, options.batch_size, progress=options.progress,
            first_position=lambda site: options.sink_weighting and is_key_value_projection(site, spec),
        ),
    )
    for site, site_stats in tqdm(
        site_moments, total=len(quantized_sites), desc="quantizing planes", disable=not options.progress
    ):
        full = isinstance(site_stats, InputSecondMoment)
        sink_weight = windows.shape[1] if full and options.sink_weighting and is_key_value_projection(site, spec) else None
        if sink_weight:
            second_moment = site_stats.hessian_with_first_weighted(sink_weight)
        else:
            second_moment = site_stats.hessian if full else site_stats.mean_square
        # Everything below sees the rotated linear: W H and the statistics of x H (the planes store W H).
        rotation = rotations[site.name]
        weight = rotate_weight(linear_weight(site), rotation)
        second_moment = rotate_second_moment(second_moment, rotation)
        mean_square = rotate_mean_square(site_stats.mean_square, rotation)
        energy = output_energy(weight, second_moment)
        errors = scheme_errors(weight, group_sizes[site.name], second_moment, mean_square, energy, base_levels)
        scheme, scheme_reason = choose_scheme(errors, options.scheme)
        specs = _plane_specs(
            options.tiers, group_sizes[site.name], base_symmetric=scheme == "symmetric", scale_bits=options.scale_bits,
            base_levels=base_levels,
        )
        if options.method == "gptq" and full:
            method = "gptq"
            wide_damping = options.gptq_wide_damping if site.name in wide_names else None
            planes[site.name] = gptq_tiers(
                weight, specs, second_moment, options.gptq_order, options.gptq_damping if wide_damping is None else wide_damping,
                options.gptq_refit_rounds, options.gptq_descent_sweeps,
            )
        else:
            method = "rtn"
            planes[site.name] = quantize_tiers(weight, specs, importance=mean_square)
        sensitivity = {
            str(tier): relative_output_error(weight, dequantize_planes(planes[site.name], count), second_moment, energy)
            for count, tier in enumerate(options.tiers, start=1)
        }
        policies[site.name] = LinearPolicy(
            name=site.name,
            in_features=site.in_features,
            out_features=site.out_features,
            bias=getattr(site.module, "bias", None) is not None,
            layer_index=site.layer_index,
            tiers=tuple(options.tiers),
            planes=specs,
            weight_layout=site.layout,
            method=method,
            sensitivity=sensitivity,
            reason=f"base plane {scheme}: {scheme_reason}"
            + (f"; first token weighted x{sink_weight} in the Hessian (attention sink)" if sink_weight else "")
            + (f"; Hessian gathered layer by layer ({site.in_features} > {MAX_HESSIAN_FEATURES} inputs)" if site.name in wide_names else ""),
            scheme=scheme,
            scheme_errors={k: round(v, 8) for k, v in errors.items()},
            input_rotation=rotation,
        )
    site_stats = second_moment = None  # the last site's Hessian is not held into pass 2
    policies = {site.name: policies[site.name] for site in quantized_sites}  # model order, wide sites included
    for site_stats in stats.values():
        if isinstance(site_stats, InputSecondMoment):
            site_stats.release()  # pass 2 needs only their diagonals (Qwen2.5-1.5B: 3.2 GB freed)
    shares = tier_shares(tuple(options.tiers), options.high_precision_share)
    if options.target_bits is not None:
        policies = allocate_min_tiers(policies, shares, options.target_bits)
    timings["quantize_seconds"] = time.perf_counter() - tick

    sketch_sites = error_sketch_sites(quantized_sites, stats, len(decoder_layers(model, spec)))
    sketches = error_sketches(sketch_sites, planes, policies, text_config.hidden_size)
    tick = time.perf_counter()
    # The KL target is measured where routing acts: at the base-tier model, with the probe's features.
    at_base_tier = options.router_target == "kl_impact"
    signals = collect_token_signals(
        model,
        spec,
        quantized_sites,
        # The weight a token not routed upward reads: the module's min-tier planes.
        lambda site: dequantize_linear(planes[site.name], policies[site.name]),
        router_windows,
        progress=options.progress,
        error_sketches=sketches,
        at_base_tier=at_base_tier,
        keep_normed=at_base_tier,
    )
    timings["pass2_seconds"] = time.perf_counter() - tick
    tick = time.perf_counter()
    probe_tensors: dict[str, torch.Tensor] = {}
    if at_base_tier:
        # Stored in float16 (half the bytes; SmolLM2's 4/8 checkpoint sits at 52% of fp16), and
        # the router is fitted on the values the stored vectors give.
        probes = [probe.to(torch.float16) for probe in fit_sensitivity_probes(signals)]
        signals = add_sensitivity(signals, probes)
        signals.normed_inputs = None
        probe_tensors = {sensitivity_probe_name(i): p.contiguous() for i, p in enumerate(probes)}
    body = router_windows[:, 1:] if bos is not None else router_windows  # the BOS was not in the text
    log_frequency = token_log_frequency(token_ids, model.get_input_embeddings().num_embeddings, held_out=body)
    router = fit_router(
        signals, log_frequency, tuple(options.tiers), options.high_precision_share, target=options.router_target
    )
    # The runtime derives the sketches from these sites' stored planes (format 4).
    router = replace(router, error_sketch_sites=sketch_sites)
    timings["fit_seconds"] = time.perf_counter() - tick

    for site in quantized_sites:
        for plane_index, plane in enumerate(planes[site.name]):
            for field_name, tensor in plane.stored_tensors().items():
                writer.add_tensor(plane_tensor_name(site.name, plane_index, field_name), tensor)
        if policies[site.name].bias:
            writer.add_tensor(f"{site.name}.bias", site.module.bias.detach().to(torch.float32))

    embeddings, handled = _add_embeddings(
        model, writer, None if head_moment is None else head_moment.hessian, options.column_scales, options.head_damping
    )
    handled |= {f"{site.name}.{suffix}" for site in quantized_sites for suffix in ("weight", "bias")}
    for name, tensor in model.state_dict().items():
        if name in handled:
            continue
        stored = kept_tensor_storage(tensor)
        bits = torch.finfo(stored.dtype).bits
        reason = kept[name].reason if name in kept else f"norm, bias or other small tensor, kept in float{bits}"
        kept.setdefault(name, KeptTensor(name, bits, reason))
        writer.add_tensor(name, stored)

    num_parameters = sum(t.numel() for n, t in model.state_dict().items() if not _is_tied_duplicate(model, n))
    calibration = CalibrationInfo(
        dataset=text.dataset,
        source=text.source,
        num_samples=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        seed=options.seed,
        num_tokens=int(token_ids.numel()),
        router_samples=int(router_windows.shape[0]),
        seconds=round(time.perf_counter() - started, 2),
        extra={
            "source_model": str(model_name_or_path),
            "source_is_hub_repo": not Path(model_name_or_path).expanduser().exists(),
            "base_model": options.base_model,
            "num_parameters": int(num_parameters),
            "fp16_bytes": int(num_parameters * 2),
            "bos_prepended": bos is not None,
            "special_token_spellings": "text",  # calibration.data.text_token_ids
            "sink_weight": int(windows.shape[1]) if options.sink_weighting else None,
            "gptq_order": options.gptq_order if options.method == "gptq" else None,
            "gptq_damping": options.gptq_damping if options.method == "gptq" else None,
            "gptq_refit_rounds": options.gptq_refit_rounds if options.method == "gptq" else None,
            "gptq_descent_sweeps": options.gptq_descent_sweeps if options.method == "gptq" else None,
            "gptq_wide_layers": options.gptq_wide_layers if options.method == "gptq" else None,
            "gptq_wide_damping": options.gptq_wide_damping if options.method == "gptq" and options.gptq_wide_layers else None,
            "head_damping": options.head_damping if head_moment is not None else None,
            "rotation": options.rotation,
            "base_levels": options.base_levels,
            "target_bits": options.target_bits,
            "expected_avg_weight_bits": round(average_bits(policies, shares), 4),
            "promoted_linears": sorted(n for n, p in policies.items() if p.min_tier != options.tiers[0]),
            "batch_size": options.batch_size,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "torch_threads": torch.get_num_threads(),
        },
    )
    table = RoutingTable(
        format_version=FORMAT_VERSION,
        model_type=text_config.model_type,
        architecture=type(model).__name__,
        num_layers=len(router.thresholds),
        tiers=tuple(options.tiers),
        high_precision_share=options.high_precision_share,
        linear=policies,
        embeddings=embeddings,
        kept=kept,
        router=router,
        calibration=calibration,
        shards=(),
        producer="tap-engine 0.1.0 (tap-convert)",
    )
    config_dict = _checkpoint_config(config, tuple(options.tiers))

    def save_extra_files(directory: Path) -> None:
        tokenizer.save_pretrained(str(directory))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(directory))

    return writer.finish(
        config_dict,
        table,
        {**encode_token_log_frequency(log_frequency), **probe_tensors},
        save_extra_files,
        lambda written, total: render_model_card(written, total),
    )


def kept_tensor_storage(tensor: torch.Tensor) -> torch.Tensor:
    """float16 where that holds every value exactly (norms of bfloat16-trained models do: their 8
    significant bits fit float16's 11 inside its range), else float32: lossless either way."""
    values = tensor.detach().to(torch.float32)
    if values.is_floating_point() and torch.equal(values.to(torch.float16).to(torch.float32), values):
        return values.to(torch.float16)
    return values


def _is_tied_duplicate(model, name: str) -> bool:
    head = output_head(model)
    return head is not None and head[2] is not None and name == f"{head[0]}.weight"


def _add_embeddings(
    model,
    writer: CheckpointWriter,
    head_hessian: torch.Tensor | None = None,
    column_scaled: bool = True,
    head_damping: float = ROW_DAMPING,
) -> tuple[dict[str, EmbeddingPolicy], set[str]]:
    """Quantize every embedding and the output head to 8-bit rows; returns policies and handled keys.

    With ``head_hessian`` (the second moment of the final hidden states) the head's rows are
    error-compensated (GPTQ) for the logits; a tied embedding stores those same rows. With
    ``column_scaled`` each matrix gets the column scales that lower its rows' error, if any do.
    """
    policies: dict[str, EmbeddingPolicy] = {}
    handled: set[str] = set()
    head = output_head(model)
    tied_target = head[2] if head is not None else None
    exponents: dict[str, float] = {}
    for name, embedding in iter_embeddings(model):
        compensate = head_hessian is not None and name == tied_target
        exponents[name] = _add_rows(
            writer, name, embedding.weight, head_hessian if compensate else None, column_scaled, damping=head_damping
        )
        policies[name] = EmbeddingPolicy(
            name,
            embedding.num_embeddings,
            embedding.embedding_dim,
            EMBEDDING_BITS,
            method="gptq" if compensate else "rtn",
            column_scale_exponent=exponents[name],
        )
        handled.add(f"{name}.weight")
    if head is not None:
        name, module, tied_to = head
        rows, dim = module.weight.shape
        if tied_to is None:
            exponent = _add_rows(writer, name, module.weight, head_hessian, column_scaled, head_only=True, damping=head_damping)
        else:
            exponent = exponents[tied_to]
        method = "gptq" if head_hessian is not None else "rtn"
        policies[name] = EmbeddingPolicy(
            name, rows, dim, EMBEDDING_BITS, role="head", tied_to=tied_to, method=method, column_scale_exponent=exponent
        )
        handled.add(f"{name}.weight")
        if getattr(module, "bias", None) is not None:
            raise InvalidConfigError(f"{name}: output heads with a bias are not supported yet.")
    return policies, handled


def _add_rows(
    writer: CheckpointWriter,
    name: str,
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    column_scaled: bool,
    head_only: bool = False,
    damping: float = ROW_DAMPING,
) -> float:
    """Write one row-quantized matrix; returns its column-scale exponent (0: none).

    An embedding's exponent is chosen on its weight-space error (what a lookup feels, tied or
    not); a head that is only a head chooses on its output error under ``hessian``.
    """
    weight = weight.detach().to(torch.float32)
    exponent, column_scales = 0.0, None
    if column_scaled:
        exponent, column_scales, errors = choose_column_scales(weight, hessian if head_only else None)
        _log.info("%s column scales: exponent %s (row error %s)", name, exponent,
                  {a: f"{e:.2e}" for a, e in errors.items()})
    if column_scales is not None:
        weight = weight / column_scales
        if hessian is not None:
            # The same output error in the scaled coordinates: x . w == (x * c) . (w / c).
            hessian = hessian * column_scales.unsqueeze(0) * column_scales.unsqueeze(1)
    rows = quantize_rows(weight) if hessian is None else gptq_rows(weight, hessian, damping=damping)
    writer.add_tensor(embedding_tensor_name(name, "qweight"), rows.qweight)
    writer.add_tensor(embedding_tensor_name(name, "scales"), rows.scales)
    if column_scales is not None:
        writer.add_tensor(embedding_tensor_name(name, "column_scales"), column_scales.contiguous())
    return exponent


def _checkpoint_config(config, tiers: tuple[int, ...]) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("quantization_config", None)
    data["dtype"] = "float32"
    data["quantization_config"] = quantization_config_dict(tiers)
    return data
