"""A short quality measurement for the model card: the checkpoint against its fp32 source.

The text is the *other* bundled corpus (C4 for a WikiText calibration and vice versa), so
calibration never saw it. A handful of windows gives a figure to publish with its command;
``scripts/bench_quality.py`` is the full benchmark.
"""

from __future__ import annotations

import math
import os

import torch

from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_runtime.errors import InvalidConfigError

__all__ = ["measure_quality", "quality_table_rows"]


def _other_corpus(calibration_dataset: str) -> str:
    """The bundled corpus the calibration did not read (a mix such as ``wikitext+c4`` read both)."""
    used = set(calibration_dataset.split("+"))
    left = [name for name in ("c4", "wikitext") if name not in used]
    if not left:
        raise InvalidConfigError(
            f"calibrated on {calibration_dataset!r}: every bundled corpus was read by the calibration, so none is "
            f"left to measure quality on without measuring on calibration text. Convert with one of them to measure."
        )
    return left[0]


@torch.inference_mode()
def measure_quality(source_model: str, checkpoint: str | os.PathLike, num_windows: int = 4, seq_len: int = 512) -> tuple[dict, str]:
    """Rows {config: {ppl_ratio, kl, top1, share_above_base, avg_bits}} and a description of the text."""
    from transformers import AutoModelForCausalLM

    import tap_runtime
    from tap_runtime.metrics import weight_bits_read

    tap = tap_runtime.load(checkpoint)
    config = tap.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = min(seq_len, limit) if limit else seq_len
    corpus = _other_corpus(tap.table.calibration.dataset)
    text = load_calibration_text(corpus)
    ids = tokenize_text(tap.tokenizer, text)
    bos = tap.tokenizer.bos_token_id if tap.table.calibration.extra.get("bos_prepended") else None
    windows = make_windows(ids, num_windows, seq_len, seed=1234, bos_token_id=bos, source=text.source)
    reference = AutoModelForCausalLM.from_pretrained(source_model, dtype=torch.float32).eval()
    ref_logprobs = [torch.log_softmax(reference(w[None]).logits[0, :-1].float(), -1) for w in windows]
    del reference
    fp32_nll = sum(-lp.gather(-1, w[1:, None]).sum().item() for lp, w in zip(ref_logprobs, windows))
    count = sum(w.numel() - 1 for w in windows)
    rows = {}
    for label, mode, tier in (("learned routing", "learned", None), (f"tier {tap.table.tiers[0]}", "fixed", tap.table.tiers[0]),
                              (f"tier {tap.table.tiers[-1]}", "fixed", tap.table.tiers[-1])):
        tap.set_routing(mode, tier=tier)
        tap.router.reset_counts()
        nll = kl = agree = 0.0
        for window, ref in zip(windows, ref_logprobs):
            logprobs = torch.log_softmax(tap(window[None]).logits[0, :-1].float(), -1)
            nll -= logprobs.gather(-1, window[1:, None]).sum().item()
            kl += (ref.exp() * (ref - logprobs)).sum().item()
            agree += (logprobs.argmax(-1) == ref.argmax(-1)).sum().item()
        counts = tap.router.counts.clone()
        rows[label] = {
            "ppl_ratio": math.exp((nll - fp32_nll) / count),
            "kl": kl / count,
            "top1": agree / count,
            "share_above_base": 1.0 - float(counts[:, 0].sum()) / max(float(counts.sum()), 1.0),
            "avg_bits": weight_bits_read(tap.table, counts)["avg_weight_bits_per_token"],
        }
    return rows, f"{num_windows} windows x {seq_len} tokens of the bundled {corpus} sample"


def quality_table_rows(rows: dict) -> str:
    return "\n".join(
        f"| {label} | {r['ppl_ratio']:.4f} | {r['kl']:.4f} | {r['top1']:.3f} | {r['share_above_base']:.3f} | {r['avg_bits']:.2f} |"
        for label, r in rows.items()
    )
