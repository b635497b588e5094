"""The model card written into every checkpoint (and, later, what goes to the Hub with it).

Everything the card states comes from the routing table and the files written; quality figures
are left to ``scripts/bench_quality.py``, whose command the card gives.
"""

from __future__ import annotations

from tap_runtime.format import LEVEL_STEPS_PER_CODE, RoutingTable

__all__ = ["render_model_card", "write_measured_quality", "MEASURED_BEGIN", "MEASURED_END"]

MEASURED_BEGIN = "<!-- tap:measured-quality -->"
MEASURED_END = "<!-- /tap:measured-quality -->"


def write_measured_quality(directory, table_rows: str, command: str, machine: str, text: str) -> None:
    """Put a measured-quality section into the checkpoint's README.md (replacing an older one).

    The card is not among the checksummed files, so this does not invalidate the checkpoint;
    the write is atomic (temp file, then rename).
    """
    import os
    from pathlib import Path

    path = Path(directory) / "README.md"
    card = path.read_text(encoding="utf-8") if path.is_file() else ""
    if MEASURED_BEGIN in card:
        card = card[: card.index(MEASURED_BEGIN)] + card[card.index(MEASURED_END) + len(MEASURED_END) :].lstrip("\n")
    section = (
        f"{MEASURED_BEGIN}\n## Measured quality\n\nAgainst the fp32 source model on {text} (never seen in "
        f"calibration), measured with `{command}` ({machine}); ppl ratio is the checkpoint's perplexity over the source's:\n\n"
        f"| config | ppl ratio | mean KL | top-1 agree | share > base | avg bits |\n|---|---|---|---|---|---|\n"
        f"{table_rows}\n{MEASURED_END}\n"
    )
    temporary = path.with_suffix(".md.tmp")
    temporary.write_text(card.rstrip("\n") + "\n\n" + section, encoding="utf-8")
    os.replace(temporary, path)


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _gptq_order(table: RoutingTable) -> str:
    """The GPTQ column order for the card's method line ("" for tables written before it was recorded)."""
    order = table.calibration.extra.get("gptq_order")
    rounds = table.calibration.extra.get("gptq_refit_rounds")
    refit = f", group scales refitted to its codes in {rounds} round{'s' if rounds != 1 else ''}" if rounds else ""
    sweeps = table.calibration.extra.get("gptq_descent_sweeps")
    refit += f", then {sweeps} sweep{'s' if sweeps != 1 else ''} of coordinate descent over the codes" if sweeps else ""
    return f"; GPTQ in {order} order{refit}" if order else ""


def input_rotation(table: RoutingTable) -> str:
    """Which linears quantize W H (a block Hadamard rotation of their input), in words."""
    blocks = sorted({p.input_rotation for p in table.linear.values() if p.input_rotation})
    rotated = sum(1 for p in table.linear.values() if p.input_rotation)
    if not rotated:
        return "none"
    return f"{rotated} of {len(table.linear)} linears, Hadamard blocks of {', '.join(map(str, blocks))}"


def scale_storage(table: RoutingTable) -> str:
    """How the planes' group scales are stored, in words (for inspect and the model card)."""
    kinds = {spec.scale_bits for policy in table.linear.values() for spec in policy.planes}
    words = {8: "8-bit log codes under a float32 reference per plane", 16: "float16"}
    return " and ".join(words[k] for k in sorted(kinds)) or "none"


def code_levels(table: RoutingTable) -> str:
    """What the planes' 16 codes stand for, in words (for inspect and the model card)."""
    tables = {spec.levels for policy in table.linear.values() for spec in policy.planes if spec.levels is not None}
    with_table = sum(1 for policy in table.linear.values() for spec in policy.planes if spec.levels is not None)
    planes = sum(len(policy.planes) for policy in table.linear.values())
    if not tables:
        return "evenly spaced codes"
    listed = "; ".join(" ".join(f"{v / LEVEL_STEPS_PER_CODE:g}" for v in levels) for levels in sorted(tables))
    return f"a fitted table of 16 levels in {with_table} of {planes} planes ({listed} code steps), evenly spaced codes elsewhere"


def kept_storage(table: RoutingTable) -> str:
    """How many unquantized tensors are stored at which precision, in words (inspect, model card)."""
    counts: dict[int, int] = {}
    for kept in table.kept.values():
        counts[kept.tier] = counts.get(kept.tier, 0) + 1
    return ", ".join(f"{n} in float{bits}" for bits, n in sorted(counts.items())) or "none"


