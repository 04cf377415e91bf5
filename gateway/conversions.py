"""Conversion jobs over the API (admin scope): submit, list, inspect, follow (SSE) and cancel EXL3 conversions.

The gateway only writes the job: its state hash ``conv:{id}``, its place in the ``conv:jobs`` listing and its entry on
the ``conversions`` stream. A converter worker (converter_worker/service.py) runs it and writes state and progress
events; a cancel is the key ``conv:{id}:cancel``, which the converter notices between blocks, keeping a resumable work
directory. Model names are ids under the models directory: absolute paths, ``..`` and symlinks out are refused.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.auth import ADMIN, require_scope
from gateway.handlers import read_json
from gateway.sse import SseWriter, client_disconnected
from gateway.state import GatewayState, state_of
from shared import names, wire
from shared.model_paths import ModelPathError, resolve_model_path, valid_model_id
from shared.redis_streams import entry

CODEBOOKS = ("mul1", "mcg", "3inst")
TERMINAL_STATES = ("done", "failed", "cancelled")
MIN_BITS, MAX_BITS = 1.0, 8.0
HEAD_BITS = (*range(1, 9), 16)  # 16 keeps the output head unquantized
CANCEL_TTL_S = 7 * 24 * 3600
LIST_LIMIT = 100
EVENTS_BLOCK_MS = 1000
# fields the converter stores as numbers (the hash holds strings)
_FLOATS = ("bits", "created", "started", "finished", "progress", "eta", "seconds", "result_bits")
_INTS = ("head_bits", "cal_rows", "cal_cols", "done", "total")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/conversions", submit)
    app.router.add_get("/v1/conversions", list_jobs)
    app.router.add_get("/v1/conversions/{job_id}", get_job)
    app.router.add_delete("/v1/conversions/{job_id}", cancel_job)
    app.router.add_get("/v1/conversions/{job_id}/events", job_events)


# -- request parsing -----------------------------------------------------------------------------------------------
def parse_submission(body: dict[str, Any], state: GatewayState) -> dict[str, Any]:
    """The job to enqueue, or a 400 naming the offending field."""
    models_dir = state.settings.models_dir
    source = body.get("source", body.get("model"))
    if not isinstance(source, str) or not source:
        raise errors.invalid("'source' is required: a model id (or .gguf file) in the models directory", "source")
    try:
        source_path = resolve_model_path(models_dir, source)
    except ModelPathError as exc:
        raise errors.invalid(f"source: {exc}", "source") from None
    if not ((source_path / "config.json").is_file() or (source_path.is_file() and source_path.suffix == ".gguf")):
        raise errors.invalid(f"source {source!r} is neither a model directory (config.json) nor a .gguf file", "source")

    bits = _number(body.get("bits"), "bits", required=True)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise errors.invalid(f"'bits' must be between {MIN_BITS:g} and {MAX_BITS:g} (got {bits:g})", "bits")
    head_bits = int(_number(body.get("head_bits", 6), "head_bits", integer=True))
    if head_bits not in HEAD_BITS:
        raise errors.invalid("'head_bits' must be 1..8, or 16 to keep the output head unquantized", "head_bits")
    codebook = body.get("codebook", "mul1")
    if codebook not in CODEBOOKS:
        raise errors.invalid(f"'codebook' must be one of {list(CODEBOOKS)}", "codebook")
    allocation = body.get("allocation", wire.CONVERSION_ALLOCATIONS[0])
    if allocation not in wire.CONVERSION_ALLOCATIONS:
        raise errors.invalid(f"'allocation' must be one of {list(wire.CONVERSION_ALLOCATIONS)}", "allocation")
    cal_rows = int(_number(body.get("cal_rows", 250), "cal_rows", integer=True))
    cal_cols = int(_number(body.get("cal_cols", 2048), "cal_cols", integer=True))
    if not (1 <= cal_rows <= 10_000 and 16 <= cal_cols <= 65_536):
        raise errors.invalid("'cal_rows' must be 1..10000 and 'cal_cols' 16..65536", "cal_rows")

    output = body.get("output") or default_output_name(source, bits)
    if not isinstance(output, str) or not valid_model_id(output):
        raise errors.invalid("'output' must be a model id (letters, digits, '.', '_', '-', at most one '/')", "output")
    try:
        output_path = resolve_model_path(models_dir, output, must_exist=False)
    except ModelPathError as exc:
        raise errors.invalid(f"output: {exc}", "output") from None
    if output_path.exists():
        raise errors.ApiError(409, f"A model named {output!r} already exists.", param="output", code="output_exists")
    return wire.conversion_job(source, output, bits, head_bits, codebook, cal_rows, cal_cols, allocation=allocation)


def default_output_name(source: str, bits: float) -> str:
    stem = source.rsplit("/", 1)[-1].removesuffix(".gguf")
    return f"{stem}-exl3-{bits:g}bpw"


def _number(value: Any, name: str, required: bool = False, integer: bool = False) -> float:
    if value is None and required:
        raise errors.invalid(f"'{name}' is required", name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise errors.invalid(f"'{name}' must be a number", name)
    if integer and value != int(value):
        raise errors.invalid(f"'{name}' must be a whole number", name)
    return float(value)


# -- job views -----------------------------------------------------------------------------------------------------
def job_view(job_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """The job hash as the API shows it: numbers as numbers, per-block figures as a list."""
    raw = {k.decode(): v.decode() for k, v in fields.items()}
    view: dict[str, Any] = {"id": job_id, "object": "conversion"}
    for key, value in raw.items():
        if key == "blocks":
            view["blocks"] = json.loads(value) if value else []
        elif key in _FLOATS and value != "":
            view[key] = float(value)
        elif key in _INTS and value != "":
            view[key] = int(float(value))
        elif key == "cancel_requested":
            view[key] = value == "1"
        else:
            view[key] = value
    view.setdefault("blocks", [])
    view.setdefault("error", "")
    return view


async def _load(state: GatewayState, job_id: str) -> dict[str, Any]:
    fields = await state.redis.hgetall(names.conversion_key(job_id))
    if not fields:
        raise errors.ApiError(404, f"No conversion job {job_id!r}.", param="job_id", code="conversion_not_found")
    return job_view(job_id, fields)


# -- handlers ------------------------------------------------------------------------------------------------------
async def submit(request: web.Request) -> web.Response:
    require_scope(request, ADMIN)
    state = state_of(request)
    job = parse_submission(await read_json(request), state)
    fields = {k: str(v) for k, v in job.items() if k != "id"}
    try:
        await _refuse_output_in_use(state, job["output"])
        pipe = state.redis.pipeline(transaction=True)
        pipe.hset(names.conversion_key(job["id"]), mapping={**fields, "state": "queued", "progress": "0"})
        pipe.zadd(names.CONVERSION_JOBS, {job["id"]: job["created"]})
        pipe.xadd(names.CONVERSIONS_STREAM, entry(job))
        await pipe.execute()
        view = await _load(state, job["id"])
    except RedisError as exc:
        raise errors.redis_unavailable(str(exc), state.settings.retry_after_seconds) from None
    return web.json_response(view, status=201, headers={"Location": f"/v1/conversions/{job['id']}"})


async def _refuse_output_in_use(state: GatewayState, output: str) -> None:
    """409 when a job that has not ended already writes ``output`` (two converters must never share an output)."""
    ids = [i.decode() for i in await state.redis.zrevrange(names.CONVERSION_JOBS, 0, -1)]
    pipe = state.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(names.conversion_key(job_id), ["output", "state"])
    for out, job_state in await pipe.execute() if ids else []:
        if out is not None and out.decode() == output and (job_state or b"").decode() not in TERMINAL_STATES:
            raise errors.ApiError(
                409, f"Another conversion is already writing {output!r}.", param="output", code="output_exists"
            )


async def list_jobs(request: web.Request) -> web.Response:
    """Newest first; jobs whose state expired (a week after they ended) drop out of the listing."""
    require_scope(request, ADMIN)
    state = state_of(request)
    ids = [i.decode() for i in await state.redis.zrevrange(names.CONVERSION_JOBS, 0, LIST_LIMIT - 1)]
    pipe = state.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(names.conversion_key(job_id))
    jobs, gone = [], []
    for job_id, fields in zip(ids, await pipe.execute(), strict=True):
        (jobs.append(job_view(job_id, fields)) if fields else gone.append(job_id))
    if gone:
        await state.redis.zrem(names.CONVERSION_JOBS, *gone)
    return web.json_response({"object": "list", "data": jobs})


async def get_job(request: web.Request) -> web.Response:
    require_scope(request, ADMIN)
    return web.json_response(await _load(state_of(request), request.match_info["job_id"]))


async def cancel_job(request: web.Request) -> web.Response:
    """Asks the converter to stop at its next block (a queued job never starts); the work dir stays resumable.
    409 for a job that has already ended."""
    require_scope(request, ADMIN)
    state = state_of(request)
    job_id = request.match_info["job_id"]
    job = await _load(state, job_id)
    if job.get("state") in TERMINAL_STATES:
        raise errors.ApiError(409, f"Conversion {job_id} has already ended ({job['state']}).", code="conversion_ended")
    pipe = state.redis.pipeline(transaction=True)
    pipe.set(names.conversion_cancel_key(job_id), 1, ex=CANCEL_TTL_S)
    pipe.hset(names.conversion_key(job_id), "cancel_requested", "1")
    await pipe.execute()
    return web.json_response(await _load(state, job_id), status=202)


async def job_events(request: web.Request) -> web.StreamResponse:
    """The job's events as SSE (``id:`` = stream entry id; Last-Event-ID resumes), ending after its final state."""
    require_scope(request, ADMIN)
    state = state_of(request)
    job_id = request.match_info["job_id"]
    await _load(state, job_id)  # 404 before the stream opens
    last_id = request.headers.get("Last-Event-ID") or request.query.get("after") or "0-0"
    sse = SseWriter(request, state.settings.keepalive_seconds)
    await sse.open()
    key = names.conversion_events(job_id)
    try:
        while not client_disconnected(request):
            resp = await state.redis.xread({key: last_id}, count=100, block=EVENTS_BLOCK_MS)
            for _stream, items in resp or []:
                for entry_id, fields in items:
                    last_id = entry_id.decode()
                    event = wire.unpack(fields[names.PAYLOAD_FIELD])
                    await sse.send(event, event_id=last_id)
                    if event.get("type") == "state" and event.get("state") in TERMINAL_STATES:
                        await sse.send_done()
                        return sse.response
            if not resp and (await _load(state, job_id)).get("state") in TERMINAL_STATES:
                await sse.send_done()  # ended, and every event was sent (events expire with the job)
                return sse.response
            await sse.keepalive_if_due()
    except (ConnectionResetError, RedisError):
        pass  # the client went away, or Redis did: the client reconnects with Last-Event-ID
    return sse.response
