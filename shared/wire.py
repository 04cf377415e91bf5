"""Messages that cross Redis between the gateway and the workers, encoded with msgpack.

Requests go gateway -> ``requests:{model}``; events go worker -> ``out:{request_id}``. Each stream entry has one field,
``names.PAYLOAD_FIELD``, holding ``pack(...)`` of a plain dict, so any language can read the wire.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

SPECULATIVE_METHODS = ("off", "ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16  # longest draft a request may ask for: beyond this a miss wastes more than a hit saves


class SpeculativeError(ValueError):
    """A malformed ``speculative`` field; ``param`` names the part at fault (for the gateway's 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_speculative(value: Any) -> dict[str, Any] | None:
    """A request's ``speculative`` field with its shape checked: None, or {"method"?, "num_tokens"?}. The gateway
    and the worker both check it here; whether a worker offers the method is the worker's own question."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SpeculativeError(f"'speculative' must be an object, got {type(value).__name__}", "speculative")
    unknown = sorted(set(value) - {"method", "num_tokens"})
    if unknown:
        message = f"'speculative' has unknown fields {unknown}; allowed: method, num_tokens"
        raise SpeculativeError(message, "speculative")
    method = value.get("method")
    if method is not None and not (isinstance(method, str) and method in SPECULATIVE_METHODS):
        raise SpeculativeError(
            f"'speculative.method' {method!r} is not one of {list(SPECULATIVE_METHODS)}", "speculative.method"
        )
    num_tokens = value.get("num_tokens")
    if num_tokens is not None and (
        isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 0 <= num_tokens <= MAX_SPECULATIVE_TOKENS
    ):
        raise SpeculativeError(
            f"'speculative.num_tokens' must be an integer in [0, {MAX_SPECULATIVE_TOKENS}], got {num_tokens!r}",
            "speculative.num_tokens",
        )
    return {key: v for key, v in value.items() if v is not None}


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # and this many alternatives per position
    n: int = 1
    # per-request speculative decoding: {"method": "off" | "ngram" | "draft", "num_tokens": k}, each key optional;
    # None (or a key left out) takes the worker's setting (TRELLIS_SPECULATIVE_METHOD / _TOKENS)
    speculative: dict[str, Any] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    created: float = 0.0  # unix time the gateway accepted it (queue time is measured from here)
    deadline: float = 0.0  # unix time by which it must have started; 0 = none. Late requests never run.
    # Set only by a worker that reclaims a request another worker left unfinished (crash): per choice index the
    # token ids already streamed to the client, and the choices that already finished. Generation continues
    # after them so the client's stream has no gap and no duplicate.
    resume_tokens: dict[int, list[int]] = field(default_factory=dict)
    finished_choices: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRequest:
        params = dict(d.get("params") or {})
        # msgpack keeps int keys, but be lenient with string keys from other clients
        params["logit_bias"] = {int(k): float(v) for k, v in (params.get("logit_bias") or {}).items()}
        return cls(
            id=d["id"],
            model=d["model"],
            prompt_ids=list(d["prompt_ids"]),
            params=SamplingParams(**params),
            created=float(d.get("created", 0.0)),
            deadline=float(d.get("deadline", 0.0)),
            resume_tokens={int(k): list(v) for k, v in (d.get("resume_tokens") or {}).items()},
            finished_choices=list(d.get("finished_choices") or []),
        )


# how a conversion spreads its bits over the linears (converter_worker/convert.py); the first is the default
CONVERSION_ALLOCATIONS = ("plain", "measured")


def conversion_job(source: str, output: str, bits: float, head_bits: int = 6, codebook: str = "mul1",
                   cal_rows: int = 250, cal_cols: int = 2048, job_id: str | None = None,
                   allocation: str = CONVERSION_ALLOCATIONS[0]) -> dict[str, Any]:
    """A conversion job as the gateway enqueues it on the `conversions` stream (paths are model ids)."""
    return {"id": job_id or uuid.uuid4().hex, "source": source, "output": output, "bits": bits,
            "head_bits": head_bits, "codebook": codebook, "cal_rows": cal_rows, "cal_cols": cal_cols,
            "allocation": allocation, "created": time.time()}


# Output events. Each is a dict with a "type":
#   {"type": "delta", "index": i, "text": str, "token_ids": [int], "logprobs": [TokenLogprob...] | None}
#   {"type": "finish", "index": i, "finish_reason": "stop" | "length" | "abort", "completion_tokens": int,
#    "stop_reason": str | int | None}
#   {"type": "done", "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
#    "timings": {"queue_s", "ttft_s", "total_s"}, "worker_id": str}
#   {"type": "error", "message": str, "code": str}
# TokenLogprob = {"token": str, "id": int, "logprob": float, "bytes": [int], "top": [[str, int, float], ...]}
# "done" or "error" is always the last event of a request.
EVENT_DELTA = "delta"
EVENT_FINISH = "finish"
EVENT_DONE = "done"
EVENT_ERROR = "error"
TERMINAL_EVENTS = (EVENT_DONE, EVENT_ERROR)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
