"""Gateway-only settings (security, admission, resumption), read from ``TRELLIS_*`` variables like shared/settings.py.

They live here until they are merged into ``shared.settings.Settings``; the names and the parsing rules are the same,
so merging is a move, not a rename. Every default keeps ``make run`` working with no configuration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

METRICS_AUTH_CHOICES = ("admin", "user", "none")


@dataclass(frozen=True)
class GatewayConfig:
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

    # request size limits, beyond shared.settings (body size, max_tokens, n, stop strings)
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


def _coerce(raw: str, typ: type) -> object:
    if typ is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if typ is Path:
        return Path(raw).expanduser()
    return typ(raw)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path, "Path | None": Path}


def load_gateway_config(env: dict[str, str] | None = None, **overrides: object) -> GatewayConfig:
    """``GatewayConfig`` from ``TRELLIS_<FIELD>`` variables (upper case), then explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in dataclasses.fields(GatewayConfig):
        name = f"TRELLIS_{f.name.upper()}"
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        typ = _TYPES[f.type] if isinstance(f.type, str) else f.type
        try:
            values[f.name] = _coerce(raw, typ)
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not a valid {typ.__name__}") from exc
    values.update(overrides)
    config = GatewayConfig(**values)
    if config.metrics_auth not in METRICS_AUTH_CHOICES:
        raise ValueError(f"TRELLIS_METRICS_AUTH={config.metrics_auth!r} must be one of {list(METRICS_AUTH_CHOICES)}")
    return config
