"""How far could token routing go? Oracle routings against the learned router, at one share.

The learned router predicts, from what the runtime sees before a layer runs, which tokens make
the largest layer-output error on the base tier (two-tier checkpoints). This script measures the
ceiling of that design and of a better target, on held-out windows, every row at the same share
of tokens per layer (so the same average weight bits read):
  base tier                 every token on the base tier (the floor)
  random                    the share drawn at random
  learned, top-k            the fitted score, exactly the share per layer
  oracle: layer error       the tokens whose layer output changes most between the tiers (L2),
                            the learned router's own target, measured on this text
  oracle: first-order KL    the tokens with the largest |g . e|: e the layer output's change
                            from base tier to top tier, g the gradient of the KL to fp32 at the
                            base-tier model (it needs the whole window and a backward pass)
  oracle: gradient norm     the tokens with the largest ||g|| alone (no error information)
  probe                     a ridge regression of log |g . e| on what the router could see (the
                            layer's normed input, the sketched error estimate, the hidden norm,
                            the position), fitted on calibration windows of the checkpoint's own
                            source, never on the evaluated text (--probe-target: g and e as the
                            oracle has them, or as the converter's calibration pass has them)
The oracles use the evaluated text's own gradients: they are ceilings, not routers. The
gradients come from a float32 copy of the model with the planes dequantized (tier 8 = all planes),
the routed rows run on the TAP model itself.

    python scripts/bench_router_ceiling.py --model models/gemma3 --tap models/gemma3-tap-hr --text c4 --windows 8
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.stats import rankdata
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, set_threads, window_stats
from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_runtime.architectures import get_architecture
from tap_runtime.layers import TapEmbedding, TapLinear
from tap_runtime.metrics import shares_for_bits
from tap_runtime.modeling import decoder_layers
from tap_runtime.planes import dequantize_linear, dequantize_rows
from tap_runtime.router import error_estimate_feature, hidden_norm_feature, position_feature


def tier_models(model_dir: str, portable) -> tuple[torch.nn.Module, torch.nn.Module]:
    """float32 copies of the source model with every quantized linear at the base tier and at the
    top tier (the planes dequantized, rotated back), embeddings and head as the 8-bit rows."""
    copies = []
    for count in (1, None):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
        modules = dict(model.named_modules())
        for name, module in portable.model.named_modules():
            if isinstance(module, TapEmbedding):
                modules[name].weight.data.copy_(dequantize_rows(module.rows()))
            elif isinstance(module, TapLinear):
                planes = module.planes()
                modules[name].weight.data.copy_(dequantize_linear(planes, module.policy, count or len(planes)))
        copies.append(model)
    return copies[0], copies[1]


def token_impacts(base, top, spec, sketches, windows, references) -> list[list[dict]]:
    """Per window, per layer: the router's inputs (normed input, error estimate, hidden norm,
    position) and the oracle scores of every position but the last.

    ``base`` runs the window and gives the gradients, ``top`` reruns each layer on the same
    inputs, which gives e. With ``references`` None the loss is the window's own next-token
    loss (no fp32 logits needed), else the KL to those logits."""
    base_layers, top_layers = decoder_layers(base, spec), decoder_layers(top, spec)
    results = []
    for window, reference in zip(windows, references if references is not None else [None] * len(windows)):
        inputs: dict[int, tuple] = {}
        outputs: dict[int, torch.Tensor] = {}

        def before(index):
            def hook(module, args, kwargs):
                inputs[index] = (args, kwargs)

            return hook

        def after(index):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden.retain_grad()
                outputs[index] = hidden

            return hook

        handles = [layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(base_layers)]
        handles += [layer.register_forward_hook(after(i)) for i, layer in enumerate(base_layers)]
        handles.append(base.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        with torch.enable_grad():
            logprobs = torch.log_softmax(base(window.unsqueeze(0), use_cache=False).logits[0, :-1].float(), -1)
            if reference is None:
                (-logprobs.gather(-1, window[1:, None])).sum().backward()
            else:
                target = torch.log_softmax(reference.float(), -1)
                (target.exp() * (target - logprobs)).sum().backward()
        for handle in handles:
            handle.remove()
        per_layer = []
        with torch.no_grad():
            positions = position_feature(torch.arange(window.numel()))
            for index, layer in enumerate(top_layers):
                args, kwargs = inputs[index]
                hidden_in = (args[0] if args else kwargs["hidden_states"]).detach()
                kwargs = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
                if args:
                    top_out = layer(hidden_in, *args[1:], **kwargs)
                else:
                    top_out = layer(**{**kwargs, "hidden_states": hidden_in})
                top_out = top_out[0] if isinstance(top_out, tuple) else top_out
                error = (top_out - outputs[index].detach())[0]
                grad = outputs[index].grad[0]
                normed = getattr(base_layers[index], spec.input_norm)(hidden_in)[0]
                features = torch.cat(
                    [
                        normed,
                        error_estimate_feature(normed, sketches[index])[:, None],
                        hidden_norm_feature(hidden_in[0])[:, None],
                        positions[:, None],
                    ],
                    dim=1,
                )
                impact = (grad * error).sum(-1).abs()
                per_layer.append(
                    {
                        "features": features[:-1],
                        "layer_error": error.pow(2).sum(-1),
                        "first_order_kl": impact,
                        "gradient_norm": grad.pow(2).sum(-1),
                        "log_impact": torch.log(impact.clamp_min(1e-30))[:-1],
                    }
                )
        results.append(per_layer)
    return results


class RidgeProbe:
    """y ~ z-scored features @ w + b, fitted in closed form with an L2 penalty."""

    def __init__(self, features: torch.Tensor, target: torch.Tensor, penalty: float):
        features, target = features.double(), target.double()
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        design = torch.cat([(features - self.mean) / self.std, torch.ones(len(features), 1, dtype=torch.float64)], 1)
        gram = design.T @ design + penalty * torch.eye(design.shape[1], dtype=torch.float64)
        gram[-1, -1] -= penalty  # the intercept is not penalised
        self.weights = torch.linalg.solve(gram, design.T @ target)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        design = (features.double() - self.mean) / self.std
        return (design @ self.weights[:-1] + self.weights[-1]).float()


def top_share_auc(score: torch.Tensor, target: torch.Tensor, share: float) -> float:
    labels = (target >= torch.quantile(target, 1 - share)).numpy()
    ranks = rankdata(score.numpy())
    positives, negatives = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="a two-tier TAP checkpoint converted from it")
    parser.add_argument("--text", default="c4", help="wikitext / c4 (held-out parts) or a .txt path")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--bits", type=float, default=4.6, help="the share is the one that reads this many average bits")
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration windows the probe is fitted on")
    parser.add_argument("--penalty", type=float, default=10.0, help="the probe's ridge penalty")
    parser.add_argument(
        "--probe-target", choices=("kl-base", "nll-fp32"), default="kl-base",
        help="what the probe learns: |g.e| with g the KL gradient at the base-tier model and e the "
        "base-to-top change (as the oracle), or with g the next-token loss gradient at the float32 "
        "model and e the fp32-to-base change (what the converter's calibration pass records today)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    portable = tap_runtime.load(args.tap, kernel="reference", keep_portable=True)
    table = portable.table
    if len(table.tiers) != 2:
        raise SystemExit(f"{args.tap}: this script compares two-tier routings; the checkpoint has tiers {list(table.tiers)}")
    share = shares_for_bits(table, args.bits, (float(table.router.tier_shares.get(str(table.tiers[1]), 0.1)),))[0]
    spec = get_architecture(table.model_type)
    sketches = [s.to(torch.float32) for s in portable.router.error_sketches]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if table.calibration.extra.get("bos_prepended") else None
    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    base, top = tier_models(args.model, portable)
    del portable

    # The probe's windows: the last ones the converter would draw from its own source (seed 0).
    calibration = make_windows(
        tokenize_text(tokenizer, load_calibration_text(table.calibration.dataset)),
        table.calibration.num_samples, args.ctx, table.calibration.seed, bos,
    )[-args.calib_windows :]
    with torch.inference_mode():
        calibration_references = [teacher(w.unsqueeze(0)).logits[0, :-1].to(torch.bfloat16) for w in calibration]
    if args.probe_target == "kl-base":
        fitted = token_impacts(base, top, spec, sketches, calibration, calibration_references)
    else:
        fitted = token_impacts(teacher, base, spec, sketches, calibration, None)
    num_layers = len(fitted[0])
    train = max(1, int(len(fitted) * 0.75))
    probes, aucs = [], []
    for layer in range(num_layers):
        features = [w[layer]["features"] for w in fitted]
        targets = [w[layer]["log_impact"] for w in fitted]
        if len(fitted) > train:
            held_probe = RidgeProbe(torch.cat(features[:train]), torch.cat(targets[:train]), args.penalty)
            aucs.append(top_share_auc(held_probe(torch.cat(features[train:])), torch.cat(targets[train:]), share))
        probes.append(RidgeProbe(torch.cat(features), torch.cat(targets), args.penalty))
    print(f"probe ({args.probe_target}): fitted on {len(fitted)} calibration windows; on the last {len(fitted) - train} held out of its fit, "
          f"AUC for the top {share:.1%} by |g.e|: mean {np.mean(aucs):.3f} (per layer {', '.join(f'{a:.2f}' for a in aucs)})", flush=True)

    windows = eval_windows(tokenizer, heldout_text(args.text), args.ctx, args.windows, bos)
    references, fp32_ppl = fp32_references(teacher, windows)
    del teacher
    oracles = token_impacts(base, top, spec, sketches, windows, references)
    del base, top

    tap = tap_runtime.load(args.tap)
    router = tap.router
    learned_route = router.route_layer
    state: dict = {"row": None, "window": 0}

    def route(layer_index, hidden_states, normed=None):
        row = state["row"]
        if row is None:
            return learned_route(layer_index, hidden_states, normed)
        if row == "probe":
            x = normed[0].to(torch.float32)
            features = torch.cat(
                [
                    x,
                    error_estimate_feature(x, sketches[layer_index])[:, None],
                    hidden_norm_feature(hidden_states[0])[:, None],
                    position_feature(torch.arange(x.shape[0]))[:, None],
                ],
                dim=1,
            )
            score = probes[layer_index](features)
        else:
            score = oracles[state["window"]][layer_index][row]
        chosen = torch.argsort(score, descending=True)[: int(round(share * score.numel()))]
        router.layers[layer_index].plane_indices = [chosen.sort().values]

    router.route_layer = route

    def measure(label: str, row: str | None) -> None:
        began = time.perf_counter()
        state["row"] = row
        nll = kl = 0.0
        count = 0
        with torch.inference_mode():
            for index, (window, reference) in enumerate(zip(windows, references)):
                state["window"] = index
                logits = tap(window.unsqueeze(0), use_cache=False).logits[0, :-1]
                window_nll, window_kl, _, tokens = window_stats(logits, reference, window[1:])
                nll, kl, count = nll + window_nll, kl + window_kl, count + tokens
        print(f"{label:<28} {math.exp(nll / count) / fp32_ppl:>9.4f} {kl / count:>9.5f} {time.perf_counter() - began:>6.0f}", flush=True)

    print(f"# bench_router_ceiling: {args.tap} vs {args.model}; text={args.text}, {args.windows} windows x {args.ctx} tokens; "
          f"share {share:.4f} per layer ({args.bits:g} bits)")
    print(f"# {environment()}")
    print(f"{'row':<28} {'ppl ratio':>9} {'mean KL':>9} {'s':>6}")
    router.set_mode("fixed", tier=table.tiers[0])
    measure("base tier", None)
    router.set_mode("random", shares=(share,), seed=0)
    measure("random", None)
    router.set_mode("topk", shares=(share,))
    measure("learned, top-k", None)
    measure("probe (calibration fit)", "probe")
    measure("oracle: layer error", "layer_error")
    measure("oracle: first-order KL", "first_order_kl")
    measure("oracle: gradient norm", "gradient_norm")
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
