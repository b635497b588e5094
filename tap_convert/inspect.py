"""``tap-convert inspect DIR``: what a checkpoint holds, whether every file verifies, and (with
``--plot``) its precision map: per-layer sensitivity and policy, and the share of tokens per tier
on a sample text.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from tap_runtime.checkpoint import read_checkpoint, verify_files
from tap_runtime.errors import TapError
from tap_runtime.format import RoutingTable

from .hub import code_levels, input_rotation, kept_storage, scale_storage

__all__ = ["inspect_checkpoint", "scheme_wins", "token_tier_shares", "plot_precision_map"]


def _file_status(directory: Path, table: RoutingTable) -> list[tuple[str, int, str]]:
    rows = []
    for shard in table.shards:
        try:
            verify_files(directory, dataclasses.replace(table, shards=(shard,)))
            status = "ok"
        except TapError as exc:
            status = f"FAILED: {exc}"
        rows.append((shard.file_name, shard.num_bytes, status))
    return rows


def scheme_wins(table: RoutingTable) -> dict[str, dict[str, int]]:
    """Per module kind (q_proj, down_proj, ...): how many layers each scheme measured best on."""
    wins: dict[str, dict[str, int]] = {}
    for name, policy in table.linear.items():
        if not policy.scheme_errors:
            continue
        best = min(policy.scheme_errors, key=policy.scheme_errors.get)
        kind = wins.setdefault(name.rsplit(".", 1)[-1], {})
        kind[best] = kind.get(best, 0) + 1
    return dict(sorted(wins.items()))


def inspect_checkpoint(directory: str | os.PathLike) -> tuple[str, bool]:
    """A plain-text report of the checkpoint, and whether every file verified."""
    directory = Path(directory)
    checkpoint = read_checkpoint(directory, verify=False)
    table = checkpoint.table
    files = _file_status(directory, table)
    total = sum(size for _, size, _ in files)
    fp16 = int(table.calibration.extra.get("fp16_bytes", 0))
    lines = [
        f"checkpoint {directory}",
        f"  format version {table.format_version}, {table.architecture} ({table.model_type}), {table.num_layers} layers",
        f"  tiers {list(table.tiers)}, routed share {table.high_precision_share:.0%} above the base tier",
        "",
        "files (sha256 and size checked against the routing table):",
    ]
    lines += [f"  {name:40s} {size:>14,d}  {status}" for name, size, status in files]
    lines.append(f"  total {total:,} bytes" + (f" = {total / fp16:.2%} of fp16 ({fp16:,})" if fp16 else ""))
    lines += ["", "stored bits per weight:"]
    lines += [f"  {k.replace('_', ' ')}: {v:.3f}" for k, v in table.weight_bits_summary().items()]
    lines += ["", "per-layer policy (relative output error per tier, from calibration):"]
    for name, policy in table.linear.items():
        errors = ", ".join(f"t{t} {float(e):.4f}" for t, e in policy.sensitivity.items())
        planes = "/".join(f"{'s' if p.symmetric else 'a'}g{p.group_size}{'L' if p.levels else ''}" for p in policy.planes)
        planes += f" H{policy.input_rotation}" if policy.input_rotation else ""
        promoted = f"  min tier {policy.min_tier}" if policy.min_tier != table.tiers[0] else ""
        lines.append(f"  {name:48s} {policy.in_features:>5d}x{policy.out_features:<5d} {policy.method:4s} {planes:10s} {errors}{promoted}")
    for name, embedding in table.embeddings.items():
        tied = f" (tied to {embedding.tied_to})" if embedding.tied_to else ""
        columns = f", column scales rms^{embedding.column_scale_exponent:g}" if embedding.column_scaled else ""
        lines.append(
            f"  {name:48s} {embedding.role} {embedding.num_embeddings}x{embedding.embedding_dim} 8-bit rows{tied}{columns}"
        )
    lines.append(f"  kept unquantized (norms, biases, ...): {kept_storage(table)}")
    lines += ["", "base-plane scheme with the lowest measured error, per module kind (log is measured, not runnable):"]
    for kind, wins in scheme_wins(table).items():
        lines.append(f"  {kind:12s} " + ", ".join(f"{scheme} {count}" for scheme, count in wins.items()))
    router = table.router
    lines += ["", "router:"]
    lines.append(f"  score = {router.bias:+.3f} " + " ".join(f"{router.weights[s]:+.3f}*{s}" for s in router.signals))
    lines.append(f"  target: {router.fit.get('target', 'n/a')}")
    holdout = router.fit.get("holdout", {})
    lines.append("  held-out calibration: " + ", ".join(f"{k} {v:.3f}" for k, v in holdout.items() if isinstance(v, float)))
    for signal, auc in router.fit.get("single_signal_auc", {}).items():
        used = "used" if signal in router.signals else f"not used: {router.excluded_signals.get(signal, '')}"
        lines.append(f"  signal {signal:20s} AUC {auc if auc is None else round(auc, 3)}  {used}")
    first, last = router.thresholds[0], router.thresholds[-1]
    lines.append(f"  thresholds per layer (tiers {list(table.tiers[1:])}): layer 0 {list(map(lambda v: round(v, 3), first))} ... "
                 f"layer {table.num_layers - 1} {list(map(lambda v: round(v, 3), last))}")
    calibration = table.calibration
    lines += ["", "calibration:"]
    lines.append(f"  {calibration.dataset}: {calibration.source}")
    lines.append(f"  {calibration.num_samples} windows x {calibration.seq_len} tokens (seed {calibration.seed}), "
                 f"{calibration.router_samples} router windows, {calibration.seconds:.0f} s")
    lines.append(f"  source model {calibration.extra.get('source_model')}")
    if calibration.extra.get("special_token_spellings") == "text":
        lines.append("  special tokens spelled in the text: read as text")
    if calibration.extra.get("gptq_order"):
        lines.append(f"  GPTQ column order: {calibration.extra['gptq_order']}")
    if calibration.extra.get("gptq_damping") is not None:
        lines.append(f"  GPTQ damping: {calibration.extra['gptq_damping']} of the mean Hessian diagonal")
    if calibration.extra.get("head_damping") is not None:
        lines.append(f"  head rows' GPTQ damping: {calibration.extra['head_damping']}")
    lines.append(f"  input rotation ({calibration.extra.get('rotation', 'none')}): {input_rotation(table)}")
    lines.append(f"  group scales: {scale_storage(table)}")
    lines.append(f"  codes: {code_levels(table)}")
    ok = all(status == "ok" for _, _, status in files)
    lines += ["", "all files verified" if ok else "SOME FILES FAILED VERIFICATION"]
    return "\n".join(lines), ok


def token_tier_shares(directory: str | os.PathLike, text: str, max_tokens: int = 512) -> torch.Tensor:
    """(num_layers, len(tiers)) share of the text's tokens per tier in each layer, learned routing."""
    import tap_runtime

    tap = tap_runtime.load(directory)
    ids = tap.tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    tap.router.reset_counts()
    with torch.inference_mode():
        tap(ids, use_cache=False)
    counts = tap.router.counts.to(torch.float64)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def plot_precision_map(directory: str | os.PathLike, out: str | os.PathLike, text: str) -> None:
    """Left: base-tier relative error of every linear (layers x module), promoted ones marked.
    Right: share of the sample text's tokens per tier in each layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = read_checkpoint(directory, verify=False).table
    kinds = sorted({name.rsplit(".", 1)[-1] for name in table.linear})
    base = str(table.tiers[0])
    error = torch.full((table.num_layers, len(kinds)), float("nan"))
    promoted = []
    for name, policy in table.linear.items():
        if policy.layer_index is None:
            continue
        column = kinds.index(name.rsplit(".", 1)[-1])
        error[policy.layer_index, column] = float(policy.sensitivity.get(base, float("nan")))
        if policy.min_tier != table.tiers[0]:
            promoted.append((column, policy.layer_index))
    shares = token_tier_shares(directory, text)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, max(4, table.num_layers * 0.22)), sharey=True)
    image = left.imshow(error.numpy(), aspect="auto", cmap="magma")
    left.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    left.set_ylabel("decoder layer")
    left.set_title(f"relative output error at tier {base} (x: promoted)")
    for column, row in promoted:
        left.text(column, row, "x", ha="center", va="center", color="cyan")
    figure.colorbar(image, ax=left)
    bottom = torch.zeros(table.num_layers, dtype=torch.float64)
    for k, tier in enumerate(table.tiers):
        right.barh(range(table.num_layers), shares[:, k].numpy(), left=bottom.numpy(), label=f"tier {tier}")
        bottom += shares[:, k]
    right.set_xlim(0, 1)
    right.set_title("share of sample-text tokens per tier")
    right.legend(loc="lower right")
    right.invert_yaxis()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
