"""Hooks that run calibration windows through a model and record what TAP needs.

Pass 1 (:func:`collect_input_stats`) records each linear layer's input second moment, batch by
batch; :func:`collect_layer_moments` gathers those of layers too wide to hold all at once, a
decoder layer at a time. Pass 2 (:func:`collect_token_signals`) records, per token and decoder layer, the
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
    "collect_layer_moments",
    "collect_token_signals",
    "base_model",
    "MAX_HESSIAN_FEATURES",
]

# Above this width pass 1 keeps only the diagonal: a full (in, in) Hessian for every such layer
# at once costs too much memory; collect_layer_moments gathers them one layer at a time.
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


@contextlib.contextmanager
def _accumulate_inputs(
    sites: list[LinearSite], stats: dict[str, ChannelMeanSquare], make: Callable[[LinearSite], ChannelMeanSquare]
) -> Iterator[None]:
    """Feed each site's inputs into ``stats[site.name]`` (made by ``make``) while the block runs.

    Sites called one after another with the very same tensor object (q/k/v, gate/up) share one
    accumulator, which is fed once per call of the group.
    """
    # The previous call's input is held, so an identity match cannot be a reused address.
    previous: dict[str, object] = {"input": None, "accumulator": None, "site": None}

    def record(site: LinearSite) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            shared = inputs is previous["input"] and previous["site"].layer_index == site.layer_index
            if site.name not in stats:
                stats[site.name] = previous["accumulator"] if shared else make(site)
            accumulator = stats[site.name]
            if not (shared and accumulator is previous["accumulator"]):
                accumulator.add_batch(inputs)
            previous.update(input=inputs, accumulator=accumulator, site=site)

        return hook

    handles = [site.module.register_forward_pre_hook(record(site)) for site in sites]
    try:
        with _hooks(handles):
            yield
    finally:
        previous.clear()


@torch.inference_mode()
def collect_input_stats(
    model: nn.Module,
    sites: list[LinearSite],
    windows: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    hessians: bool = True,
    output_moment: InputSecondMoment | None = None,
    max_hessian_features: int = MAX_HESSIAN_FEATURES,
) -> dict[str, ChannelMeanSquare]:
    """Input statistics of every site over all ``windows`` (num, seq_len).

    With ``hessians``, sites up to ``max_hessian_features`` wide get an :class:`InputSecondMoment`,
    wider ones the diagonal only (:func:`collect_layer_moments` gathers theirs a layer at a time).
    Sites fed the same tensor share one accumulator. ``output_moment``, when given, is fed the
    decoder's final hidden states: the output head's input, for its error compensation.
    """
    stats: dict[str, ChannelMeanSquare] = {}

    def make(site: LinearSite) -> ChannelMeanSquare:
        full = hessians and site.in_features <= max_hessian_features
        return (InputSecondMoment if full else ChannelMeanSquare)(site.in_features)

    decoder = base_model(model)
    with _accumulate_inputs(sites, stats, make):
        for batch in tqdm(windows.split(batch_size), desc="calibration pass 1/2: activation statistics", disable=not progress):
            outputs = decoder(input_ids=batch, use_cache=False)
            if output_moment is not None:
                output_moment.add_batch(outputs.last_hidden_state)
    return stats


def record_layer_calls(
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Per batch, the first decoder layer's hidden-state input; per layer and batch, the other
    arguments the model calls that layer with (masks, rotary tables: shared objects, kept by reference).

    Every layer is replaced by the identity meanwhile, so the recording pass costs only the
    embedding lookup and whatever the model computes once before its layers.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def recorder(index: int) -> Callable:
        def forward(*args, **kwargs):
            if args:
                states, rest = args[0], args[1:]
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                hidden.append(states)
            calls[index].append((rest, kwargs))
            return states

        return forward

    try:
        for index, layer in enumerate(layers):
            layer.forward = recorder(index)  # an instance attribute shadows the class's forward
        decoder = base_model(model)
        for batch in windows.split(batch_size):
            decoder(input_ids=batch, use_cache=False)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return hidden, calls


@torch.inference_mode()
def collect_layer_moments(
    model: nn.Module,
    spec: ArchitectureSpec,
    sites: list[LinearSite],
    windows: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    first_position: Callable[[LinearSite], bool] = lambda site: True,
) -> Iterator[tuple[LinearSite, InputSecondMoment]]:
    """The full input second moment of each of ``sites``, one decoder layer at a time, in model order.

    For linears too wide for every layer's (in, in) moment to be held at once: Qwen2.5-1.5B's
    down projections read 8,960 features, 642 MB each in float64, 18 GB for its 28 layers. The
    first layer's inputs and every layer's call arguments are recorded once; then the layers run
    in turn on the cached hidden states (full precision, as pass 1 sees them), as GPTQ's
    reference code runs them, and a layer's moments are handed out before the next layer runs,
    so a consumer that drops them holds one layer's at a time. Sites fed the same tensor share
    one moment. ``first_position(site)``: whether the site's moment keeps the window starts apart
    (:meth:`InputSecondMoment.hessian_with_first_weighted`).
    """
    by_layer: dict[int, list[LinearSite]] = {}
    for site in sites:
        by_layer.setdefault(site.layer_index, []).append(site)
    if not by_layer:
        return
    layers = decoder_layers(model, spec)
    last = max(by_layer)
    hidden, calls = record_layer_calls(model, layers, windows, batch_size)
    bar = tqdm(
        total=(last + 1) * len(hidden), desc="calibration: wide layers' Hessians, layer by layer", disable=not progress
    )
    try:
        for index in range(last + 1):
            stats: dict[str, ChannelMeanSquare] = {}
            make = lambda site: InputSecondMoment(site.in_features, first_position=first_position(site))  # noqa: E731
            with _accumulate_inputs(by_layer.get(index, []), stats, make):
                for batch, (args, kwargs) in enumerate(calls[index]):
                    output = layers[index](hidden[batch], *args, **kwargs)
                    hidden[batch] = output[0] if isinstance(output, tuple) else output
                    bar.update(1)
            for site in by_layer.get(index, []):
                yield site, stats[site.name]
            del stats
    finally:
        bar.close()


def _swap_weights(sites: list[LinearSite], data: dict[str, torch.Tensor]) -> list[tuple[nn.Module, torch.Tensor]]:
    """Point each site's weight at ``data[site.name]`` (stored layout); returns what to restore."""
    saved = []
    for site in sites:
        saved.append((site.module, site.module.weight.data))
        site.module.weight.data = data[site.name]
    return saved


