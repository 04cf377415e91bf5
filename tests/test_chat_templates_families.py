"""The real chat templates of every supported model family render byte-for-byte as transformers renders them.

Each template in tests/data/chat_templates/ is the one the model ships (tests/data/chat_templates/SOURCES.md says where
each came from). Both renderers load it from the same model directory: a copy of the default model's tokenizer.json
given the family's special tokens (and, where the family's tokenizer adds BOS by itself, a post-processor that does),
and a tokenizer_config.json naming them the way the family's own config does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pytest
import tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from shared.tokenizer import ChatTemplateError, ModelTokenizer
from tests.test_tokenizer import CONVERSATIONS as TOKENIZER_CONVERSATIONS

TEMPLATES_DIR = Path(__file__).parent / "data" / "chat_templates"


@dataclass(frozen=True)
class Family:
    template: str  # file name under tests/data/chat_templates/
    bos: str | None  # the family's bos_token (None: the config has none, as in Qwen)
    eos: str
    special: tuple[str, ...] = ()  # control tokens the family's tokenizer.json has as special added tokens
    adds_bos: bool = False  # the family's tokenizer post-processor prepends BOS on encode
    tools: bool = False  # the template renders tools and tool calls
    tool_call_content: str | None = None  # content of the assistant message that carries tool calls


LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>")
MISTRAL_SPECIAL = ("<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]")

FAMILIES = {
    "llama-3.1": Family(
        "llama-3.1-8b-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", LLAMA3_SPECIAL, adds_bos=True, tools=True
    ),
    "mistral-v0.3": Family("mistral-7b-instruct-v0.3.jinja", "<s>", "</s>", MISTRAL_SPECIAL, adds_bos=True, tools=True),
    "mixtral": Family("mixtral-8x7b-instruct-v0.1.jinja", "<s>", "</s>", MISTRAL_SPECIAL, adds_bos=True),
    "qwen2.5": Family("qwen2.5-7b-instruct.jinja", None, "<|im_end|>", tools=True),
    # Qwen3's template concatenates an assistant message's content unconditionally, so a tool-call turn carries ""
    # (what the model itself emits) rather than the OpenAI null, which both renderers drop and the template rejects.
    "qwen3": Family("qwen3.jinja", None, "<|im_end|>", tools=True, tool_call_content=""),
    "qwen2-moe": Family("qwen2-instruct.jinja", None, "<|im_end|>"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a <city> & its region",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TOOL_CALL_ID = "a1b2c3d4e"  # Mistral's template insists on 9 alphanumeric characters

# The plain conversations of tests/test_tokenizer.py (HTML-ish text, emoji, padded whitespace), plus reasoning turns
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    **TOKENIZER_CONVERSATIONS,
    "reasoning": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    ],
    "inline_think": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n\n5"},
        {"role": "user", "content": "And 2+4?"},
    ],
}


def tool_conversation(family: Family) -> list[dict[str, Any]]:
    """The user asks, the assistant calls a tool (OpenAI shape), the tool answers, the assistant replies, then more."""
    call = {
        "id": TOOL_CALL_ID,
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    }
    return [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": family.tool_call_content, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": TOOL_CALL_ID, "name": "get_weather", "content": '{"temperature": 18}'},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
        {"role": "user", "content": "And in Lyon?"},
    ]


# Conversations a template refuses, with the message its raise_exception gives; every other one must render.
# Mixtral's template has no system role: a leading system message breaks its user/assistant alternation.
EXPECTED_REJECTIONS = {
    ("mixtral", "system_and_user"): "Conversation roles must alternate user/assistant/user/assistant/...",
    ("mixtral", "multi_turn_with_system"): "Conversation roles must alternate user/assistant/user/assistant/...",
}


@dataclass
class Pair:
    ours: ModelTokenizer
    theirs: Any  # a transformers tokenizer


def _model_dir(source: Path, dest: Path, family: Family) -> Path:
    dest.mkdir()
    raw = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    raw.add_special_tokens([token for token in (family.bos, family.eos, *family.special) if token])
    if family.adds_bos:
        bos_id = raw.token_to_id(family.bos)
        raw.post_processor = TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B:1", special_tokens=[(family.bos, bos_id)]
        )
    raw.save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": family.eos}
    if family.bos is not None:
        config["bos_token"] = family.bos
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dest / "chat_template.jinja").write_text((TEMPLATES_DIR / family.template).read_text(encoding="utf-8"))
    return dest


@pytest.fixture(scope="module")
def pairs(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    root = tmp_path_factory.mktemp("families")
    result = {}
    for name, family in FAMILIES.items():
        model_dir = _model_dir(default_model_dir, root / name, family)
        result[name] = Pair(ModelTokenizer.from_dir(model_dir), AutoTokenizer.from_pretrained(str(model_dir)))
    return result


def _assert_renders_like_transformers(
    pair: Pair, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict] | None = None
) -> str:
    expected = pair.theirs.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = pair.ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    assert rendered == expected
    return rendered


def test_every_template_is_vendored_and_compiles() -> None:
    names = {path.name for path in TEMPLATES_DIR.glob("*.jinja")}
    assert names == {family.template for family in FAMILIES.values()}
    sources = (TEMPLATES_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for name in names:
        assert f"`{name}`" in sources, f"{name} has no row in SOURCES.md"
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse((TEMPLATES_DIR / name).read_text())


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conversation_renders_like_transformers(
    pairs: dict[str, Pair], family: str, conversation: str, add_generation_prompt: bool
) -> None:
    pair, messages = pairs[family], CONVERSATIONS[conversation]
    rejection = EXPECTED_REJECTIONS.get((family, conversation))
    if rejection is not None:
        with pytest.raises(jinja2.TemplateError, match=re.escape(rejection)):
            pair.theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        with pytest.raises(ChatTemplateError, match=re.escape(rejection)):
            pair.ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return
    rendered = _assert_renders_like_transformers(pair, messages, add_generation_prompt)
    assert messages[-1]["content"].strip() in rendered


@pytest.mark.parametrize("family", sorted(name for name, family in FAMILIES.items() if family.tools))
def test_tools_and_tool_calls_render_like_transformers(pairs: dict[str, Pair], family: str) -> None:
    messages = tool_conversation(FAMILIES[family])
    rendered = _assert_renders_like_transformers(pairs[family], messages, True, tools=[WEATHER_TOOL])
    assert "get_weather" in rendered and "Paris" in rendered and "18" in rendered
    assert "<city> & its region" in rendered  # the tool schema went through the non-HTML-escaping tojson
    # The tools must change the prompt: the template really took its tools branch
    assert rendered != pairs[family].ours.apply_chat_template(messages, add_generation_prompt=True)


def test_qwen3_reasoning_is_rendered_in_think_tags(pairs: dict[str, Pair]) -> None:
    rendered = _assert_renders_like_transformers(pairs["qwen3"], CONVERSATIONS["reasoning"], False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\nTwo plus two is four.\n</think>\n\n4<|im_end|>\n")
    # A past turn's thinking, written inline in the content, is stripped from the history
    rendered = _assert_renders_like_transformers(pairs["qwen3"], CONVERSATIONS["inline_think"], True)
    assert "Two plus three" not in rendered and "<|im_start|>assistant\n5<|im_end|>" in rendered


def test_qwen3_thinking_switch_reaches_the_template_as_transformers_passes_it(pairs: dict[str, Pair]) -> None:
    pair, messages = pairs["qwen3"], CONVERSATIONS["reasoning"][:1]
    for enable in (False, True):
        expected = pair.theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable
        )
        rendered = pair.ours.apply_chat_template(messages, variables={"enable_thinking": enable})
        assert rendered == expected
    assert rendered != pair.ours.apply_chat_template(messages, variables={"enable_thinking": False})
    assert pair.ours.apply_chat_template(messages, variables={"enable_thinking": False}).endswith(
        "<think>\n\n</think>\n\n"
    )
    with pytest.raises(ValueError, match="messages"):
        pair.ours.apply_chat_template(messages, variables={"messages": []})


@pytest.mark.parametrize(
    ("family", "messages", "message"),
    [
        (
            "mistral-v0.3",
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "After the optional system message, conversation roles must alternate user/assistant/user/assistant/...",
        ),
        (
            "mixtral",
            [{"role": "assistant", "content": "a"}],
            "Conversation roles must alternate user/assistant/user/assistant/...",
        ),
        (
            "mixtral",
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "Only user and assistant roles are supported!",
        ),
        (
            "mistral-v0.3",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"id": "short", "function": {"name": "f", "arguments": {}}}]},
            ],
            "Tool call IDs should be alphanumeric strings with length 9!",
        ),
    ],
)
def test_raise_exception_in_a_real_template_is_our_chat_template_error(
    pairs: dict[str, Pair], family: str, messages: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(jinja2.TemplateError, match=re.escape(message)):
        pairs[family].theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match=re.escape(message)):
        pairs[family].ours.apply_chat_template(messages)


@pytest.mark.parametrize("conversation", ["system_and_user", "multi_turn_without_system", "single_turn"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_prompt_ids_match_transformers_with_bos_once(
    pairs: dict[str, Pair], family: str, conversation: str
) -> None:
    pair, spec, messages = pairs[family], FAMILIES[family], CONVERSATIONS[conversation]
    if (family, conversation) in EXPECTED_REJECTIONS:  # Mixtral has no system role: keep its BOS check on user turns
        messages = messages[1:]
    ids = pair.ours.chat_prompt_ids(messages)
    rendered = pair.theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == pair.theirs(rendered, add_special_tokens=False)["input_ids"]
    if spec.adds_bos:
        bos_id = pair.ours.bos_token_id
        assert (
            pair.ours.encode("hello")[0] == bos_id
        )  # the tokenizer adds BOS by itself: the template's must not double
        assert ids[0] == bos_id and ids.count(bos_id) == 1
    else:
        assert pair.ours.bos_token_id is None
    assert pair.ours.eos_token_ids == [pair.ours.tokenizer.token_to_id(spec.eos)]
