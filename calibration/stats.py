"""Running statistics gathered batch by batch (``add_batch``, as GPTQ accumulates its Hessian)."""

from __future__ import annotations

import torch

__all__ = ["ChannelMeanSquare", "InputSecondMoment", "symmetric_gram", "token_log_frequency"]


class ChannelMeanSquare:
    """Mean square of each input channel of a linear layer over all calibration tokens.

    This is the diagonal of the layer-input second moment: the weight that tells the quantizer
    how much an error in each input column costs (llama.cpp's importance matrix).
    """

    def __init__(self, in_features: int):
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64)
        self.num_tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """inputs: (..., in_features) activations entering the layer."""
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        self.sum_squares += flat.pow(2).sum(dim=0).to(torch.float64)
        self.num_tokens += flat.shape[0]

    @property
    def mean_square(self) -> torch.Tensor:
        """(in_features,) float32."""
        return (self.sum_squares / max(self.num_tokens, 1)).to(torch.float32)


class InputSecondMoment(ChannelMeanSquare):
    """Mean of x x^T over calibration inputs: the layer-input Hessian GPTQ compensates with.

    Its diagonal is the channel mean square, so it serves wherever that does. The first
    position of every window is also summed on its own (inputs shaped (batch, seq, features)),
    so the sequence's first token can be weighted up: see :meth:`hessian_with_first_weighted`.
    Without ``first_position`` that second matrix is not kept (half the memory of a wide layer
    whose first token is not weighted). :meth:`release` drops both matrices once they are used.
    """

    def __init__(self, in_features: int, first_position: bool = True):
        super().__init__(in_features)
        self.sum_outer = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.sum_outer_first = torch.zeros(in_features, in_features, dtype=torch.float64) if first_position else None
        self.num_first = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        if self.sum_outer is None:
            raise RuntimeError("this second moment was released; it cannot take more batches")
        inputs = inputs.detach()
        flat = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        super().add_batch(flat)
        self.sum_outer += symmetric_gram(flat).to(torch.float64)
        if self.sum_outer_first is not None and inputs.dim() >= 3:
            first = inputs.reshape(-1, inputs.shape[-2], inputs.shape[-1])[:, 0].to(torch.float32)
            self.sum_outer_first += (first.t() @ first).to(torch.float64)
            self.num_first += first.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """(in_features, in_features) float32."""
        if self.sum_outer is None:
            raise RuntimeError("this second moment was released; its Hessian is gone")
        return (self.sum_outer / max(self.num_tokens, 1)).to(torch.float32)

    def hessian_with_first_weighted(self, first_weight: float) -> torch.Tensor:
        """The Hessian with each window's first position counted ``first_weight`` times.

        A sequence's first token is the attention sink: every later query attends to it, so
        an error in its key or value reaches every position. Its inputs are a handful of
        directions, and GPTQ weighted towards them makes the quantized projection nearly
        exact there at little cost elsewhere.
        """
        if self.sum_outer_first is None:
            raise RuntimeError("this second moment was built without first_position, or released")
        extra = (first_weight - 1.0) * self.sum_outer_first
        count = self.num_tokens + (first_weight - 1.0) * self.num_first
        return ((self.sum_outer + extra) / max(count, 1)).to(torch.float32)

    def release(self) -> None:
        """Free the (in, in) matrices, keeping the diagonal: a converter holding every layer's
        statistics gives their memory back before its next pass (Qwen2.5-1.5B's take 3.2 GB)."""
        self.sum_outer = None
        self.sum_outer_first = None


def symmetric_gram(rows: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``rows.T @ rows`` from its upper block triangle only, mirrored: (n, d) -> (d, d).

    A Gram matrix is symmetric, so the blocks below the diagonal repeat those above; skipping
    them takes 58% of the multiply-adds at d = 1536 (67% at 576). Pass 1 of calibration spends
    about as long on these products as on the model's own forward.
    """
    width = rows.shape[1]
    if width <= block:
        return rows.t() @ rows
    gram = torch.empty(width, width, dtype=rows.dtype, device=rows.device)
    for start in range(0, width, block):
        stop = min(start + block, width)
        strip = rows[:, start:stop].t() @ rows[:, start:]  # (block, width - start)
        gram[start:stop, start:] = strip
        gram[stop:, start:stop] = strip[:, stop - start :].t()
    return gram


def token_log_frequency(token_ids: torch.Tensor, vocab_size: int, held_out: torch.Tensor | None = None) -> torch.Tensor:
    """log of each id's add-one smoothed unigram probability: (vocab_size,) float32.

    ``held_out`` tokens (the router's fitting windows) are left out of the counts: counted in,
    every token the router is fitted on would be "seen", while at run time many are not, and
    the fitted thresholds would route more tokens than asked.
    """
    counts = torch.bincount(token_ids.reshape(-1).clamp(0, vocab_size - 1), minlength=vocab_size)
    if held_out is not None:
        counts = counts - torch.bincount(held_out.reshape(-1).clamp(0, vocab_size - 1), minlength=vocab_size)
    counts = counts.clamp_min(0).to(torch.float64)
    return torch.log((counts + 1.0) / (counts.sum() + vocab_size)).to(torch.float32)