def _restore_weights(saved: list[tuple[nn.Module, torch.Tensor]]) -> None:
    for module, data in saved:
        module.weight.data = data


def _rerun_with(module: nn.Module, args: tuple, kwargs: dict, sites: list[LinearSite], data: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
    """Run a decoder layer again with its linears on other weights (``data``); restore them after.

    ``state["rerun"]`` is set meanwhile so the caller's own hooks can ignore the second pass.
    """
    saved = _swap_weights(sites, data)
    state["rerun"] = True
    try:
        rerun = module(*args, **kwargs)
    finally:
        state["rerun"] = False
        _restore_weights(saved)
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

    With ``at_base_tier`` the window ran on the base-tier weights instead: ``base_error`` and
    ``loss_impact``'s e are then the change to full precision at the base-tier model's own inputs
    (what routing a token up changes at run time), and L is the KL of the base-tier model's
    next-token distributions to the float32 model's, defined at every position.
    ``normed_inputs`` (num_layers, num_windows, seq_len, hidden), bfloat16, is each layer's normed
    input when it was asked for (the sensitivity probe's features); ``sensitivity`` is the probe's
    value once one is fitted (calibration.probe).
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
    at_base_tier: bool = False
    normed_inputs: torch.Tensor | None = None
    sensitivity: torch.Tensor | None = None


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


def _kl_to_reference(logits: torch.Tensor, reference: torch.Tensor, chunk_tokens: int = 128) -> torch.Tensor:
    """Summed KL(reference || model) over positions, (tokens, vocab) each; differentiable in ``logits``.

    In chunks: the reference's probabilities never exist for a whole 262k-vocabulary window at once.
    """
    total = logits.new_zeros((), dtype=torch.float32)
    for model_chunk, reference_chunk in zip(logits.split(chunk_tokens), reference.split(chunk_tokens)):
        target = torch.log_softmax(reference_chunk.to(torch.float32), dim=-1)
        log_probs = torch.log_softmax(model_chunk.to(torch.float32), dim=-1)
        total = total + (target.exp() * (target - log_probs)).sum()
    return total


def collect_token_signals(
    model: nn.Module,
    spec: ArchitectureSpec,
    sites: list[LinearSite],
    base_weight: Callable[[LinearSite], torch.Tensor],
    windows: torch.Tensor,
    progress: bool = True,
    error_sketches: list[torch.Tensor] | None = None,
    at_base_tier: bool = False,
    keep_normed: bool = False,
) -> TokenSignals:
    """Every router signal of ``windows`` from one forward and one backward pass per window.

    The forward runs in full precision (eager attention, whose weights give
    ``attention_received``); after each decoder layer a hook runs it again on base-tier weights,
    which gives both ``base_error`` and the error that ``loss_impact`` projects on the gradient.
    One pass instead of a signal pass and a gradient pass halves the reruns and drops a forward.
    With ``at_base_tier`` the roles swap: a no-grad full-precision forward gives the reference
    logits, the forward with gradients runs on base-tier weights against the KL to them, and
    each layer is rerun in full precision. Windows go one at a time so a 262k-vocabulary head's
    logits and their gradient fit in memory; weights are never updated or given gradients.

    Args:
        base_weight: returns a site's base-tier weight, (out_features, in_features), dequantized.
        error_sketches: per layer (hidden, rank) sketches for the error-estimate signal.
        at_base_tier: measure at the base-tier model, against the KL to full precision.
        keep_normed: keep every layer's normed input (TokenSignals.normed_inputs).
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
    normed_inputs = None
    entropy = torch.full((num_windows, seq_len), float("nan"))
    sites_by_layer: dict[int, list[LinearSite]] = {}
    for site in sites:
        sites_by_layer.setdefault(site.layer_index, []).append(site)
    # Both weight sets in each module's stored layout, so a swap is a pointer assignment.
    full_data = {site.name: site.module.weight.data for site in sites}
    base_data = {}
    for site in sites:
        weight = base_weight(site)
        base_data[site.name] = weight if site.layout == "linear" else weight.t().contiguous()
    rerun_data = full_data if at_base_tier else base_data
    state = {"row": 0, "rerun": False, "quiet": False}
    outputs: dict[int, torch.Tensor] = {}
    errors: dict[int, torch.Tensor] = {}

    def before_layer(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            nonlocal normed_inputs
            if state["rerun"] or state["quiet"]:
                return
            with torch.no_grad():
                hidden = (args[0] if args else kwargs["hidden_states"])[0]
                hidden_norm[layer_index, state["row"]] = hidden_norm_feature(hidden)
                if error_estimate is not None or keep_normed:
                    normed = getattr(module, spec.input_norm)(hidden)
                if error_estimate is not None:
                    error_estimate[layer_index, state["row"]] = error_estimate_feature(normed, error_sketches[layer_index])
                if keep_normed:
                    if normed_inputs is None:
                        normed_inputs = torch.zeros((*shape, normed.shape[-1]), dtype=torch.bfloat16)
                    normed_inputs[layer_index, state["row"]] = normed.to(torch.bfloat16)

        return hook

    def after_attention(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not (state["rerun"] or state["quiet"]) and weights is not None:
                with torch.no_grad():
                    attention_received[layer_index, state["row"]] = _attention_received(weights.detach())[0]

        return hook

    def after_layer(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if state["rerun"] or state["quiet"]:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.retain_grad()
            outputs[layer_index] = hidden
            with torch.no_grad():
                layer_sites = sites_by_layer.get(layer_index, [])
                rerun = _rerun_with(module, args, kwargs, layer_sites, rerun_data, state)
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
    description = (
        "calibration pass 2/2: token signals and KL gradients at the base tier"
        if at_base_tier
        else "calibration pass 2/2: token signals and loss gradients"
    )
    try:
        with _hooks(handles):
            for row in tqdm(range(num_windows), desc=description, disable=not progress):
                state["row"] = row
                ids = windows[row : row + 1]
                saved = []
                try:
                    if at_base_tier:
                        state["quiet"] = True
                        with torch.no_grad():
                            reference = model(input_ids=ids, use_cache=False).logits[0]
                        state["quiet"] = False
                        saved = _swap_weights(sites, base_data)
                    with torch.no_grad():
                        embeds = embed(ids)
                    embeds.requires_grad_(True)  # the graph starts here; the weights stay frozen
                    if at_base_tier:
                        result = model(inputs_embeds=embeds, use_cache=False)
                        _kl_to_reference(result.logits[0], reference).backward()
                        del reference
                    else:
                        result = model(inputs_embeds=embeds, labels=ids, use_cache=False)
                        result.loss.backward()
                finally:
                    state["quiet"] = False
                    _restore_weights(saved)
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
    if not at_base_tier:
        # The last position predicts nothing inside the window: no gradient, no signal. (The KL
        # to the reference is defined at every position.)
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
        at_base_tier=at_base_tier,
        normed_inputs=normed_inputs,
    )
