"""GET /openapi.json: an OpenAPI 3.0 document of every route, its body and its answers, with this server's limits.

Written by hand beside the parsers it describes (gateway/openai_api.py, handlers.py, resume.py): when a route or a
field changes, change it here too; tests/test_openapi_schemathesis.py fuzzes the live gateway against this document
(no 5xx, every error body well-formed), which is what keeps the two honest.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.openai_api import CHAT_ROLES, MAX_CHAT_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS
from gateway.state import state_of
from shared.settings import Settings
from shared.tokenizer import RESERVED_TEMPLATE_VARIABLES
from shared.wire import CONVERSION_ALLOCATIONS, MAX_SPECULATIVE_TOKENS, SPECULATIVE_METHODS

JSON = "application/json"
Schema = dict[str, Any]
# OpenAPI 3.0 has a text/event-stream schema describe one event: "data" is a JSON chunk, an error or [DONE];
# "id" is the Redis entry id to resume after.
SSE = {
    "text/event-stream": {
        "schema": {"type": "object", "properties": {"data": {"type": "string"}, "id": {"type": "string"}}}
    }
}


async def openapi_json(request: web.Request) -> web.Response:
    state = state_of(request)
    return web.json_response(openapi_document(state.settings))


def openapi_document(settings: Settings) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Trellis gateway",
            "version": "1",
            "description": "OpenAI-compatible completions over Redis Streams. Errors are always "
            '{"error": {"message", "type", "param", "code"}}; 429 and 503 carry Retry-After.',
        },
        "security": [{"bearer": []}],
        "paths": _paths(settings),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(settings),
            "responses": {
                str(status): {"description": why, "content": {JSON: {"schema": _ref("Error")}}}
                for status, why in _ERROR_STATUSES.items()
            },
        },
    }


_ERROR_STATUSES = {
    400: "The request breaks a rule; error.param names the field.",
    401: "No API key, or an unknown one.",
    403: "The key's scope does not allow this route.",
    404: "No such model, route or stream.",
    405: "The route does not take this method.",
    409: "A conflict: the output model already exists, or the conversion has already ended.",
    413: "The body is over the size limit.",
    429: "A rate limit, quota or full queue; see Retry-After.",
    500: "A bug or a broken model directory.",
    503: "Redis, or every worker of the model, is unavailable; see Retry-After.",
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/{s}"} for s in (401, 403, 405, 500, *statuses)}


def _json_ok(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {JSON: {"schema": schema}}}}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(name)}}}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _paths(settings: Settings) -> dict[str, Any]:
    generation_answer = {
        "200": {
            "description": "The completion (JSON), or with stream=true an SSE stream of chunks ending in [DONE]; "
            "each event's id is a Redis entry id for Last-Event-ID.",
            "headers": {"X-Request-Id": {"schema": {"type": "string"}}},
            "content": {JSON: {"schema": _ref("Completion")}, **SSE},
        },
        **_errors(400, 404, 413, 429, 503),
    }
    plain = {"security": [], "responses": _json_ok({"type": "object"})}
    return {
        "/v1/completions": {
            "post": {
                "summary": "Text completion (OpenAI legacy completions API)",
                "requestBody": _body("CompletionRequest"),
                "responses": generation_answer,
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "Chat completion",
                "requestBody": _body("ChatCompletionRequest"),
                "responses": generation_answer,
            }
        },
        "/v1/streams/{request_id}": {
            "get": {
                "summary": "Resume a request's SSE stream after Last-Event-ID (on any gateway instance)",
                "parameters": [
                    {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "SSE stream", "content": SSE},
                    **_errors(400, 404, 503),
                },
            }
        },
        "/v1/models": {
            "get": {"summary": "Served models", "responses": {**_json_ok(_ref("ModelList")), **_errors(503)}}
        },
        "/v1/tokenize": {
            "post": {
                "summary": "Prompt text or chat messages to token ids",
                "requestBody": _body("TokenizeRequest"),
                "responses": {**_json_ok(_ref("Tokens")), **_errors(400, 404, 413)},
            }
        },
        "/v1/detokenize": {
            "post": {
                "summary": "Token ids to text",
                "requestBody": _body("DetokenizeRequest"),
                "responses": {**_json_ok(_ref("Detokenized")), **_errors(400, 404, 413)},
            }
        },
        "/v1/ws": {
            "get": {
                "summary": "WebSocket: many generations on one socket (docs/websocket.md); needs Upgrade: websocket",
                "responses": {"101": {"description": "Switching protocols"}, **_errors(400)},
            }
        },
        "/v1/usage": {
            "get": {
                "summary": "The calling key's limits and usage counters",
                "responses": {**_json_ok(_ref("Usage")), **_errors(404, 503)},
            }
        },
        "/v1/workers": {
            "get": {
                "summary": "Live workers (admin scope)",
                "responses": {**_json_ok(_ref("WorkerList")), **_errors(503)},
            }
        },
        "/v1/conversions": {
            "post": {
                "summary": "Submit an EXL3 conversion of a model in the models directory (admin scope)",
                "requestBody": _body("ConversionRequest"),
                "responses": {
                    "201": {"description": "Queued", "content": {JSON: {"schema": _ref("Conversion")}}},
                    **_errors(400, 409, 413, 503),
                },
            },
            "get": {
                "summary": "Conversion jobs, newest first (admin scope)",
                "responses": {**_json_ok(_ref("ConversionList")), **_errors(503)},
            },
        },
        "/v1/conversions/{job_id}": {
            "get": {
                "summary": "A conversion's state, progress, per-block figures and error (admin scope)",
                "parameters": [_JOB_ID],
                "responses": {**_json_ok(_ref("Conversion")), **_errors(404, 503)},
            },
            "delete": {
                "summary": "Cancel a conversion at its next block, keeping a resumable work dir (admin scope)",
                "parameters": [_JOB_ID],
                "responses": {
                    "202": {"description": "Cancel requested", "content": {JSON: {"schema": _ref("Conversion")}}},
                    **_errors(404, 409, 503),
                },
            },
        },
        "/v1/conversions/{job_id}/events": {
            "get": {
                "summary": "A conversion's state and progress events as SSE, ending with [DONE] (admin scope)",
                "parameters": [
                    _JOB_ID,
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "SSE stream", "content": SSE}, **_errors(404, 503)},
            }
        },
        "/health": {"get": {"summary": "Liveness: the process answers; never needs a key", **plain}},
        "/ready": {
            "get": {
                "summary": "Readiness: Redis answers and a worker is live (503 with the reason otherwise)",
                "responses": {
                    **_json_ok({"type": "object"}),
                    "503": {"description": "Not ready", "content": {JSON: {"schema": {"type": "object"}}}},
                    **_errors(),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (scope set by TRELLIS_METRICS_AUTH)",
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **_errors(),
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {**_json_ok({"type": "object"}), **_errors()}}
        },
    }


def _schemas(settings: Settings) -> dict[str, Schema]:
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    number = {"type": "number"}
    sampling: dict[str, Schema] = {
        "model": {"type": "string", "minLength": 1, "default": settings.default_model},
        "n": {"type": "integer", "minimum": 1, "maximum": settings.max_n},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": settings.max_tokens_limit},
        "temperature": {**number, "minimum": 0},
        "top_p": {**number, "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "min_p": {**number, "minimum": 0, "maximum": 1},
        "repetition_penalty": {**number, "exclusiveMinimum": True, "minimum": 0},
        "presence_penalty": {**number, "minimum": -2, "maximum": 2},
        "frequency_penalty": {**number, "minimum": -2, "maximum": 2},
        "logit_bias": {"type": "object", "additionalProperties": {**number, "minimum": -100, "maximum": 100}},
        "seed": {"type": "integer"},
        "stop": {
            "oneOf": [
                {"type": "string", "minLength": 1, "maxLength": settings.max_stop_string_chars},
                {
                    "type": "array",
                    "maxItems": settings.max_stop_strings,
                    "items": {"type": "string", "minLength": 1, "maxLength": settings.max_stop_string_chars},
                },
            ]
        },
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "ignore_eos": {"type": "boolean"},
        "include_stop_str_in_output": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
            "description": "Only with stream=true.",
        },
        "user": {"type": "string"},
        "queue_timeout": {
            **number,
            "exclusiveMinimum": True,
            "minimum": 0,
            "maximum": settings.max_queue_timeout_seconds,
            "description": f"Seconds the request may wait to start (default {settings.queue_timeout_seconds:g}); "
            "past it the request is dropped with a 503 queue_timeout and never runs.",
        },
        "deadline": {**number, "description": "Unix time by which the request must have started."},
        "speculative": {
            "type": "object",
            "additionalProperties": False,
            "description": "Speculative decoding for this request (default: the worker's setting).",
            "properties": {
                "method": {"type": "string", "enum": list(SPECULATIVE_METHODS)},
                "num_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_SPECULATIVE_TOKENS},
            },
        },
    }
    chat_template_options = {
        "add_generation_prompt": {"type": "boolean", "description": "end the prompt with the assistant's turn opener"},
        "chat_template_kwargs": {
            "type": "object",
            "description": 'extra chat template variables, e.g. {"enable_thinking": false}; not messages, tools, '
            "documents, add_generation_prompt or the special token names",
            "not": {"anyOf": [{"required": [name]} for name in sorted(RESERVED_TEMPLATE_VARIABLES)]},
        },
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "description": "content may be null only in an assistant message that called tools.",
        "properties": {
            "role": {"type": "string", "enum": sorted(CHAT_ROLES)},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                        },
                    },
                ],
            },
            "name": {"type": "string"},
        },
    }
    prompt = {
        "oneOf": [
            {"type": "string", "maxLength": settings.max_prompt_chars},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1, "maxItems": 1},
        ]
    }
    nullable_string = {"type": "string", "nullable": True}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": nullable_string,
                        "code": nullable_string,
                    },
                }
            },
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                **sampling,
                "prompt": prompt,
                "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS},
                "echo": {"type": "boolean", "enum": [False]},
                "suffix": {"type": "string", "maxLength": 0},
                "add_special_tokens": {"type": "boolean"},
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["messages"],
            "properties": {
                **sampling,
                "messages": {"type": "array", "minItems": 1, "items": message},
                "max_completion_tokens": sampling["max_tokens"],
                **chat_template_options,
                "logprobs": {"type": "boolean"},
                "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_CHAT_TOP_LOGPROBS},
                "response_format": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"type": "string", "enum": ["text"]}},
                },
            },
        },
        "TokenizeRequest": {
            "type": "object",
            "description": "Exactly one of prompt or messages.",
            "properties": {
                "model": sampling["model"],
                "prompt": {"type": "string"},
                "messages": {"type": "array", "minItems": 1, "items": message},
                **chat_template_options,
                "add_special_tokens": {"type": "boolean"},
            },
        },
        "DetokenizeRequest": {
            "type": "object",
            "required": ["tokens"],
            "properties": {"model": sampling["model"], "tokens": {"type": "array", "items": {"type": "integer"}}},
        },
        "Tokens": {
            "type": "object",
            "required": ["tokens", "count"],
            "properties": {
                "tokens": {"type": "array", "items": {"type": "integer"}},
                "count": {"type": "integer"},
                "max_model_len": {"type": "integer", "nullable": True},
            },
        },
        "Detokenized": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        "Completion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["text_completion", "chat.completion"]},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": {"type": "object", "nullable": True},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object"}}},
        },
        "WorkerList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object"}}},
        },
        "ConversionRequest": {
            "type": "object",
            "required": ["source", "bits"],
            "properties": {
                "source": {"type": "string", "description": "Model id (directory or .gguf) in the models directory"},
                "output": {"type": "string", "description": "Output model id (default: {source}-exl3-{bits}bpw)"},
                "bits": {**number, "minimum": 1, "maximum": 8},
                "head_bits": {"type": "integer", "enum": [1, 2, 3, 4, 5, 6, 7, 8, 16]},
                "codebook": {"type": "string", "enum": ["mul1", "mcg", "3inst"]},
                "allocation": {
                    "type": "string",
                    "enum": list(CONVERSION_ALLOCATIONS),
                    "description": "Bits spread in a fixed order (default) or by measured sensitivity (experimental)",
                },
                "cal_rows": {"type": "integer", "minimum": 1, "maximum": 10000},
                "cal_cols": {"type": "integer", "minimum": 16, "maximum": 65536},
            },
        },
        "Conversion": {
            "type": "object",
            "required": ["id", "object", "state", "source", "output", "bits", "blocks", "error"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["conversion"]},
                "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
                "source": {"type": "string"},
                "output": {"type": "string"},
                "bits": {"type": "number"},
                "progress": {"type": "number"},
                "blocks": {"type": "array", "items": {"type": "object"}},
                "error": {"type": "string"},
            },
        },
        "ConversionList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": _ref("Conversion")}},
        },
        "Usage": {
            "type": "object",
            "required": ["key_id", "requests", "prompt_tokens", "completion_tokens", "tokens_today", "limits"],
            "properties": {
                "key_id": {"type": "string"},
                "requests": {"type": "integer"},
                "prompt_tokens": {"type": "integer"},
                "completion_tokens": {"type": "integer"},
                "tokens_today": {"type": "integer"},
                "limits": {"type": "object"},
            },
        },
    }