def _methods(table: RoutingTable) -> dict[str, int]:
    counts: dict[str, int] = {}
    for policy in table.linear.values():
        counts[policy.method] = counts.get(policy.method, 0) + 1
    return counts


def render_model_card(table: RoutingTable, checkpoint_bytes: int) -> str:
    """Markdown with Hub YAML front matter, describing tiers, sizes, router and provenance."""
    calibration = table.calibration
    source = str(calibration.extra.get("source_model", ""))
    fp16_bytes = int(calibration.extra.get("fp16_bytes", 0))
    ratio = checkpoint_bytes / fp16_bytes if fp16_bytes else float("nan")
    tier_tags = "".join(f"  - tier-{t}\n" for t in table.tiers)
    front = "---\n"
    base_model = calibration.extra.get("base_model") or (source if calibration.extra.get("source_is_hub_repo") else None)
    if base_model:
        front += f"base_model: {base_model}\nbase_model_relation: quantized\n"
    front += f"library_name: transformers\npipeline_tag: text-generation\ntags:\n  - tap\n  - quantized\n{tier_tags}---\n"
    bits = table.weight_bits_summary()
    bits_rows = "\n".join(f"| {key.replace('_', ' ')} | {value:.2f} |" for key, value in bits.items())
    router = table.router
    weights = ", ".join(f"{name} {router.weights[name]:+.3f}" for name in router.signals)
    holdout = router.fit.get("holdout", {})
    single = router.fit.get("single_signal_auc", {})
    single_rows = "\n".join(
        f"| {name} | {_figure(auc)} | "
        f"{'yes' if name in router.signals else 'no: ' + router.excluded_signals.get(name, '')} |"
        for name, auc in single.items()
    )
    return f"""{front}
# {table.architecture} — TAP {'/'.join(map(str, table.tiers))}-bit

Token-Adaptive Precision checkpoint of `{source or 'unknown source'}`: nested 4-bit planes per
linear layer (tier {table.tiers[0]} reads the base plane; each higher tier adds a residual plane)
and a router that sends about {table.high_precision_share:.0%} of tokens per layer above the base tier.

## Size

| | bytes |
|---|---|
| this checkpoint (all shards) | {checkpoint_bytes:,} |
| source model in fp16 | {fp16_bytes:,} |
| ratio | {ratio:.4f} |

| stored bits per weight | value |
|---|---|
{bits_rows}

Linear layers quantized: {len(table.linear)} ({', '.join(f'{n} by {m}' for m, n in _methods(table).items())}{_gptq_order(table)}; group scales as {scale_storage(table)}; codes: {code_levels(table)}; input rotation: {input_rotation(table)});
promoted above the base tier for every token: {sum(1 for p in table.linear.values() if p.min_tier != table.tiers[0])};
embeddings/heads at 8 bits: {len(table.embeddings)} ({sum(1 for e in table.embeddings.values() if e.column_scaled)} with per-column scales); tensors kept unquantized: {kept_storage(table)} (float16 only where exact).

## Router

Score = {router.bias:+.3f} + {weights} (z-scored signals), thresholds per layer fitted on
calibration so that {', '.join(f'{share:.1%} reach tier {tier}' for tier, share in router.tier_shares.items())}.
Held-out calibration windows: AUC {_figure(holdout.get('auc'))}, precision at share
{_figure(holdout.get('precision_at_share'))}, base-tier error mass routed {_figure(holdout.get('error_mass_routed'))}
(random routing: {table.high_precision_share}).

| signal | AUC on held-out calibration tokens | used at run time |
|---|---|---|
{single_rows}

## Calibration

{calibration.num_samples} windows of {calibration.seq_len} tokens (seed {calibration.seed}) from
`{calibration.source}`; {calibration.router_samples} of them for the router; {calibration.seconds:.0f} s.

## Use

```python
import tap_runtime
model = tap_runtime.load("path/or/repo")
out = model.generate("Hello", max_new_tokens=32)
print(out.text, out.metrics.tier_share)
```

Quality against the source model: `python scripts/bench_quality.py --model SOURCE --tap CHECKPOINT`
in the tap-engine repository measures perplexity and KL divergence on held-out text.
"""
