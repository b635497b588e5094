"""Error-compensated plane quantization (GPTQ, Frantar et al. 2022) on the layer-input Hessian.

Columns are quantized one at a time; each column's rounding error is spread over the columns
not yet quantized, in proportion to the inverse Hessian of the layer inputs, so the layer
*output* error on calibration activations shrinks rather than each weight's own error. By
default the most strongly used input channels go first (act-order), with every group's scale
and zero fixed before the pass; ``order="column"`` goes left to right and chooses a group's
scale when the group starts, from the weights as updated so far. Both use the same per-group
clip search as :func:`tap_convert.quantize.quantize_plane`.
"""

from __future__ import annotations

import torch

from tap_runtime.format import PlaneSpec
from tap_runtime.packing import pack_int4
from tap_runtime.planes import Plane, RowQuantized, dequantize_plane

from .quantize import _candidate, clip_ratios, scale_reference_for

__all__ = ["gptq_plane", "gptq_tiers", "gptq_rows", "DAMPING", "ROW_DAMPING", "GPTQ_ORDERS"]

# Fraction of the mean Hessian diagonal added to it before inverting: the weight of each weight's
# own error beside the layer's output error (the GPTQ reference code uses 0.01). The head's rows
# take 0.1: a tied embedding stores the same rows, and its lookups feel each row's own error,
# which light damping inflates; 0.1 gave the lowest KL of the tied matrix on calibration windows
# of gemma-3 and SmolLM2 (README, "GPTQ damping"; scripts/bench_head_damping.py). Planes keep
# 0.01 (scripts/bench_gptq_damping.py measures the alternatives).
DAMPING = 0.01
ROW_DAMPING = 0.1
_BLOCK = 128
_PARAMETER_ROWS = 256  # rows whose group parameters are searched at once
# Column orders gptq_plane knows; "activation" (act-order with static groups) is the default.
GPTQ_ORDERS = ("activation", "column")


