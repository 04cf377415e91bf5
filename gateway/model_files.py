"""The gateway's view of the models directory: which model ids exist, and one cached tokenizer per model.

The gateway tokenizes prompts and applies chat templates itself (workers receive token ids), so it needs each served
model's tokenizer files locally. Loading one takes a moment, so tokenizers are loaded in a thread, once, and kept in a
small LRU.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from pathlib import Path

from gateway.errors import ApiError
from shared.tokenizer import TOKENIZER_FILE, ModelTokenizer

log = logging.getLogger("gateway.model_files")

# One directory name, or "org/name": nothing that could climb out of the models directory.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def valid_model_id(model: str) -> bool:
    return bool(_MODEL_ID.match(model)) and ".." not in model


class ModelFiles:
    def __init__(self, models_dir: Path, max_tokenizers: int = 8) -> None:
        self.models_dir = models_dir
        self.max_tokenizers = max_tokenizers
        self._tokenizers: OrderedDict[str, ModelTokenizer] = OrderedDict()
        self._loading: dict[str, asyncio.Lock] = {}

    def has_model(self, model: str) -> bool:
        return valid_model_id(model) and (self.models_dir / model).is_dir()

    def has_tokenizer(self, model: str) -> bool:
        return self.has_model(model) and (self.models_dir / model / TOKENIZER_FILE).is_file()

    async def tokenizer(self, model: str) -> ModelTokenizer:
        """The model's tokenizer, loaded once; the caller has checked ``has_model``."""
        cached = self._cached(model)
        if cached is not None:
            return cached
        lock = self._loading.setdefault(model, asyncio.Lock())
        async with lock:  # concurrent first requests share one load
            cached = self._cached(model)
            if cached is not None:
                return cached
            tokenizer = await asyncio.to_thread(self._load, model)
            self._tokenizers[model] = tokenizer
            while len(self._tokenizers) > self.max_tokenizers:
                self._tokenizers.popitem(last=False)
            return tokenizer

    def _cached(self, model: str) -> ModelTokenizer | None:
        tokenizer = self._tokenizers.get(model)
        if tokenizer is not None:
            self._tokenizers.move_to_end(model)
        return tokenizer

    def _load(self, model: str) -> ModelTokenizer:
        try:
            return ModelTokenizer.from_dir(self.models_dir / model)
        except Exception as exc:  # a broken model directory is the operator's problem, not the client's
            log.exception("cannot load the tokenizer of %s", model)
            raise ApiError(
                500, f"The tokenizer of model '{model}' could not be loaded: {exc}", code="tokenizer_unavailable"
            ) from exc
