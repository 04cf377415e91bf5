"""A model directory's tokenizer and chat template, used by the gateway (prompts) and the worker (eos, decoding).

Files read (Hugging Face layout): ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens, chat
template), ``chat_template.jinja`` / ``chat_template.json`` (where newer exports keep the template),
``special_tokens_map.json`` (older exports) and ``generation_config.json`` (extra eos ids).

The chat template is rendered the way ``transformers`` renders it, so a prompt here is byte-for-byte the prompt the
model was trained and evaluated with: a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``,
``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape HTML, and the named special tokens
(``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# The named special tokens transformers hands to every chat template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Older names for a message's reasoning; templates read `reasoning_content` (and gpt-oss ones `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# Variables the renderer sets itself; a request's extra template variables (chat_template_kwargs) may not.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", *SPECIAL_TOKEN_NAMES}
)


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How a chat request wants its conversation rendered (vLLM's request extras)."""

    add_generation_prompt: bool = True
    variables: dict[str, Any] = field(default_factory=dict)  # extra template variables, e.g. {"enable_thinking": False}


class ChatTemplateError(ValueError):
    """The model has no usable chat template, or the template rejected the conversation."""


class ModelTokenizer:
    """Encode, decode, special token ids and the chat template of one model."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        extra_eos_token_ids: list[int] | None = None,
        name: str = "model",
    ) -> None:
        self.tokenizer = tokenizer  # the raw `tokenizers.Tokenizer`, for the incremental detokenizer
        self.name = name
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.bos_token_id = self._token_id(self.special_tokens.get("bos_token"))
        eos_ids = [self._token_id(self.special_tokens.get("eos_token")), *(extra_eos_token_ids or [])]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos_ids if i is not None))
        self._adds_bos = self._post_processor_adds_bos()
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelTokenizer:
        model_dir = Path(path)
        tokenizer_path = model_dir / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{tokenizer_path} not found: the model directory {model_dir} has no tokenizer")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust side raises a bare Exception with a parse message
            raise ValueError(f"{tokenizer_path} could not be loaded: {exc}") from exc
        config = _read_json(model_dir / TOKENIZER_CONFIG_FILE)
        special_tokens = {**_special_tokens(_read_json(model_dir / SPECIAL_TOKENS_MAP_FILE)), **_special_tokens(config)}
        generation = _read_json(model_dir / GENERATION_CONFIG_FILE)
        return cls(
            tokenizer,
            special_tokens=special_tokens,
            chat_template=_find_chat_template(model_dir, config),
            extra_eos_token_ids=_as_id_list(generation.get("eos_token_id"), model_dir / GENERATION_CONFIG_FILE),
            name=model_dir.name,
        )

    # -- ids <-> text ------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1, added (special) tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """The conversation rendered with the model's own template, as ``transformers`` renders it; ``variables``
        are extra template variables (transformers' ``**kwargs``), none of ``RESERVED_TEMPLATE_VARIABLES``."""
        reserved = sorted(set(variables or ()) & RESERVED_TEMPLATE_VARIABLES)
        if reserved:
            raise ValueError(f"template variables {', '.join(reserved)} are set by the renderer itself")
        template = self._template(tools)
        try:
            return template.render(
                **(variables or {}),
                messages=_normalize_messages(messages),
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:  # raise_exception() in the template, or a template bug
            raise ChatTemplateError(f"the chat template of {self.name} rejected the conversation: {exc}") from exc

    def chat_prompt_ids(
        self,
        messages: list[dict[str, Any]],
        options: ChatTemplateOptions | None = None,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Token ids of the rendered conversation: BOS exactly once, whether or not the template wrote it."""
        options = options or ChatTemplateOptions()
        text = self.apply_chat_template(messages, options.add_generation_prompt, tools, options.variables)
        ids = self.encode(text, add_special_tokens=False)
        if self._adds_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def _template(self, tools: list[dict] | None) -> jinja2.Template:
        source = self._template_source(tools)
        compiled = self._compiled.get(source)
        if compiled is None:
            try:
                compiled = self._compiled[source] = _jinja_environment().from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise ChatTemplateError(f"the chat template of {self.name} is not valid Jinja: {exc}") from exc
        return compiled

    def _template_source(self, tools: list[dict] | None) -> str:
        template = self.chat_template
        if isinstance(template, dict):  # several named templates: like transformers, prefer tool_use with tools
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ChatTemplateError(
                f"{self.name} has several chat templates ({sorted(template)}) and none is named 'default'"
            )
        if not template:
            raise ChatTemplateError(
                f"{self.name} has no chat template (none in {TOKENIZER_CONFIG_FILE}, {CHAT_TEMPLATE_JINJA_FILE} or "
                f"{CHAT_TEMPLATE_JSON_FILE}): use the completions endpoint with a plain prompt instead"
            )
        return template

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        with_special = self.tokenizer.encode("a", add_special_tokens=True).ids
        return with_special[:1] == [self.bos_token_id] and plain[:1] != [self.bos_token_id]


def _jinja_environment() -> jinja2.Environment:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts for the template: None fields dropped, text parts joined, reasoning under every known name."""
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"message {index} must be a dict with a 'role', got {message!r}")
        # transformers drops None values too: templates test for a key's presence, and would print "None"
        message = {key: value for key, value in message.items() if value is not None}
        if isinstance(message.get("content"), list):
            message["content"] = _text_of_parts(message["content"], index)
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


def _text_of_parts(parts: list[Any], index: int) -> str:
    """OpenAI content parts [{"type": "text", "text": ...}, ...] as one string, joined by newlines as vLLM does."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError(
                f"message {index} has a content part of type {kind!r}: only text parts are supported"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file: {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """Named special tokens, each written either as a string or as an AddedToken dict with "content"."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The template as transformers finds it: chat_template.jinja first, then tokenizer_config, then the legacy json."""
    jinja_path = model_dir / CHAT_TEMPLATE_JINJA_FILE
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(model_dir / CHAT_TEMPLATE_JSON_FILE).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        return {entry["name"]: entry["template"] for entry in template}
    return template


def _as_id_list(value: Any, source: Path) -> list[int]:
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}")
    return ids
