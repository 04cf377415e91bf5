"""The gateway's wire protocol, with the test playing the worker: it reads ``requests:{model}`` with XREADGROUP and
answers with XADD to ``out:{id}``. Non-streaming and SSE relaying, keep-alives, cancellation on disconnect, worker
errors and a worker that disappears. (End-to-end tests with the real worker live in test_e2e.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.admission import fit_max_tokens
from gateway.app import start
from gateway.openai_api import parse_completion
from gateway.queue_budget import QueueBudget
from gateway.registry import WorkerRegistry
from gateway.relay import Relay
from shared import names, wire
from shared.redis_server import free_port
from shared.settings import load_settings
from tests.gateway_harness import (
    WorkerPeer,
    announce_worker,
    delta,
    done,
    finish,
    gateway_config,
    gateway_settings,
    make_model_dir,
    parse_sse,
    running_gateway,
    wait_for_key,
)

MODEL = "wire-model"
CONTEXT = 128
PROMPT = [5, 6, 7]
RESUME_GRACE = 0.5  # a dropped stream keeps running this long, waiting for a resume (gateway/detach.py)


@pytest.fixture
async def peer(redis) -> WorkerPeer:
    return await WorkerPeer.announced(redis, MODEL, max_model_len=CONTEXT)


@pytest.fixture
async def client(redis_url: str, tmp_path: Path, peer: WorkerPeer):
    make_model_dir(tmp_path, MODEL)
    settings = gateway_settings(redis_url, tmp_path, keepalive_seconds=0.2)
    async with running_gateway(settings, gateway_config(resume_grace_seconds=RESUME_GRACE)) as c:
        yield c


async def test_non_streaming_completion_is_assembled_from_the_workers_events(client, peer: WorkerPeer) -> None:
    call = asyncio.create_task(
        client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.5})
    )
    req = await peer.next_request()
    assert req.prompt_ids == PROMPT
    assert req.params.max_tokens == 4 and req.params.temperature == 0.5
    assert req.id.startswith("cmpl-")
    await peer.answer(req.id, ["Hel", "lo", "!"], finish_reason="length", prompt_tokens=len(PROMPT))

    resp = await call
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == req.id
    body = await resp.json()
    assert body["id"] == req.id and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"] == [
        {"index": 0, "text": "Hello!", "logprobs": None, "finish_reason": "length", "stop_reason": None}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def test_every_openai_and_extra_parameter_reaches_the_wire(client, peer: WorkerPeer) -> None:
    body = {
        "model": MODEL,
        "prompt": [PROMPT],
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 0.9,
        "n": 2,
        "stop": "END",
        "seed": 1234,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"42": -100},
        "logprobs": 2,
        "user": "someone",
        "echo": False,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "stop_token_ids": [2, 3],
        "ignore_eos": True,
        "include_stop_str_in_output": True,
    }
    call = asyncio.create_task(client.post("/v1/completions", json=body))
    req = await peer.next_request()
    p = req.params
    assert req.prompt_ids == PROMPT
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.seed) == (7, 0.0, 0.9, 2, 1234)
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (0.5, -0.5, {42: -100.0})
    assert (p.logprobs, p.top_logprobs, p.top_k, p.min_p, p.repetition_penalty) == (True, 2, 40, 0.05, 1.1)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.include_stop_str_in_output) == (["END"], [2, 3], True, True)
    lp = {"token": "A", "id": 65, "logprob": -0.1, "bytes": [65], "top": [["A", 65, -0.1], ["B", 66, -2.5]]}
    for index in (1, 0):  # choices may finish in any order
        await peer.emit(req.id, {**delta("A", index=index), "logprobs": [lp]})
        await peer.emit(req.id, finish(index, "stop", 1))
    await peer.emit(req.id, done(3, 2))
    out = await (await call).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["choices"][0]["logprobs"] == {
        "tokens": ["A"],
        "token_logprobs": [-0.1],
        "top_logprobs": [{"A": -0.1, "B": -2.5}],
        "text_offset": [0],
    }


async def test_omitted_max_tokens_asks_for_the_rest_of_the_context(client, peer: WorkerPeer) -> None:
    call = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT}))
    req = await peer.next_request()
    assert req.params.max_tokens == CONTEXT - len(PROMPT)
    await peer.answer(req.id, ["x"])
    assert (await call).status == 200


def test_default_max_tokens_is_capped_by_the_configured_limit() -> None:
    settings = load_settings(env={}, max_tokens_limit=50)
    parsed = parse_completion({"model": MODEL, "prompt": PROMPT}, settings)
    assert fit_max_tokens(parsed, prompt_tokens=3, max_model_len=4096, limit=settings.max_tokens_limit) == 50
    assert fit_max_tokens(parsed, prompt_tokens=3, max_model_len=20, limit=settings.max_tokens_limit) == 17


async def test_streaming_completion_relays_chunks_with_redis_entry_ids_then_usage_and_done(
    client, peer: WorkerPeer
) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    call = asyncio.create_task(client.post("/v1/completions", json=body))
    req = await peer.next_request()
    entry_ids = await peer.answer(req.id, ["Once", " upon"], finish_reason="length")
    resp = await call
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in parse_sse(await resp.text()) if e.data is not None]

    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert [e.id for e in events[:-1]] == entry_ids  # delta, delta, finish, usage: one per Redis entry
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["Once", " upon"]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert all(c["id"] == req.id and c["object"] == "text_completion" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


async def test_keepalive_comments_flow_while_the_worker_is_silent(client, peer: WorkerPeer) -> None:
    call = asyncio.create_task(
        client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True})
    )
    req = await peer.next_request()
    await asyncio.sleep(1.0)  # five keep-alive intervals with nothing to say
    await peer.answer(req.id, ["late"])
    events = parse_sse(await (await call).text())
    first_data = next(i for i, e in enumerate(events) if e.data is not None)
    keepalives = [e for e in events[:first_data] if e.comment == "keep-alive"]
    assert len(keepalives) >= 2


async def test_client_leaving_a_stream_sets_the_cancel_key_after_the_resume_grace(
    client, peer: WorkerPeer, redis
) -> None:
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "stream": True})
    req = await peer.next_request()
    await peer.emit(req.id, delta("first"))
    line = await resp.content.readline()
    assert line.startswith(b"id: ")
    left = time.monotonic()
    resp.close()  # drop the connection mid-stream
    assert await wait_for_key(redis, names.cancel_key(req.id), timeout=5)
    assert time.monotonic() - left >= RESUME_GRACE - 0.1  # it waited for a resume first
    assert await redis.ttl(names.cancel_key(req.id)) > 0


async def test_client_leaving_a_non_streaming_request_sets_the_cancel_key(client, peer: WorkerPeer, redis) -> None:
    call = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT}))
    req = await peer.next_request()
    call.cancel()  # the client gives up while the worker is still busy
    await asyncio.gather(call, return_exceptions=True)
    assert await wait_for_key(redis, names.cancel_key(req.id), timeout=5)


async def test_client_leaving_while_tokens_keep_flowing_sets_the_cancel_key(client, peer: WorkerPeer, redis) -> None:
    call = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT}))
    req = await peer.next_request()

    async def busy_worker() -> None:  # never idle: the gateway must notice the client between events
        while not await redis.exists(names.cancel_key(req.id)):
            await peer.emit(req.id, delta("tok"))
            await asyncio.sleep(0.02)

    worker = asyncio.create_task(busy_worker())
    await peer.emit(req.id, delta("first"))
    await asyncio.sleep(0.2)
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    try:
        assert await wait_for_key(redis, names.cancel_key(req.id), timeout=5)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_a_finished_request_leaves_no_cancel_key(client, peer: WorkerPeer, redis) -> None:
    call = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT}))
    req = await peer.next_request()
    await peer.answer(req.id, ["ok"])
    assert (await call).status == 200
    assert not await wait_for_key(redis, names.cancel_key(req.id), timeout=0.5)


@pytest.mark.parametrize(("code", "status"), [("context_length_exceeded", 400), ("engine_failure", 500)])
async def test_worker_error_event_becomes_an_error_body(client, peer: WorkerPeer, code: str, status: int) -> None:
    call = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT}))
    req = await peer.next_request()
    await peer.emit(req.id, delta("par"))
    await peer.emit(req.id, {"type": wire.EVENT_ERROR, "message": "the engine fell over", "code": code})
    resp = await call
    assert resp.status == status
    assert (await resp.json())["error"] == {
        "message": "the engine fell over",
        "type": "invalid_request_error" if status == 400 else "server_error",
        "param": None,
        "code": code,
    }


async def test_worker_error_event_mid_stream_becomes_an_error_event(client, peer: WorkerPeer) -> None:
    call = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "stream": True}))
    req = await peer.next_request()
    await peer.emit(req.id, delta("par"))
    error_id = await peer.emit(req.id, {"type": wire.EVENT_ERROR, "message": "out of memory", "code": "oom"})
    events = [e for e in parse_sse(await (await call).text()) if e.data is not None]
    assert events[0].json()["choices"][0]["text"] == "par"
    assert events[1].id == error_id and events[1].json()["error"]["message"] == "out of memory"
    assert events[2].data == "[DONE]"


async def test_request_ends_with_503_when_every_worker_of_the_model_disappears(
    redis_url: str, tmp_path: Path, redis
) -> None:
    make_model_dir(tmp_path, MODEL)
    worker_id = await announce_worker(redis, MODEL)
    peer = await WorkerPeer(redis, MODEL).join()
    settings = gateway_settings(redis_url, tmp_path, worker_stale_seconds=0.5)
    async with running_gateway(settings) as c:
        call = asyncio.create_task(c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT}))
        req = await peer.next_request()
        await redis.delete(names.worker_key(worker_id))  # the worker dies without a word
        resp = await asyncio.wait_for(call, timeout=10)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "worker_lost"
        assert await redis.exists(names.cancel_key(req.id))


async def test_requests_stream_is_trimmed_to_about_its_configured_length(redis) -> None:
    relay = Relay(redis, WorkerRegistry(redis, 10.0), stream_maxlen=10, cancel_ttl=60, block_seconds=0.1)
    queue = QueueBudget(redis, max_requests=1000, max_tokens=10**9, fallback_retry_after=1.0)
    for i in range(500):
        request = wire.GenerationRequest(id=f"trim-{i}", model=MODEL, prompt_ids=PROMPT)
        await queue.reserve_and_enqueue(MODEL, request.id, 1, time.time() + 60, relay.enqueue_call(request))
    length = await redis.xlen(names.requests_stream(MODEL))
    assert 10 <= length < 500  # MAXLEN ~ trims whole macro-nodes: about 10, never unbounded


async def test_shutdown_ends_open_streams_promptly_and_leaves_them_resumable(
    redis_url: str, tmp_path: Path, redis, peer: WorkerPeer
) -> None:
    make_model_dir(tmp_path, MODEL)
    settings = dataclasses.replace(gateway_settings(redis_url, tmp_path), host="127.0.0.1", port=free_port())
    runner = await start(dataclasses.replace(settings, resume_grace_seconds=30))
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{settings.port}") as session:
        resp = await session.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "stream": True})
        req = await peer.next_request()
        await peer.emit(req.id, delta("partial"))
        assert (await resp.content.readline()).startswith(b"id: ")
        began = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - began < 4.0  # not the aiohttp grace period spent waiting on our stream
        events = [e for e in parse_sse((await resp.content.read()).decode()) if e.data is not None]
    error = events[-2].json()["error"]
    assert error["code"] == "shutting_down" and f"/v1/streams/{req.id}" in error["message"]
    assert events[-1].data == "[DONE]"
    # not cancelled: detached, so a client can resume it on another gateway within the grace period
    assert not await redis.exists(names.cancel_key(req.id))
    assert await redis.zscore(names.DETACHED_STREAMS, req.id) is not None
