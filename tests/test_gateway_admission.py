"""Admission control and backpressure: the per-model queue budget (requests and tokens) with Retry-After from the
observed drain rate, queue timeouts and deadlines (a late request never runs), per-key request rates and token quotas
shared by every gateway instance, and the size limits on prompts, stop strings and websockets. Real gateways on a real
Redis; the test plays the worker (WorkerPeer) or runs the wire-level stand-in (StandInWorker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.app import create_app
from gateway.inflight import InFlight
from gateway.queue_budget import DrainRate, QueueState, retry_after_seconds
from gateway.state import STATE
from gateway.stream_meta import RequestMeta
from shared import names, wire
from shared.redis_streams import entry
from tests.gateway_harness import (
    StandInWorker,
    WorkerPeer,
    delta,
    gateway_config,
    gateway_redis_url,
    gateway_settings,
    make_model_dir,
    parse_sse,
    running_gateway,
)

MODEL = "admission-model"
PROMPT = [5, 6, 7]
KEY = "limited-key-0123456789"


def completion(**extra: object) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **extra}


def assert_error(body: dict, code: str, param: str | None = None) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["param"] == param
    return error


@pytest.fixture
async def peer(redis) -> WorkerPeer:
    return await WorkerPeer.announced(redis, MODEL, max_model_len=4096)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path):
    make_model_dir(tmp_path, MODEL)
    return gateway_settings(redis_url, tmp_path, keepalive_seconds=0.2)


async def waiting_in_ledger(redis) -> int:
    return await redis.hlen(names.queue_costs(MODEL))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- the queue budget ----------------------------------------------------------------------------------------------
async def test_a_full_queue_is_429_with_retry_after_and_the_limit_named(settings, peer: WorkerPeer, redis) -> None:
    config = gateway_config(max_queued_requests=2, retry_after_seconds=7)
    async with running_gateway(settings, config) as client:
        waiting = [asyncio.create_task(client.post("/v1/completions", json=completion())) for _ in range(2)]
        await until(lambda: _equals(waiting_in_ledger(redis), 2))
        resp = await client.post("/v1/completions", json=completion())
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"  # nothing has drained yet: the configured fallback
        assert "2 requests are waiting" in assert_error(await resp.json(), "queue_full")["message"]
        assert await redis.xlen(names.requests_stream(MODEL)) == 2  # the rejected one never reached the stream
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await until(lambda: _equals(waiting_in_ledger(redis), 0))  # clients that left give their place back


async def test_a_request_that_ends_with_its_first_event_still_counts_as_started(settings, redis) -> None:
    # the start's release runs in the background; leaving right after must not release the place as "not started"
    state = create_app(settings)[STATE]
    request = wire.GenerationRequest(id="quick-1", model=MODEL, prompt_ids=[1, 2, 3])
    meta = RequestMeta(request.id, "completions", MODEL, 0, 1, False, 0, False, 3, queue_deadline=time.time() + 60)
    await redis.xadd(names.output_stream(request.id), entry({"type": wire.EVENT_DELTA, "index": 0, "token_ids": [7]}))
    async with InFlight(state, meta, request=request) as flight:
        async for ev in flight.events():
            if ev is not None:
                break  # the client leaves at once
    await asyncio.gather(*state.tasks)
    assert await waiting_in_ledger(redis) == 0
    assert (await state.queue.state(MODEL)).drained == 1
    await state.redis.aclose()


async def test_the_token_budget_admits_a_first_request_of_any_size_but_not_a_second(
    settings, peer: WorkerPeer, redis
) -> None:
    config = gateway_config(max_queued_tokens=100)
    async with running_gateway(settings, config) as client:
        first = asyncio.create_task(client.post("/v1/completions", json=completion(max_tokens=150)))
        await until(lambda: _equals(waiting_in_ledger(redis), 1))
        resp = await client.post("/v1/completions", json=completion(max_tokens=10))
        assert resp.status == 429 and "Retry-After" in resp.headers
        message = assert_error(await resp.json(), "queue_full")["message"]
        assert "153 tokens are waiting" in message and "adds up to 13" in message
        req = await peer.next_request()  # the first one starts: its tokens leave the budget
        await peer.answer(req.id, ["ok"])
        assert (await first).status == 200
        admitted = await client.post("/v1/completions", json=completion(max_tokens=10, queue_timeout=0.3))
        assert_error(await admitted.json(), "queue_timeout")  # admitted (not 429); nobody serves it here


async def test_retry_after_follows_the_observed_drain_rate(settings, peer: WorkerPeer, redis) -> None:
    config = gateway_config(max_queued_requests=2, retry_after_seconds=30)
    async with running_gateway(settings, config) as client:
        calls = [asyncio.create_task(client.post("/v1/completions", json=completion())) for _ in range(2)]
        await until(lambda: _equals(waiting_in_ledger(redis), 2))
        assert (await client.post("/v1/completions", json=completion())).headers["Retry-After"] == "30"
        for _ in range(2):  # one request starts per second: the drain rate is 1/s
            await asyncio.sleep(1.0)
            req = await peer.next_request()
            await peer.emit(req.id, delta("go"))
            await until(lambda: _less_than(waiting_in_ledger(redis), 2))
            calls.append(asyncio.create_task(client.post("/v1/completions", json=completion())))
            await until(lambda: _equals(waiting_in_ledger(redis), 2))
        resp = await client.post("/v1/completions", json=completion())
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 3  # one request must drain, at about one per second
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def test_retry_after_is_the_excess_over_the_drain_rate() -> None:
    full = QueueState(waiting=10, tokens=500, drained=0, drained_tokens=0)
    assert retry_after_seconds(full, 10, 10, 10_000, (0.5, 0.0), fallback=9) == pytest.approx(2.0)
    over_tokens = QueueState(waiting=3, tokens=900, drained=0, drained_tokens=0)
    assert retry_after_seconds(over_tokens, 300, 10, 1000, (1.0, 50.0), fallback=9) == pytest.approx(4.0)
    assert retry_after_seconds(over_tokens, 300, 10, 1000, (0.0, 0.0), fallback=9) == 9
    rate = DrainRate(window_seconds=30)
    rate.observe("m", drained=5, drained_tokens=100, now=0.0)
    rate.observe("m", drained=9, drained_tokens=300, now=2.0)
    assert rate.rates("m") == (2.0, 100.0)
    assert rate.rates("other") == (0.0, 0.0)


# -- queue timeouts and deadlines ----------------------------------------------------------------------------------
async def test_a_request_not_started_by_its_queue_timeout_is_dropped_and_never_runs(
    settings, peer: WorkerPeer, redis
) -> None:
    async with running_gateway(settings) as client:
        began = time.monotonic()
        resp = await client.post("/v1/completions", json=completion(queue_timeout=0.5))
        assert 0.4 < time.monotonic() - began < 3.0
        assert resp.status == 503
        assert "never ran" in assert_error(await resp.json(), "queue_timeout")["message"]
        # withdrawn from the stream before any worker was handed it: a worker that looks now finds nothing
        assert await redis.xlen(names.requests_stream(MODEL)) == 0
        assert await waiting_in_ledger(redis) == 0
        stream = await client.post("/v1/completions", json=completion(queue_timeout=0.3, stream=True))
        events = [e for e in parse_sse(await stream.text()) if e.data is not None]
        assert_error(events[-2].json(), "queue_timeout") and events[-1].data == "[DONE]"


async def test_a_late_request_a_worker_already_holds_is_cancelled(settings, peer: WorkerPeer, redis) -> None:
    async with running_gateway(settings) as client:
        call = asyncio.create_task(client.post("/v1/completions", json=completion(queue_timeout=0.5)))
        req = await peer.next_request()  # handed to a worker, which never starts it
        resp = await call
        assert resp.status == 503
        assert "told to drop it" in assert_error(await resp.json(), "queue_timeout")["message"]
        assert await redis.exists(names.cancel_key(req.id))


async def test_the_wire_request_carries_its_queue_deadline(settings, peer: WorkerPeer, redis) -> None:
    async with running_gateway(settings, gateway_config(queue_timeout_seconds=40)) as client:
        deadline = time.time() + 20
        calls = []
        for n, extra in enumerate(({}, {"deadline": deadline}), 1):  # the default, then a deadline that comes first
            calls.append(asyncio.create_task(client.post("/v1/completions", json=completion(**extra))))
            await until(lambda n=n: _equals(redis.xlen(names.requests_stream(MODEL)), n))
        entries = await redis.xrange(names.requests_stream(MODEL))
        first, second = (wire.unpack(fields[names.PAYLOAD_FIELD]) for _, fields in entries)
        assert wire.GenerationRequest.from_dict(first).deadline == pytest.approx(first["created"] + 40)
        assert wire.GenerationRequest.from_dict(second).deadline == pytest.approx(deadline)
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"queue_timeout": 0}, "queue_timeout"),
        ({"queue_timeout": "soon"}, "queue_timeout"),
        ({"queue_timeout": 10_000}, "queue_timeout"),
        ({"deadline": 1_000_000.0}, "deadline"),
    ],
)
async def test_bad_queue_timeouts_and_past_deadlines_are_400(
    settings, peer: WorkerPeer, extra: dict, param: str
) -> None:
    async with running_gateway(settings) as client:
        resp = await client.post("/v1/completions", json=completion(**extra))
        assert resp.status == 400
        assert_error(await resp.json(), "invalid_request", param)


# -- per-key rates and quotas --------------------------------------------------------------------------------------
async def test_a_keys_request_rate_is_shared_by_every_gateway_instance(settings, redis, redis_url: str) -> None:
    config = gateway_config(api_keys=f"user:{KEY}", rate_limit_rpm=3)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        StandInWorker(gateway_redis_url(redis_url), MODEL),
        running_gateway(settings, config, headers=headers) as a,
        running_gateway(settings, config, headers=headers) as b,
    ):
        statuses = [(await client.post("/v1/completions", json=completion())).status for client in (a, b, a)]
        assert statuses == [200, 200, 200]
        resp = await b.post("/v1/completions", json=completion())
        assert resp.status == 429
        assert 15 <= int(resp.headers["Retry-After"]) <= 21  # a minute's 3 requests: the next fits in 20 s
        assert "3 requests per minute" in assert_error(await resp.json(), "rate_limit_exceeded")["message"]
        usage = await (await a.get("/v1/usage")).json()
        assert usage["requests"] == 3 and usage["limits"]["requests_per_minute"] == 3


async def test_a_token_quota_holds_the_worst_case_then_charges_what_was_used(
    settings, redis, redis_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys.json"
    key_file.write_text(f'[{{"scope": "user", "key": "{KEY}", "name": "quota-test", "tokens_per_day": 100}}]')
    config = gateway_config(api_keys_file=key_file)
    async with (
        StandInWorker(gateway_redis_url(redis_url), MODEL, tokens=2),
        running_gateway(settings, config, headers={"Authorization": f"Bearer {KEY}"}) as client,
    ):
        resp = await client.post("/v1/completions", json=completion(max_tokens=90))  # holds 3 + 90 of 100
        assert resp.status == 200
        usage = await (await client.get("/v1/usage")).json()
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["tokens_today"]) == (3, 2, 5)
        assert usage["name"] == "quota-test" and usage["limits"]["tokens_per_day"] == 100
        resp = await client.post("/v1/completions", json=completion(max_tokens=93))  # 5 + 96 > 100
        assert resp.status == 429
        assert 0 < int(resp.headers["Retry-After"]) <= 86_400  # until the next UTC day
        assert "100 per day" in assert_error(await resp.json(), "token_quota_exceeded")["message"]
        assert (await client.post("/v1/completions", json=completion(max_tokens=92))).status == 200


# -- size limits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (completion(prompt="x" * 101), "prompt", "prompt_too_long"),
        (completion(prompt=list(range(1, 12))), "prompt", "prompt_too_long"),
        (completion(stop=["y" * 9]), "stop", "invalid_request"),
        (completion(n=17), "n", "invalid_request"),
        (completion(stop=[f"s{i}" for i in range(17)]), "stop", "invalid_request"),
    ],
)
async def test_prompt_n_and_stop_limits_are_400_naming_the_field(
    settings, peer: WorkerPeer, body: dict, param: str, code: str
) -> None:
    config = gateway_config(max_prompt_chars=100, max_prompt_tokens=10, max_stop_string_chars=8)
    async with running_gateway(settings, config) as client:
        resp = await client.post("/v1/completions", json=body)
        assert resp.status == 400
        assert_error(await resp.json(), code, param)


async def test_a_websocket_is_closed_after_its_message_allowance(settings) -> None:
    async with running_gateway(settings, gateway_config(ws_max_messages=3)) as client:
        async with client.ws_connect("/v1/ws") as ws:
            for i in range(3):
                await ws.send_json({"id": f"c{i}", "type": "cancel"})
                assert (await ws.receive_json())["error"]["code"] == "unknown_id"
            await ws.send_json({"id": "c3", "type": "cancel"})
            assert (await ws.receive_json())["error"]["code"] == "too_many_messages"
            closing = await ws.receive()
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_an_idle_websocket_is_closed(settings) -> None:
    async with running_gateway(settings, gateway_config(ws_idle_seconds=0.5)) as client:
        async with client.ws_connect("/v1/ws") as idle:
            began = time.monotonic()
            closing = await idle.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert idle.close_code == aiohttp.WSCloseCode.OK
            assert 0.4 < time.monotonic() - began < 3


async def test_a_quiet_websocket_with_a_running_request_is_not_idle(settings, peer: WorkerPeer) -> None:
    async with running_gateway(settings, gateway_config(ws_idle_seconds=0.5)) as client:
        async with client.ws_connect("/v1/ws") as busy:
            await busy.send_json({"id": "a", "type": "completions", "body": completion()})
            # the client keeps reading (answering the server's heartbeat pings), as real clients do
            first_frame = asyncio.create_task(busy.receive_json())
            req = await peer.next_request()
            await asyncio.sleep(1.2)  # quiet for over twice the idle time, but a request is running
            await peer.answer(req.id, ["still here"])
            assert (await asyncio.wait_for(first_frame, 5))["type"] == "delta"
            assert (await busy.receive_json(timeout=5))["type"] == "final"


async def _equals(value, expected) -> bool:
    return await value == expected


async def _less_than(value, bound) -> bool:
    return await value < bound
