"""Helpers shared by the benchmark scripts: held-out evaluation text, windows, environment line.

Evaluation text is always the part of the shared data that the bundled calibration samples
left out (recorded in calibration/data/samples.json), so no benchmark scores text the
converter calibrated on.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TAP_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLES = json.loads((REPO / "calibration" / "data" / "samples.json").read_text())

__all__ = [
    "REPO", "SHARED_DATA", "heldout_text", "eval_windows", "load_tap_and_windows", "environment", "set_threads",
    "reference_logprobs", "window_quality", "prefill_ab_arguments", "plane_swap_setup", "window_stats", "fp32_references", "tap_quality",
]


def heldout_text(name: str) -> str:
    """``wikitext``: WikiText-2 valid lines after the bundled half; ``c4``: C4 docs 1000-1999; else a path."""
    if name == "wikitext":
        start, end = SAMPLES["wikitext2_calibration.txt.gz"]["evaluation_lines"]
        lines = (SHARED_DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
        return "\n".join(lines[start:end])
    if name == "c4":
        import pyarrow.parquet as pq

        start, end = SAMPLES["c4_calibration.txt.gz"]["evaluation_documents"]
        docs = pq.read_table(SHARED_DATA / "c4" / "c4_validation_2k.parquet").column("text").to_pylist()
        return "\n\n".join(docs[start:end])
    return Path(name).read_text(encoding="utf-8")


def eval_windows(tokenizer, text: str, ctx: int, num_windows: int, bos_token_id: int | None) -> torch.Tensor:
    """``num_windows`` non-overlapping windows of ``ctx`` tokens, evenly spread over the text (read
    as plain text: ``calibration.data.text_token_ids``)."""
    from calibration.data import text_token_ids

    ids = torch.tensor(text_token_ids(tokenizer, text), dtype=torch.long)
    body = ctx - 1 if bos_token_id is not None else ctx
    available = ids.numel() // body
    if available < num_windows:
        raise SystemExit(f"evaluation text has {ids.numel()} tokens: {available} windows of {ctx}, {num_windows} asked")
    picks = torch.linspace(0, available - 1, num_windows).round().long()
    windows = ids[: available * body].view(available, body)[picks]
    if bos_token_id is not None:
        windows = torch.cat([torch.full((num_windows, 1), bos_token_id), windows], dim=1)
    return windows


def load_tap_and_windows(args):
    """(TAP model, source tokenizer, held-out windows) from ``args.tap``, ``args.model``,
    ``args.text``, ``args.ctx`` and ``args.windows``: every quality script's common start. The
    windows start with BOS when the checkpoint was calibrated with it (gemma needs it)."""
    from transformers import AutoTokenizer

    import tap_runtime

    tap = tap_runtime.load(args.tap, kernel=getattr(args, "kernel", "auto"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if tap.table.calibration.extra.get("bos_prepended") else None
    return tap, tokenizer, eval_windows(tokenizer, heldout_text(args.text), args.ctx, args.windows, bos)


def plane_swap_setup(args, kernel: str = "reference"):
    """Every plane-swapping study's common start (bench_low_rank, bench_residual_bits,
    bench_sequential_gptq): the two-tier checkpoint ``args.tap`` on ``kernel``, its float32 source
    ``args.model``, ``args.samples`` fresh windows of the checkpoint's own calibration source
    (``args.calib`` overrides it; seed ``args.seed``), the quantized linears by name and their sites
    in the source model. The fresh windows keep the study off the converter's exact sample."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tap_runtime
    from calibration.data import load_calibration_text, make_windows, tokenize_text
    from tap_runtime.architectures import get_architecture
    from tap_runtime.layers import TapLinear
    from tap_runtime.modeling import iter_linear_sites

    tap = tap_runtime.load(args.tap, kernel=kernel)
    if len(tap.table.tiers) != 2:
        raise SystemExit(f"{args.tap}: needs a two-tier checkpoint; tiers are {list(tap.table.tiers)}")
    extra = tap.table.calibration.extra
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if extra.get("bos_prepended") else None
    spec = get_architecture(model.config.get_text_config().model_type, source=f"{args.model}/config.json")
    calib = args.calib or tap.table.calibration.dataset
    windows = make_windows(tokenize_text(tokenizer, load_calibration_text(calib)), args.samples, 512, args.seed, bos)
    modules = {name: m for name, m in tap.model.named_modules() if isinstance(m, TapLinear)}
    sites = [s for s in iter_linear_sites(model, spec) if s.name in modules]
    if len(sites) != len(modules):
        raise SystemExit(f"{args.tap}: {len(modules)} quantized linears, {len(sites)} found in {args.model}")
    return SimpleNamespace(tap=tap, extra=extra, model=model, tokenizer=tokenizer, bos=bos, spec=spec, calib=calib,
                           windows=windows, modules=modules, sites=sites)