def _group_parameters(
    groups: torch.Tensor, spec: PlaneSpec, importance: torch.Tensor, reference: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best clip ratio per row and group.

    groups: (out, group_size) with importance (group_size,), giving (out,) scales and zeros; or
    (out, groups, group_size) with importance (groups, group_size), giving (out, groups).
    """
    single = groups.dim() == 2
    groups3 = groups.unsqueeze(1) if single else groups
    best = None
    for ratio in clip_ratios(spec):
        scales, zeros = _candidate(groups3, ratio, spec, reference)
        values = spec.dequantize_codes(spec.round_codes(groups3 / scales + zeros))
        err = (((values - zeros) * scales - groups3) ** 2 * importance).sum(dim=-1, keepdim=True)
        if best is None:
            best = (err, scales, zeros)
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, scales, best[1]), torch.where(better, zeros, best[2]))
    shape = (groups3.shape[0],) if single else groups3.shape[:2]
    return best[1].reshape(shape), best[2].reshape(shape)


def _inverse_hessian_factor(hessian: torch.Tensor, dead: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; retries with more damping if H is not PD."""
    if not damping > 0:
        raise ValueError(f"GPTQ damping must be positive; got {damping}")
    hessian = hessian.clone()
    hessian[dead, dead] = 1.0
    damping = damping * torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(hessian + damping * (10**attempt) * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("layer-input Hessian is not positive definite even after damping x 1e5")


def _static_group_parameters(
    weight: torch.Tensor, spec: PlaneSpec, importance: torch.Tensor, reference: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's scale and zero, chosen up front from the weights before any compensation
    (all groups in one search: the same arithmetic as group by group)."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // spec.group_size, spec.group_size)
    importance = importance.reshape(-1, spec.group_size)
    # Row chunks keep each candidate's temporaries in cache.
    chunks = [_group_parameters(chunk, spec, importance, reference) for chunk in groups.split(_PARAMETER_ROWS)]
    return torch.cat([s for s, _ in chunks]), torch.cat([z for _, z in chunks])


def gptq_plane(
    weight: torch.Tensor,
    spec: PlaneSpec,
    hessian: torch.Tensor,
    order: str = "activation",
    damping: float = DAMPING,
    refit_rounds: int = 0,
    descent_sweeps: int = 0,
) -> Plane:
    """Quantize (out_features, in_features) ``weight`` into one plane, compensating with ``hessian``.

    Args:
        weight: float (out_features, in_features); in_features % group_size == 0.
        spec: the plane's bits, group size and symmetry.
        hessian: (in_features, in_features) mean of x x^T over calibration inputs.
        order: ``"activation"`` quantizes the most strongly used input channels first (the
            Hessian's diagonal, descending), so their errors are spread over the weaker channels
            still free to absorb them; group scales are then fixed up front from the weights
            (static groups), because the groups no longer start in column order. ``"column"``
            goes left to right and chooses each group's scale when the group starts.
        damping: fraction of the mean Hessian diagonal added to its diagonal.
        refit_rounds: after the pass, refit every group's scale and zero to the codes it chose
            (least squares under the Hessian) and run the pass again with them, this many times.
    Returns:
        a :class:`Plane` (same layout as ``quantize_plane``).
    """
    if order not in GPTQ_ORDERS:
        raise ValueError(f"GPTQ order {order!r} is unknown; expected one of {list(GPTQ_ORDERS)}")
    weight = weight.detach().to(torch.float32).clone()
    out_features, in_features = weight.shape
    hessian = hessian.to(torch.float32)
    dead = torch.diag(hessian) == 0
    weight[:, dead] = 0.0
    importance = torch.diag(hessian).clamp_min(0)
    importance = importance + importance.mean() * 1e-3 + 1e-12
    group_size = spec.group_size
    num_groups = in_features // group_size
    # From the weights before compensation: in column order a later group may want a larger
    # scale than this allows and is clipped a little more (the largest code is the reference).
    reference = scale_reference_for(weight, spec)
    if order == "activation":
        scales, zeros = _static_group_parameters(weight, spec, importance, reference)
        permutation = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    else:
        scales, zeros = torch.zeros(out_features, num_groups), torch.zeros(out_features, num_groups)
        permutation = torch.arange(in_features)
    # Work in the processing order: weight columns and the Hessian permuted alike.
    factor = _inverse_hessian_factor(hessian[permutation][:, permutation], dead[permutation], damping)
    codes = _gptq_pass(weight, permutation, factor, scales, zeros, spec, importance, reference, order)
    if refit_rounds:
        codes, scales, zeros = _refit_and_repass(
            weight, codes, scales, zeros, spec, hessian, reference, damping, refit_rounds,
            lambda s, z: _gptq_pass(weight, permutation, factor, s, z, spec, importance, reference, "activation"),
        )
    if descent_sweeps:
        damped = hessian + damping * torch.mean(torch.diag(hessian)) * torch.eye(in_features)
        codes = descend_codes(weight, codes, scales, zeros, spec, damped, descent_sweeps, permutation)
    return Plane(
        spec=spec,
        qweight=pack_int4(codes),
        scales=scales.to(torch.float16).contiguous(),
        zeros=None if spec.symmetric else zeros.to(torch.float16).contiguous(),
        scale_reference=reference,
    )


def _gptq_pass(
    weight: torch.Tensor,
    permutation: torch.Tensor,
    factor: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: PlaneSpec,
    importance: torch.Tensor,
    reference: torch.Tensor | None,
    order: str,
) -> torch.Tensor:
    """One GPTQ pass in ``permutation``'s order; returns the uint8 codes (out, in) in column order.

    ``order="column"`` chooses each group's scale and zero (into ``scales``/``zeros``, in place)
    when the group starts; otherwise they are fixed.
    """
    if order != "column":
        return _static_gptq_pass(weight, permutation, factor, scales, zeros, spec)
    out_features, in_features = weight.shape
    group_size = spec.group_size
    weight = weight[:, permutation].clone()
    original_columns = permutation.tolist()
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    block = max(_BLOCK // group_size, 1) * group_size  # column order: blocks hold whole groups
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        block_weight = weight[:, start:end].clone()
        block_errors = torch.zeros_like(block_weight)
        block_factor = factor[start:end, start:end]
        for i in range(end - start):
            column = original_columns[start + i]
            group = column // group_size
            if order == "column" and column % group_size == 0:
                s, z = _group_parameters(
                    block_weight[:, i : i + group_size], spec, importance[column : column + group_size], reference
                )
                scales[:, group], zeros[:, group] = s, z
            s, z = scales[:, group], zeros[:, group]
            q = spec.round_codes(block_weight[:, i] / s + z)
            codes[:, column] = q.to(torch.uint8)
            error = (block_weight[:, i] - (spec.dequantize_codes(q) - z) * s) / block_factor[i, i]
            block_weight[:, i:] -= error.unsqueeze(1) * block_factor[i, i:].unsqueeze(0)
            block_errors[:, i] = error
        weight[:, end:] -= block_errors @ factor[start:end, end:]
    return codes


def _static_gptq_pass(
    weight: torch.Tensor, permutation: torch.Tensor, factor: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: PlaneSpec
) -> torch.Tensor:
    """:func:`_gptq_pass` with every group's scale and zero fixed up front (act-order's static groups).

    The same arithmetic on the transposed weight: each column is a contiguous row, its scale
    and zero are gathered per column once, and the per-column work is a handful of in-place
    ops, since Python's per-op cost dominates at these widths.
    """
    out_features, in_features = weight.shape
    group_of_column = permutation // spec.group_size
    weight_t = weight.t()[permutation].contiguous()  # (in, out), processing order
    column_scales = scales.t()[group_of_column].to(torch.float32).contiguous()
    column_zeros = zeros.t()[group_of_column].to(torch.float32).contiguous()
    codes_t = torch.empty(in_features, out_features)
    max_code = float(2**spec.bits - 1)
    dequantized = torch.empty(out_features)
    if spec.levels is not None:
        table = spec.code_values()
        midpoints = (table[1:] + table[:-1]) / 2
        target = torch.empty(out_features)
    for start in range(0, in_features, _BLOCK):
        end = min(start + _BLOCK, in_features)
        block = weight_t[start:end]  # a view: updated in place
        block_errors = torch.empty(end - start, out_features)
        block_factor = factor[start:end, start:end]
        pivots = block_factor.diagonal().tolist()
        for i in range(end - start):
            column, s, z, q = block[i], column_scales[start + i], column_zeros[start + i], codes_t[start + i]
            if spec.levels is None:
                torch.div(column, s, out=q).add_(z).round_().clamp_(0.0, max_code)
                torch.sub(q, z, out=dequantized).mul_(s)
            else:
                code = torch.bucketize(torch.div(column, s, out=target).add_(z), midpoints)
                q.copy_(code)
                torch.sub(table[code], z, out=dequantized).mul_(s)
            error = torch.sub(column, dequantized, out=block_errors[i]).div_(pivots[i])
            if i + 1 < end - start:
                block[i + 1 :].sub_(block_factor[i, i + 1 :].unsqueeze(1) * error.unsqueeze(0))
        if end < in_features:
            weight_t[end:].sub_(factor[start:end, end:].t() @ block_errors)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    codes[:, permutation] = codes_t.t().to(torch.uint8)
    return codes


def _refit_and_repass(weight, codes, scales, zeros, spec, hessian, reference, damping, rounds, repass):
    """Alternate refitting the group parameters and GPTQ passes with them; per row (rows are
    independent in GPTQ) keep whichever codes and parameters gave the lowest output error."""
    damped = hessian.to(torch.float32) + damping * torch.mean(torch.diag(hessian)) * torch.eye(hessian.shape[0])
    best_error = _row_output_error(weight, codes, scales, zeros, spec, damped)
    for _ in range(rounds):
        refitted = refit_group_parameters(weight, codes, scales, zeros, spec, hessian, reference, damping)
        if refitted is None:
            break
        scales, zeros = refitted
        best_error = _row_output_error(weight, codes, scales, zeros, spec, damped)
        candidate = repass(scales.clone(), zeros.clone())
        error = _row_output_error(weight, candidate, scales, zeros, spec, damped)
        better = error < best_error
        codes = torch.where(better.unsqueeze(1), candidate, codes)
        best_error = torch.where(better, error, best_error)
    return codes, scales, zeros


def descend_codes(weight, codes, scales, zeros, spec: PlaneSpec, hessian, sweeps: int, order=None) -> torch.Tensor:
    """Cyclic coordinate descent on the codes: each code in turn set to the best one for the
    row's output error (w - w_hat) H (w - w_hat)^T with every other code held, all rows at once.

    GPTQ decides each code once, against weights it has not compensated yet; a sweep revisits
    every code with all the others known. A 1-D quadratic's best code is the one whose value is
    nearest its minimum, so no step can raise a row's error. Returns new uint8 codes (out, in).
    """
    out_features, in_features = weight.shape
    group_size = spec.group_size
    scale = scales.to(torch.float32).repeat_interleave(group_size, dim=1)
    zero = (torch.full_like(scales, spec.implied_zero) if spec.symmetric else zeros).to(torch.float32)
    zero = zero.repeat_interleave(group_size, dim=1)
    q = codes.to(torch.float32).clone()
    error = weight - (spec.dequantize_codes(q) - zero) * scale
    gradient = error @ hessian
    diagonal = torch.diag(hessian).clamp_min(1e-20)
    columns = (order if order is not None else torch.arange(in_features)).tolist()
    for _ in range(sweeps):
        moved = 0
        for i in columns:
            best_error = error[:, i] - gradient[:, i] / diagonal[i]
            new = spec.round_codes((weight[:, i] - best_error) / scale[:, i] + zero[:, i])
            changed = new != q[:, i]
            if not bool(changed.any()):
                continue
            rows = changed.nonzero().squeeze(1)
            step = spec.dequantize_codes(new[rows]) - spec.dequantize_codes(q[rows, i])
            delta = -step * scale[rows, i]
            error[rows, i] += delta
            gradient[rows] += delta.unsqueeze(1) * hessian[i].unsqueeze(0)
            q[rows, i] = new[rows]
            moved += rows.numel()
        if not moved:
            break
    return q.to(torch.uint8)


_REFIT_ROWS = 64  # rows whose normal equations are built at once: bounds the (rows, in, groups) work tensor


def refit_group_parameters(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: PlaneSpec,
    hessian: torch.Tensor,
    reference: torch.Tensor | None,
    damping: float = DAMPING,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each group's scale and zero refitted to fixed ``codes``: least squares under the Hessian.

    GPTQ fixes a group's scale before compensation moves its weights, so the scale it keeps was
    chosen for weights that are no longer the ones coded. With the codes fixed the dequantized
    row is linear in (scale, scale x zero) per group, and the row's output error
    (w - w_hat) H (w - w_hat)^T is a quadratic in them: one small solve per row. The result is
    rounded to the stored grids (offset re-solved after the scale is rounded); a row keeps its
    old parameters wherever the rounded refit is not better. Returns None when nothing changed.
    """
    out_features, in_features = weight.shape
    group_size = spec.group_size
    groups = in_features // group_size
    hessian = hessian.to(torch.float32).clone()
    hessian += damping * torch.mean(torch.diag(hessian)) * torch.eye(in_features)
    hessian_blocks = hessian.view(in_features, groups, group_size)
    row_sums = hessian_blocks.sum(-1)  # (in, groups): sum of H[i, j] over j in group h
    offset_normal = row_sums.view(groups, group_size, groups).sum(1)  # (groups, groups)
    weighted = weight @ hessian  # (out, in)
    mid = spec.implied_zero
    new_scales, new_zeros = scales.clone(), zeros.clone()
    for first in range(0, out_features, _REFIT_ROWS):
        rows = slice(first, min(first + _REFIT_ROWS, out_features))
        q = spec.dequantize_codes(codes[rows])
        if spec.symmetric:
            q = q - mid
        count = q.shape[0]
        q3 = q.view(count, groups, group_size)
        partial = torch.einsum("ihj,chj->cih", hessian_blocks, q3)  # (c, in, groups)
        code_normal = torch.einsum("cgi,cgih->cgh", q3, partial.view(count, groups, group_size, groups))
        code_rhs = (q * weighted[rows]).view(count, groups, group_size).sum(-1)
        if spec.symmetric:
            solved = _solve_rows(code_normal, code_rhs)
            if solved is None:
                continue
            fitted = spec.round_scales(solved.clamp_min(0), reference)
            new_scales[rows] = torch.where(solved > 0, fitted, scales[rows])
            continue
        cross = torch.einsum("cgi,gih->cgh", q3, row_sums.view(groups, group_size, groups))  # (c, groups, groups)
        offset_rhs = weighted[rows].view(count, groups, group_size).sum(-1)
        normal = torch.cat(
            [torch.cat([code_normal, cross], 2), torch.cat([cross.transpose(1, 2), offset_normal.expand(count, -1, -1)], 2)], 1
        )
        solved = _solve_rows(normal, torch.cat([code_rhs, offset_rhs], 1))
        if solved is None:
            continue
        slope = solved[:, :groups]
        fitted = spec.round_scales(slope.clamp_min(1e-10), reference)
        fitted = torch.where(slope > 0, fitted, scales[rows])
        # The best offsets for the scales as stored, then zero = -offset / scale on its grid.
        offsets = torch.linalg.solve(offset_normal, (offset_rhs - torch.einsum("cgh,cg->ch", cross, fitted)).T).T
        new_scales[rows] = fitted
        new_zeros[rows] = spec.round_zeros(-offsets / fitted)
    old_error = _row_output_error(weight, codes, scales, zeros, spec, hessian)
    new_error = _row_output_error(weight, codes, new_scales, new_zeros, spec, hessian)
    better = new_error < old_error
    if not bool(better.any()):
        return None
    keep = better.unsqueeze(1)
    return torch.where(keep, new_scales, scales), torch.where(keep, new_zeros, zeros)


def _solve_rows(normal: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """Batched solve of (c, n, n) x = (c, n); a tiny ridge keeps constant groups solvable."""
    ridge = 1e-9 * normal.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    eye = torch.eye(normal.shape[1]).expand_as(normal)
    solution, info = torch.linalg.solve_ex(normal + ridge[:, None, None] * eye, rhs.unsqueeze(-1))
    if bool((info != 0).all()):
        return None
    return torch.where(torch.isfinite(solution.squeeze(-1)), solution.squeeze(-1), torch.zeros_like(rhs))


def _row_output_error(weight, codes, scales, zeros, spec: PlaneSpec, hessian: torch.Tensor) -> torch.Tensor:
    """(out,) each row's (w - w_hat) H (w - w_hat)^T for the given group parameters."""
    out_features, in_features = weight.shape
    q = spec.dequantize_codes(codes).view(out_features, -1, spec.group_size)
    zero = torch.full_like(scales, spec.implied_zero) if spec.symmetric else zeros
    error = weight - ((q - zero.unsqueeze(-1)) * scales.unsqueeze(-1)).view(out_features, in_features)
    return ((error @ hessian) * error).sum(1)


def gptq_tiers(
    weight: torch.Tensor,
    specs: tuple[PlaneSpec, ...] | list[PlaneSpec],
    hessian: torch.Tensor,
    order: str = "activation",
    damping: float = DAMPING,
    refit_rounds: int = 0,
    descent_sweeps: int = 0,
) -> list[Plane]:
    """Nested planes, each error-compensated: plane k quantizes what planes 0..k-1 left."""
    remainder = weight.detach().to(torch.float32)
    planes: list[Plane] = []
    for spec in specs:
        plane = gptq_plane(remainder, spec, hessian, order, damping, refit_rounds, descent_sweeps)
        planes.append(plane)
        remainder = remainder - dequantize_plane(plane)
    return planes


_ROW_CHUNK = 16384  # rows (vocabulary entries) compensated at once: bounds the working copy


def gptq_rows(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 8, damping: float = ROW_DAMPING) -> RowQuantized:
    """Symmetric per-row int8 (the output head's format), error-compensated with ``hessian``.

    The head's output error on the final hidden states, not each weight's own error, is what
    the logits feel: round-to-nearest 8-bit rows cost SmolLM2 0.3% perplexity at tier 8, a third
    of that tier's whole loss. Scales stay those of round-to-nearest (row max / 127), so a code
    the compensation pushes past the range clips there.
    """
    if bits != 8:
        raise ValueError(f"only 8-bit rows are supported; got bits={bits}")
    weight = weight.detach().to(torch.float32)
    rows, in_features = weight.shape
    hessian = hessian.to(torch.float32)
    dead = torch.diag(hessian) == 0
    factor = _inverse_hessian_factor(hessian, dead, damping)
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-8).to(torch.float16)
    scales_f32 = scales.to(torch.float32).clamp_min(1e-8)
    codes = torch.empty(rows, in_features, dtype=torch.int8)
    quantized = torch.empty(min(rows, _ROW_CHUNK))
    for first in range(0, rows, _ROW_CHUNK):
        # Transposed, so each column is a contiguous row and each step a few in-place ops.
        chunk_t = weight[first : first + _ROW_CHUNK].t().contiguous()
        chunk_t[dead] = 0.0
        count = chunk_t.shape[1]
        scale = scales_f32[first : first + _ROW_CHUNK]
        q = quantized[:count]
        codes_t = torch.empty(in_features, count, dtype=torch.int8)
        for start in range(0, in_features, _BLOCK):
            end = min(start + _BLOCK, in_features)
            block = chunk_t[start:end]
            block_errors = torch.empty(end - start, count)
            block_factor = factor[start:end, start:end]
            pivots = block_factor.diagonal().tolist()
            for i in range(end - start):
                torch.div(block[i], scale, out=q).round_().clamp_(-127, 127)
                codes_t[start + i] = q.to(torch.int8)
                error = torch.sub(block[i], q.mul_(scale), out=block_errors[i]).div_(pivots[i])
                if i + 1 < end - start:
                    block[i + 1 :].sub_(block_factor[i, i + 1 :].unsqueeze(1) * error.unsqueeze(0))
            if end < in_features:
                chunk_t[end:].sub_(factor[start:end, end:].t() @ block_errors)
        codes[first : first + _ROW_CHUNK] = codes_t.t()
    return RowQuantized(qweight=codes.contiguous(), scales=scales.contiguous())
