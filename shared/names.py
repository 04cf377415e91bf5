"""Every Redis key and stream name, in one place (see ARCHITECTURE.md, "Redis layout")."""

WORKER_GROUP = "workers"
CONVERTER_GROUP = "converters"
CONVERSIONS_STREAM = "conversions"
# Stream entries carry one field holding a msgpack payload (see shared/wire.py).
PAYLOAD_FIELD = b"d"


def requests_stream(model: str) -> str:
    return f"requests:{model}"


def output_stream(request_id: str) -> str:
    return f"out:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"cancel:{request_id}"


def worker_key(worker_id: str) -> str:
    return f"workers:{worker_id}"


WORKER_KEY_PATTERN = "workers:*"


def conversion_key(job_id: str) -> str:
    return f"conv:{job_id}"


def conversion_cancel_key(job_id: str) -> str:
    return f"conv:{job_id}:cancel"


CONVERSION_JOBS = "conv:jobs"  # sorted set of job ids by submission time, for listing


def conversion_events(job_id: str) -> str:
    return f"conv:{job_id}:events"


def deadletter_stream(name: str) -> str:
    return f"deadletter:{name}"


def converter_key(converter_id: str) -> str:
    return f"converters:{converter_id}"


# -- keys only gateways read and write (shared by every gateway instance) ------------------------------------------
# Each one expires or is removed by the gateways themselves, so Redis memory stays bounded:
#   gw:meta:{request_id}            hash, TTL: what a resuming gateway needs to rebuild a stream; quota settlement
#   gw:queue:{model}                hash: request id -> token cost, for requests admitted but not yet started
#   gw:queue:{model}:deadlines      zset: request id -> unix queue deadline (leaked entries leave at their deadline)
#   gw:queue:{model}:stats          hash: ``tokens`` queued now; counters ``drained``, ``drained_tokens`` (drain rate)
#   gw:rate:{key_id}                string, TTL: the key's GCRA "theoretical arrival time" in ms (requests per minute)
#   gw:quota:{key_id}:{day}         string, TTL: tokens reserved or used on that UTC day
#   gw:usage:{key_id}               hash: requests, prompt_tokens, completion_tokens: the key's all-time counters
#   gw:detached                     zset: request id -> unix time its stream is cancelled unless a client resumes it
#   gw:readers:{request_id}         hash, TTL: the SSE readers following a stream now (one per gateway connection)
DETACHED_STREAMS = "gw:detached"


def request_meta(request_id: str) -> str:
    return f"gw:meta:{request_id}"


def queue_costs(model: str) -> str:
    return f"gw:queue:{model}"


def queue_deadlines(model: str) -> str:
    return f"gw:queue:{model}:deadlines"


def queue_stats(model: str) -> str:
    return f"gw:queue:{model}:stats"


def key_rate(key_id: str) -> str:
    return f"gw:rate:{key_id}"


def key_quota(key_id: str, day: int) -> str:
    return f"gw:quota:{key_id}:{day}"


def key_usage(key_id: str) -> str:
    return f"gw:usage:{key_id}"


def stream_readers(request_id: str) -> str:
    return f"gw:readers:{request_id}"
