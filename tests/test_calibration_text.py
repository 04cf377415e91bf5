"""The calibration text: what ships, how a user's own text is read, and that no evaluation text leaks into it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.calibration import CALIBRATION_DIR, calibration_text, text_digest

EVAL_TEXT = Path(__file__).resolve().parent / "data" / "eval" / "britannica-11th-slice.txt"


def test_the_shipped_folder_is_read_in_name_order_and_every_file_is_documented() -> None:
    files = sorted(CALIBRATION_DIR.glob("*.txt"))
    assert len(files) >= 2
    text = calibration_text()
    starts = [text.index(f.read_text(encoding="utf-8")[:200]) for f in files]
    assert starts == sorted(starts)
    readme = (CALIBRATION_DIR / "README.md").read_text(encoding="utf-8")
    for f in files:
        assert f"`{f.name}`" in readme, f"{f.name} has no row in the calibration README"


def test_no_evaluation_sentence_is_in_the_calibration_text() -> None:
    calibration = " ".join(calibration_text().split())
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.;])\s+", EVAL_TEXT.read_text(encoding="utf-8"))]
    long_ones = [s for s in sentences if len(s) > 80]
    assert len(long_ones) > 50
    leaked = [s for s in long_ones if s in calibration]
    assert not leaked, f"evaluation text found in the calibration text: {leaked[:2]}"


def test_a_users_file_or_folder_is_read_and_bad_paths_are_named(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\r\nfile", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert calibration_text(tmp_path) == "first\n\nsecond\nfile"
    assert calibration_text(tmp_path / "b.txt") == "second\nfile"
    assert text_digest("first") != text_digest("first ")
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        calibration_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no calibration text \(\*\.txt\)"):
        calibration_text(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        calibration_text(tmp_path / "blank.txt")
