"""Turn a validated request into a GenerationRequest a worker can run, and decide whether it may queue at all.

Order matters for the status a client sees: body errors (400) were raised during parsing; here the key's request rate
is counted first (429), then size limits (400), an unknown model (404), a known model with no live worker (503), a
prompt that does not fit the served context (400), and last the two reservations: the key's daily token quota and a
place in the model's queue (429 with Retry-After). A request that gets through holds both; ``InFlight`` gives them
back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import errors
from gateway.api_keys import ApiKey
from gateway.key_limits import QuotaHold
from gateway.openai_api import CHAT, ParsedRequest
from gateway.queue_budget import queue_cost
from gateway.registry import WorkerInfo, context_length
from gateway.state import GatewayState
from gateway.stream_meta import RequestMeta
from shared.settings import Settings
from shared.tokenizer import ChatTemplateError
from shared.wire import GenerationRequest

INLINE_TOKENIZE_CHARS = 4096  # up to here tokenizing takes well under a millisecond


@dataclass
class Admitted:
    parsed: ParsedRequest
    request: GenerationRequest
    max_model_len: int | None
    received: float  # time.monotonic() when the gateway got the request: the start of gateway-side TTFT
    meta: RequestMeta  # what is stored beside the request for resuming and settling

    @property
    def id(self) -> str:
        return self.request.id


def new_request_id(endpoint: str) -> str:
    return f"{'chatcmpl' if endpoint == CHAT else 'cmpl'}-{uuid.uuid4().hex}"


async def admit(parsed: ParsedRequest, state: GatewayState, received: float, key: ApiKey | None) -> Admitted:
    """Resolve the model, build the wire request and reserve its key's quota; raises ApiError (429, 400, 404, 503)
    when it cannot run. The caller must hand the result to ``InFlight``, which takes the queue place (429 when the
    queue is full) as it enqueues, and releases what it holds."""
    if key is not None:
        await state.limits.count_request(key)
    check_request_size(parsed, state.settings)
    created = time.time()
    queue_deadline = queue_deadline_of(parsed, state.settings, created)
    workers = await require_served_model(parsed.model, state)
    prompt_ids = await prompt_token_ids(parsed, state)
    if state.settings.max_prompt_tokens and len(prompt_ids) > state.settings.max_prompt_tokens:
        raise errors.invalid(
            f"The prompt is {len(prompt_ids)} tokens; this server accepts at most {state.settings.max_prompt_tokens} "
            "(TRELLIS_MAX_PROMPT_TOKENS).",
            _prompt_param(parsed),
            code="prompt_too_long",
        )
    max_model_len = context_length(workers)
    params = parsed.params
    params.max_tokens = fit_max_tokens(parsed, len(prompt_ids), max_model_len, state.settings.max_tokens_limit)
    request = GenerationRequest(
        id=new_request_id(parsed.endpoint),
        model=parsed.model,
        prompt_ids=prompt_ids,
        params=params,
        created=created,
        deadline=queue_deadline,  # a worker that picks it up later drops it unstarted (error "queue_timeout")
    )
    hold = await state.limits.reserve_tokens(key, queue_cost(request)) if key is not None else QuotaHold("", 0)
    meta = RequestMeta(
        request_id=request.id,
        endpoint=parsed.endpoint,
        model=parsed.model,
        created=int(created),
        n=params.n,
        want_logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        include_usage=parsed.include_usage,
        prompt_tokens=len(prompt_ids),
        key_id=key.key_id if key is not None else "",
        reserved_tokens=hold.reserved,
        quota_key=hold.quota_key,
        queue_deadline=queue_deadline,
    )
    return Admitted(parsed=parsed, request=request, max_model_len=max_model_len, received=received, meta=meta)


def check_request_size(parsed: ParsedRequest, settings: Settings) -> None:
    """Limits checked before any tokenizing: the prompt's characters and each stop string's length."""
    chars = prompt_chars(parsed)
    if chars > settings.max_prompt_chars:
        param = _prompt_param(parsed)
        raise errors.invalid(
            f"The {param} holds {chars} characters; the limit is {settings.max_prompt_chars} "
            "(TRELLIS_MAX_PROMPT_CHARS).",
            param,
            code="prompt_too_long",
        )
    longest = max((len(s) for s in parsed.params.stop), default=0)
    if longest > settings.max_stop_string_chars:
        raise errors.invalid(
            f"A 'stop' string is {longest} characters; the limit is {settings.max_stop_string_chars}.", "stop"
        )


def queue_deadline_of(parsed: ParsedRequest, settings: Settings, created: float) -> float:
    """The unix time by which the request must have started: ``queue_timeout`` (or the default) after ``created``,
    or the client's ``deadline`` if that comes first."""
    timeout = settings.queue_timeout_seconds if parsed.queue_timeout is None else parsed.queue_timeout
    if timeout > settings.max_queue_timeout_seconds:
        raise errors.invalid(
            f"'queue_timeout' may be at most {settings.max_queue_timeout_seconds:g} seconds, got {timeout:g}.",
            "queue_timeout",
        )
    deadline = created + timeout
    if parsed.deadline is not None:
        if parsed.deadline <= created:
            raise errors.invalid(
                f"'deadline' ({parsed.deadline:.3f}, unix seconds) is already past (now: {created:.3f}).", "deadline"
            )
        deadline = min(deadline, parsed.deadline)
    return deadline


