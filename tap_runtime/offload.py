"""``offload_to_cpu``: decoder layers beyond a GPU budget keep their packed planes in host memory.

A model larger than the GPU still runs there: the layers that fit stay on the GPU, the others
keep their planes (already in the GPU kernel's packed layout) in pinned host memory and copy
the planes every token reads in just before each linear runs, through an accelerate hook on the
linear; a residual plane crosses only when the router sends tokens to it in that call. Per linear, not
per layer, because both transformers' forward and the lean decode loop call every TapLinear,
while the lean loop bypasses the decoder layer's own forward. While one linear runs, the next
offloaded one is already being copied on a side stream, so transfers overlap compute.

The placement is accelerate's device-map format, ``{module prefix: GPU index | "cuda:N" |
"cpu"}``, so a map from ``accelerate.infer_auto_device_map`` or written by hand works;
:func:`plan_device_map` makes one from a byte budget for the packed decoder-layer planes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidConfigError
from .format import LinearPolicy, RoutingTable

__all__ = ["plan_device_map", "offloaded_linears", "plane_bytes", "to_host", "attach_offload_hooks", "HostPlane", "OffloadSummary"]

DeviceMap = dict[str, Any]


def plane_bytes(policy: LinearPolicy) -> int:
    """Bytes of one linear's planes as stored: 4-bit codes plus group scales (and zeros)."""
    total = 0
    for spec in policy.planes:
        groups = policy.in_features // spec.group_size
        zero_bytes = 0 if spec.symmetric else spec.zero_bits // 8
        total += policy.out_features * policy.in_features // 2 + policy.out_features * groups * (spec.scale_bits // 8 + zero_bytes)
    return total


def _layer_prefixes(table: RoutingTable) -> dict[int, str]:
    """Decoder layer index -> the module prefix its linears share (``model.layers.3``)."""
    names: dict[int, list[list[str]]] = {}
    for name, policy in table.linear.items():
        if policy.layer_index is not None:
            names.setdefault(policy.layer_index, []).append(name.split("."))
    prefixes = {}
    for index, parts in names.items():
        common = []
        for pieces in zip(*parts):
            if len(set(pieces)) != 1:
                break
            common.append(pieces[0])
        if len(parts) == 1:
            common = common[:-1]  # a lone linear: its layer is its parent
        prefixes[index] = ".".join(common)
    return prefixes


def plan_device_map(table: RoutingTable, gpu_budget_bytes: int, gpu: int = 0) -> DeviceMap:
    """Decoder layers in order on GPU ``gpu`` while their planes fit ``gpu_budget_bytes``; the
    rest on ``"cpu"``. Everything outside the decoder layers stays on the GPU (key ``""``)."""
    if gpu_budget_bytes < 0:
        raise InvalidConfigError(f"the GPU budget for offloading must be >= 0 bytes, got {gpu_budget_bytes}.")
    per_layer: dict[int, int] = {}
    for policy in table.linear.values():
        if policy.layer_index is not None:
            per_layer[policy.layer_index] = per_layer.get(policy.layer_index, 0) + plane_bytes(policy)
    device_map: DeviceMap = {"": gpu}
    used = 0
    full = False
    for index, prefix in sorted(_layer_prefixes(table).items()):
        full = full or used + per_layer[index] > gpu_budget_bytes
        if full:
            device_map[prefix] = "cpu"
        else:
            used += per_layer[index]
            device_map[prefix] = gpu
    return device_map


def _placement(name: str, device_map: DeviceMap) -> Any:
    """accelerate's rule: the longest prefix of ``name`` (on module boundaries) decides."""
    best, best_length = None, -1
    for prefix, where in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best_length:
                best, best_length = where, len(prefix)
    return best


def offloaded_linears(table: RoutingTable, device_map: DeviceMap) -> set[str]:
    """Names of the linears whose planes stay on the host under ``device_map``."""
    for prefix, where in device_map.items():
        if where == "disk":
            raise InvalidConfigError(
                f"device_map puts {prefix or 'the model'!r} on 'disk'; TAP offloads to 'cpu' only (the shards are "
                f"already on disk: use memory_efficient mode on the CPU to read planes from them on demand)."
            )
    if _placement("", device_map) is None and not all(_placement(n, device_map) is not None for n in table.linear):
        missing = [n for n in table.linear if _placement(n, device_map) is None]
        raise InvalidConfigError(f"device_map places no device for {missing[0]!r}; give it a GPU or 'cpu'.")
    return {name for name in table.linear if _placement(name, device_map) == "cpu"}


