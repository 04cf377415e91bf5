"""The gateway's other routes - /health, /ready, /v1/models, /v1/workers, /metrics, /v1/tokenize, /v1/detokenize -
and the chat endpoint on the real default model's tokenizer and chat template, the test playing the worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.tokenizer import ChatTemplateOptions, ModelTokenizer
from tests.gateway_harness import (
    WorkerPeer,
    announce_worker,
    delta,
    done,
    finish,
    gateway_settings,
    make_model_dir,
    parse_sse,
    running_gateway,
)

CONTEXT = 2048


@pytest.fixture
async def client(redis_url: str, tmp_path: Path, redis):
    for model in ("alpha", "beta", "stale"):
        make_model_dir(tmp_path, model)
    async with running_gateway(gateway_settings(redis_url, tmp_path)) as c:
        yield c


# -- operations ----------------------------------------------------------------------------------------------------
async def test_ready_says_why_until_a_worker_heartbeats(client, redis) -> None:
    assert (await client.get("/health")).status == 200
    resp = await client.get("/ready")
    assert resp.status == 503
    assert "worker" in (await resp.json())["reason"]
    await announce_worker(redis, "alpha")
    await asyncio.sleep(0.6)  # past the registry's short cache
    resp = await client.get("/ready")
    assert resp.status == 200
    assert (await resp.json())["models"] == ["alpha"]


async def test_models_lists_served_models_with_the_smallest_worker_context(client, redis) -> None:
    await announce_worker(redis, "alpha", max_model_len=4096)
    await announce_worker(redis, "alpha", max_model_len=1024)
    await announce_worker(redis, "beta", max_model_len=512)
    await announce_worker(redis, "stale", max_model_len=512, age=120)
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"], m["workers"]) for m in body["data"]] == [
        ("alpha", "model", 1024, 2),
        ("beta", "model", 512, 1),
    ]


async def test_workers_lists_each_live_worker_with_its_load(client, redis) -> None:
    worker_id = await announce_worker(redis, "alpha", active=3)
    await announce_worker(redis, "stale", age=120)
    workers = (await (await client.get("/v1/workers")).json())["data"]
    assert [w["id"] for w in workers] == [worker_id]
    assert (workers[0]["model"], workers[0]["device"], workers[0]["pid"], workers[0]["active"]) == (
        "alpha",
        "cpu",
        4242,
        3,
    )


async def test_metrics_count_requests_open_streams_and_time_to_first_token(client, redis) -> None:
    await announce_worker(redis, "alpha")
    peer = await WorkerPeer(redis, "alpha").join()
    body = {"model": "alpha", "prompt": [1, 2], "max_tokens": 3, "stream": True}
    resp = await client.post("/v1/completions", json=body)
    req = await peer.next_request()
    await peer.emit(req.id, delta("a"))
    await resp.content.readline()  # the first event arrived: the stream is open
    during = await (await client.get("/metrics")).text()
    assert 'trellis_gateway_open_streams{transport="sse"} 1.0' in during
    await peer.emit(req.id, finish(0, "length", 1))
    await peer.emit(req.id, done(2, 1))
    await resp.text()
    after = await (await client.get("/metrics")).text()
    assert 'trellis_gateway_open_streams{transport="sse"} 0.0' in after
    assert 'trellis_gateway_ttft_seconds_count{model="alpha"} 1.0' in after
    assert 'trellis_gateway_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' in after


# -- the real default model's tokenizer ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_dir(default_model_dir)


@pytest.fixture
async def model_client(redis_url: str, default_model_dir: Path, redis):
    async with running_gateway(gateway_settings(redis_url, default_model_dir.parent)) as c:
        yield c, default_model_dir.name


async def test_tokenize_and_detokenize_round_trip(model_client, redis, tokenizer: ModelTokenizer) -> None:
    client, model = model_client
    await announce_worker(redis, model, max_model_len=CONTEXT)
    text = "Trellis serves quantized models."
    resp = await client.post("/v1/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
    body = await resp.json()
    assert body["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CONTEXT
    resp = await client.post("/v1/detokenize", json={"model": model, "tokens": body["tokens"]})
    assert (await resp.json()) == {"prompt": text}


async def test_tokenize_messages_applies_the_chat_template(model_client, tokenizer: ModelTokenizer) -> None:
    client, model = model_client
    messages = [{"role": "user", "content": "Hello there"}]
    body = await (await client.post("/v1/tokenize", json={"model": model, "messages": messages})).json()
    assert body["tokens"] == tokenizer.chat_prompt_ids(messages)
    assert body["max_model_len"] is None  # no live worker reports a context
    assert len(body["tokens"]) > len(tokenizer.encode("Hello there", add_special_tokens=False))


async def test_chat_template_options_reach_the_template(model_client, tokenizer: ModelTokenizer) -> None:
    client, model = model_client
    messages = [{"role": "user", "content": "Hello there"}]
    body = {"model": model, "messages": messages, "add_generation_prompt": False}
    tokens = (await (await client.post("/v1/tokenize", json=body)).json())["tokens"]
    assert tokens == tokenizer.chat_prompt_ids(messages, ChatTemplateOptions(add_generation_prompt=False))
    assert tokens != tokenizer.chat_prompt_ids(messages)
    # extra variables go to the template (this one ignores unknown names: the prompt is unchanged)
    body = {"model": model, "messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
    assert (await (await client.post("/v1/tokenize", json=body)).json())["tokens"] == tokenizer.chat_prompt_ids(
        messages
    )
    for bad in ([1], {"messages": []}, {"bos_token": "x"}):
        resp = await client.post("/v1/chat/completions", json={"model": model, "messages": messages,
                                                                "chat_template_kwargs": bad})  # fmt: skip
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "chat_template_kwargs"
    resp = await client.post("/v1/tokenize", json={"model": model, "messages": messages, "add_generation_prompt": 1})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "add_generation_prompt"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/v1/detokenize", {"tokens": "abc"}, "tokens"),
        ("/v1/tokenize", {"prompt": 5}, "prompt"),
        ("/v1/tokenize", {}, "prompt"),
        ("/v1/tokenize", {"model": "no-such-model", "prompt": "x"}, "model"),
    ],
)
async def test_tokenize_and_detokenize_reject_bad_input(model_client, path: str, body: dict, param: str) -> None:
    client, model = model_client
    resp = await client.post(path, json={"model": model, **body})
    assert resp.status in (400, 404)
    assert (await resp.json())["error"]["param"] == param


async def test_out_of_vocabulary_token_ids_are_400(model_client, redis, tokenizer: ModelTokenizer) -> None:
    client, model = model_client
    await announce_worker(redis, model, max_model_len=CONTEXT)
    bodies = [
        ({"prompt": [1, tokenizer.vocab_size]}, "prompt"),
        ({"prompt": "hi", "logit_bias": {str(tokenizer.vocab_size + 5): 1}}, "logit_bias"),
        ({"prompt": "hi", "stop_token_ids": [tokenizer.vocab_size]}, "stop_token_ids"),
    ]
    for body, param in bodies:
        resp = await client.post("/v1/completions", json={"model": model, **body})
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == param


async def test_text_prompt_is_tokenized_with_the_models_special_tokens(
    model_client, redis, tokenizer: ModelTokenizer
) -> None:
    client, model = model_client
    await announce_worker(redis, model, max_model_len=CONTEXT)
    peer = await WorkerPeer(redis, model).join()
    call = asyncio.create_task(client.post("/v1/completions", json={"model": model, "prompt": "Once upon a time"}))
    req = await peer.next_request()
    assert req.prompt_ids == tokenizer.encode("Once upon a time")
    assert req.params.max_tokens == CONTEXT - len(req.prompt_ids)
    await peer.answer(req.id, [" there"])
    assert (await (await call).json())["choices"][0]["text"] == " there"


async def test_chat_stream_opens_with_the_assistant_role_and_sends_the_templated_prompt(
    model_client, redis, tokenizer: ModelTokenizer
) -> None:
    client, model = model_client
    await announce_worker(redis, model, max_model_len=CONTEXT)
    peer = await WorkerPeer(redis, model).join()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    body = {"model": model, "messages": messages, "stream": True, "max_completion_tokens": 5}
    call = asyncio.create_task(client.post("/v1/chat/completions", json=body))
    req = await peer.next_request()
    assert req.prompt_ids == tokenizer.chat_prompt_ids(messages)
    assert req.id.startswith("chatcmpl-") and req.params.max_tokens == 5
    await peer.answer(req.id, ["Hi", "!"])
    events = [e for e in parse_sse(await (await call).text()) if e.data is not None]
    chunks = [e.json() for e in events[:-1]]
    assert events[-1].data == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hi", "!"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_answer_has_an_assistant_message_and_chat_logprobs(model_client, redis) -> None:
    client, model = model_client
    await announce_worker(redis, model, max_model_len=CONTEXT)
    peer = await WorkerPeer(redis, model).join()
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 1}
    call = asyncio.create_task(client.post("/v1/chat/completions", json=body))
    req = await peer.next_request()
    assert req.params.logprobs and req.params.top_logprobs == 1
    lp = {"token": "Yo", "id": 56, "logprob": -0.25, "bytes": [89, 111], "top": [["Yo", 56, -0.25], ["Hey", 7, -2.0]]}
    await peer.emit(req.id, {**delta("Yo"), "logprobs": [lp]})
    await peer.emit(req.id, finish(0, "stop", 1))
    await peer.emit(req.id, done(len(req.prompt_ids), 1))
    out = await (await call).json()
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and out["id"] == req.id
    assert choice["message"] == {"role": "assistant", "content": "Yo"}
    assert choice["logprobs"]["content"] == [
        {
            "token": "Yo",
            "logprob": -0.25,
            "bytes": [89, 111],
            "top_logprobs": [{"token": "Yo", "logprob": -0.25, "bytes": [89, 111]}],
        }
    ]
    assert out["usage"]["prompt_tokens"] == len(req.prompt_ids)
