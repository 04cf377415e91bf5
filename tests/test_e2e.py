"""End to end on the real default model: official OpenAI client and a websocket client against a running gateway,
Redis and a continuous-batching worker on CPU."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import openai
import pytest

from shared.settings import DEFAULT_MODEL_ID
from tests.suite import live_workers, running_suite

MODEL = DEFAULT_MODEL_ID


@pytest.fixture(scope="module")
def base_url(redis_url: str, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("suite-logs")
    with running_suite(redis_url, default_model_dir.parent, MODEL, logs, TRELLIS_MAX_BATCH_SIZE="8") as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_served_default_model(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list().data]


def test_chat_completion_non_streaming_answers_with_text_and_usage(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12
    assert resp.usage.prompt_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_completion_streaming_equals_non_streaming_greedy(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_respects_max_tokens_and_reports_length(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5
    assert resp.choices[0].text


def test_eight_concurrent_greedy_requests_match_their_solo_outputs(client: openai.OpenAI) -> None:
    prompts = [f"Write a short sentence about the number {i}." + " Please." * i for i in range(8)]

    def run(p: str) -> str:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=10 + (len(p) % 7), temperature=0)
        return r.choices[0].text

    solo = [run(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, prompts))
    assert together == solo


def test_ngram_speculation_through_the_api_keeps_greedy_output(client: openai.OpenAI) -> None:
    prompt = "Copy this list exactly: red, green, blue, yellow, purple, orange.\nCopy: red, green, blue,"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    fast = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
        extra_body={"speculative": {"method": "ngram", "num_tokens": 4}},
    )  # fmt: skip
    assert fast.choices[0].text == plain.choices[0].text
    assert fast.usage.completion_tokens == plain.usage.completion_tokens == 16


async def test_websocket_streams_two_interleaved_requests_on_one_socket(base_url: str) -> None:
    bodies = {
        "a": {"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12,
              "temperature": 0},
        "b": {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0},
    }
    kinds = {"a": "chat.completions", "b": "completions"}
    texts = {"a": "", "b": ""}
    finals: dict[str, dict] = {}
    order: list[tuple[str, str]] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{base_url}/v1/ws") as ws:
        for rid, body in bodies.items():
            await ws.send_json({"id": rid, "type": kinds[rid], "body": body})
        while len(finals) < 2:
            msg = await asyncio.wait_for(ws.receive_json(), timeout=120)
            rid = msg["id"]
            assert msg["type"] != "error", msg
            order.append((rid, msg["type"]))
            if msg["type"] == "final":
                finals[rid] = msg
            else:
                texts[rid] += msg.get("text", "")
    # both ran at once: frames of each arrive before either request finishes
    first_final = next(i for i, (_, kind) in enumerate(order) if kind == "final")
    assert {rid for rid, _ in order[:first_final]} == {"a", "b"}
    for rid in bodies:
        assert finals[rid]["usage"]["completion_tokens"] > 0
        assert texts[rid]


def test_cancelled_stream_frees_its_worker_slot(client: openai.OpenAI, base_url: str) -> None:
    stream = client.completions.create(model=MODEL, prompt="Tell me a very long story.", max_tokens=2000,
                                       temperature=0.8, stream=True)
    got = 0
    for _ in stream:
        got += 1
        if got >= 3:
            break
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(int(w["active"]) == 0 for w in live_workers(base_url)):
            break
        time.sleep(0.2)
    assert all(int(w["active"]) == 0 for w in live_workers(base_url)), live_workers(base_url)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 10_000_000}, 400, "max_tokens"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
        ({"model": MODEL, "prompt": "hi", "speculative": {"method": "medusa"}}, 400, "speculative.method"),
        ({"model": MODEL, "prompt": "hi", "speculative": {"num_tokens": 99}}, 400, "speculative.num_tokens"),
        ({"model": MODEL, "prompt": "hi", "speculative": "on"}, 400, "speculative"),
    ],
)
def test_bad_completion_requests_get_openai_error_bodies(base_url: str, body: dict, status: int, param: str) -> None:
    code, err = _post(f"{base_url}/v1/completions", json.dumps(body).encode())
    assert code == status
    assert set(err["error"]) >= {"message", "type", "param", "code"}
    assert err["error"]["param"] == param


def test_malformed_json_is_a_400(base_url: str) -> None:
    code, err = _post(f"{base_url}/v1/chat/completions", b"{not json")
    assert code == 400 and err["error"]["message"]


def test_oversized_body_is_a_413(base_url: str) -> None:
    code, err = _post(f"{base_url}/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * 5_000_000}).encode())
    assert code == 413 and err["error"]["message"]


def test_prompt_plus_max_tokens_beyond_context_is_a_400(base_url: str) -> None:
    code, err = _post(f"{base_url}/v1/completions",
                      json.dumps({"model": MODEL, "prompt": "word " * 8000, "max_tokens": 1000}).encode())
    assert code == 400
    assert "context" in err["error"]["message"]
