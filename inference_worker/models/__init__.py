"""Every supported model family, and how a config.json picks one.

One module per family, each declaring an ``ArchSpec`` (spec.py); they all run on the shared model in decoder.py.
Adding a family means adding its module and one entry in ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

from inference_worker.models import llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from inference_worker.models.spec import ArchSpec

FAMILIES: tuple[ArchSpec, ...] = (
    llama.SPEC,
    mistral.SPEC,
    qwen2.SPEC,
    qwen3.SPEC,
    mixtral.SPEC,
    qwen2_moe.SPEC,
    qwen3_moe.SPEC,
)
# config.json "architectures" name -> family; "model_type" -> family (the fallback when no name is known)
ARCHITECTURES: dict[str, ArchSpec] = {name: spec for spec in FAMILIES for name in spec.architectures}
MODEL_TYPES: dict[str, ArchSpec] = {kind: spec for spec in FAMILIES for kind in spec.model_types}


def find_spec(config: dict[str, Any], where: object = "config.json") -> ArchSpec:
    """The family of a config.json dict, from its ``architectures`` names, else its ``model_type``.

    Raises ValueError naming what the config declares and listing every supported architecture."""
    names = config.get("architectures") or []
    if not isinstance(names, list):
        names = [names]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    declared = " / ".join(str(n) for n in names) or None
    if declared is None and model_type is None:
        raise ValueError(
            f"{where} has neither 'architectures' nor 'model_type', so the model type is unknown "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    what = declared or f"model_type {model_type!r}"
    raise ValueError(f"{where} holds a {what} model, which Trellis cannot run (supported: {', '.join(ARCHITECTURES)})")
