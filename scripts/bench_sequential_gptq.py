"""Would GPTQ on the quantized model's own inputs lower the base tier's error? Measured before building.

The converter collects every linear's input Hessian in one float32 pass and fits each linear
alone, as if everything upstream were exact. At run time a linear sees inputs that the
quantized layers before it already changed. Two known remedies, measured here against the
converter's one-shot fit on the same calibration windows:

- ``sequential`` (GPTQ's "true sequential"): layer by layer, and inside a layer group by group
  (q/k/v, o, gate/up, down), the Hessian comes from the inputs the already-quantized model
  produces, so the fit matches the inputs the linear will really see.
- ``asymmetric`` (GPTAQ's objective, Li et al. 2025): minimise ||W X_fp - Q X_q||, the output
  the float model would give on its own inputs against what the quantized linear gives on the
  quantized inputs. That quadratic in Q has its minimum at W* = W C H_q^-1 (C = X_fp X_q^T,
  H_q = X_q X_q^T), and equals ||(Q - W*) X_q||^2 plus a constant, so it is GPTQ of W* under
  H_q: it also corrects the upstream error, not only fits to it.
- ``asymmetric-base``: the base plane fitted as ``asymmetric``, the residual plane to the float
  weights (W H - base), so a routed token reads W again rather than W*: W* is corrected for
  upstream layers on the base tier, which a routed token's upstream may not be.

Every variant fits both planes of each linear (base, then the residual on what the base left)
with the converter's own GPTQ, in the rotated space the checkpoint stores, with the stored plane
layouts and the same sink weighting of keys and values. The planes are swapped into the
checkpoint on the reference kernel, and quality is measured on held-out text with every token
on the base tier, at budget routing, and on tier 8. The router is the stored one (fitted on the
stored base planes), so the budget row slightly favours the stored planes.

    python scripts/bench_sequential_gptq.py --model models/gemma3 --tap models/gemma3-tap-kl \
        --samples 64 --variants oneshot,sequential,asymmetric --text wikitext,c4 --windows 16
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from bench_common import environment, eval_windows, fp32_references, heldout_text, plane_swap_setup, set_threads, tap_quality
from calibration.capture import record_layer_calls
from tap_convert.gptq import gptq_plane, gptq_tiers
from tap_runtime.modeling import decoder_layers, iter_linear_sites
from tap_runtime.planes import dequantize_plane
from tap_runtime.rotation import rotate_second_moment, rotate_weight

VARIANTS = ("oneshot", "sequential", "asymmetric", "asymmetric-base")


class _Stop(Exception):
    """Raised from a hook once the inputs it waits for are recorded: the rest of the layer is skipped."""


class _Moments:
    """Token-weighted sums of x_q x_q^T and (for the asymmetric fit) x_fp x_q^T."""

    def __init__(self, features: int, cross: bool):
        self.outer = torch.zeros(features, features, dtype=torch.float64)
        self.cross = torch.zeros(features, features, dtype=torch.float64) if cross else None
        self.weight = 0.0

    def add(self, quantized: torch.Tensor, reference: torch.Tensor | None, first_weight: float) -> None:
        """(batch, seq, features) inputs; each window's first position counted ``first_weight`` times."""
        batch, seq, features = quantized.shape
        weights = torch.ones(batch, seq, 1)
        weights[:, 0] = first_weight
        q = quantized.reshape(-1, features).float()
        w = weights.reshape(-1, 1)
        self.outer += ((q * w).t() @ q).double()
        if self.cross is not None:
            self.cross += ((reference.reshape(-1, features).float() * w).t() @ q).double()
        self.weight += float(w.sum())


def _layer_inputs(model, layers, windows: torch.Tensor, batch_size: int):
    """The first decoder layer's input for every window, and each layer's call kwargs (the first
    batch's: every batch has the same shape, so position embeddings and masks are the same)."""
    with torch.inference_mode():
        hidden, calls = record_layer_calls(model, layers, windows, batch_size)
    kwargs_of: dict[int, dict] = {}
    for index, layer_calls in enumerate(calls):
        args, kwargs = layer_calls[0]
        if args:
            raise SystemExit(f"decoder layer {index} takes {len(args) + 1} positional arguments; this script passes one")
        kwargs_of[index] = kwargs
    return torch.cat(hidden), kwargs_of


