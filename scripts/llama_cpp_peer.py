"""llama.cpp as a peer: HF model -> f32 GGUF -> (importance matrix) -> Q8_0 / Q4_K_M / Q4_0.

Uses llama.cpp's own tools (convert_hf_to_gguf.py, llama-imatrix, llama-quantize) and reads
logits through the llama-cpp-python binding, feeding the very token ids the other rows see.
``scripts/setup_llama_cpp.sh`` builds the tools and installs the binding (offline, from the
llama-cpp-python sdist on PyPI). Files are cached under models/.llama.cpp/work.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench_common import REPO

LLAMA_CPP_DIR = REPO / "models" / ".llama.cpp"
TOOLS = Path(os.environ.get("LLAMA_CPP_TOOLS", LLAMA_CPP_DIR / "build" / "bin"))
SOURCE = Path(os.environ.get("LLAMA_CPP_SOURCE", LLAMA_CPP_DIR / "src" / "vendor" / "llama.cpp"))
WORK = LLAMA_CPP_DIR / "work"

__all__ = ["f32_gguf", "importance_matrix", "quantize", "linear_bits_per_weight", "LlamaCppLogits", "ensure_available"]


def ensure_available() -> None:
    """Raise with the set-up command when the tools or the binding are missing."""
    missing = [str(TOOLS / t) for t in ("llama-quantize", "llama-imatrix") if not (TOOLS / t).is_file()]
    if not (SOURCE / "convert_hf_to_gguf.py").is_file():
        missing.append(str(SOURCE / "convert_hf_to_gguf.py"))
    if missing:
        raise FileNotFoundError(f"llama.cpp tools not found ({', '.join(missing)}); run scripts/setup_llama_cpp.sh")
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(TOOLS))
    import llama_cpp  # noqa: F401  (ImportError names the missing binding)


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SOURCE / "gguf-py")})
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command[:3])} ...):\n{done.stderr[-1500:]}")


def f32_gguf(model_dir: str) -> Path:
    """The HF model as a float32 GGUF (llama.cpp's converter; cached)."""
    out = WORK / f"{Path(model_dir).resolve().name}-f32.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        _run([sys.executable, str(SOURCE / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32", "--outfile", str(partial)], "convert_hf_to_gguf")
        partial.rename(out)
    return out


def importance_matrix(f32: Path, calibration_text: str, calib_name: str, ctx: int, chunks: int, threads: int) -> Path:
    """llama-imatrix over the calibration text TAP was fitted on (cached per text and settings)."""
    digest = hashlib.sha256(calibration_text.encode()).hexdigest()[:12]
    out = WORK / f"{f32.stem}-imatrix-{calib_name}-{digest}-c{ctx}x{chunks}.gguf"
    if not out.is_file():
        text_file = WORK / f"calib-{calib_name}-{digest}.txt"
        text_file.write_text(calibration_text, encoding="utf-8")
        partial = out.with_suffix(".partial.gguf")
        _run([str(TOOLS / "llama-imatrix"), "-m", str(f32), "-f", str(text_file), "-o", str(partial), "-c", str(ctx),
              "--chunks", str(chunks), "-t", str(threads), "--no-ppl"], "llama-imatrix")
        partial.rename(out)
    return out


def quantize(f32: Path, qtype: str, threads: int, imatrix: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
    """llama-quantize to ``qtype`` (optionally with an importance matrix and extra flags)."""
    tag = (f"-im-{imatrix.stem[-24:]}" if imatrix else "") + ("-" + "-".join(a.strip("-") for a in extra) if extra else "")
    out = WORK / f"{f32.stem.removesuffix('-f32')}-{qtype}{tag}.gguf"
    if not out.is_file():
        partial = out.with_suffix(".partial.gguf")
        command = [str(TOOLS / "llama-quantize"), *extra]
        if imatrix is not None:
            command += ["--imatrix", str(imatrix)]
        _run(command + [str(f32), str(partial), qtype, str(threads)], "llama-quantize")
        partial.rename(out)
    return out


def linear_bits_per_weight(gguf: Path) -> float:
    """Bits per weight of the decoder's 2-D weights (blk.*), read from the file's tensor sizes."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    nbytes = elements = 0
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2:
            nbytes += int(tensor.n_bytes)
            elements += int(tensor.n_elements)
    return 8 * nbytes / elements


class LlamaCppLogits:
    """Calls like a transformers model on (1, seq) ids and returns ``.logits`` (1, seq, vocab)."""

    def __init__(self, gguf: Path, ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False)

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        tokens = ids[0].tolist()
        self.llm.reset()
        self.llm.eval(tokens)
        scores = np.array(self.llm.scores[: len(tokens)], dtype=np.float32, copy=True)
        return SimpleNamespace(logits=torch.from_numpy(scores).unsqueeze(0))

    def close(self) -> None:
        self.llm.close()
