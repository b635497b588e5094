"""Build the calibration samples bundled in calibration/data/ from ../shared/data/.

WikiText-2 validation is split at the article boundary nearest its middle: the first half is
bundled for calibration, the second half is what scripts/bench_quality.py evaluates on, so
calibration never sees evaluation text. C4: documents 0-999 are bundled, 1000-1999 are for
evaluation. Rerun with: python scripts/build_calibration_samples.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
OUT_DIR = REPO / "calibration" / "data"
C4_CALIBRATION_DOCS = 1000


def wikitext_split_line(lines: list[str]) -> int:
    """Index of the first line of the article that starts nearest the middle of the file."""
    starts = [i for i, line in enumerate(lines) if line.startswith(" = ") and not line.startswith(" = = ")]
    middle = len(lines) // 2
    return min(starts, key=lambda i: abs(i - middle))


def write_gzip_text(path: Path, documents: list[str]) -> None:
    data = "\n\n".join(d.strip() for d in documents if d.strip()).encode("utf-8")
    # mtime=0 keeps the archive byte-identical across rebuilds.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as handle:
        handle.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    args = parser.parse_args()
    valid = args.shared_data / "wikitext-2" / "valid.txt"
    lines = valid.read_text(encoding="utf-8").splitlines()
    split = wikitext_split_line(lines)
    write_gzip_text(OUT_DIR / "wikitext2_calibration.txt.gz", lines[:split])

    import pyarrow.parquet as pq

    c4 = pq.read_table(args.shared_data / "c4" / "c4_validation_2k.parquet").column("text").to_pylist()
    write_gzip_text(OUT_DIR / "c4_calibration.txt.gz", c4[:C4_CALIBRATION_DOCS])
    manifest = {
        "wikitext2_calibration.txt.gz": {
            "source": "wikitext-2/valid.txt",
            "source_sha256": hashlib.sha256(valid.read_bytes()).hexdigest(),
            "lines": [0, split],
            "evaluation_lines": [split, len(lines)],
        },
        "c4_calibration.txt.gz": {
            "source": "c4/c4_validation_2k.parquet",
            "documents": [0, C4_CALIBRATION_DOCS],
            "evaluation_documents": [C4_CALIBRATION_DOCS, len(c4)],
        },
    }
    (OUT_DIR / "samples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
