"""Build OpenAI response bodies and stream chunks from the worker's output events (see shared/wire.py).

One ``ResponseBuilder`` per request knows the endpoint's shapes (``text_completion`` or ``chat.completion``), turns
each ``delta`` / ``finish`` / ``done`` event into a chunk, and accumulates the choices for a non-streaming answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.openai_api import CHAT, COMPLETIONS


@dataclass
class ChoiceState:
    """What one choice (one of ``n``) has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # wire TokenLogprob dicts
    text_length: int = 0  # characters emitted so far: the legacy logprobs' text_offset base
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ResponseBuilder:
    def __init__(
        self,
        endpoint: str,
        request_id: str,
        model: str,
        created: int,
        n: int,
        want_logprobs: bool,
        top_logprobs: int,
        include_usage: bool = False,
    ) -> None:
        if endpoint not in (COMPLETIONS, CHAT):
            raise ValueError(f"unknown endpoint {endpoint!r}")
        self.endpoint = endpoint
        self.request_id = request_id
        self.model = model
        self.created = created
        self.want_logprobs = want_logprobs
        self.top_logprobs = top_logprobs
        self.include_usage = include_usage  # then every chunk carries "usage": null until the final usage chunk
        self.choices = [ChoiceState(i) for i in range(n)]
        self.usage: dict[str, int] | None = None

    @property
    def is_chat(self) -> bool:
        return self.endpoint == CHAT

    # -- events -> state -----------------------------------------------------------------------------------------
    def choice(self, event: dict[str, Any]) -> ChoiceState:
        index = int(event.get("index", 0))
        if not 0 <= index < len(self.choices):
            raise ValueError(f"worker event for choice {index}, but the request has {len(self.choices)} choices")
        return self.choices[index]

    def apply_delta(self, event: dict[str, Any]) -> tuple[ChoiceState, str, list[dict[str, Any]], int]:
        """Record a delta; returns (choice, its new text, its new logprobs, the text offset it starts at)."""
        state = self.choice(event)
        text = str(event.get("text") or "")
        logprobs = list(event.get("logprobs") or []) if self.want_logprobs else []
        offset = state.text_length
        state.text.append(text)
        state.text_length += len(text)
        state.logprobs.extend(logprobs)
        return state, text, logprobs, offset

    def apply_finish(self, event: dict[str, Any]) -> ChoiceState:
        state = self.choice(event)
        state.finish_reason = event.get("finish_reason")
        state.stop_reason = event.get("stop_reason")
        return state

    def apply_done(self, event: dict[str, Any]) -> dict[str, int]:
        usage = event.get("usage") or {}
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        self.usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": int(usage.get("total_tokens", prompt + completion)),
        }
        return self.usage

    # -- non-streaming body --------------------------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            choice: dict[str, Any] = {"index": c.index}
            if self.is_chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = self.format_logprobs(c.logprobs, 0) if self.want_logprobs else None
            choice["finish_reason"] = c.finish_reason
            choice["stop_reason"] = c.stop_reason  # vLLM's extra: which stop string or token id ended it
            choices.append(choice)
        return {**self._head(chunk=False), "choices": choices, "usage": self.usage}

    # -- streaming chunks ----------------------------------------------------------------------------------------
    def role_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open with an assistant role delta per choice (completions have none)."""
        if not self.is_chat:
            return []
        return [
            self._chunk(
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
            for c in self.choices
        ]

    def delta_chunk(self, state: ChoiceState, text: str, logprobs: list[dict[str, Any]], offset: int) -> dict:
        lp = self.format_logprobs(logprobs, offset) if self.want_logprobs else None
        if self.is_chat:
            body = {"index": state.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
        else:
            body = {"index": state.index, "text": text, "logprobs": lp, "finish_reason": None}
        return self._chunk(body)

    def finish_chunk(self, state: ChoiceState) -> dict[str, Any]:
        if self.is_chat:
            body = {"index": state.index, "delta": {}, "logprobs": None, "finish_reason": state.finish_reason}
        else:
            body = {"index": state.index, "text": "", "logprobs": None, "finish_reason": state.finish_reason}
        body["stop_reason"] = state.stop_reason
        return self._chunk(body)

    def usage_chunk(self) -> dict[str, Any]:
        """The final chunk of ``stream_options.include_usage``: no choices, the whole request's usage."""
        return {**self._head(chunk=True), "choices": [], "usage": self.usage}

    # -- shapes --------------------------------------------------------------------------------------------------
    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.is_chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._head(chunk=True), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def format_logprobs(self, entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
        """Wire TokenLogprob dicts in this endpoint's OpenAI shape; ``offset``: where their text starts."""
        if self.is_chat:
            return chat_logprobs(entries, self.top_logprobs)
        return completion_logprobs(entries, offset, self.top_logprobs)


def chat_logprobs(entries: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """Chat format: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    content = []
    for e in entries:
        alternatives = [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, _id, lp in (e.get("top") or [])[:top]
        ]
        token = e["token"]
        content.append(
            {
                "token": token,
                "logprob": e["logprob"],
                "bytes": e.get("bytes") or list(token.encode("utf-8")),
                "top_logprobs": alternatives,
            }
        )
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]], offset: int, top: int) -> dict[str, Any]:
    """Legacy completions format: parallel lists of tokens, their logprobs, top alternatives and text offsets."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        token_logprobs.append(e["logprob"])
        tops.append({t: lp for t, _id, lp in (e.get("top") or [])[:top]} if top else None)
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
