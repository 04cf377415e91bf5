"""GET /v1/ws with the test playing the worker: interleaved requests on one socket, cancel, close, bad frames."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType

from gateway.app import start
from shared import names
from shared.redis_server import free_port
from tests.gateway_harness import (
    WorkerPeer,
    delta,
    done,
    finish,
    gateway_settings,
    make_model_dir,
    running_gateway,
    wait_for_key,
)

MODEL = "ws-model"
MAX_FRAME = 2048


@pytest.fixture
async def peer(redis) -> WorkerPeer:
    return await WorkerPeer.announced(redis, MODEL, max_model_len=256)


@pytest.fixture
async def ws(redis_url: str, tmp_path: Path, peer: WorkerPeer):
    make_model_dir(tmp_path, MODEL)
    settings = gateway_settings(redis_url, tmp_path, ws_max_frame_bytes=MAX_FRAME)
    async with running_gateway(settings) as client:
        async with client.ws_connect("/v1/ws") as socket:
            yield socket


def request_frame(client_id: str, prompt: list[int], kind: str = "completions") -> dict[str, Any]:
    return {"id": client_id, "type": kind, "body": {"model": MODEL, "prompt": prompt, "max_tokens": 8}}


async def receive(ws, timeout: float = 5.0) -> dict[str, Any]:
    return await asyncio.wait_for(ws.receive_json(), timeout=timeout)


async def test_two_interleaved_requests_and_a_cancel_on_one_socket(ws, peer: WorkerPeer, redis) -> None:
    await ws.send_json(request_frame("a", [1, 1, 1]))
    await ws.send_json(request_frame("b", [2, 2]))
    first, second = await peer.next_request(), await peer.next_request()
    by_client = {"a" if r.prompt_ids == [1, 1, 1] else "b": r for r in (first, second)}
    a, b = by_client["a"], by_client["b"]

    # the worker interleaves both requests' tokens
    await peer.emit(a.id, delta("A1"))
    await peer.emit(b.id, delta("B1"))
    await peer.emit(a.id, delta("A2"))
    frames = [await receive(ws) for _ in range(3)]
    assert sorted((f["id"], f["text"]) for f in frames) == [("a", "A1"), ("a", "A2"), ("b", "B1")]
    assert all(f["type"] == "delta" and f["index"] == 0 for f in frames)

    await peer.emit(a.id, finish(0, "stop", 2))
    await peer.emit(a.id, done(3, 2))
    final_a = await receive(ws)
    assert final_a["id"] == "a" and final_a["type"] == "final"
    assert final_a["choices"][0]["finish_reason"] == "stop"
    assert final_a["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert final_a["request_id"] == a.id

    await ws.send_json({"type": "cancel", "id": "b"})
    final_b = await receive(ws)
    assert final_b["id"] == "b" and final_b["type"] == "final" and final_b["cancelled"] is True
    assert await redis.exists(names.cancel_key(b.id))
    assert not await redis.exists(names.cancel_key(a.id))


async def test_closing_the_socket_cancels_what_is_still_running(ws, peer: WorkerPeer, redis) -> None:
    await ws.send_json(request_frame("long", [3, 3]))
    req = await peer.next_request()
    await peer.emit(req.id, delta("x"))
    assert (await receive(ws))["text"] == "x"
    await ws.close()
    assert await wait_for_key(redis, names.cancel_key(req.id), timeout=5)


async def test_worker_error_becomes_an_error_frame_for_that_id_only(ws, peer: WorkerPeer) -> None:
    await ws.send_json(request_frame("bad", [4]))
    await ws.send_json(request_frame("good", [5]))
    reqs = {r.prompt_ids[0]: r for r in (await peer.next_request(), await peer.next_request())}
    await peer.emit(reqs[4].id, {"type": "error", "message": "kaput", "code": "engine_failure"})
    err = await receive(ws)
    assert err["id"] == "bad" and err["type"] == "error" and err["error"]["message"] == "kaput"
    await peer.answer(reqs[5].id, ["fine"])
    frames = [await receive(ws), await receive(ws)]
    assert [(f["id"], f["type"]) for f in frames] == [("good", "delta"), ("good", "final")]


@pytest.mark.parametrize(
    ("frame", "param"),
    [
        ("not json at all", None),
        ({"type": "completions", "body": {}}, "id"),
        ({"id": "x", "type": "embeddings", "body": {}}, "type"),
        ({"id": "x", "type": "completions", "body": "prompt"}, "body"),
        ({"id": "x", "type": "completions", "body": {"model": MODEL, "prompt": [1], "top_p": 7}}, "top_p"),
        ({"id": "x", "type": "chat.completions", "body": {"model": MODEL}}, "messages"),
        ({"id": "x", "type": "completions", "body": {"model": "nope", "prompt": [1]}}, "model"),
        ({"id": "nobody", "type": "cancel"}, "id"),
    ],
)
async def test_bad_frames_get_an_error_frame_and_the_socket_stays_open(ws, frame: Any, param: str | None) -> None:
    await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))
    err = await receive(ws)
    assert err["type"] == "error"
    assert set(err["error"]) >= {"message", "type", "param", "code"} and err["error"]["param"] == param
    await ws.send_str("still listening?")
    assert (await receive(ws))["type"] == "error"


async def test_a_running_id_cannot_be_reused(ws, peer: WorkerPeer) -> None:
    await ws.send_json(request_frame("same", [6]))
    req = await peer.next_request()
    await ws.send_json(request_frame("same", [7]))
    err = await receive(ws)
    assert err["id"] == "same" and err["error"]["code"] == "duplicate_id"
    await peer.answer(req.id, ["ok"])
    assert [(await receive(ws))["type"] for _ in range(2)] == ["delta", "final"]


async def test_a_frame_over_the_size_limit_closes_the_socket_with_1009(ws) -> None:
    await ws.send_json(request_frame("big", list(range(MAX_FRAME))))
    msg = await asyncio.wait_for(ws.receive(), timeout=5)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
    assert ws.close_code == WSCloseCode.MESSAGE_TOO_BIG


async def test_shutdown_closes_sockets_as_going_away_and_cancels_their_requests(
    redis_url: str, tmp_path: Path, redis, peer: WorkerPeer
) -> None:
    make_model_dir(tmp_path, MODEL)
    settings = dataclasses.replace(gateway_settings(redis_url, tmp_path), host="127.0.0.1", port=free_port())
    runner = await start(settings)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{settings.port}/v1/ws") as ws:
            await ws.send_json(request_frame("w", [8, 8]))
            req = await peer.next_request()

            async def read_until_closed() -> list[dict]:
                frames = []
                while (msg := await ws.receive()).type == WSMsgType.TEXT:
                    frames.append(json.loads(msg.data))
                return frames

            reader = asyncio.create_task(read_until_closed())  # a live client is always reading
            began = time.monotonic()
            await runner.cleanup()
            assert time.monotonic() - began < 4.0
            frames = await asyncio.wait_for(reader, timeout=5)
            assert ws.close_code == WSCloseCode.GOING_AWAY
    assert all(f["id"] == "w" and f["type"] == "error" for f in frames)  # at most the shutting_down error
    assert await redis.exists(names.cancel_key(req.id))
