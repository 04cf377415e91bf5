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
