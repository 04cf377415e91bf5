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
METRICS_AUTH_CHOICES = ("admin", "user", "none")


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
    # API keys: ``scope:key`` entries (comma or newline separated) or a JSON list; the file is re-read when it changes
    api_keys: str = ""
    api_keys_file: Path | None = None
    allow_open: bool = False  # serve a non-loopback address with no keys configured (you take the risk)
    metrics_auth: str = "admin"  # which scope /metrics needs when keys are configured: admin | user | none
    # per-key limits (0: unlimited); a key's own entry in the key file may override them
    rate_limit_rpm: int = 0
    token_quota_per_day: int = 0
    # admission control, per model
    max_queued_requests: int = 1024  # requests admitted but not yet started
    max_queued_tokens: int = 4_194_304  # their prompt + n * max_tokens, summed
    queue_timeout_seconds: float = 120.0  # the default wait before a request that has not started is dropped
    max_queue_timeout_seconds: float = 3600.0  # the most a client may ask for with ``queue_timeout``
    retry_after_seconds: int = 2  # Retry-After when Redis is down, or no drain rate was observed yet
    # request size limits beyond the body size, max_tokens, n and stop strings above
    max_prompt_chars: int = 1_000_000  # text prompt or all message contents together: tokenizing costs CPU
    max_prompt_tokens: int = 0  # 0: the served context length is the only limit
    max_stop_string_chars: int = 256
    # websocket limits
    ws_max_messages: int = 10_000  # frames a client may send on one socket
    ws_idle_seconds: float = 300.0  # a socket with no frame and no running request for this long is closed
    # every open stream holds one Redis connection while it waits (a blocking XREAD): size the pool for them
    redis_max_connections: int = 4096
    # resumable streams: how long a disconnected SSE stream keeps generating, waiting for a resume
    resume_grace_seconds: float = 5.0  # 0: cancel at once when the client goes (no resumption after a drop)

    # inference worker
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    max_batch_size: int = 16  # sequences advanced together per step
    max_batch_tokens: int = 2048  # tokens per forward (prefill chunks + decodes)
    kv_cache_tokens: int = 0  # 0: derive from max_model_len * max_batch_size (CPU) or free memory (GPU)
    kv_cache_memory_fraction: float = 0.9  # with kv_cache_tokens=0 on CUDA: this share of the free memory
    kv_page_size: int = 16
    kv_bits: str = "fp16"  # "fp16" (unquantized, the model's dtype) or "K,V" bits per key and value, each 2..8 or fp16
    kv_key_centering: bool = True  # quantized keys stored centered and per-channel scaled (better at 2-4 bits)
    prefix_caching: bool = True  # reuse the KV pages of a prompt prefix computed before (chat turns, system prompts)
    # speculative decoding (docs/speculative.md): the default for requests that do not set "speculative"
    speculative_method: str = "off"  # off | ngram (prompt lookup) | draft
    speculative_tokens: int = 4  # the most guessed tokens verified per sequence and step
    speculative_max_batch: int = 16  # with more decoding sequences than this, no sequence speculates
    speculative_max_step_tokens: int = 32  # guesses are cut so a decode step feeds at most this many tokens
    speculative_by_cost: bool = True  # cap guesses by the measured cost of steps with and without them
    # after a step that ended requests, wait up to this many ms for their successors (Engine.linger: at most 5% of
    # a step while others run, 25% when none does, more when successors are known to come; docs/worker.md)
    admit_linger_ms: float = 50.0
    speculative_draft_model: str = ""  # model id under models_dir that guesses for method "draft" ("": none)
    speculative_draft_cache_tokens: int = 0  # the draft model's own KV cache; 0: room for every speculating sequence
    max_model_len: int = 0  # 0: the model's own context length
    cuda_graphs: bool = True  # on CUDA, replay decode steps from captured graphs (dense models; docs/worker.md)
    # ... and steps over short prompts, padded to at most this many tokens (0: prompt steps always run eagerly)
    prompt_graph_tokens: int = 256
    # on CUDA, RMSNorm and rotary embeddings as one Triton launch each (kernels/norm_rope.py); off until timed
    fused_norm_rope: bool = False
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
    types = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path, "Path | None": Path}
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
    settings = Settings(**values)
    if settings.metrics_auth not in METRICS_AUTH_CHOICES:
        raise ValueError(f"TRELLIS_METRICS_AUTH={settings.metrics_auth!r} must be one of {list(METRICS_AUTH_CHOICES)}")
    return settings
