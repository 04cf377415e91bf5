"""The text Trellis calibrates on (shared/calibration_text/): the converter's Hessians and the worker's key centering
for quantized KV caches read the same files. ``trellis convert --cal-text`` can point the converter elsewhere."""

from __future__ import annotations

import hashlib
from pathlib import Path

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration_text"


def calibration_text(source: Path | None = None) -> str:
    """A text file's contents, or every ``*.txt`` in a folder in name order joined by blank lines; None: the text
    that ships with Trellis."""
    source = CALIBRATION_DIR if source is None else Path(source)
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(source.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no calibration text (*.txt) in {source}")
    else:
        raise FileNotFoundError(f"calibration text {source} is neither a file nor a folder")
    text = "\n\n".join(f.read_text(encoding="utf-8").replace("\r\n", "\n") for f in files)
    if not text.strip():
        raise ValueError(f"the calibration text in {source} is empty")
    return text


def text_digest(text: str) -> str:
    """SHA-256 of the text: what a resumed conversion compares to know it calibrates on the same words."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
