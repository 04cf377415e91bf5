"""The public-domain text Trellis calibrates on (shared/calibration_text/): the converter's Hessians and the worker's
key centering for quantized KV caches read the same files."""

from __future__ import annotations

from pathlib import Path

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration_text"


def calibration_text(directory: Path = CALIBRATION_DIR) -> str:
    """Every ``*.txt`` in the calibration folder, in name order, joined by blank lines."""
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no calibration text (*.txt) in {directory}")
    return "\n\n".join(f.read_text(encoding="utf-8").replace("\r\n", "\n") for f in files)