def _map_tensors(value: Any, move) -> Any:
    """``value`` with every tensor in it (dataclasses and lists followed) passed through ``move``."""
    if isinstance(value, torch.Tensor):
        return move(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _map_tensors(getattr(value, f.name), move) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, list):
        return [_map_tensors(item, move) for item in value]
    return value


def _tensors(value: Any):
    """Every tensor in ``value`` (dataclasses and lists followed)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, list):
        for item in value:
            yield from _tensors(item)


def to_host(prepared: list) -> list:
    """Packed planes copied to pinned host memory (pageable where pinning is unavailable).

    The GPU kernel's dense-prefill copy of the portable codes is dropped: shipping it on every
    call would double the bytes moved, and the packed kernel serves any token count.
    """

    def move(tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.to("cpu")
        if torch.cuda.is_available():
            host = host.pin_memory()
        return host

    stripped = [dataclasses.replace(p, portable=None) if hasattr(p, "portable") else p for p in prepared]
    return _map_tensors(stripped, move)


@dataclass
class OffloadSummary:
    """Where the packed decoder planes live after load."""

    device_map: DeviceMap
    offloaded: list[str] = field(default_factory=list)
    gpu_plane_bytes: int = 0
    host_plane_bytes: int = 0


def _hook_base():
    try:
        from accelerate.hooks import ModelHook, add_hook_to_module
    except ImportError as error:  # accelerate is the [gguf] extra's; offloading needs it too
        raise InvalidConfigError(
            "offload_to_cpu uses accelerate's module hooks: pip install 'accelerate>=1.0' (or the tap-engine[gguf] extra)."
        ) from error
    return ModelHook, add_hook_to_module


class HostPlane:
    """A residual plane of an offloaded linear: copied to the device only when a call routes
    tokens to it, so offloading moves the bytes the routing reads, like everything else here."""

    __slots__ = ("plane", "device", "copy")

    def __init__(self, plane: Any, device: torch.device):
        self.plane = plane
        self.device = device
        self.copy = None

    def resolve(self) -> Any:
        if self.copy is None:
            self.copy = _map_tensors(self.plane, lambda t: t.to(self.device, non_blocking=True))
        return self.copy


def attach_offload_hooks(modules: list, device: torch.device) -> None:
    """Give each offloaded TapLinear (in execution order) a hook that copies the planes every
    token reads to ``device`` before it runs (residual ones only if routed: :class:`HostPlane`),
    starts the next linear's copy, and drops the device copies after."""
    ModelHook, add_hook_to_module = _hook_base()
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    class PlaneOffloadHook(ModelHook):
        def __init__(self, module):
            self.module = module
            self.host_planes = module._prepared
            self.residual = [HostPlane(plane, device) for plane in self.host_planes]
            self.pending: tuple[list, Any] | None = None
            self.next: "PlaneOffloadHook | None" = None

        def start_copy(self) -> None:
            if self.pending is not None:
                return
            always = self.host_planes[: self.module.policy.always_planes]
            if stream is None:
                self.pending = (_map_tensors(always, lambda t: t.to(device)), None)
                return
            with torch.cuda.stream(stream):
                planes = _map_tensors(always, lambda t: t.to(device, non_blocking=True))
                done = torch.cuda.Event()
                done.record(stream)
            self.pending = (planes, done)

        def pre_forward(self, module, *args, **kwargs):
            self.start_copy()
            planes, done = self.pending
            self.pending = None
            if done is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(done)
                # Allocated on the copy stream, used on this one: keep the allocator from reusing them early.
                for tensor in _tensors(planes):
                    tensor.record_stream(current)
            module._prepared = planes + self.residual[len(planes) :]
            if self.next is not None:
                self.next.start_copy()
            return args, kwargs

        def post_forward(self, module, output):
            for plane in self.residual:
                plane.copy = None
            module._prepared = self.host_planes
            return output

    hooks = []
    for module in modules:
        hook = PlaneOffloadHook(module)
        add_hook_to_module(module, hook)
        module.tap_offloaded = True
        hooks.append(hook)
    for this, following in zip(hooks, hooks[1:] + hooks[:1]):
        this.next = following if following is not this else None
