"""The REST routes: generation (JSON or SSE), models, tokenize/detokenize, usage, health, readiness, workers, metrics.

(Resuming a stream is gateway/resume.py; the websocket is gateway/websocket.py; the OpenAPI document is
gateway/openapi.py.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.admission import admit
from gateway.auth import ADMIN, USER, principal_of, require_scope
from gateway.generation import complete, stream
from gateway.openai_api import (
    CHAT,
    COMPLETIONS,
    decode_json_object,
    parse_chat_template_options,
    parse_generation,
    parse_messages,
    parse_token_ids,
)
from gateway.registry import WorkerInfo, context_length
from gateway.state import GatewayState, state_of
from shared.tokenizer import ChatTemplateError


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object: 413 over ``max_body_bytes`` (checked before reading when the size is declared)."""
    limit = state_of(request).settings.max_body_bytes
    too_large = errors.ApiError(
        413,
        f"The request body is larger than the limit of {limit} bytes (TRELLIS_MAX_BODY_BYTES).",
        code="request_too_large",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        raw = await request.read()  # aiohttp enforces client_max_size for chunked bodies too
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    return decode_json_object(raw)


# -- generation ----------------------------------------------------------------------------------------------------
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, COMPLETIONS)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CHAT)


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    received = time.monotonic()
    require_scope(request, USER)
    state = state_of(request)
    parsed = parse_generation(endpoint, await read_json(request), state.settings)
    admitted = await admit(parsed, state, received, principal_of(request))
    if parsed.stream:
        return await stream(admitted, state, request)
    return await complete(admitted, state, request)


# -- models and tokens ---------------------------------------------------------------------------------------------
async def list_models(request: web.Request) -> web.Response:
    require_scope(request, USER)
    served = await state_of(request).registry.models()
    data = [
        {
            "id": model,
            "object": "model",
            "created": int(min(w.started for w in workers)),
            "owned_by": "trellis",
            "max_model_len": context_length(workers),
            "workers": len(workers),
        }
        for model, workers in sorted(served.items())
    ]
    return web.json_response({"object": "list", "data": data})


async def tokenize(request: web.Request) -> web.Response:
    """``{model, prompt}`` (plain text) or ``{model, messages}`` (through the chat template) -> token ids."""
    require_scope(request, USER)
    state = state_of(request)
    body = await read_json(request)
    model = _model_with_files(body, state)
    tokenizer = await state.model_files.tokenizer(model)
    if ("prompt" in body) == ("messages" in body):
        raise errors.invalid("Send exactly one of 'prompt' (text) or 'messages' (chat).", "prompt")
    if "messages" in body:
        messages = parse_messages(body["messages"])
        try:
            options = parse_chat_template_options(body)
            tokens = await asyncio.to_thread(tokenizer.chat_prompt_ids, messages, options)
        except ChatTemplateError as exc:
            raise errors.invalid(str(exc), "messages") from exc
    else:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise errors.invalid("'prompt' must be a string.", "prompt")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise errors.invalid("'add_special_tokens' must be a boolean.", "add_special_tokens")
        tokens = await asyncio.to_thread(tokenizer.encode, prompt, add_special_tokens=add_special)
    tokens = list(tokens)
    max_model_len = context_length(await _workers_or_none(state, model))
    return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len})


async def detokenize(request: web.Request) -> web.Response:
    require_scope(request, USER)
    state = state_of(request)
    body = await read_json(request)
    model = _model_with_files(body, state)
    if "tokens" not in body:
        raise errors.invalid("'tokens' is required.", "tokens")
    tokens = body["tokens"]
    if tokens != []:
        tokens = parse_token_ids(tokens, "tokens")
    tokenizer = await state.model_files.tokenizer(model)
    bad = next((t for t in tokens if t >= tokenizer.vocab_size), None)
    if bad is not None:
        raise errors.invalid(
            f"'tokens' holds token id {bad}, outside the vocabulary of {tokenizer.vocab_size}.", "tokens"
        )
    text = await asyncio.to_thread(tokenizer.decode, tokens)
    return web.json_response({"prompt": text})


def _model_with_files(body: dict[str, Any], state: GatewayState) -> str:
    model = body.get("model", state.settings.default_model)
    if not isinstance(model, str) or not model:
        raise errors.invalid("'model' must be a non-empty string.", "model")
    if not state.model_files.has_model(model):
        raise errors.unknown_model(model)
    return model


async def _workers_or_none(state: GatewayState, model: str) -> list[WorkerInfo]:
    try:
        return await state.registry.workers_for(model)
    except RedisError:
        return []  # tokenizing works without Redis; only the context length is unknown


# -- operations ----------------------------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. Says nothing about Redis or workers (that is /ready)."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: Redis answers and at least one worker is live; else 503 with the reason."""
    state = state_of(request)
    try:
        await state.redis.ping()
        workers = await state.registry.live_workers()
    except (RedisError, OSError) as exc:
        return web.json_response({"status": "unavailable", "reason": f"redis is unreachable: {exc}"}, status=503)
    if not workers:
        return web.json_response({"status": "unavailable", "reason": "no live inference worker"}, status=503)
    return web.json_response({"status": "ready", "workers": len(workers), "models": sorted({w.model for w in workers})})


async def list_workers(request: web.Request) -> web.Response:
    require_scope(request, ADMIN)  # worker pids and hosts are operator information
    workers = await state_of(request).registry.live_workers()
    return web.json_response({"object": "list", "data": [w.to_json() for w in workers]})


async def metrics(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.settings.metrics_auth != "none":
        require_scope(request, state.settings.metrics_auth)
    await state.metrics.cluster.refresh(state.redis, state.registry, state.settings.models_dir)
    return state.metrics.response()


async def usage(request: web.Request) -> web.Response:
    """The caller's key: its limits and its counters (requests, tokens; today's includes running requests' holds)."""
    require_scope(request, USER)
    state = state_of(request)
    key = principal_of(request)
    if key is None:
        raise errors.ApiError(
            404, "Usage is counted per API key, and this gateway runs without keys.", code="no_api_keys"
        )
    counters = await state.limits.usage(key)
    return web.json_response(
        {
            "object": "usage",
            "key_id": key.key_id,
            "name": key.name,
            "scope": key.scope,
            "limits": {"requests_per_minute": state.limits.rpm_of(key), "tokens_per_day": state.limits.quota_of(key)},
            **counters,
        }
    )
