"""The model tokenizer: special ids and chat prompts rendered exactly as transformers renders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from shared.tokenizer import ChatTemplateError, ModelTokenizer

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system_and_user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Japan?"},
    ],
    "multi_turn_with_system": [
        {"role": "system", "content": 'You are terse. Use <b>bold</b> & "quotes" freely.'},
        {"role": "user", "content": "Hi! 👋"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Écris un haïku sur 東京.\nTwo lines."},
        {"role": "assistant", "content": "Néons sous la pluie"},
        {"role": "user", "content": "  And now with spaces  "},
    ],
    "multi_turn_without_system": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "times 3?"},
    ],
}

# Exercises everything the environment provides: trim/lstrip blocks, loop controls, tojson (no HTML escaping, kwargs),
# strftime_now, namespace, special-token variables and tools.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(users=0) %}
{% if tools %}Tools: {{ tools | tojson }}
Indented: {{ tools[0] | tojson(indent=2, sort_keys=True) }}
{% endif %}
Year: {{ strftime_now("%Y") }}
{% for message in messages %}
    {% if message.role == "user" %}{% set ns.users = ns.users + 1 %}{% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
[{{ message.role }}] {{ message.content | tojson }}
{% endfor %}
users={{ ns.users }}{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}"""
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for <city> & region",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def model_tokenizer(default_model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir: Path):  # noqa: ANN201 (a transformers tokenizer class chosen at runtime)
    return AutoTokenizer.from_pretrained(str(default_model_dir))


def _model_dir_variant(source: Path, dest: Path, config: dict | None = None, **files: str) -> Path:
    """A copy of source's tokenizer.json with the given tokenizer_config.json and other files."""
    dest.mkdir()
    shutil.copy(source / "tokenizer.json", dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps(config or {}), encoding="utf-8")
    for name, text in files.items():
        (dest / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return dest


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_chat_prompt_matches_transformers(
    model_tokenizer: ModelTokenizer, hf_tokenizer, conversation: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[conversation]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert model_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_template_environment_matches_transformers(default_model_dir: Path, tmp_path: Path) -> None:
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": FEATURE_TEMPLATE}
    model_dir = _model_dir_variant(default_model_dir, tmp_path / "features", config)
    ours, theirs = ModelTokenizer.from_dir(model_dir), AutoTokenizer.from_pretrained(str(model_dir))
    messages = CONVERSATIONS["multi_turn_with_system"]
    for tools in (None, TOOLS):
        expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        rendered = ours.apply_chat_template(messages, tools=tools)
        assert rendered == expected
    assert '<b>bold</b> & \\"quotes\\"' in rendered and "<city> & region" in rendered  # tojson did not escape HTML


def test_text_content_parts_render_like_plain_content(model_tokenizer: ModelTokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    plain = [{"role": "user", "content": "first\nsecond"}]
    assert model_tokenizer.apply_chat_template(parts) == model_tokenizer.apply_chat_template(plain)


def test_non_text_content_part_is_rejected_by_type(model_tokenizer: ModelTokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        model_tokenizer.apply_chat_template(messages)


def test_message_without_role_is_rejected(model_tokenizer: ModelTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="message 1"):
        model_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])


def test_model_without_chat_template_says_so(default_model_dir: Path, tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(_model_dir_variant(default_model_dir, tmp_path / "bare-model"))
    with pytest.raises(ChatTemplateError, match="bare-model has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_raise_exception_in_template_surfaces_its_message(default_model_dir: Path, tmp_path: Path) -> None:
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    )
    tok = ModelTokenizer.from_dir(
        _model_dir_variant(default_model_dir, tmp_path / "strict", {"chat_template": template})
    )
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_chat_template_jinja_file_is_found(default_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _model_dir_variant(
        default_model_dir, tmp_path / "jinja-file", chat_template__jinja="<{{ messages[0].content }}>"
    )
    assert ModelTokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "<x>"


def test_chat_prompt_ids_tokenize_the_rendered_prompt(model_tokenizer: ModelTokenizer, hf_tokenizer) -> None:
    messages = CONVERSATIONS["multi_turn_with_system"]
    ids = model_tokenizer.chat_prompt_ids(messages)
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert model_tokenizer.decode(ids, skip_special_tokens=False) == rendered


@pytest.mark.parametrize("template_writes_bos", [True, False])
def test_chat_prompt_ids_hold_exactly_one_bos(
    default_model_dir: Path, tmp_path: Path, template_writes_bos: bool
) -> None:
    """A tokenizer that adds BOS by itself: the template's own BOS must not be doubled, nor a missing one skipped."""
    bos = "<|endoftext|>"
    raw = tokenizers.Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    raw.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, raw.token_to_id(bos))])
    template = ("{{ bos_token }}" if template_writes_bos else "") + "{{ messages[0].content }}"
    model_dir = _model_dir_variant(
        default_model_dir, tmp_path / "adds-bos", {"bos_token": bos, "chat_template": template}
    )
    raw.save(str(model_dir / "tokenizer.json"))

    tok = ModelTokenizer.from_dir(model_dir)
    assert tok.encode("hello")[0] == tok.bos_token_id  # the tokenizer really adds BOS
    ids = tok.chat_prompt_ids([{"role": "user", "content": "hello"}])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == "hello"


def test_special_token_ids_match_transformers(model_tokenizer: ModelTokenizer, hf_tokenizer) -> None:
    assert model_tokenizer.bos_token_id == hf_tokenizer.bos_token_id
    assert hf_tokenizer.eos_token_id in model_tokenizer.eos_token_ids
    assert model_tokenizer.vocab_size == len(hf_tokenizer)


def test_generation_config_adds_eos_ids(default_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _model_dir_variant(
        default_model_dir,
        tmp_path / "gen",
        {"eos_token": "<|im_end|>"},
        generation_config__json='{"eos_token_id": [0, 2]}',
    )
    tok = ModelTokenizer.from_dir(model_dir)
    im_end = tok.tokenizer.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == list(dict.fromkeys([im_end, 0, 2]))


def test_encode_decode_round_trip(model_tokenizer: ModelTokenizer, hf_tokenizer) -> None:
    text = "Round trip: naïve 東京 🙂 e\u0301\n\tdone"
    ids = model_tokenizer.encode(text, add_special_tokens=False)
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert model_tokenizer.decode(ids) == text


def test_missing_tokenizer_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ModelTokenizer.from_dir(tmp_path)
