"""Find a model's quantizable modules, swap them for TAP modules, and wire up the router.

The converter uses the ``iter_*`` functions to decide what to quantize; the loader uses
:func:`replace_modules` (on the meta device, before weights load) and :func:`prepare_model`
(after), so both sides agree on which module is which by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .architectures import ArchitectureSpec, get_architecture
from .errors import CorruptCheckpointError, InvalidConfigError, RoutingTableMismatchError
from .format import embedding_tensor_suffix, plane_tensor_suffix, ROUTER_TENSORS_FILE, ROUTER_TOKEN_LOG_FREQUENCY, ROUTING_FILE, RoutingTable, error_sketch_name, sensitivity_probe_name
from .dense_mlp import install_dense_mlp
from .prefill_attention import install_prefill_attention
from .kernels import select_kernel
from .layers import TapEmbedding, TapHead, TapLinear, share_input_rotations
from .pages import page_out, return_freed_heap
from .sketch import input_space_residual, residual_error_sketch
from .offload import OffloadSummary, attach_offload_hooks, plane_bytes, to_host
from .residency import ResidualPlaneCache, shard_of_every_tensor
from .router import TokenRouter

__all__ = [
    "LinearSite",
    "get_submodule_path",
    "decoder_layers",
    "iter_linear_sites",
    "iter_embeddings",
    "output_head",
    "linear_weight",
    "replace_modules",
    "prepare_model",
]

_log = logging.getLogger(__name__)
_TRIM_EVERY = 8  # linears packed between two heap trims while loading


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - depends on the transformers build
        return None
    return Conv1D


@dataclass
class LinearSite:
    """A linear module found in a decoder layer. ``layout`` is ``linear`` or ``conv1d``."""

    name: str
    module: nn.Module
    layer_index: int
    layout: str

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[1 if self.layout == "linear" else 0]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[0 if self.layout == "linear" else 1]


def get_submodule_path(model: nn.Module, dotted: str) -> nn.Module:
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    return get_submodule_path(model, spec.decoder_layers)


def iter_linear_sites(model: nn.Module, spec: ArchitectureSpec) -> Iterator[LinearSite]:
    """Every nn.Linear / Conv1D inside the decoder layers, in model order."""
    conv1d = _conv1d_class()
    for layer_index, layer in enumerate(decoder_layers(model, spec)):
        for sub_name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                layout = "linear"
            elif conv1d is not None and isinstance(module, conv1d):
                layout = "conv1d"
            else:
                continue
            yield LinearSite(f"{spec.decoder_layers}.{layer_index}.{sub_name}", module, layer_index, layout)


def iter_embeddings(model: nn.Module) -> Iterator[tuple[str, nn.Embedding]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            yield name, module


def output_head(model: nn.Module) -> tuple[str, nn.Module, str | None] | None:
    """(name, module, name of the embedding it is tied to or None), or None if headless."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head_name = names[id(head)]
    tied_to = None
    for name, embedding in iter_embeddings(model):
        if embedding.weight is head.weight:
            tied_to = name
    return head_name, head, tied_to


