"""Parse and validate OpenAI request bodies (completions and chat completions) into plain, typed requests.

Pure functions over the decoded JSON: no Redis, no tokenizer. What needs the model (tokenizing, the context length
and the default ``max_tokens``) happens afterwards in ``gateway/admission.py``. Every rejection is a 400 ``ApiError``
whose ``param`` names the offending field, so a client never sees a 500 for its own mistake.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ApiError, invalid
from shared.settings import Settings
from shared.tokenizer import RESERVED_TEMPLATE_VARIABLES, ChatTemplateOptions
from shared.wire import SamplingParams, SpeculativeError, check_speculative

COMPLETIONS = "completions"
CHAT = "chat.completions"
ENDPOINTS = (COMPLETIONS, CHAT)

MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API allows 0..5 alternatives
MAX_CHAT_TOP_LOGPROBS = 20
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts


@dataclass
class ParsedRequest:
    """A validated generation request, before the model is consulted."""

    endpoint: str  # COMPLETIONS | CHAT
    model: str
    params: SamplingParams  # params.max_tokens is provisional until admission fills in the default
    max_tokens: int | None  # what the client asked for; None means "the rest of the context"
    prompt: str | list[int] | None = None  # completions: text, or token ids
    messages: list[dict[str, Any]] | None = None  # chat
    chat_template: ChatTemplateOptions = field(default_factory=ChatTemplateOptions)  # chat
    stream: bool = False
    include_usage: bool = False
    add_special_tokens: bool = True  # completions text prompts (vLLM's extra); chat templates add their own
    queue_timeout: float | None = None  # seconds the request may wait to start (our extra); None: the default
    deadline: float | None = None  # unix time by which it must have started (our extra)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; malformed JSON, NaN/Infinity or a non-object is a 400."""
    if not raw.strip():
        raise invalid("The request body is empty; expected a JSON object.")

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except UnicodeDecodeError as exc:
        raise invalid(f"The request body is not valid UTF-8: {exc.reason}.") from exc
    except ValueError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}.") from exc
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {_json_type(body)}.")
    return body


def parse_generation(endpoint: str, body: dict[str, Any], settings: Settings) -> ParsedRequest:
    """Validate a completions or chat completions body; raises a 400 ApiError naming the bad field."""
    if endpoint == COMPLETIONS:
        return parse_completion(body, settings)
    if endpoint == CHAT:
        return parse_chat(body, settings)
    raise ValueError(f"unknown endpoint {endpoint!r}")


def parse_completion(body: dict[str, Any], settings: Settings) -> ParsedRequest:
    f = _Fields(body)
    _reject_unsupported_completion_fields(f)
    prompt = parse_prompt(body.get("prompt"))
    n = f.int("n", 1, lo=1, hi=settings.max_n)
    logprobs = f.int("logprobs", None, lo=0, hi=MAX_COMPLETION_LOGPROBS)
    max_tokens = f.int("max_tokens", None, lo=1, hi=settings.max_tokens_limit)
    params = _sampling_params(f, settings, n=n, max_tokens=max_tokens)
    params.logprobs = logprobs is not None
    params.top_logprobs = logprobs or 0
    stream, include_usage = _stream_flags(f)
    return ParsedRequest(
        endpoint=COMPLETIONS,
        model=_model(f, settings),
        params=params,
        max_tokens=max_tokens,
        prompt=prompt,
        stream=stream,
        include_usage=include_usage,
        add_special_tokens=f.bool("add_special_tokens", True),
        queue_timeout=f.optional_number("queue_timeout", lo=0.0, lo_open=True),
        deadline=f.optional_number("deadline", lo=0.0, lo_open=True),
    )


def parse_chat(body: dict[str, Any], settings: Settings) -> ParsedRequest:
    f = _Fields(body)
    _reject_unsupported_chat_fields(f)
    messages = parse_messages(body.get("messages"))
    n = f.int("n", 1, lo=1, hi=settings.max_n)
    # max_completion_tokens replaced max_tokens in OpenAI's chat API; accept both, the newer one wins
    max_tokens = f.int("max_completion_tokens", None, lo=1, hi=settings.max_tokens_limit)
    if max_tokens is None:
        max_tokens = f.int("max_tokens", None, lo=1, hi=settings.max_tokens_limit)
    want_logprobs = f.bool("logprobs", False)
    top_logprobs = f.int("top_logprobs", None, lo=0, hi=MAX_CHAT_TOP_LOGPROBS)
    if top_logprobs is not None and not want_logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    params = _sampling_params(f, settings, n=n, max_tokens=max_tokens)
    params.logprobs = want_logprobs
    params.top_logprobs = top_logprobs or 0
    stream, include_usage = _stream_flags(f)
    return ParsedRequest(
        endpoint=CHAT,
        model=_model(f, settings),
        params=params,
        max_tokens=max_tokens,
        messages=messages,
        chat_template=parse_chat_template_options(body),
        stream=stream,
        include_usage=include_usage,
        queue_timeout=f.optional_number("queue_timeout", lo=0.0, lo_open=True),
        deadline=f.optional_number("deadline", lo=0.0, lo_open=True),
    )


