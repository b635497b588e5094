"""What the format's storage choices cost or save, measured on a real model's weights.

Three measurements, none of which read evaluation text:
1. The embedding's 8-bit rows: relative round-to-nearest error for each column-scale exponent
   (what the converter chooses from, ``tap_convert/column_scales.py``).
2. Asymmetric 4-bit planes (groups of 64, importance-free clip search) of every linear in one
   decoder layer: plane error with float16 zero points, one-byte eighths (format 2), integers,
   and eighths with 8-bit log-coded scales (format 3); then the symmetric residual plane of what
   the format-3 base plane left, with float16 and with 8-bit scales.
3. With ``--tap`` checkpoints: the stored head rows' logit error and embedding error against the
   source, on the final hidden states of a few calibration windows.

    python scripts/bench_storage_precision.py --model models/gemma3 --layer 3 \
        --tap models/gemma3-tap-sink models/gemma3-tap-v2
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import torch
from safetensors import safe_open

from bench_common import set_threads
from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_convert import quantize as quantize_module
from tap_convert.column_scales import choose_column_scales
from tap_runtime.format import PlaneSpec
from tap_runtime.planes import dequantize_plane


def _source_tensors(model_dir: str) -> dict[str, str]:
    """Tensor name -> shard file of the fp32 source."""
    names = {}
    for shard in sorted(glob.glob(f"{model_dir}/*.safetensors")):
        with safe_open(shard, "pt") as handle:
            names.update({key: shard for key in handle.keys()})
    return names


def _read(names: dict[str, str], key: str) -> torch.Tensor:
    with safe_open(names[key], "pt") as handle:
        return handle.get_tensor(key).to(torch.float32)


def _plane_error(weight: torch.Tensor, spec: PlaneSpec, integer_zeros: bool) -> float:
    original = quantize_module._candidate

    def integer(groups, ratio, plane_spec, reference=None):
        scales, zeros = original(groups, ratio, plane_spec, reference)
        return scales, torch.clamp(torch.round(zeros), 0, 2**plane_spec.bits - 1)

    quantize_module._candidate = integer if integer_zeros else original
    try:
        plane = quantize_module.quantize_plane(weight, spec)
    finally:
        quantize_module._candidate = original
    return float((dequantize_plane(plane) - weight).pow(2).sum() / weight.pow(2).sum())


def _residual_errors(weight: torch.Tensor) -> tuple[float, float]:
    """Relative error of tier 8 (format-3 base plus a residual with float16, then 8-bit, scales)."""
    base = quantize_module.quantize_plane(weight, PlaneSpec(4, 64, False))
    remainder = weight - dequantize_plane(base)
    errors = []
    for scale_bits in (16, 8):
        residual = quantize_module.quantize_plane(remainder, PlaneSpec(4, 64, True, scale_bits=scale_bits))
        errors.append(float((remainder - dequantize_plane(residual)).pow(2).sum() / weight.pow(2).sum()))
    return errors[0], errors[1]


def _stored_rows(checkpoint: str, name: str) -> torch.Tensor:
    shard = glob.glob(f"{checkpoint}/model-*.safetensors")[0]
    with safe_open(shard, "pt") as handle:
        rows = handle.get_tensor(f"{name}.weight").to(torch.float32) * handle.get_tensor(f"{name}.weight_scales").to(torch.float32)[:, None]
        if f"{name}.weight_column_scales" in handle.keys():
            rows = rows * handle.get_tensor(f"{name}.weight_column_scales")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="fp32 source model directory")
    parser.add_argument("--layer", type=int, default=3, help="decoder layer whose linears are measured")
    parser.add_argument("--tap", nargs="*", default=[], help="TAP checkpoints whose head rows to compare")
    parser.add_argument("--windows", type=int, default=4, help="calibration windows for the head's inputs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    names = _source_tensors(args.model)
    embedding_key = next(k for k in names if k.endswith("embed_tokens.weight"))
    embedding = _read(names, embedding_key)
    exponent, _, errors = choose_column_scales(embedding)
    print(f"# {args.model}: embedding {tuple(embedding.shape)}, relative round-to-nearest row error per column-scale exponent")
    print("exponent  row error")
    for alpha, error in errors.items():
        print(f"{alpha:8.2f}  {error:.3e}{'  (chosen)' if alpha == exponent else ''}")

    print(f"\n# layer {args.layer}: asymmetric 4-bit g64 plane error by zero-point and scale storage "
          "(ratio to float16 scales and zeros); tier-8 residual error by scale storage")
    print(f"{'linear':28s} {'float16':>10s} {'eighths':>10s} {'integer':>10s} {'8b scales':>10s} "
          f"{'t8 f16 sc':>10s} {'t8 8b sc':>10s}")
    prefix = f".layers.{args.layer}."
    for key in sorted(k for k in names if prefix in k and k.endswith("proj.weight")):
        weight = _read(names, key)
        errors = [
            _plane_error(weight, PlaneSpec(4, 64, False, zero_bits=16, scale_bits=16), False),
            _plane_error(weight, PlaneSpec(4, 64, False, zero_bits=8, scale_bits=16), False),
            _plane_error(weight, PlaneSpec(4, 64, False, zero_bits=16, scale_bits=16), True),
            _plane_error(weight, PlaneSpec(4, 64, False, zero_bits=8, scale_bits=8), False),
        ]
        tier8_f16, tier8_8bit = _residual_errors(weight)
        ratios = " ".join(f"{e / errors[0]:10.4f}" for e in errors[1:])
        print(f"{key.split(prefix)[1]:28s} {errors[0]:10.3e} {ratios} {tier8_f16:10.3e} {tier8_8bit / tier8_f16:10.4f}")

    if not args.tap:
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenize_text(tokenizer, load_calibration_text("wikitext"))
    windows = make_windows(ids, args.windows, 256, seed=0, bos_token_id=tokenizer.bos_token_id)
    captured: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    hook.remove()
    hidden = torch.cat(captured)
    reference_weight = head.weight.detach()
    reference = hidden @ reference_weight.t()
    print(f"\n# head rows on {args.windows} calibration windows of 256 tokens: relative logit error, embedding error")
    for checkpoint in args.tap:
        table = json.loads((Path(checkpoint) / "tap_routing.json").read_text())
        name = next(n for n, e in table["embeddings"].items() if e["role"] == "embedding")
        rows = _stored_rows(checkpoint, name)
        logits = hidden @ rows.t()
        logit_error = float((logits - reference).pow(2).sum() / reference.pow(2).sum())
        embedding_error = float((rows - embedding).pow(2).sum() / embedding.pow(2).sum())
        print(f"{checkpoint:40s} logits {logit_error:.3e}  embedding {embedding_error:.3e}")


if __name__ == "__main__":
    main()
