"""Per-column scales for 8-bit row-wise matrices (embeddings and output heads).

Per-row int8 spends each row's 255 levels on its largest entry. Where a few columns are much
larger than the rest in every row (gemma-3's embedding), the other columns round coarsely.
Dividing column j by c_j = rms_j ** alpha before rounding evens the columns out; the runtime
multiplies c back in (the embedding after its lookup, the head on its input), at the cost of
one float per column and no kernel change. alpha is chosen here, per matrix, from the weights
(and the head's calibration Hessian where there is one), never from evaluation text.
"""

from __future__ import annotations

import torch

from tap_runtime.planes import RowQuantized, dequantize_rows

from .quantize import quantize_rows

__all__ = ["COLUMN_SCALE_EXPONENTS", "column_scales_for", "choose_column_scales"]

# Candidate alphas; 0 means no column scales, so a matrix that does not gain stays as it was.
COLUMN_SCALE_EXPONENTS = (0.0, 0.25, 0.5, 0.75, 1.0)
_ROW_CHUNK = 16384  # rows measured at once: bounds the working copies for a 262k-row vocabulary


def column_scales_for(weight: torch.Tensor, exponent: float) -> torch.Tensor | None:
    """c_j = rms_j ** exponent, normalised to geometric mean 1 (row scales keep their magnitude).

    Returns None for exponent 0. Columns that are all zero get c_j = 1.
    """
    if exponent == 0.0:
        return None
    rms = weight.detach().to(torch.float32).pow(2).mean(dim=0).sqrt()  # (embedding_dim,)
    live = rms > 0
    if not bool(live.any()):
        return None
    scales = torch.ones_like(rms)
    powered = rms[live].pow(exponent)
    scales[live] = powered / powered.log().mean().exp()
    return scales


def _relative_error(weight: torch.Tensor, column_scales: torch.Tensor | None, hessian: torch.Tensor | None) -> float:
    """||W - W_hat||^2 / ||W||^2 of round-to-nearest rows; with ``hessian``, tr(E H E^T) / tr(W H W^T)."""
    noise = signal = 0.0
    for first in range(0, weight.shape[0], _ROW_CHUNK):
        chunk = weight[first : first + _ROW_CHUNK].detach().to(torch.float32)
        scaled = chunk if column_scales is None else chunk / column_scales
        rows = quantize_rows(scaled)
        error = chunk - dequantize_rows(RowQuantized(rows.qweight, rows.scales, column_scales))
        if hessian is None:
            noise += float(error.pow(2).sum())
            signal += float(chunk.pow(2).sum())
        else:
            noise += float(((error @ hessian) * error).sum())
            signal += float(((chunk @ hessian) * chunk).sum())
    return noise / signal if signal > 0 else 0.0


def choose_column_scales(
    weight: torch.Tensor, hessian: torch.Tensor | None = None, exponents: tuple[float, ...] = COLUMN_SCALE_EXPONENTS
) -> tuple[float, torch.Tensor | None, dict[float, float]]:
    """The exponent whose column scales give the smallest round-to-nearest row error.

    Args:
        weight: (rows, cols) float matrix.
        hessian: (cols, cols) second moment of the head's input, for a head that is not an
            embedding too; None measures the error in weight space, which is what a lookup feels.
    Returns:
        (exponent, column_scales or None, {exponent: relative error}).
    """
    hessian = None if hessian is None else hessian.to(torch.float32)
    errors = {
        exponent: _relative_error(weight, column_scales_for(weight, exponent), hessian) for exponent in exponents
    }
    best = min(errors, key=lambda exponent: (errors[exponent], exponent))
    return best, column_scales_for(weight, best), errors