def parse_chat_template_options(body: dict[str, Any]) -> ChatTemplateOptions:
    """vLLM's extras for chat: ``add_generation_prompt`` (default true) and ``chat_template_kwargs``, extra variables
    for the template (e.g. Qwen3's ``{"enable_thinking": false}``); names the renderer sets itself are refused."""
    f = _Fields(body)
    extra = body.get("chat_template_kwargs")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise invalid(f"'chat_template_kwargs' must be an object, got {_json_type(extra)}.", "chat_template_kwargs")
    reserved = sorted(set(extra) & RESERVED_TEMPLATE_VARIABLES)
    if reserved:
        raise invalid(
            f"'chat_template_kwargs' may not set {', '.join(reserved)}: the request's own fields set those.",
            "chat_template_kwargs",
        )
    return ChatTemplateOptions(f.bool("add_generation_prompt", True), extra)


def parse_prompt(prompt: Any, param: str = "prompt") -> str | list[int]:
    """A completions prompt: a string, a one-element list of strings, or token ids (flat or one-element nested)."""
    if prompt is None:
        raise invalid(f"'{param}' is required.", param)
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise invalid(f"'{param}' must be a string or a list of token ids, got {_json_type(prompt)}.", param)
    if not prompt:
        raise invalid(f"'{param}' must not be an empty list.", param)
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        if len(prompt) != 1:
            raise invalid(f"'{param}' holds {len(prompt)} prompts; this server takes one prompt per request.", param)
        return parse_prompt(prompt[0], param) if isinstance(prompt[0], str) else parse_token_ids(prompt[0], param)
    return parse_token_ids(prompt, param)


