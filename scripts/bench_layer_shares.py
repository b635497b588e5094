"""Would per-layer routed shares, chosen from calibration measurements, beat one share for all
layers at the same average bits?

Budget routing sends the same share of tokens up in every decoder layer. Layers differ in how much
their residual plane buys back, so a converter could measure that and move share to the layers
where it pays most (EXL2's measurement pass does this for whole layers). This script measures
whether that generalises before anything is built:

1. on fresh windows of the checkpoint's own calibration source (never the evaluation text), the
   end-to-end KL against fp32 with every layer on the base tier, then with one layer at a time
   routed (budget routing, exact top share of each pass) at each share of ``--grid``;
2. a greedy allocation over those gain curves (best gain per unit of share first) with the same
   mean share as uniform budget routing at ``--budget-bits``, scaled to spend it exactly (every
   decoder layer has the same linears, so equal mean share is equal average bits);
3. on held-out text: base tier, uniform budget routing and the allocated shares, at the bits the
   runtime counts.

Per-layer shares are set for this ablation only (the runtime routes every layer at one share):
the script hands each layer its share just before the router decides that layer.

    python scripts/bench_layer_shares.py --model models/gemma3 --tap models/gemma3-tap-hr --samples 12 --windows 8
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, set_threads, tap_quality
from calibration.data import load_calibration_text, make_windows, tokenize_text


def allocate_shares(gains: dict[tuple[int, float], float], num_layers: int, grid: list[float], mean_share: float) -> list[float]:
    """Greedy over piecewise-linear gain curves: repeatedly take the step (a layer moving to a
    larger grid share) with the largest KL gain per unit of share that still fits the budget,
    then scale the result so its mean is exactly ``mean_share`` (no layer above 1)."""
    points = [0.0] + grid
    at = [0] * num_layers
    budget, spent = mean_share * num_layers, 0.0

    def gain(layer: int, k: int) -> float:
        return 0.0 if k == 0 else gains[layer, points[k]]

    while True:
        best = None
        for layer in range(num_layers):
            for k in range(at[layer] + 1, len(points)):
                cost = points[k] - points[at[layer]]
                if spent + cost > budget + 1e-9:
                    continue
                slope = (gain(layer, k) - gain(layer, at[layer])) / cost
                if best is None or slope > best[0]:
                    best = (slope, layer, k, cost)
        if best is None or best[0] <= 0:
            break
        _, layer, k, cost = best
        at[layer], spent = k, spent + cost
    shares = [points[k] for k in at]
    total = sum(shares)
    return [min(1.0, s * budget / total) for s in shares] if total else [mean_share] * num_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="a two-tier (4/8) TAP checkpoint converted from it")
    parser.add_argument("--calib", default=None, help="calibration source for the measurement (default: the checkpoint's own)")
    parser.add_argument("--samples", type=int, default=12, help="calibration windows for the per-layer measurement")
    parser.add_argument("--seed", type=int, default=1, help="window seed (the converter's default is 0)")
    parser.add_argument("--grid", default="0.05,0.1,0.2,0.4", help="per-layer shares measured")
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--text", default="wikitext,c4", help="held-out texts, comma list")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()

    tap = tap_runtime.load(args.tap)
    if len(tap.table.tiers) != 2:
        raise SystemExit(f"{args.tap}: needs a two-tier checkpoint; tiers are {list(tap.table.tiers)}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if tap.table.calibration.extra.get("bos_prepended") else None
    calib = args.calib or tap.table.calibration.dataset
    router, num_layers = tap.router, tap.router.num_layers
    grid = [float(s) for s in args.grid.split(",")]

    layer_shares: list[float] = [0.0] * num_layers
    decide = router.route_layer

    def route_layer_at_its_share(layer_index, hidden_states, normed=None):
        router.random_shares = (layer_shares[layer_index],)
        return decide(layer_index, hidden_states, normed)

    router.route_layer = route_layer_at_its_share

    def measure(windows, refs, shares: list[float]) -> tuple[float, float, float]:
        """(perplexity, mean KL, bits the runtime counts) with ``shares[l]`` routed in layer l."""
        tap.set_routing("budget", shares=(0.0,))
        layer_shares[:] = shares
        quality = tap_quality(tap, windows, refs)
        return quality["ppl"], quality["kl"], quality["avg_bits"]

    print(f"# bench_layer_shares: {args.tap} vs {args.model}; gains measured on {args.samples} windows of {calib} "
          f"(seed {args.seed}); held-out {args.text}, {args.windows} windows x 512")
    print(f"# {environment()}")
    calibration = make_windows(tokenize_text(tokenizer, load_calibration_text(calib)), args.samples, 512, args.seed, bos)
    calibration_refs, _ = fp32_references(model, calibration)
    _, base_kl, _ = measure(calibration, calibration_refs, [0.0] * num_layers)
    print(f"calibration KL, every layer on the base tier: {base_kl:.5f}")
    print("KL gain per layer at share " + " ".join(f"{s:>8.2f}" for s in grid))
    gains = {}
    for layer in tqdm(range(num_layers), desc="layers"):
        for share in grid:
            shares = [0.0] * num_layers
            shares[layer] = share
            gains[layer, share] = base_kl - measure(calibration, calibration_refs, shares)[1]
        tqdm.write(f"layer {layer:2d}                    " + " ".join(f"{gains[layer, s]:8.5f}" for s in grid))

    tap.set_routing("budget", bits=args.budget_bits)
    uniform = router.random_shares[0]
    allocated = allocate_shares(gains, num_layers, grid, uniform)
    print(f"uniform share at {args.budget_bits} bits: {uniform:.4f}; allocated (mean {sum(allocated) / num_layers:.4f}): "
          + " ".join(f"{s:.3f}" for s in allocated))
    rows = {"base tier": [0.0] * num_layers, "uniform share (budget)": [uniform] * num_layers, "allocated shares": allocated}
    print(f"{'text':12s} {'row':24s} {'bits':>6s} {'ppl ratio':>9s} {'mean KL':>9s}")
    for label, shares in rows.items():
        if label != "base tier":
            ppl, kl, bits = measure(calibration, calibration_refs, shares)
            print(f"{'calibration':12s} {label:24s} {bits:6.3f} {'':>9s} {kl:9.5f}", flush=True)
    for text in args.text.split(","):
        evaluation = eval_windows(tokenizer, heldout_text(text), 512, args.windows, bos)
        refs, fp32_ppl = fp32_references(model, evaluation)
        for label, shares in rows.items():
            ppl, kl, bits = measure(evaluation, refs, shares)
            print(f"{text:12s} {label:24s} {bits:6.3f} {ppl / fp32_ppl:9.4f} {kl:9.5f}", flush=True)
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
