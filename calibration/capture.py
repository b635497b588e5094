"""Hooks that run calibration windows through a model and record what TAP needs.

Pass 1 (:func:`collect_input_stats`) records each linear layer's input second moment, batch by
batch. Pass 2 (:func:`collect_token_signals`) records, per token and decoder layer, the
importance signals, the loss gradient, and the error the layer makes when its linears run on the
base tier alone: right after each layer runs in full precision, a hook runs it again on the same
inputs with base-tier weights and compares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tap_runtime.architectures import ArchitectureSpec
from tap_runtime.modeling import LinearSite, decoder_layers
from tap_runtime.router import error_estimate_feature, hidden_norm_feature, position_feature

from .stats import ChannelMeanSquare, InputSecondMoment

__all__ = [
    "TokenSignals",
    "collect_input_stats",
    "collect_token_signals",
    "base_model",
    "MAX_HESSIAN_FEATURES",
]

# Above this width a full (in, in) Hessian costs too much memory; such layers keep the diagonal.
MAX_HESSIAN_FEATURES = 4096


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the output head (logits are computed separately, in chunks)."""
    return getattr(model, model.base_model_prefix)


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def collect_input_stats(
    model: nn.Module,
    sites: list[LinearSite],
    windows: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    hessians: bool = True,
    output_moment: InputSecondMoment | None = None,
) -> dict[str, ChannelMeanSquare]:
    """Input statistics of every site over all ``windows`` (num, seq_len).

    With ``hessians``, sites up to MAX_HESSIAN_FEATURES wide get an :class:`InputSecondMoment`.
    Sites called one after another with the very same tensor object (q/k/v, gate/up) share one
    accumulator, which is fed once per call of the group. ``output_moment``, when given, is fed
    the decoder's final hidden states: the output head's input, for its error compensation.
    """
    stats: dict[str, ChannelMeanSquare] = {}
    # The previous call's input is held, so an identity match cannot be a reused address.
    previous: dict[str, object] = {"input": None, "accumulator": None, "site": None}

    def record(site: LinearSite) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            shared = inputs is previous["input"] and previous["site"].layer_index == site.layer_index
            if site.name not in stats:
                if shared:
                    stats[site.name] = previous["accumulator"]
                else:
                    full = hessians and site.in_features <= MAX_HESSIAN_FEATURES
                    stats[site.name] = (InputSecondMoment if full else ChannelMeanSquare)(site.in_features)
            accumulator = stats[site.name]
            if not (shared and accumulator is previous["accumulator"]):
                accumulator.add_batch(inputs)
            previous.update(input=inputs, accumulator=accumulator, site=site)

        return hook

    handles = [site.module.register_forward_pre_hook(record(site)) for site in sites]
    decoder = base_model(model)
    with _hooks(handles):
        for batch in tqdm(windows.split(batch_size), desc="calibration pass 1/2: activation statistics", disable=not progress):
            outputs = decoder(input_ids=batch, use_cache=False)
            if output_moment is not None:
                output_moment.add_batch(outputs.last_hidden_state)
    previous.clear()
    return stats


def _rerun_on_base(module: nn.Module, args: tuple, kwargs: dict, sites: list[LinearSite], base_weight: Callable, state: dict) -> torch.Tensor:
    """Run a decoder layer again with its linears on their base-tier weights; restore them after.

    ``state["rerun"]`` is set meanwhile so the caller's own hooks can ignore the second pass.
    """
    saved = []
    for site in sites:
        weight = base_weight(site)
        saved.append((site.module, site.module.weight.data))
        site.module.weight.data = weight if site.layout == "linear" else weight.t().contiguous()
    state["rerun"] = True
    try:
        rerun = module(*args, **kwargs)
    finally:
        state["rerun"] = False
        for layer_module, data in saved:
            layer_module.weight.data = data
    return rerun[0] if isinstance(rerun, tuple) else rerun


