"""A model directory with another one's shapes, tokenizer and config, and random weights: for timing runs on a machine
that cannot receive the real weights (the GPU host takes at most 64 MiB per call; the default model is ~100 MB).

    python bench/random_weights.py spec MODEL_DIR SPEC.json      # tensor names, shapes and dtypes of MODEL_DIR
    python bench/random_weights.py write SPEC.json FROM_DIR OUT_DIR   # OUT_DIR: FROM_DIR's small files + random weights

Speed does not depend on the weights' values where the output length is fixed (``ignore_eos``), so a serving or step
benchmark on such a directory times what the real model would; its text is noise. Norm weights are ones, the rest
N(0, 0.02) in the spec's dtype, from a fixed seed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.model_dir import TensorSource  # noqa: E402

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def spec(model_dir: Path) -> dict[str, dict]:
    """Every tensor's shape and dtype, read the way the worker reads the directory (sharded or not)."""
    with TensorSource(model_dir) as source:
        return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for name in source.keys() for t in [source.get(name)]}  # fmt: skip


def write(spec_path: Path, from_dir: Path, out_dir: Path) -> None:
    tensors = json.loads(spec_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (from_dir / name).is_file():
            shutil.copy(from_dir / name, out_dir / name)
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(t["shape"], dtype=getattr(torch, t["dtype"]))
        else:
            weights[name] = (0.02 * torch.randn(t["shape"], generator=gen)).to(getattr(torch, t["dtype"]))
    save_file(weights, str(out_dir / "model.safetensors"))


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "spec":
        Path(argv[2]).write_text(json.dumps(spec(Path(argv[1]))))
        return 0
    if len(argv) == 4 and argv[0] == "write":
        write(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
