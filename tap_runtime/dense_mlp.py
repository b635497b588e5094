"""Many-token passes (prefill) through a gated MLP (SiLU: Llama, Qwen, Mistral; GELU tanh: Gemma)
without float32 round trips.

A dense pass multiplies each plane in bfloat16 (kernels/vnni.py). The module path then widens
gate and up to float32, runs SiLU and the product as separate passes, and the down projection
narrows the result to bfloat16 again: on Qwen2.5-1.5B at 512 tokens those passes over
(tokens, 8960) matrices were about a tenth of the prefill. Here gate and up come back as the
products left them, in bfloat16, with the routed tokens' rows apart in float32 (base plus
residual), one native pass makes the down projection's bfloat16 input (a second, small one the
routed rows'), and only the (tokens, hidden) output is widened. The arithmetic is the module
path's: SiLU and the product in float32, rounded to bfloat16 once where the down GEMM would
have rounded it. Where the down projection reads float32 (the AVX2 build's lane kernels), its
input is made in float32 and not rounded at all.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .kernels.native import native_kernels
from .layers import TapLinear
from .rotation import rotate_input

__all__ = ["install_dense_mlp", "dense_mlp_forward"]


def _gate_activation(act_fn: nn.Module) -> str | None:
    """Which gate activation the native pass computes for ``act_fn``: "silu" (Llama, Qwen,
    Mistral), "gelu_tanh" (GELU's tanh form: Gemma), or None (the module path keeps it)."""
    name = type(act_fn).__name__
    if isinstance(act_fn, nn.SiLU) or name in ("SiLUActivation", "SiLU"):
        return "silu"
    if (isinstance(act_fn, nn.GELU) and act_fn.approximate == "tanh") or name in ("GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"
    return None


def dense_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The MLP's output for many float32 tokens through the native path, or None where the
    module path should run (few tokens, another dtype, a kernel without dense products)."""
    flat = x.reshape(-1, x.shape[-1])
    kernel = mlp.gate_proj.kernel
    minimum = getattr(kernel, "vnni_dense_min_tokens", None)
    if x.dtype != torch.float32 or minimum is None or flat.shape[0] < minimum:
        return None
    for projection in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if projection._forward_hooks or projection._forward_pre_hooks or getattr(projection, "_hf_hook", None) is not None:
            return None  # hooks (offloading's plane swaps, a user's) must see the module calls
    native = native_kernels()
    gelu_tanh = mlp.tap_gate_activation == "gelu_tanh"
    # The down projection's input in the dtype its kernel reads (float32 for the AVX2 lanes):
    # rounding it to bfloat16 there only to widen it again cost a (tokens, intermediate) copy.
    reads = getattr(mlp.down_proj.kernel, "many_token_input_dtype", None)
    float_output = reads is not None and reads() == torch.float32
    # The down projection's input rotation happens inside the native pass, in float32 before
    # the rounding to bfloat16 (rotating the rounded values would round twice).
    rotation = mlp.down_proj.policy.input_rotation
    # gate and up read one input: rotate it once for both where their rotations agree.
    shared = mlp.gate_proj.policy.input_rotation
    if shared and shared == mlp.up_proj.policy.input_rotation:
        rotated = rotate_input(flat, shared)
        (gate, gate_routed), (up, up_routed) = mlp.gate_proj.products(rotated, True), mlp.up_proj.products(rotated, True)
    else:
        (gate, gate_routed), (up, up_routed) = mlp.gate_proj.products(flat), mlp.up_proj.products(flat)
    if gate_routed is None and up_routed is None:
        activated = native.silu_mul_rows(gate.contiguous(), up.contiguous(), rotation, float_output, gelu_tanh)
    elif (
        gate_routed is not None and up_routed is not None and gate.dtype == up.dtype
        and torch.equal(gate_routed.indices, up_routed.indices)
    ):
        # Every row from the bfloat16 base products, then the routed rows again from their
        # float32 sums: the routed tokens keep float32 gate and up, as on the module path.
        activated = native.silu_mul_rows(gate.contiguous(), up.contiguous(), rotation, float_output, gelu_tanh)
        activated.index_copy_(0, gate_routed.indices, native.silu_mul_rows(gate_routed.rows, up_routed.rows, rotation, float_output, gelu_tanh))
    else:  # gate and up routed differently: both in float32
        gate = gate_routed.into(gate) if gate_routed is not None else gate.to(torch.float32)
        up = up_routed.into(up) if up_routed is not None else up.to(torch.float32)
        activated = native.silu_mul_rows(gate.contiguous(), up.contiguous(), rotation, float_output, gelu_tanh)
    out, out_routed = mlp.down_proj.products(activated, input_rotated=True)
    out = out_routed.into(out) if out_routed is not None else out.to(torch.float32)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def install_dense_mlp(model: nn.Module) -> int:
    """Route every gated MLP's (gate, up and down TapLinears; SiLU or GELU tanh) many-token calls
    through :func:`dense_mlp_forward`
    (fewer tokens keep the module's own forward; ``mlp.tap_dense_mlp = False`` turns it off
    for one MLP, for A/B and debugging). Returns how many MLPs were set up."""
    native = native_kernels()
    if native is None or not hasattr(native, "silu_mul_rows"):
        return 0
    count = 0
    for module in model.modules():
        projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        activation = _gate_activation(getattr(module, "act_fn", None))
        if not all(isinstance(p, TapLinear) for p in projections) or activation is None:
            continue
        if not all(hasattr(p.kernel, "matmul_plane_sum") for p in projections):
            continue  # torch's kernels: their products are bfloat16 too, but the dense path is theirs
        module_forward = module.forward

        def forward(self, x, _module_forward=module_forward):
            out = dense_mlp_forward(self, x) if self.tap_dense_mlp else None
            return out if out is not None else _module_forward(x)

        module.forward = types.MethodType(forward, module)
        module.tap_dense_mlp = True
        module.tap_gate_activation = activation
        count += 1
    return count