@dataclass
class TokenSignals:
    """Per-token signals of the router-calibration windows.

    Per window position, shape (num_windows, seq_len): ``token_ids``, ``position`` (log1p),
    ``predictive_entropy`` (nats, of the distribution the token was drawn from; NaN at t=0).
    Per layer, shape (num_layers, num_windows, seq_len): ``hidden_norm`` (log RMS at the layer
    input), ``attention_received`` (mean attention from the queries that can see the token),
    ``base_error`` (L2 norm of the change in the layer's output with base-tier linears),
    ``error_estimate`` (log ||norm(h) P||^2 from the layer's error sketch; None without sketches),
    ``loss_gradient`` (log ||dL/dh|| at the layer's output, L the window's next-token loss) and
    ``loss_impact`` (log |dL/dh . e|, e the change in the layer's output when its linears run on
    the base tier: a first-order estimate of how much the token's loss moves when this layer runs
    cheap for it, the Fisher / Taylor view of importance as in DP-LLM and EXL2). The last two are
    NaN at the last position, which predicts nothing inside the window.
    """

    token_ids: torch.Tensor
    position: torch.Tensor
    predictive_entropy: torch.Tensor
    hidden_norm: torch.Tensor
    attention_received: torch.Tensor
    base_error: torch.Tensor
    error_estimate: torch.Tensor | None = None
    loss_gradient: torch.Tensor | None = None
    loss_impact: torch.Tensor | None = None


def _attention_received(weights: torch.Tensor) -> torch.Tensor:
    """(batch, heads, q, k) attention probabilities -> (batch, k) mean received per query."""
    seq_len = weights.shape[-1]
    received = weights.to(torch.float32).mean(dim=1).sum(dim=1)  # (batch, k)
    # Key j is visible to the seq_len - j queries at or after it.
    visible = torch.arange(seq_len, 0, -1, dtype=torch.float32, device=weights.device)
    return received / visible