def prefill_ab_arguments(description: str):
    """The parsed command line of an in-process prefill A/B (bench_dense_mlp, bench_lane_residuals):
    --tap, --model (fp32 source, for quality), --tokens, --rounds, --windows, --threads."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--model", default=None, help="fp32 source model, for the quality part")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8, help="quality windows of 512 tokens (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    return args


def reference_logprobs(model_dir: str, windows) -> list[torch.Tensor]:
    """Log-probabilities of the fp32 source model at every position but the last of each window
    (the model is freed afterwards, so a large one is not held next to the TAP model)."""
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        references = [torch.log_softmax(fp32(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows]
    del fp32
    return references


def window_quality(forward, windows, references, inference: bool = True) -> tuple[float, float]:
    """(perplexity, mean KL against the references) of ``forward(ids (1, T)) -> logits`` over
    windows. references: log-probabilities (float32, or bfloat16 to save memory: widened here).
    ``inference=False`` runs under no_grad rather than inference_mode, for models whose tensors
    refuse inference tensors (optimum-quanto's int4)."""
    import math

    nll = kl = count = 0.0
    with torch.inference_mode() if inference else torch.no_grad():
        for window, reference in zip(windows, references):
            logprobs = torch.log_softmax(forward(window.unsqueeze(0))[0, :-1].float(), -1)
            nll -= logprobs.gather(-1, window[1:, None]).sum().item()
            reference = reference.float()
            kl += (reference.exp() * (reference - logprobs)).sum().item()
            count += window.numel() - 1
    return math.exp(nll / count), kl / count


def window_stats(logits: torch.Tensor, reference: torch.Tensor | None, targets: torch.Tensor) -> tuple[float, float, int, int]:
    """(sum NLL, sum KL vs reference, top-1 agreements with reference, count) over one window."""
    log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum().item()
    kl, agree = 0.0, targets.numel()
    if reference is not None:
        ref_log = torch.log_softmax(reference.to(torch.float32), dim=-1)
        kl = (ref_log.exp() * (ref_log - log_probs)).sum().item()
        agree = int((ref_log.argmax(-1) == log_probs.argmax(-1)).sum())
    return nll, kl, agree, targets.numel()


def fp32_references(model, windows, per_window: bool = False):
    """The fp32 model's logits at every position but the last of each window, kept in bfloat16
    (a 262k-entry vocabulary makes float32 copies large), and its perplexity from the float32 ones;
    with ``per_window``, also each window's summed NLL (for :func:`ratio_interval`)."""
    import math

    references, window_nlls, count_sum = [], [], 0
    with torch.inference_mode():
        for window in windows:
            logits = model(window.unsqueeze(0)).logits[0, :-1]
            references.append(logits.to(torch.bfloat16))
            nll, _, _, count = window_stats(logits, None, window[1:])
            window_nlls.append(nll)
            count_sum += count
    ppl = math.exp(sum(window_nlls) / count_sum)
    return (references, ppl, window_nlls) if per_window else (references, ppl)


def ratio_interval(tap_window_nlls, fp32_window_nlls, tokens_per_window: int, draws: int = 2000, seed: int = 0):
    """90% interval of the perplexity ratio over windows resampled with replacement: how far
    another draw of held-out text of this size could move it (16 windows of 512 tokens: about
    +-1 point on gemma)."""
    change = torch.tensor(tap_window_nlls, dtype=torch.float64) - torch.tensor(fp32_window_nlls, dtype=torch.float64)
    picks = torch.randint(0, change.numel(), (draws, change.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = (change[picks].sum(1) / (change.numel() * tokens_per_window)).exp()
    return float(ratios.quantile(0.05)), float(ratios.quantile(0.95))


def tap_quality(tap, windows, references) -> dict:
    """A TAP model's perplexity, mean KL and top-1 agreement against ``references`` over the
    windows, with the routed share above the base tier and the average weight bits read per
    token (as the runtime counts them) under its current routing."""
    import math

    from tap_runtime.metrics import weight_bits_read

    tap.router.reset_counts()
    nll_sum = kl_sum = 0.0
    agree_sum = count_sum = 0
    window_nlls = []
    with torch.inference_mode():
        for window, reference in zip(windows, references):
            nll, kl, agree, count = window_stats(tap(window.unsqueeze(0)).logits[0, :-1], reference, window[1:])
            window_nlls.append(nll)
            nll_sum, kl_sum, agree_sum, count_sum = nll_sum + nll, kl_sum + kl, agree_sum + agree, count_sum + count
    counts = tap.router.counts.clone()
    return {
        "ppl": math.exp(nll_sum / count_sum),
        "window_nlls": window_nlls,
        "kl": kl_sum / count_sum,
        "top1": agree_sum / count_sum,
        "share_above_base": 1.0 - float(counts[:, 0].sum()) / float(counts.sum()),
        "avg_bits": weight_bits_read(tap.table, counts)["avg_weight_bits_per_token"],
    }


def environment() -> str:
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f"; command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}"
    )


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after one warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return 1e3 * statistics.median(times)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def add_layer_hessian_arguments(parser) -> None:
    """The options of the layer-level benchmarks (calibration Hessians of a few decoder layers)."""
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--layers", default="3,12", help="comma list of decoder layer indices")
    parser.add_argument("--calib", default="wikitext")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)


HESSIAN_MEASURES = ("fit", "held out", "other text")


def fit_held_out_and_other_hessians(args, script: str):
    """(sites, fit stats, {site name: {measure: Hessian}}) for the layer-level A/B scripts: the fit
    on half of 2 x ``args.windows`` calibration windows, measured under the fit's own Hessian, the
    other half's (held out) and ``args.other`` text's; prints the header that says so."""
    sites, fit = layer_hessians(args, split=(0, 2))
    _, held_out = layer_hessians(args, split=(1, 2))
    _, other = layer_hessians(args, args.other)
    print(f"# {script}: {args.model}, layers {args.layers}, fit on {args.windows} {args.calib} windows, "
          f"held out {args.windows} {args.calib} windows, other text {args.windows} {args.other} windows")
    print(f"# {environment()}")
    measured = {
        site.name: dict(zip(HESSIAN_MEASURES, (fit[site.name].hessian, held_out[site.name].hessian, other[site.name].hessian)))
        for site in sites
    }
    return sites, fit, measured


def print_tier_error_table(label: str, settings: list, totals: dict, name=str) -> None:
    """The layer-level A/B table: summed errors per setting, tier (4, 8) and HESSIAN_MEASURES,
    then every later setting's ratios to the first. ``name`` spells a setting."""
    print()
    header = " ".join(f"{f'tier {t} {m}':>18s}" for t in (4, 8) for m in HESSIAN_MEASURES)
    print(f"{label:>8s} {header}")
    for setting in settings:
        print(f"{name(setting):>8s} " + " ".join(f"{totals[setting, t, m]:18.4e}" for t in (4, 8) for m in HESSIAN_MEASURES))
    first = settings[0]
    for setting in settings[1:]:
        ratios = " ".join(f"{totals[setting, t, m] / totals[first, t, m]:18.3f}" for t in (4, 8) for m in HESSIAN_MEASURES)
        print(f"{f'{name(setting)}/{name(first)}':>8s} {ratios}")


def layer_hessians(args, calib: str | None = None, split: tuple[int, int] | None = None):
    """(sites, stats): the linears of ``args.layers`` and their calibration input statistics
    (Hessians included), from ``args.windows`` windows of the calibration text (``calib``, default
    ``args.calib``), never the evaluation text. ``split=(part, parts)`` cuts ``parts`` times as
    many windows and keeps every ``parts``-th from ``part``: disjoint sets of the same text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibration.capture import collect_input_stats
    from calibration.data import load_calibration_text, make_windows, tokenize_text
    from tap_convert.convert import _tokenizer_adds_bos
    from tap_runtime.architectures import get_architecture
    from tap_runtime.modeling import iter_linear_sites

    set_threads(args.threads)
    layers = {int(i) for i in args.layers.split(",")}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    spec = get_architecture(config.model_type)
    text = load_calibration_text(calib or args.calib)
    bos = tokenizer.bos_token_id if (spec.needs_bos or _tokenizer_adds_bos(tokenizer)) else None
    part, parts = split or (0, 1)
    windows = make_windows(tokenize_text(tokenizer, text), args.windows * parts, args.seq_len, 0, bos, source=text.source)
    windows = windows[part::parts]
    sites = [s for s in iter_linear_sites(model, spec) if s.layer_index in layers]
    return sites, collect_input_stats(model, sites, windows, 4, progress=False, hessians=True)
