"""Model ids and paths: nothing named by a client may leave the models directory."""

from __future__ import annotations

import re
from pathlib import Path

# One directory name, or "org/name": no absolute paths, no "..", nothing that could climb out.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelPathError(ValueError):
    """A model id or path that is malformed or points outside the models directory."""


def valid_model_id(model: str) -> bool:
    return bool(_MODEL_ID.match(model)) and ".." not in model


def resolve_model_path(models_dir: Path, name: str, must_exist: bool = True) -> Path:
    """models_dir / name, refusing absolute paths, "..", and symlinks that lead outside models_dir."""
    if not valid_model_id(name):
        raise ModelPathError(f"{name!r} is not a model id (letters, digits, '.', '_', '-', at most one '/')")
    root = models_dir.resolve()
    path = (models_dir / name).resolve()
    if not path.is_relative_to(root):
        raise ModelPathError(f"{name!r} leads outside the models directory")
    if must_exist and not path.exists():
        raise ModelPathError(f"no model {name!r} in the models directory")
    return path
