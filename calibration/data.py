"""Calibration text: find it (Hub, bundled sample or a local file) and cut it into token windows.

``wikitext`` reads ``wikitext-2-raw-v1`` (train) through ``datasets`` when the Hub is reachable
and otherwise falls back, with one log line, to the sample bundled in ``calibration/data/``.
``c4`` is the bundled C4 sample. A path may be a .txt, .jsonl or .parquet file with a ``text``
column, or a directory saved with ``datasets``' ``save_to_disk``. ``wikitext+c4`` (any sources
joined by ``+``) mixes them in equal parts, so that no one domain's statistics decide the planes.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch

from tap_runtime.errors import CalibrationDataError

__all__ = [
    "BUNDLED_SAMPLES",
    "CalibrationText",
    "load_calibration_text",
    "text_token_ids",
    "tokenize_text",
    "make_windows",
]

_log = logging.getLogger(__name__)

# name -> (bundled file, what it is)
BUNDLED_SAMPLES = {
    "wikitext": ("wikitext2_calibration.txt.gz", "WikiText-2 validation, first half of the articles (CC BY-SA 3.0)"),
    "c4": ("c4_calibration.txt.gz", "C4 validation, documents 0-999 of the shared 2k sample (ODC-BY)"),
}
_HUB_DATASETS = {"wikitext": ("wikitext", "wikitext-2-raw-v1", "train")}
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class CalibrationText:
    """Documents of calibration text and where they came from (recorded in the routing table)."""

    documents: list[str]
    dataset: str
    source: str

    @property
    def num_characters(self) -> int:
        return sum(len(d) for d in self.documents)


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "", "false"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _read_bundled(name: str) -> CalibrationText:
    file_name, description = BUNDLED_SAMPLES[name]
    resource = resources.files("calibration").joinpath("data").joinpath(file_name)
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
        documents = [d for d in handle.read().split("\n\n") if d.strip()]
    return CalibrationText(documents, dataset=name, source=f"bundled:{file_name} ({description})")


def _from_hub(name: str) -> CalibrationText | None:
    path, config, split = _HUB_DATASETS[name]
    if not _hub_reachable():
        return None
    try:
        import datasets

        data = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # network errors surface as many types; any of them means "use the sample"
        _log.info("loading %s/%s from the Hub failed: %s", path, config, exc)
        return None
    documents = [t for t in data["text"] if t.strip()]
    return CalibrationText(documents, dataset=name, source=f"hub:{path}/{config}:{split}")


def _text_column(rows: list[dict], path: Path) -> list[str]:
    if not rows or "text" not in rows[0]:
        raise CalibrationDataError(
            f"{path}: no 'text' column; expected records with a 'text' field. Rename the column or pass a .txt file."
        )
    return [str(r["text"]) for r in rows if str(r.get("text", "")).strip()]


def _read_path(path: Path) -> CalibrationText:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise CalibrationDataError(
                f"{path}: not a dataset saved with save_to_disk ({exc}); expected a datasets directory."
            ) from exc
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        if "text" not in data.column_names:
            raise CalibrationDataError(f"{path}: no 'text' column; expected one, got {data.column_names}.")
        documents = [t for t in data["text"] if t and t.strip()]
    elif suffix in (".txt", ".txt.gz"):
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            documents = [d for d in handle.read().split("\n\n") if d.strip()]
    elif suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise CalibrationDataError(f"{path}:{line_number}: not valid JSON ({exc}).") from exc
        documents = _text_column(rows, path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CalibrationDataError(f"{path}: no 'text' column; expected one, got {table.column_names}.")
        documents = [t for t in table.column("text").to_pylist() if t and t.strip()]
    else:
        raise CalibrationDataError(
            f"{path}: unsupported calibration file type {suffix!r}; expected .txt, .jsonl, .parquet or a "
            f"saved datasets directory."
        )
    return CalibrationText(documents, dataset=path.name, source=f"file:{path.resolve()}")


def _equal_parts(texts: list[CalibrationText]) -> CalibrationText:
    """The sources one after another, each cut to the shortest one's characters (whole documents,
    the last one cut), so windows drawn uniformly from the stream fall on each in equal shares."""
    limit = min(text.num_characters for text in texts)
    documents: list[str] = []
    for text in texts:
        left = limit
        for document in text.documents:
            if left <= 0:
                break
            documents.append(document[:left])
            left -= len(document)
    return CalibrationText(
        documents,
        dataset="+".join(text.dataset for text in texts),
        source=" + ".join(text.source for text in texts) + f" (equal parts, {limit} characters each)",
    )


def load_calibration_text(name_or_path: str) -> CalibrationText:
    """Resolve ``--calib``: ``wikitext``, ``c4``, a path, or several joined by ``+`` (equal parts).

    Example:
        >>> load_calibration_text("c4").dataset
        'c4'
    """
    if "+" in name_or_path and not Path(name_or_path).expanduser().exists():
        parts = [part.strip() for part in name_or_path.split("+")]
        if len(parts) < 2 or not all(parts):
            raise CalibrationDataError(f"{name_or_path!r}: a mix needs two or more sources joined by '+', e.g. 'wikitext+c4'.")
        return _equal_parts([load_calibration_text(part) for part in parts])
    if name_or_path in _HUB_DATASETS:
        text = _from_hub(name_or_path)
        if text is not None:
            return text
        file_name = BUNDLED_SAMPLES[name_or_path][0]
        _log.warning("%s: Hub not reachable; using the bundled sample calibration/data/%s", name_or_path, file_name)
        return _read_bundled(name_or_path)
    if name_or_path in BUNDLED_SAMPLES:
        return _read_bundled(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise CalibrationDataError(
            f"{path}: calibration data not found; expected 'wikitext', 'c4' or an existing .txt/.jsonl/.parquet "
            f"file or datasets directory."
        )
    text = _read_path(path)
    if not text.documents:
        raise CalibrationDataError(f"{path}: contains no text; expected non-empty documents.")
    return text


def text_token_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` read as plain text: a special token's spelling inside it (WikiText's
    ``<unk>`` markers) becomes ordinary characters, as llama.cpp's perplexity tool reads it.

    By default a Hugging Face tokenizer turns such a spelling into the reserved id itself, which
    no model is trained to predict: gemma-3 gives its ``<unk>`` id 20-33 nats, and the 4.4% of
    WikiText's tokens that spell it carried a fifth of its log-perplexity, so quantization
    noise on logits that never matter moved perplexity ratios by points."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def tokenize_text(tokenizer, text: CalibrationText) -> torch.Tensor:
    """All documents as one 1-D LongTensor of ids (:func:`text_token_ids`), documents separated
    by a blank line."""
    ids: list[int] = []
    separator = text_token_ids(tokenizer, "\n\n")
    for document in text.documents:
        ids.extend(text_token_ids(tokenizer, document))
        ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


def make_windows(
    token_ids: torch.Tensor,
    num_samples: int,
    seq_len: int,
    seed: int,
    bos_token_id: int | None = None,
    source: str = "calibration text",
) -> torch.Tensor:
    """Cut ``num_samples`` non-overlapping windows of ``seq_len`` tokens, chosen with ``seed``.

    With ``bos_token_id`` every window starts with BOS followed by ``seq_len - 1`` text tokens.
    Returns a LongTensor (num_samples, seq_len). Raises CalibrationDataError when the text is
    too short, saying how many tokens there are and how many were needed.
    """
    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"{source}: need num_samples >= 1 and seq_len >= 2; got {num_samples} and {seq_len}.")
    body = seq_len - 1 if bos_token_id is not None else seq_len
    available = token_ids.numel() // body
    if available < num_samples:
        raise CalibrationDataError(
            f"{source}: too little text; expected at least {num_samples * body} tokens for {num_samples} windows "
            f"of {seq_len}, got {token_ids.numel()} tokens ({available} windows). Pass fewer --num-samples, a "
            f"shorter --seq-len or more text."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:num_samples].sort().values
    windows = token_ids[: available * body].view(available, body)[chosen]
    if bos_token_id is not None:
        windows = torch.cat([torch.full((num_samples, 1), bos_token_id, dtype=torch.long), windows], dim=1)
    return windows.contiguous()