def _entropy(logits: torch.Tensor, chunk_tokens: int = 128) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position: (tokens, vocab) -> (tokens,).

    In chunks, so a 262k-vocabulary head's log-probabilities never exist for a whole window at once.
    """
    out = []
    for chunk in logits.split(chunk_tokens):
        log_probs = torch.log_softmax(chunk.to(torch.float32), dim=-1)
        out.append(-(log_probs.exp() * log_probs).sum(dim=-1))
    return torch.cat(out)


def collect_token_signals(
    model: nn.Module,
    spec: ArchitectureSpec,
    sites: list[LinearSite],
    base_weight: Callable[[LinearSite], torch.Tensor],
    windows: torch.Tensor,
    progress: bool = True,
    error_sketches: list[torch.Tensor] | None = None,
) -> TokenSignals:
    """Every router signal of ``windows`` from one forward and one backward pass per window.

    The forward runs in full precision (eager attention, whose weights give
    ``attention_received``); after each decoder layer a hook runs it again on base-tier weights,
    which gives both ``base_error`` and the error that ``loss_impact`` projects on the gradient.
    One pass instead of a signal pass and a gradient pass halves the reruns and drops a forward.
    Windows go one at a time so a 262k-vocabulary head's logits and their gradient fit in memory;
    weights are never updated or given gradients.

    Args:
        base_weight: returns a site's base-tier weight, (out_features, in_features), dequantized.
        error_sketches: per layer (hidden, rank) sketches for the error-estimate signal.
    """
    layers = decoder_layers(model, spec)
    num_layers = len(layers)
    num_windows, seq_len = windows.shape
    shape = (num_layers, num_windows, seq_len)
    hidden_norm = torch.zeros(shape)
    attention_received = torch.zeros(shape)
    base_error = torch.zeros(shape)
    error_estimate = torch.zeros(shape) if error_sketches is not None else None
    gradient_norm = torch.zeros(shape)
    loss_impact = torch.zeros(shape)
    entropy = torch.full((num_windows, seq_len), float("nan"))
    sites_by_layer: dict[int, list[LinearSite]] = {}
    for site in sites:
        sites_by_layer.setdefault(site.layer_index, []).append(site)
    base_weights = {site.name: base_weight(site) for site in sites}
    state = {"row": 0, "rerun": False}
    outputs: dict[int, torch.Tensor] = {}
    errors: dict[int, torch.Tensor] = {}

    def before_layer(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if state["rerun"]:
                return
            with torch.no_grad():
                hidden = (args[0] if args else kwargs["hidden_states"])[0]
                hidden_norm[layer_index, state["row"]] = hidden_norm_feature(hidden)
                if error_estimate is not None:
                    normed = getattr(module, spec.input_norm)(hidden)
                    error_estimate[layer_index, state["row"]] = error_estimate_feature(normed, error_sketches[layer_index])

        return hook

    def after_attention(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not state["rerun"] and weights is not None:
                with torch.no_grad():
                    attention_received[layer_index, state["row"]] = _attention_received(weights.detach())[0]

        return hook

    def after_layer(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if state["rerun"]:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.retain_grad()
            outputs[layer_index] = hidden
            with torch.no_grad():
                layer_sites = sites_by_layer.get(layer_index, [])
                rerun = _rerun_on_base(module, args, kwargs, layer_sites, lambda site: base_weights[site.name], state)
                error = (rerun - hidden).to(torch.float32)[0]
                errors[layer_index] = error
                # Absolute, not relative, error: routing by it gave the lowest end-to-end KL of the
                # oracle targets tried (relative error was no better than random routing).
                base_error[layer_index, state["row"]] = error.norm(dim=-1)

        return hook

    handles = []
    for layer_index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before_layer(layer_index), with_kwargs=True))
        handles.append(layer.register_forward_hook(after_layer(layer_index), with_kwargs=True))
        attention = getattr(layer, spec.attention, None)
        if attention is not None:
            handles.append(attention.register_forward_hook(after_attention(layer_index)))

    embed = model.get_input_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]
    previous_attention = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights exist only in eager attention
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with _hooks(handles):
            for row in tqdm(range(num_windows), desc="calibration pass 2/2: token signals and loss gradients", disable=not progress):
                state["row"] = row
                ids = windows[row : row + 1]
                with torch.no_grad():
                    embeds = embed(ids)
                embeds.requires_grad_(True)  # the graph starts here; the weights stay frozen
                result = model(inputs_embeds=embeds, labels=ids, use_cache=False)
                result.loss.backward()
                with torch.no_grad():
                    # The entropy a token "was drawn from" is the prediction made one position earlier.
                    entropy[row, 1:] = _entropy(result.logits.detach()[0, :-1])
                    for layer_index in range(num_layers):
                        grad = outputs[layer_index].grad.to(torch.float32)[0]
                        gradient_norm[layer_index, row] = torch.log(grad.norm(dim=-1).clamp_min(1e-30))
                        dot = (grad * errors[layer_index]).sum(dim=-1).abs()
                        loss_impact[layer_index, row] = torch.log(dot.clamp_min(1e-30))
                del result
                outputs.clear()
                errors.clear()
    finally:
        model.set_attn_implementation(previous_attention)
        for parameter in trainable:
            parameter.requires_grad_(True)
    # The last position predicts nothing inside the window: no gradient, no signal.
    gradient_norm[:, :, -1] = float("nan")
    loss_impact[:, :, -1] = float("nan")
    positions = position_feature(torch.arange(seq_len)).expand(num_windows, seq_len).clone()
    return TokenSignals(
        token_ids=windows.clone(),
        position=positions,
        predictive_entropy=entropy,
        hidden_norm=hidden_norm,
        attention_received=attention_received,
        base_error=base_error,
        error_estimate=error_estimate,
        loss_gradient=gradient_norm,
        loss_impact=loss_impact,
    )
