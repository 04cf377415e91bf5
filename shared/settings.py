"""Every setting of every service, read once from ``TRELLIS_*`` environment variables.

Each field's default makes ``make run`` work with no configuration. Services call ``load_settings()`` once at start
and pass the object down; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL_ID = "smollm2-135m-instruct"


def _repo_var_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "var"


@dataclass(frozen=True)
class Settings:
    redis_url: str = ""  # empty: `trellis up` starts a local redis-server and fills this in
    models_dir: Path = field(default_factory=lambda: _repo_var_dir() / "models")
    work_dir: Path = field(default_factory=lambda: _repo_var_dir() / "work")
    default_model: str = DEFAULT_MODEL_ID

    # gateway
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    keepalive_seconds: float = 15.0
    worker_stale_seconds: float = 10.0  # a heartbeat older than this means the worker is gone
    max_tokens_limit: int = 32768
    max_n: int = 16
    max_stop_strings: int = 16
    ws_max_frame_bytes: int = 1024 * 1024
    output_ttl_seconds: int = 600  # out:{id} streams expire after the final event
    request_stream_maxlen: int = 100_000

    # inference worker
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    max_batch_size: int = 16  # sequences advanced together per step
    max_batch_tokens: int = 2048  # tokens per forward (prefill chunks + decodes)
    kv_cache_tokens: int = 0  # 0: derive from max_model_len * max_batch_size (CPU) or free memory (GPU)
    kv_cache_memory_fraction: float = 0.9  # with kv_cache_tokens=0 on CUDA: this share of the free memory
    kv_page_size: int = 16
    kv_bits: str = "fp16"  # "fp16" (unquantized, the model's dtype) or "K,V" bits per key and value, each 2..8 or fp16
    prefix_caching: bool = True  # reuse the KV pages of a prompt prefix computed before (chat turns, system prompts)
    max_model_len: int = 0  # 0: the model's own context length
    heartbeat_seconds: float = 2.0
    # A request pending this long without its worker refreshing it is reclaimed by another worker (the owner
    # refreshes its entries every heartbeat, so only a dead worker's entries ever get this idle).
    reclaim_idle_seconds: float = 10.0
    max_deliveries: int = 3  # a request delivered this many times without finishing goes to the dead-letter stream
    worker_metrics_port: int = 0  # 0: pick a free port (several workers on one host)
    worker_id: str = ""

    # converter worker
    converter_metrics_port: int = 0

    log_level: str = "INFO"


def _coerce(raw: str, typ: type) -> object:
    if typ is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if typ is Path:
        return Path(raw).expanduser()
    return typ(raw)


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``TRELLIS_<FIELD>`` variables (upper case), then explicit overrides."""
    env = os.environ if env is None else env
    types = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}
    values: dict[str, object] = {}
    for f in dataclasses.fields(Settings):
        raw = env.get(f"TRELLIS_{f.name.upper()}")
        if raw is not None and raw != "":
            typ = types[f.type] if isinstance(f.type, str) else f.type
            try:
                values[f.name] = _coerce(raw, typ)
            except ValueError as exc:
                raise ValueError(f"TRELLIS_{f.name.upper()}={raw!r} is not a valid {typ.__name__}") from exc
    values.update(overrides)
    return Settings(**values)
