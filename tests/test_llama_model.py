"""Our Llama forward through the paged cache against transformers' LlamaForCausalLM on the same model directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from inference_worker.batch import ForwardBatch
from inference_worker.kv_cache import PagedKVCache
from inference_worker.layers import DenseLinear
from inference_worker.loader import load_model
from inference_worker.models.llama import LlamaConfig, LlamaModel, build_llama
from shared.model_dir import WEIGHTS_INDEX_FILE, TensorSource

# fp32 on both sides; the two differ only in the order of float operations
ATOL = 5e-4
PROMPTS = [
    "<|im_start|>user\nWrite a haiku about paged attention.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\n# Example: add(2, 3) ==",
]


class PagedRun:
    """What the scheduler would do, in miniature: pages per sequence from a shuffled pool, one ForwardBatch a step."""

    def __init__(self, model: LlamaModel, config: LlamaConfig, num_pages: int = 64, page_size: int = 4) -> None:
        self.model, self.page_size = model, page_size
        self.cache = PagedKVCache(
            config.num_hidden_layers,
            num_pages,
            page_size,
            config.num_key_value_heads,
            config.head_dim,
            torch.float32,
            "cpu",
        )
        self.free_pages = torch.randperm(num_pages, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]], every_row: bool = False) -> list[torch.Tensor]:
        """Run one forward over (sequence id, new tokens) chunks; logits per sequence (every new row, or the last)."""
        ids, positions, slots, query_lens, context_lens, logit_rows = [], [], [], [], [], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.page_size < start + len(tokens):
                table.append(self.free_pages.pop())
            for pos in range(start, start + len(tokens)):
                slots.append(table[pos // self.page_size] * self.page_size + pos % self.page_size)
            rows = range(len(ids), len(ids) + len(tokens))
            logit_rows += list(rows) if every_row else [rows[-1]]
            ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            context_lens.append(start + len(tokens))
            self.lengths[seq] = start + len(tokens)
        width = max(len(self.tables[seq]) for seq, _ in chunks)
        block_tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in chunks]
        batch = ForwardBatch(
            input_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=torch.tensor(block_tables),
            slot_mapping=torch.tensor(slots),
            logits_indices=torch.tensor(logit_rows),
        )
        with torch.inference_mode():
            logits = self.model(batch, self.cache)
        assert logits.dtype == torch.float32 and logits.shape[0] == len(logit_rows)
        sizes = [len(tokens) if every_row else 1 for _, tokens in chunks]
        return list(logits.split(sizes))


def hf_logits(hf: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < ATOL
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.fixture(scope="module")
def smollm(default_model_dir: Path):
    model, config = load_model(default_model_dir, "cpu", torch.float32)
    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    return model, config, hf, tokenizer


def test_prefill_in_one_go_matches_transformers(smollm) -> None:
    model, config, hf, tokenizer = smollm
    ids = tokenizer.encode(PROMPTS[0]).ids
    (ours,) = PagedRun(model, config).step([(0, ids)], every_row=True)
    assert_logits_match(ours, hf_logits(hf, ids))


def test_prefill_in_two_chunks_matches_transformers(smollm) -> None:
    model, config, hf, tokenizer = smollm
    ids = tokenizer.encode(PROMPTS[0]).ids
    run = PagedRun(model, config)
    split = len(ids) // 2 + 1  # not on a page boundary
    (first,) = run.step([(0, ids[:split])], every_row=True)
    (second,) = run.step([(0, ids[split:])], every_row=True)
    assert_logits_match(torch.cat([first, second]), hf_logits(hf, ids))


def test_batched_greedy_decode_of_ragged_sequences_matches_transformers(smollm) -> None:
    model, config, hf, tokenizer = smollm
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    seqs = {i: list(p) for i, p in enumerate(prompts)}
    run = PagedRun(model, config)
    # step 1: two whole prefills and the first chunk of a third; step 2: two decodes beside that prompt's rest
    half = len(prompts[1]) // 2
    steps = [[(0, prompts[0]), (1, prompts[1][:half]), (2, prompts[2])]]
    first = run.step(steps[0])
    for seq, logits in ((0, first[0]), (2, first[2])):
        assert_logits_match(logits, hf_logits(hf, seqs[seq])[-1:])
        seqs[seq].append(int(logits.argmax()))
    chunks = [(0, seqs[0][-1:]), (1, prompts[1][half:]), (2, seqs[2][-1:])]
    for _ in range(5):  # then every sequence decodes, each at its own length
        for (seq, _), logits in zip(chunks, run.step(chunks), strict=True):
            assert_logits_match(logits, hf_logits(hf, seqs[seq])[-1:])
            seqs[seq].append(int(logits.argmax()))
        chunks = [(seq, seqs[seq][-1:]) for seq in seqs]
    assert len({len(s) for s in seqs.values()}) == len(seqs)  # the batch really was ragged


# --- a tiny random Llama with what SmolLM2 lacks: Llama-3 rope scaling, an untied head, sharded weights -------------


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = HFLlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        tie_word_embeddings=False,
        initializer_range=0.2,  # big enough weights that attention (so rotary) visibly shapes the logits
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out, max_shard_size="100KB")
    return out


def test_tiny_llama_with_rope_scaling_and_untied_head_matches_transformers(tiny_llama_dir: Path) -> None:
    index = json.loads((tiny_llama_dir / WEIGHTS_INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1  # the sharded path is what gets loaded
    model, config = load_model(tiny_llama_dir, "cpu", torch.float32)
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
    assert not config.tie_word_embeddings and model.head.weight.data_ptr() != model.embed.weight.data_ptr()
    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager").eval()

    ids = torch.randint(0, config.vocab_size, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = hf_logits(hf, ids)
    run = PagedRun(model, config)
    prefill = run.step([(0, ids[:70])], every_row=True)[0]
    decoded = [run.step([(0, [token])])[0] for token in ids[70:]]  # positions far past the original 16
    assert_logits_match(torch.cat([prefill, *decoded]), expected)

    # the check has teeth: the same weights without the rope scaling give clearly different logits
    with TensorSource(tiny_llama_dir) as source:
        unscaled = build_llama(dataclasses.replace(config, rope_scaling=None), source, torch.float32, "cpu")
    (unscaled_logits,) = PagedRun(unscaled, config).step([(0, ids)], every_row=True)
    assert (unscaled_logits - expected).abs().max().item() > 100 * ATOL


def test_tied_head_shares_the_embedding(smollm) -> None:
    model, config, _, _ = smollm
    assert config.tie_word_embeddings and isinstance(model.head, DenseLinear)
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_loader_refuses_other_architectures_by_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(tmp_path, "cpu", torch.float32)


def test_loader_names_a_missing_weights_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path, "cpu", torch.float32)


def test_loader_names_a_missing_tensor(tmp_path: Path, tiny_llama_dir: Path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights only have layers 0 and 1
    for f in tiny_llama_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="model.layers.2.self_attn.q_proj"):
        load_model(tmp_path, "cpu", torch.float32)


def test_config_refuses_unsupported_rope_scaling_by_name(tiny_llama_dir: Path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="'yarn'"):
        LlamaConfig.from_hf(config)