def linear_weight(site: LinearSite) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module's own layout."""
    weight = site.module.weight.detach()
    return weight if site.layout == "linear" else weight.t()


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = get_submodule_path(model, parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_modules(model: nn.Module, table: RoutingTable, source: str = ROUTING_FILE) -> None:
    """Swap every module the routing table names for its TAP module (weights not touched).

    Raises RoutingTableMismatchError when the table describes another model.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    spec = get_architecture(config.model_type)
    if table.model_type != config.model_type or table.num_layers != len(decoder_layers(model, spec)):
        raise RoutingTableMismatchError(
            f"{source}: routing table is for a {table.model_type} model with {table.num_layers} layers; "
            f"expected {config.model_type} with {len(decoder_layers(model, spec))} layers (from config.json). "
            f"The checkpoint mixes files of different models; convert it again."
        )
    sites = {site.name: site for site in iter_linear_sites(model, spec)}
    for name, policy in table.linear.items():
        site = sites.get(name)
        if site is None or (site.in_features, site.out_features) != (policy.in_features, policy.out_features):
            found = None if site is None else (site.in_features, site.out_features)
            raise RoutingTableMismatchError(
                f"{source}: module {name} expected (in, out) = {(policy.in_features, policy.out_features)} in "
                f"the model, got {found}. The routing table is from another model; convert again."
            )
        _set_submodule(model, name, TapLinear(policy))
    for name in sorted(set(sites) - set(table.linear)):
        kept = table.kept.get(f"{name}.weight")
        _log.info("%s stays unquantized: %s", name, kept.reason if kept else "not in the routing table")
    modules = dict(model.named_modules())
    new_embeddings: dict[str, TapEmbedding] = {}
    for name, policy in table.embeddings.items():
        original = modules.get(name)
        if original is None:
            raise RoutingTableMismatchError(f"{source}: {policy.role} {name} is not in the model; convert again.")
        if policy.role == "embedding":
            new_embeddings[name] = TapEmbedding(
                policy,
                output_scale=getattr(original, "scalar_embed_scale", None),
                padding_idx=getattr(original, "padding_idx", None),
            )
            _set_submodule(model, name, new_embeddings[name])
    for name, policy in table.embeddings.items():
        if policy.role != "head":
            continue
        tied = None
        if policy.tied_to is not None:
            tied = new_embeddings.get(policy.tied_to)
            if tied is None:
                raise RoutingTableMismatchError(
                    f"{source}: head {name} is tied to {policy.tied_to}, which the table does not quantize; "
                    f"convert again."
                )
        _set_submodule(model, name, TapHead(policy, tied_embedding=tied))


def prepare_model(
    model: nn.Module,
    table: RoutingTable,
    router_tensors: dict[str, torch.Tensor],
    compute_dtype: torch.dtype,
    kernel_name: str = "auto",
    keep_portable: bool = False,
    device: torch.device | str | None = None,
    residual_cache_bytes: int | None = None,
    weights_directory: Path | None = None,
    offloaded: frozenset[str] | None = None,
) -> TokenRouter:
    """After weights are loaded: pack for the kernel, attach the router, install its hooks.

    ``compute_dtype`` is the dtype of the residual stream; it must be passed, not read from
    ``model.dtype``, which reports the first floating parameter (a float16 scale tensor here).
    ``device`` is where the model will run: the kernel packs straight onto it, so quantized
    weights never pass through the device as dense copies. The caller moves the rest after.
    ``residual_cache_bytes`` turns on memory-efficient mode (see :mod:`tap_runtime.residency`):
    planes above each linear's always-read ones stay in the mapped shard, packed on demand into
    one cache of that many bytes; they are read from the shards in ``weights_directory``.
    ``offloaded`` names linears whose packed planes go to host memory right after packing and
    are copied to ``device`` just before each call (see :mod:`tap_runtime.offload`).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    kernel = select_kernel(kernel_name, device)
    sketches = None
    if "error_estimate" in table.router.signals and table.router.error_sketch_sites:
        sketches = derive_error_sketches(model, table)
    elif "error_estimate" in table.router.signals:
        missing = [error_sketch_name(i) for i in range(table.num_layers) if error_sketch_name(i) not in router_tensors]
        if missing:
            raise CorruptCheckpointError(
                f"{ROUTER_TENSORS_FILE}: missing tensors {missing[:3]}; expected one error sketch per layer for the "
                f"router's error_estimate signal. Convert again."
            )
        sketches = [router_tensors[error_sketch_name(i)] for i in range(table.num_layers)]
    probes = None
    if "sensitivity" in table.router.signals:
        probes = sensitivity_probes(router_tensors, table, model.config.get_text_config().hidden_size)
    router = TokenRouter(
        table.router, table.tiers, table.num_layers, router_tensors.get(ROUTER_TOKEN_LOG_FREQUENCY), sketches, probes
    )
    residual_cache = None
    if residual_cache_bytes is not None:
        if device.type != "cpu":
            raise InvalidConfigError(
                "memory-efficient mode pages residual planes in from the mapped shard on the CPU; "
                f"device {device} needs every plane packed at load."
            )
        if weights_directory is None:
            raise InvalidConfigError("memory-efficient mode reads residual planes from the shards: it needs their directory.")
        residual_cache = ResidualPlaneCache(kernel, residual_cache_bytes)
        located = shard_of_every_tensor(weights_directory, [shard.file_name for shard in table.shards])
    packed_count = 0
    offload = OffloadSummary(device_map={}) if offloaded else None
    hosted: list[TapLinear] = []
    for name, module in model.named_modules():
        if isinstance(module, TapLinear):
            sources = None
            if residual_cache is not None:
                sources = []
                for plane_index, spec in enumerate(module.policy.planes):
                    names = {field: f"{name}.{plane_tensor_suffix(plane_index, field)}" for field in spec.fields}
                    missing = [tensor for tensor in names.values() if tensor not in located]
                    if missing:
                        raise CorruptCheckpointError(
                            f"{weights_directory}: tensor {missing[0]} is in none of the shards; convert again."
                        )
                    sources.append((located[names["qweight"]], names))
            module.prepare(kernel, keep_portable=keep_portable, residual_cache=residual_cache, residual_sources=sources)
            if offload is not None:
                # One linear at a time through the GPU: packing there, then straight to the host.
                if name in offloaded:
                    module._prepared = to_host(module._prepared)
                    hosted.append(module)
                    offload.offloaded.append(name)
                    offload.host_plane_bytes += plane_bytes(module.policy)
                elif module.policy.layer_index is not None:
                    offload.gpu_plane_bytes += plane_bytes(module.policy)
            packed_count += 1
            if packed_count % _TRIM_EVERY == 0:
                # Packing frees large transient code buffers that glibc keeps in its heap; hand
                # them back as we go, so the load's high-water mark stays near the model's size.
                return_freed_heap()
            if module.policy.layer_index is not None:
                module.routing = router.layers[module.policy.layer_index]
        elif isinstance(module, TapEmbedding):
            module.prepare(compute_dtype)
    for module in model.modules():
        if isinstance(module, TapHead):
            # Before detaching: the head's kernel copy is made from the mapped rows, whose pages
            # go as each slice is copied, so the rows are never resident twice.
            module.prepare(kernel, keep_portable=keep_portable)
    _detach_from_files(model)
    if offload is not None:
        unknown = sorted(set(offloaded) - set(offload.offloaded))
        if unknown:
            raise InvalidConfigError(f"offload names linears the model does not have: {unknown[:3]}")
        attach_offload_hooks(hosted, device)
    model.tap_offload = offload
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    spec = get_architecture(config.model_type)
    _install_router_hooks(model, spec, router)
    install_dense_mlp(model)
    # Prompts attend on the native kernel; other calls fall through to sdpa per call.
    model.tap_native_attention = install_prefill_attention(model)
    share_input_rotations(model)
    model.tap_router = router
    model.tap_residual_cache = residual_cache
    return router


def sensitivity_probes(router_tensors: dict[str, torch.Tensor], table: RoutingTable, hidden_size: int) -> list[torch.Tensor]:
    """The router's per-layer sensitivity probe vectors (stored float16), checked, as float32 (hidden_size,)."""
    probes = []
    for layer_index in range(table.num_layers):
        name = sensitivity_probe_name(layer_index)
        probe = router_tensors.get(name)
        if probe is None or probe.dim() != 1 or probe.numel() != hidden_size or not probe.is_floating_point():
            found = "missing" if probe is None else f"{tuple(probe.shape)} {probe.dtype}"
            raise CorruptCheckpointError(
                f"{ROUTER_TENSORS_FILE}: tensor {name!r} is {found}; expected a float ({hidden_size},) probe vector per "
                f"layer for the router's sensitivity signal. The file is corrupt or from another model; convert again."
            )
        probes.append(probe.to(torch.float32).contiguous())
    return probes


def derive_error_sketches(model: nn.Module, table: RoutingTable) -> list[torch.Tensor]:
    """Format 4: each layer's error sketch from its linears' next planes, as loaded (see
    :mod:`tap_runtime.sketch`); the converter fitted the router on the very same computation."""
    modules = dict(model.named_modules())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    sketches = []
    for layer_index, names in enumerate(table.router.error_sketch_sites):
        residuals = []
        for name in names:
            module = modules.get(name)
            if not isinstance(module, TapLinear):
                raise CorruptCheckpointError(
                    f"{ROUTING_FILE}: router.error_sketch_sites names {name!r} for layer {layer_index}, which is not "
                    f"a TAP linear of this model; the routing table comes from another conversion. Convert again."
                )
            planes = module.planes()
            above = module.policy.always_planes
            if above < len(planes):
                residuals.append(input_space_residual(planes[above], module.policy.input_rotation))
        hidden_size = modules[names[0]].in_features if names else config.hidden_size
        sketches.append(residual_error_sketch(residuals, hidden_size))
    return sketches


def _detach_from_files(model: nn.Module) -> None:
    """Copy every remaining tensor into memory of its own (64-byte aligned), except embedding rows.

    transformers hands out tensors that view the memory-mapped shard; a view keeps its file's
    pages resident once they are read. What is left after packing (norms, biases, scales) is
    copied once. An embedding's int8 rows stay mapped: a lookup reads a few rows, so only the
    pages of tokens actually seen become resident (233 MB of rows on Qwen2.5-1.5B, as llama.cpp
    leaves its mapped embedding). The shard is never written in place (writers rename a new
    file over it), so the mapping stays valid.
    """
    mapped_rows = {
        id(getattr(module, embedding_tensor_suffix("qweight")))
        for module in model.modules()
        if isinstance(module, TapEmbedding) and hasattr(module, embedding_tensor_suffix("qweight"))
    }
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in mapped_rows:
            continue
        source = tensor.data
        tensor.data = source.clone(memory_format=torch.contiguous_format)
        page_out(source)


def _positions(kwargs: dict, input_ids: torch.Tensor | None, seq_len: int, batch: int) -> torch.Tensor:
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids.expand(batch, -1) if position_ids.shape[0] == 1 else position_ids
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        # Left padding: a token's position is the number of real tokens before it.
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq_len:]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    return (torch.arange(seq_len) + past).unsqueeze(0).expand(batch, -1)


def _install_router_hooks(model: nn.Module, spec: ArchitectureSpec, router: TokenRouter) -> None:
    def before_model(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            return None
        batch, seq_len = reference.shape[0], reference.shape[1]
        router.begin_forward(input_ids, _positions(kwargs, input_ids, seq_len, batch).cpu())
        return None

    def after_input_norm(layer_index):
        # Route from the layer's input norm: it runs once per layer, before any linear reads the
        # tokens, and hands over both the hidden states and their normed form (which the error
        # estimate reads), so the norm is not computed twice.
        def hook(module, args, output):
            normed = output[0] if isinstance(output, tuple) else output
            router.route_layer(layer_index, args[0], normed)
            return None

        return hook

    model.register_forward_pre_hook(before_model, with_kwargs=True)
    router.input_norms = [getattr(layer, spec.input_norm) for layer in decoder_layers(model, spec)]
    for layer_index, norm in enumerate(router.input_norms):
        norm.register_forward_hook(after_input_norm(layer_index))