def parse_token_ids(ids: Any, param: str) -> list[int]:
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise invalid(f"'{param}' must be a string or a list of integer token ids.", param)
    if not ids:
        raise invalid(f"'{param}' must not be empty.", param)
    if any(t < 0 for t in ids):
        raise invalid(f"'{param}' holds a negative token id.", param)
    return list(ids)


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages reduced to what a chat template reads: role, text content, and tool fields passed through."""
    if messages is None:
        raise invalid("'messages' is required.", "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of message objects.", "messages")
    out = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(f"'{param}' must be an object, got {_json_type(msg)}.", param)
        role = msg.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:  # a dict role is unhashable: check the type first
            raise invalid(f"'{param}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}.", f"{param}.role")
        clean: dict[str, Any] = {"role": role, "content": _message_text(msg.get("content"), role, f"{param}.content")}
        for key in ("name", "tool_calls", "tool_call_id"):
            if msg.get(key) is not None:
                clean[key] = msg[key]
        out.append(clean)
    return out


def _message_text(content: Any, role: str, param: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":  # an assistant turn that only called tools
            return ""
        raise invalid(f"'{param}' is required for a {role} message.", param)
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise invalid(
                    f"'{param}[{j}]' must be a text part ({{'type': 'text', 'text': ...}}); "
                    f"this server does not accept {kind!r} content.",
                    f"{param}[{j}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"'{param}' must be a string or a list of text parts, got {_json_type(content)}.", param)


def _sampling_params(f: _Fields, settings: Settings, *, n: int, max_tokens: int | None) -> SamplingParams:
    top_k = f.int("top_k", 0, lo=-1)
    return SamplingParams(
        max_tokens=max_tokens or 1,
        temperature=f.number("temperature", 1.0, lo=0.0),
        top_p=f.number("top_p", 1.0, lo=0.0, lo_open=True, hi=1.0),
        top_k=max(top_k, 0),  # vLLM spells "disabled" as -1; the wire uses 0
        min_p=f.number("min_p", 0.0, lo=0.0, hi=1.0),
        repetition_penalty=f.number("repetition_penalty", 1.0, lo=0.0, lo_open=True),
        presence_penalty=f.number("presence_penalty", 0.0, lo=-2.0, hi=2.0),
        frequency_penalty=f.number("frequency_penalty", 0.0, lo=-2.0, hi=2.0),
        logit_bias=_logit_bias(f.body.get("logit_bias")),
        seed=f.int("seed", None, lo=_SEED_MIN, hi=_SEED_MAX),
        stop=_stop_strings(f.body.get("stop"), settings.max_stop_strings),
        stop_token_ids=_stop_token_ids(f.body.get("stop_token_ids")),
        ignore_eos=f.bool("ignore_eos", False),
        include_stop_str_in_output=f.bool("include_stop_str_in_output", False),
        n=n,
        speculative=_speculative(f.body.get("speculative")),
    )


def _speculative(value: Any) -> dict[str, Any] | None:
    """Our extension: ``{"method": "off" | "ngram" | "draft", "num_tokens": k}``, both optional (docs/speculative.md).
    Whether the serving worker offers the method is its own check (a 400 from it when not)."""
    try:
        return check_speculative(value)
    except SpeculativeError as exc:
        raise invalid(f"{exc}.", exc.param) from None


def _stream_flags(f: _Fields) -> tuple[bool, bool]:
    stream = f.bool("stream", False)
    options = f.body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if not isinstance(options, dict):
        raise invalid(f"'stream_options' must be an object, got {_json_type(options)}.", "stream_options")
    return stream, _Fields(options, prefix="stream_options.").bool("include_usage", False)


def _model(f: _Fields, settings: Settings) -> str:
    model = f.str("model", settings.default_model)
    if not model:
        raise invalid("'model' must not be empty.", "model")
    return model


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"'logit_bias' must be an object of token id -> bias, got {_json_type(value)}.", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"'logit_bias' keys must be token ids, got {key!r}.", "logit_bias") from None
        if token < 0:
            raise invalid(f"'logit_bias' holds a negative token id {token}.", "logit_bias")
        if not _is_number(bias) or not -100.0 <= bias <= 100.0:
            raise invalid(f"'logit_bias[{key}]' must be a number in [-100, 100], got {bias!r}.", "logit_bias")
        out[token] = float(bias)
    return out


def _stop_strings(value: Any, limit: int) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or a list of strings.", "stop")
    if any(s == "" for s in stops):
        raise invalid("'stop' strings must not be empty.", "stop")
    if len(stops) > limit:
        raise invalid(f"'stop' holds {len(stops)} strings; the limit is {limit}.", "stop")
    return stops


def _stop_token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(t) and t >= 0 for t in value):
        raise invalid("'stop_token_ids' must be a list of non-negative integer token ids.", "stop_token_ids")
    return list(value)


def _reject_unsupported_common(f: _Fields) -> None:
    best_of = f.int("best_of", None, lo=1)
    if best_of is not None and best_of != f.body.get("n", 1):
        raise invalid("'best_of' other than 'n' is not supported.", "best_of")
    f.str("user", None)  # accepted for compatibility (end-user tracking); only its type is checked


def _reject_unsupported_completion_fields(f: _Fields) -> None:
    _reject_unsupported_common(f)
    if f.bool("echo", False):
        raise invalid("'echo' is not supported; only echo=false is accepted.", "echo")
    if f.body.get("suffix") not in (None, ""):
        raise invalid("'suffix' is not supported.", "suffix")


def _reject_unsupported_chat_fields(f: _Fields) -> None:
    _reject_unsupported_common(f)
    for name in ("tools", "functions"):
        if f.body.get(name):
            raise invalid(f"'{name}' (tool calling) is not supported.", name)
    if f.body.get("tool_choice") not in (None, "none"):
        raise invalid("'tool_choice' is not supported.", "tool_choice")
    response_format = f.body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("'response_format' other than {'type': 'text'} is not supported.", "response_format")


class _Fields:
    """Typed, range-checked reads of optional fields; each failure is a 400 naming the field."""

    def __init__(self, body: dict[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix

    def _fail(self, name: str, what: str, value: Any) -> ApiError:
        shown = repr(value) if isinstance(value, bool | int | float) else _json_type(value)
        return invalid(f"'{self.prefix}{name}' must be {what}, got {shown}.", self.prefix + name)

    def int(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not _is_int(value):
            raise self._fail(name, "an integer", value)
        _check_range(self, name, value, lo, hi, lo_open=False)
        return value

    def number(
        self, name: str, default: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False
    ) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if not _is_number(value):
            raise self._fail(name, "a number", value)
        _check_range(self, name, value, lo, hi, lo_open=lo_open)
        return float(value)

    def optional_number(
        self, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
    ) -> float | None:
        return None if self.body.get(name) is None else self.number(name, 0.0, lo=lo, hi=hi, lo_open=lo_open)

    def bool(self, name: str, default: bool) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(name, "a boolean", value)
        return value

    def str(self, name: str, default: str | None) -> str | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(name, "a string", value)
        return value


def _check_range(f: _Fields, name: str, value: float, lo: float | None, hi: float | None, lo_open: bool) -> None:
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        left = "(" if lo_open else "["
        lo_text = "-inf" if lo is None else f"{lo:g}"
        hi_text = "inf" if hi is None else f"{hi:g}"
        raise invalid(f"'{f.prefix}{name}' must be in {left}{lo_text}, {hi_text}], got {value!r}.", f.prefix + name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
