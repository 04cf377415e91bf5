"""Resumable SSE streams: a client that lost its stream (its connection dropped, or its gateway shut down) reconnects
to GET /v1/streams/{id} with Last-Event-ID - on another gateway instance sharing the Redis - and gets exactly the
events it missed. Two real gateways, one real Redis, the test playing the worker."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import aiohttp
import pytest

from gateway.app import start
from shared import names
from shared.redis_server import free_port
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
    read_data_events,
    running_gateway,
    wait_for_key,
)

MODEL = "resume-model"
PROMPT = [5, 6, 7]
ALICE = "alice-key-0123456789"
BOB = "bob-key-0123456789ab"
ADMIN = "admin-key-0123456789"
KEYS = f"user:{ALICE},user:{BOB},admin:{ADMIN}"
GRACE = 1.0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def peer(redis) -> WorkerPeer:
    return await WorkerPeer.announced(redis, MODEL, max_model_len=128)


@pytest.fixture
async def gateways(redis_url: str, tmp_path: Path, peer: WorkerPeer):
    """Two gateway instances on the same Redis, each with its own client session (as Alice)."""
    make_model_dir(tmp_path, MODEL)
    settings = gateway_settings(redis_url, tmp_path, keepalive_seconds=0.2)
    config = gateway_config(api_keys=KEYS, resume_grace_seconds=GRACE)
    async with (
        running_gateway(settings, config, headers=bearer(ALICE)) as a,
        running_gateway(settings, config, headers=bearer(ALICE)) as b,
    ):
        yield a, b


def stream_body(**extra: object) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "stream": True, **extra}


async def test_a_dropped_stream_resumes_on_another_gateway_without_gap_or_duplicate(
    gateways, peer: WorkerPeer, redis
) -> None:
    a, b = gateways
    resp = await a.post("/v1/completions", json=stream_body(stream_options={"include_usage": True}))
    req = await peer.next_request()
    first_ids = [await peer.emit(req.id, delta(text, token_id=i)) for i, text in enumerate(["On", "ce"])]
    seen = await read_data_events(resp, 2)
    resp.close()  # the connection drops after two events
    assert [e.id for e in seen] == first_ids

    rest_ids = [await peer.emit(req.id, delta(text, token_id=i)) for i, text in enumerate([" upon", " a"])]
    rest_ids.append(await peer.emit(req.id, finish(0, "length", 4)))
    rest_ids.append(await peer.emit(req.id, done(3, 4)))

    resumed = await b.get(f"/v1/streams/{req.id}", headers={"Last-Event-ID": seen[-1].id})
    assert resumed.status == 200 and resumed.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in parse_sse(await resumed.text()) if e.data is not None]
    assert events[-1].data == "[DONE]"
    assert [e.id for e in events[:-1]] == rest_ids  # exactly what was missed, in order
    chunks = [e.json() for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in [e.json() for e in seen] + chunks[:2])
    assert text == "Once upon a"
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert all(c["id"] == req.id for c in chunks)
    await asyncio.sleep(GRACE + 0.6)  # a finished request is never cancelled, even after the grace
    assert not await redis.exists(names.cancel_key(req.id))


async def test_a_stream_resumed_within_the_grace_is_not_cancelled(gateways, peer: WorkerPeer, redis) -> None:
    a, b = gateways
    resp = await a.post("/v1/completions", json=stream_body())
    req = await peer.next_request()
    await peer.emit(req.id, delta("x"))
    seen = await read_data_events(resp, 1)
    resp.close()
    resumed = await b.get(f"/v1/streams/{req.id}", headers={"Last-Event-ID": seen[0].id})
    assert resumed.status == 200
    await asyncio.sleep(GRACE + 0.6)  # the dropped stream's grace is over, but a client follows it again
    assert not await redis.exists(names.cancel_key(req.id))
    await peer.emit(req.id, delta("y"))
    assert (await read_data_events(resumed, 1))[0].json()["choices"][0]["text"] == "y"
    resumed.close()  # this reader leaves too, and nobody comes back: cancelled after the grace
    assert await wait_for_key(redis, names.cancel_key(req.id), timeout=GRACE + 3)


async def test_a_stream_read_again_from_the_start_is_identical(gateways, peer: WorkerPeer) -> None:
    a, b = gateways
    resp = await a.post("/v1/completions", json=stream_body())
    req = await peer.next_request()
    await peer.answer(req.id, ["a", "b"])
    original = [(e.id, e.data) for e in parse_sse(await resp.text()) if e.data is not None]
    again = await b.get(f"/v1/streams/{req.id}")
    assert [(e.id, e.data) for e in parse_sse(await again.text()) if e.data is not None] == original


async def test_resumed_completion_logprobs_continue_the_text_offsets(gateways, peer: WorkerPeer) -> None:
    a, b = gateways
    resp = await a.post("/v1/completions", json=stream_body(logprobs=0))
    req = await peer.next_request()
    lp = {"id": 1, "logprob": -0.5, "bytes": [], "top": []}
    await peer.emit(req.id, {**delta("Hello"), "logprobs": [{**lp, "token": "Hello"}]})
    seen = await read_data_events(resp, 1)
    resp.close()
    await peer.emit(req.id, {**delta(" world"), "logprobs": [{**lp, "token": " world"}]})
    await peer.emit(req.id, done(3, 2))
    resumed = await b.get(f"/v1/streams/{req.id}", headers={"Last-Event-ID": seen[0].id})
    chunk = [e for e in parse_sse(await resumed.text()) if e.data is not None][0].json()
    assert chunk["choices"][0]["logprobs"]["text_offset"] == [len("Hello")]  # rebuilt from the replayed events


async def test_resumed_chat_stream_does_not_repeat_the_role_chunk(
    redis_url: str, default_model_dir: Path, redis
) -> None:
    model = default_model_dir.name
    await announce_worker(redis, model, max_model_len=2048)
    peer = await WorkerPeer(redis, model).join()
    settings = gateway_settings(redis_url, default_model_dir.parent)
    async with running_gateway(settings) as a, running_gateway(settings) as b:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        resp = await a.post("/v1/chat/completions", json=body)
        req = await peer.next_request()
        await peer.emit(req.id, delta("Hel"))
        seen = await read_data_events(resp, 2)  # the role chunk, then the first delta
        assert seen[0].json()["choices"][0]["delta"]["role"] == "assistant" and seen[0].id is None
        resp.close()
        await peer.emit(req.id, delta("lo"))
        await peer.emit(req.id, finish(0, "stop", 2))
        await peer.emit(req.id, done(5, 2))
        resumed = await b.get(f"/v1/streams/{req.id}", headers={"Last-Event-ID": seen[1].id})
        chunks = [e.json() for e in parse_sse(await resumed.text()) if e.data not in (None, "[DONE]")]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"content": "lo"}, {}]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[1]["choices"][0]["finish_reason"] == "stop"


async def test_gateway_shutdown_mid_stream_then_resume_on_the_other_gateway(
    redis_url: str, tmp_path: Path, redis, peer: WorkerPeer
) -> None:
    make_model_dir(tmp_path, MODEL)
    settings = gateway_settings(redis_url, tmp_path, keepalive_seconds=0.2)
    config = gateway_config(resume_grace_seconds=30)
    first = dataclasses.replace(settings, host="127.0.0.1", port=free_port())
    runner = await start(dataclasses.replace(first, **config))
    async with running_gateway(settings, config) as other, aiohttp.ClientSession() as client:
        resp = await client.post(f"http://127.0.0.1:{first.port}/v1/completions", json=stream_body())
        req = await peer.next_request()
        await peer.emit(req.id, delta("before"))
        seen = await read_data_events(resp, 1)
        await runner.cleanup()  # the first gateway restarts: its client is told to resume elsewhere
        tail = [e for e in parse_sse((await resp.content.read()).decode()) if e.data is not None]
        assert tail[0].json()["error"]["code"] == "shutting_down"
        after = await peer.emit(req.id, delta(" after"))
        await peer.emit(req.id, finish(0, "stop", 2))
        await peer.emit(req.id, done(3, 2))
        resumed = await other.get(f"/v1/streams/{req.id}", headers={"Last-Event-ID": seen[0].id})
        events = [e for e in parse_sse(await resumed.text()) if e.data is not None]
    assert events[0].id == after and events[0].json()["choices"][0]["text"] == " after"
    assert events[-1].data == "[DONE]"
    assert not await redis.exists(names.cancel_key(req.id))
    assert await redis.zscore(names.DETACHED_STREAMS, req.id) is None  # the resume took it off the detached set


async def test_only_the_owner_or_an_admin_may_resume_a_stream(gateways, peer: WorkerPeer) -> None:
    a, b = gateways
    resp = await a.post("/v1/completions", json=stream_body())
    req = await peer.next_request()
    await peer.answer(req.id, ["mine"])
    await resp.text()
    as_bob = await b.get(f"/v1/streams/{req.id}", headers=bearer(BOB))
    assert as_bob.status == 404 and (await as_bob.json())["error"]["code"] == "stream_not_found"
    as_admin = await b.get(f"/v1/streams/{req.id}", headers=bearer(ADMIN))
    assert as_admin.status == 200 and "mine" in await as_admin.text()
    anonymous = await b.get(f"/v1/streams/{req.id}", headers={"Authorization": ""})
    assert anonymous.status == 401


@pytest.mark.parametrize(
    ("path", "headers", "status", "param"),
    [
        ("/v1/streams/cmpl-" + "0" * 32, {}, 404, "request_id"),
        ("/v1/streams/not-a-request-id", {}, 404, "request_id"),
        ("/v1/streams/cmpl-" + "0" * 32, {"Last-Event-ID": "yesterday"}, 400, "Last-Event-ID"),
    ],
)
async def test_unknown_streams_and_bad_event_ids_are_clear_errors(
    gateways, path: str, headers: dict, status: int, param: str
) -> None:
    a, _ = gateways
    resp = await a.get(path, headers=headers)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["param"] == param and error["message"]