def _run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _groups(layer, sites, hidden: torch.Tensor, kwargs: dict) -> list[list]:
    """The layer's sites in call order, grouped by the input tensor they share (q/k/v, gate/up)."""
    order: list[tuple] = []

    def record(site):
        def hook(module, args):
            order.append((site, args[0]))

        return hook

    handles = [site.module.register_forward_pre_hook(record(site)) for site in sites]
    try:
        with torch.inference_mode():
            _run_layer(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list] = []
    last = None
    for site, tensor in order:
        if groups and tensor is last:
            groups[-1].append(site)
        else:
            groups.append([site])
        last = tensor
    return groups


def _group_inputs(layer, group, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input the group's first site receives when the layer runs on ``hidden``."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach().clone())
        raise _Stop

    handle = group[0].module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            _run_layer(layer, hidden, kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _gptq_planes(weight, specs, hessian, order, damping) -> list[torch.Tensor]:
    return [dequantize_plane(p, torch.float32) for p in gptq_tiers(weight, specs, hessian, order, damping)]


def fit_variant(variant, model, spec, tap, windows, batch_size, sink_weight, order, damping, cross_ridge, fit_planes=_gptq_planes):
    """Every linear's planes (dequantized, rotated space) fitted as ``variant`` says.

    ``fit_planes(W H, plane specs, rotated Hessian, order, damping)`` returns the dequantized
    planes (the converter's GPTQ by default; bench_lut_grid.py passes another grid)."""
    layers = decoder_layers(model, spec)
    sites_by_layer: dict[int, list] = {}
    for site in iter_linear_sites(model, spec):
        if site.name in tap.table.linear:
            sites_by_layer.setdefault(site.layer_index, []).append(site)
    float_weights = {s.name: s.module.weight.data for sites in sites_by_layer.values() for s in sites}
    hidden_fp, kwargs_of = _layer_inputs(model, layers, windows, batch_size)
    hidden_q = hidden_fp.clone()
    fitted: dict[str, list[torch.Tensor]] = {}
    kv_names = tuple("." + n for n in spec.key_value_projections)
    try:
        for index, layer in enumerate(tqdm(layers, desc=f"{variant}: layers")):
            sites = sites_by_layer.get(index, [])
            kwargs = kwargs_of[index]
            groups = _groups(layer, sites, hidden_fp[:batch_size], kwargs)
            for group in groups:
                features = group[0].in_features
                first_weight = float(sink_weight) if sink_weight and group[0].name.endswith(kv_names) else 1.0
                moments = _Moments(features, cross=variant.startswith("asymmetric"))
                for start in range(0, hidden_fp.shape[0], batch_size):
                    batch_fp = hidden_fp[start : start + batch_size]
                    reference = None
                    if variant != "sequential":
                        quantized_now = {s.name: s.module.weight.data for s in sites}
                        for s in sites:
                            s.module.weight.data = float_weights[s.name]
                        reference = _group_inputs(layer, group, batch_fp, kwargs)
                        for s in sites:
                            s.module.weight.data = quantized_now[s.name]
                    if variant == "oneshot":
                        moments.add(reference, None, first_weight)
                    else:
                        quantized = _group_inputs(layer, group, hidden_q[start : start + batch_size], kwargs)
                        moments.add(quantized, reference, first_weight)
                hessian = (moments.outer / moments.weight).float()
                for site in group:
                    policy = tap.table.linear[site.name]
                    weight = float_weights[site.name].float()
                    weight = weight if site.layout == "linear" else weight.t()
                    if moments.cross is not None:
                        cross = (moments.cross / moments.weight).float()
                        ridge = cross_ridge * hessian.diagonal().mean() * torch.eye(features)
                        # W* = W C H_q^-1 = W + W (C - H_q) H_q^-1. The ridge goes on the correction
                        # only: on W C (H_q + ridge)^-1 it would also shrink W where inputs are exact.
                        correction = torch.linalg.solve(hessian + ridge, (weight @ (cross - hessian)).t()).t()
                        weight = weight + correction
                    rotation = policy.input_rotation
                    rotated_hessian = rotate_second_moment(hessian, rotation)
                    fitted[site.name] = fit_planes(rotate_weight(weight, rotation), policy.planes, rotated_hessian, order, damping)
                    if variant == "asymmetric-base":
                        float_weight = float_weights[site.name].float()
                        float_weight = float_weight if site.layout == "linear" else float_weight.t()
                        remainder = rotate_weight(float_weight, rotation) - fitted[site.name][0]
                        residual = gptq_plane(remainder, policy.planes[1], rotated_hessian, order, damping)
                        fitted[site.name][1] = dequantize_plane(residual, torch.float32)
                    if variant != "oneshot":
                        base = rotate_weight(fitted[site.name][0], rotation)  # back to W's space: H is its own inverse
                        site.module.weight.data = (base if site.layout == "linear" else base.t()).contiguous()
            with torch.inference_mode():
                for start in range(0, hidden_fp.shape[0], batch_size):
                    if variant != "oneshot":
                        hidden_q[start : start + batch_size] = _run_layer(layer, hidden_q[start : start + batch_size], kwargs)
                    quantized_now = {s.name: s.module.weight.data for s in sites}
                    for s in sites:
                        s.module.weight.data = float_weights[s.name]
                    hidden_fp[start : start + batch_size] = _run_layer(layer, hidden_fp[start : start + batch_size], kwargs)
                    for s in sites:
                        s.module.weight.data = quantized_now[s.name]
    finally:
        for sites in sites_by_layer.values():
            for s in sites:
                s.module.weight.data = float_weights[s.name]
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="a two-tier (4/8) GPTQ checkpoint converted from it")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calib", default=None, help="calibration source (default: the checkpoint's own)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seed", type=int, default=1, help="window seed (the converter's default is 0)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text", default="wikitext,c4", help="held-out texts, comma list")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--routings", default="tier4,budget,tier8", help="rows per plane set: tier4, budget, tier8")
    parser.add_argument("--no-stored", action="store_true", help="skip the stored planes' rows")
    parser.add_argument("--cross-ridge", type=float, default=0.1,
                        help="asymmetric: fraction of H_q's mean diagonal added before solving for W* (a least-squares "
                             "fit on calibration tokens: too little overfits them)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")

    if args.samples % args.batch_size:
        raise SystemExit(f"--samples {args.samples} must be a multiple of --batch-size {args.batch_size}")
    setup = plane_swap_setup(args)
    tap, extra, calib, model, tokenizer, bos = setup.tap, setup.extra, setup.calib, setup.model, setup.tokenizer, setup.bos
    spec, windows, modules = setup.spec, setup.windows, setup.modules
    if extra.get("gptq_refit_rounds") or extra.get("gptq_descent_sweeps"):
        raise SystemExit(f"{args.tap}: converted with refits or descent sweeps, which this script does not repeat")
    stored = {name: list(m._prepared) for name, m in modules.items()}
    planes: dict[str, dict[str, list[torch.Tensor]]] = {"stored": stored}
    seconds: dict[str, float] = {}
    for variant in variants:
        tick = time.perf_counter()
        planes[variant] = fit_variant(
            variant, model, spec, tap, windows, args.batch_size, extra.get("sink_weight"),
            extra.get("gptq_order", "activation"), extra.get("gptq_damping", 0.01), args.cross_ridge,
        )
        seconds[variant] = time.perf_counter() - tick
        missing = set(modules) - set(planes[variant])
        if missing:
            raise SystemExit(f"{variant}: no planes fitted for {sorted(missing)[:3]}")

    print(f"# bench_sequential_gptq: {args.tap} vs {args.model}; {args.samples} windows of {calib} (seed {args.seed}); "
          f"asymmetric ridge {args.cross_ridge}; "
          f"held-out {args.text}, {args.windows} windows x 512")
    print("# fit seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"# {environment()}")
    print(f"{'text':9s} {'planes':12s} {'routing':12s} {'avg bits':>8s} {'share>base':>10s} {'ppl ratio':>9s} {'mean KL':>9s}")
    base_tier, top_tier = tap.table.tiers
    known = {"tier4": ("tier 4", {"mode": "fixed", "tier": base_tier}),
             "budget": (f"budget {args.budget_bits}", {"mode": "budget", "bits": args.budget_bits}),
             "tier8": ("tier 8", {"mode": "fixed", "tier": top_tier})}
    routings = [known[r] for r in args.routings.split(",") if r]
    if args.no_stored:
        planes.pop("stored")
    for text in args.text.split(","):
        evaluation = eval_windows(tokenizer, heldout_text(text), 512, args.windows, bos)
        references, fp32_ppl = fp32_references(model, evaluation)
        for label, fitted in planes.items():
            for name, module in modules.items():
                module._prepared = list(fitted[name])
            for routing_label, routing in routings:
                mode = routing.pop("mode")
                tap.set_routing(mode, **routing)
                routing["mode"] = mode
                quality = tap_quality(tap, evaluation, references)
                print(f"{text:9s} {label:12s} {routing_label:12s} {quality['avg_bits']:8.3f} {quality['share_above_base']:10.3f} "
                      f"{quality['ppl'] / fp32_ppl:9.4f} {quality['kl']:9.5f}", flush=True)
        tap.set_routing()
    for name, module in modules.items():
        module._prepared = list(stored[name])
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