def _prompt_param(parsed: ParsedRequest) -> str:
    return "messages" if parsed.endpoint == CHAT else "prompt"


async def require_served_model(model: str, state: GatewayState) -> list[WorkerInfo]:
    """The model's live workers; 404 when the gateway has no such model directory, 503 when nobody serves it."""
    if not state.model_files.has_model(model):
        raise errors.unknown_model(model)
    workers = await state.registry.workers_for(model, allow_stale=True)  # on the first token's path
    if not workers:
        raise errors.no_worker(model)
    return workers


async def prompt_token_ids(parsed: ParsedRequest, state: GatewayState) -> list[int]:
    """Tokenize the prompt (or render the chat template); token ids the client sent are checked, not re-encoded."""
    if isinstance(parsed.prompt, list):
        # A model directory without a tokenizer can still take token ids; the worker is then the only check.
        if state.model_files.has_tokenizer(parsed.model):
            check_vocabulary(parsed, (await state.model_files.tokenizer(parsed.model)).vocab_size)
        return parsed.prompt
    tokenizer = await state.model_files.tokenizer(parsed.model)
    check_vocabulary(parsed, tokenizer.vocab_size)
    # A short prompt is tokenized in place: the hand-off to a thread would cost more than the work, on the first
    # token's path. Long ones go to a thread so one large prompt cannot stall every other stream.
    inline = prompt_chars(parsed) <= INLINE_TOKENIZE_CHARS
    if parsed.endpoint == CHAT:
        try:
            ids = await _call(inline, tokenizer.chat_prompt_ids, parsed.messages, parsed.chat_template)
        except ChatTemplateError as exc:  # the template's raise_exception(), or the model has no template
            raise errors.invalid(str(exc), "messages") from exc
        param = "messages"
    else:
        ids = await _call(inline, tokenizer.encode, parsed.prompt, add_special_tokens=parsed.add_special_tokens)
        param = "prompt"
    ids = list(ids)
    if not ids:
        raise errors.invalid(f"'{param}' encodes to zero tokens; there is nothing to continue from.", param)
    return ids


async def _call(inline: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs) if inline else await asyncio.to_thread(fn, *args, **kwargs)


def prompt_chars(parsed: ParsedRequest) -> int:
    """The prompt's size in characters (messages: their text contents summed)."""
    if isinstance(parsed.prompt, str):
        return len(parsed.prompt)
    return sum(len(m.get("content") or "") for m in parsed.messages or [])


def check_vocabulary(parsed: ParsedRequest, vocab_size: int) -> None:
    """Every token id the client named must exist: an out-of-range id must never reach a worker's embedding."""
    named = [
        ("prompt", parsed.prompt if isinstance(parsed.prompt, list) else []),
        ("logit_bias", parsed.params.logit_bias),
        ("stop_token_ids", parsed.params.stop_token_ids),
    ]
    for param, ids in named:
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise errors.invalid(
                f"'{param}' holds token id {bad}, outside the model's vocabulary of {vocab_size}.", param
            )


def fit_max_tokens(parsed: ParsedRequest, prompt_tokens: int, max_model_len: int | None, limit: int) -> int:
    """The client's max_tokens, or (like vLLM) the rest of the context capped by ``limit``; 400 if it cannot fit."""
    prompt_param = "messages" if parsed.endpoint == CHAT else "prompt"
    if max_model_len is None:  # no worker reported its context: the worker will enforce it
        return parsed.max_tokens or limit
    room = max_model_len - prompt_tokens
    if room < 1:
        raise errors.invalid(
            f"This model's maximum context length is {max_model_len} tokens, but the {prompt_param} alone is "
            f"{prompt_tokens} tokens, leaving no room for a completion. Shorten the {prompt_param}.",
            prompt_param,
            code="context_length_exceeded",
        )
    if parsed.max_tokens is None:
        return min(room, limit)
    if parsed.max_tokens > room:
        raise errors.invalid(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + parsed.max_tokens} tokens ({prompt_tokens} in the {prompt_param}, "
            f"{parsed.max_tokens} for the completion). Reduce the {prompt_param} or max_tokens.",
            "max_tokens",
            code="context_length_exceeded",
        )
    return parsed.max_tokens
