"""Every error the gateway answers with, as an OpenAI error body: 400, 404, 405, 413, 503 - and never a 500 for a
client's mistake. A real gateway, a real Redis; a heartbeat hash stands in for a live worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.redis_server import free_port
from tests.gateway_harness import (
    announce_worker,
    fresh_redis,
    gateway_settings,
    make_model_dir,
    running_gateway,
)

MODEL = "err-model"
CONTEXT = 64
MAX_BODY = 4096
TOKENS = [11, 12, 13]


@pytest.fixture
async def env(redis_url: str, tmp_path: Path):
    """A gateway that knows MODEL (a model directory plus a live heartbeat with a 64-token context)."""
    make_model_dir(tmp_path, MODEL)
    make_model_dir(tmp_path, "idle-model")  # on disk, but no worker serves it
    async with fresh_redis(redis_url) as r:
        await announce_worker(r, MODEL, max_model_len=CONTEXT)
        await announce_worker(r, "stale-model", max_model_len=CONTEXT, age=60)
        make_model_dir(tmp_path, "stale-model")
        settings = gateway_settings(redis_url, tmp_path, max_body_bytes=MAX_BODY, max_n=4, max_stop_strings=2)
        async with running_gateway(settings) as client:
            yield client


def assert_error_body(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


async def post(client, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post(path, json=body)
    return resp.status, await resp.json()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": TOKENS, "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (completion(temperature=-0.5), "temperature"),
        (completion(top_p=0), "top_p"),
        (completion(top_p=1.5), "top_p"),
        (completion(n=0), "n"),
        (completion(n=5), "n"),  # max_n is 4 here
        (completion(stop=["a", "b", "c"]), "stop"),  # max_stop_strings is 2 here
        (completion(stop=[""]), "stop"),
        (completion(max_tokens="ten"), "max_tokens"),
        (completion(max_tokens=0), "max_tokens"),
        (completion(max_tokens=10_000_000), "max_tokens"),
        ({"model": MODEL}, "prompt"),
        (completion(prompt=["one", "two"]), "prompt"),
        (completion(prompt=[]), "prompt"),
        (completion(prompt=[1, -2]), "prompt"),
        (completion(prompt={"text": "x"}), "prompt"),
        (completion(echo=True), "echo"),
        (completion(logprobs=6), "logprobs"),
        (completion(logprobs=True), "logprobs"),
        (completion(presence_penalty=2.5), "presence_penalty"),
        (completion(logit_bias={"not-a-token": 1}), "logit_bias"),
        (completion(logit_bias={"5": 500}), "logit_bias"),
        (completion(stream_options={"include_usage": True}), "stream_options"),
        (completion(stream="yes"), "stream"),
        (completion(seed=1.5), "seed"),
        (completion(top_k=-2), "top_k"),
        (completion(min_p=2), "min_p"),
        (completion(repetition_penalty=0), "repetition_penalty"),
        (completion(stop_token_ids=[1, "2"]), "stop_token_ids"),
        (completion(ignore_eos=1), "ignore_eos"),
        (completion(user=7), "user"),
        (completion(model=""), "model"),
    ],
)
async def test_invalid_completion_parameters_are_400_naming_the_parameter(env, body: dict, param: str) -> None:
    status, resp = await post(env, "/v1/completions", body)
    assert status == 400, resp
    err = assert_error_body(resp)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages="hello"), "messages"),
        (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content[0]",
        ),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(max_completion_tokens=-1), "max_completion_tokens"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (chat(response_format={"type": "json_object"}), "response_format"),
    ],
)
async def test_invalid_chat_parameters_are_400_naming_the_parameter(env, body: dict, param: str) -> None:
    status, resp = await post(env, "/v1/chat/completions", body)
    assert status == 400, resp
    assert assert_error_body(resp)["param"] == param


async def test_prompt_plus_max_tokens_beyond_the_workers_context_is_400(env) -> None:
    status, resp = await post(env, "/v1/completions", completion(max_tokens=CONTEXT - len(TOKENS) + 1))
    assert status == 400
    err = assert_error_body(resp)
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == "max_tokens"
    assert f"{CONTEXT}" in err["message"] and "context" in err["message"]


async def test_prompt_filling_the_whole_context_is_400_even_without_max_tokens(env) -> None:
    body = {"model": MODEL, "prompt": list(range(1, CONTEXT + 1))}
    status, resp = await post(env, "/v1/completions", body)
    assert status == 400
    err = assert_error_body(resp)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'"text"',
        b'{"model": "err-model", "prompt": [1], "temperature": NaN}',
        b"\xff\xfe",
    ],
)
async def test_malformed_bodies_are_400(env, raw: bytes) -> None:
    resp = await env.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert_error_body(await resp.json())


@pytest.mark.parametrize("model", ["no-such-model", "../etc", "a/../../b", ".hidden"])
async def test_unknown_model_is_404(env, model: str) -> None:
    status, resp = await post(env, "/v1/completions", completion(model=model))
    assert status == 404
    err = assert_error_body(resp)
    assert err["param"] == "model" and err["code"] == "model_not_found"


async def test_body_over_the_limit_is_413(env) -> None:
    status, resp = await post(env, "/v1/completions", completion(prompt="x" * MAX_BODY))
    assert status == 413
    assert str(MAX_BODY) in assert_error_body(resp)["message"]


async def test_chunked_body_over_the_limit_is_413(env) -> None:
    async def chunks():
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)

    resp = await env.post("/v1/completions", data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert_error_body(await resp.json())


@pytest.mark.parametrize("model", ["idle-model", "stale-model"])
async def test_model_without_a_live_worker_is_503(env, model: str) -> None:
    status, resp = await post(env, "/v1/completions", completion(model=model))
    assert status == 503
    err = assert_error_body(resp)
    assert err["code"] == "no_worker" and model in err["message"]


async def test_wrong_route_is_a_json_404_and_wrong_method_a_json_405(env) -> None:
    resp = await env.get("/v1/nothing-here")
    assert resp.status == 404
    assert assert_error_body(await resp.json())["code"] == "not_found"
    resp = await env.get("/v1/completions")
    assert resp.status == 405
    err = assert_error_body(await resp.json())
    assert "POST" in err["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "max_tokens", "stop", "seed", "logprobs", "top_k"])
@pytest.mark.parametrize("value", [{"a": 1}, [[1]], "text", True])
async def test_wrong_types_are_never_a_server_error(env, field: str, value: Any) -> None:
    if field == "stop" and isinstance(value, str):
        value = ["a", "b", value]  # a lone string is a valid stop; three strings break max_stop_strings
    status, resp = await post(env, "/v1/completions", completion(**{field: value}))
    assert status == 400, (field, value, resp)
    assert assert_error_body(resp)["param"] == field


async def test_redis_down_is_503_but_health_stays_200(tmp_path: Path) -> None:
    make_model_dir(tmp_path, MODEL)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with running_gateway(gateway_settings(dead, tmp_path)) as client:
        status, resp = await post(client, "/v1/completions", completion())
        assert status == 503
        assert assert_error_body(resp)["code"] == "redis_unavailable"
        ready = await client.get("/ready")
        assert ready.status == 503 and "redis" in (await ready.json())["reason"]
        assert (await client.get("/health")).status == 200


async def test_error_responses_are_counted_by_reason_in_metrics(env) -> None:
    await post(env, "/v1/completions", completion(temperature=-1))
    await post(env, "/v1/completions", completion(model="no-such-model"))
    text = await (await env.get("/metrics")).text()
    assert 'trellis_gateway_rejected_total{reason="invalid_request"} 1.0' in text
    assert 'trellis_gateway_rejected_total{reason="model_not_found"} 1.0' in text
    assert 'trellis_gateway_requests_total{method="POST",route="/v1/completions",status="400"} 1.0' in text
