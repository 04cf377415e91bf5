"""Serving EXL3 models: a synthetic EXL3 model generates through the whole suite, the fused Triton path and the
reconstructed dense path agree token for token, and the Triton path keeps nothing on the device but what the file
stores.

The Triton path runs on CPU tensors under the interpreter, on a tiny synthetic model (hidden 96, padded to 128, two
layers): the same kernels and the same ``Exl3Linear`` code the GPU runs, at a size the interpreter finishes quickly.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorators: kernels then run on CPU tensors
for _name in ("kernels.hadamard", "kernels.exl3_reconstruct", "kernels.exl3_matmul"):  # dependency order
    if _name in sys.modules:  # imported earlier in this process without the interpreter: decorate again
        importlib.reload(sys.modules[_name])

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from inference_worker.batch import ForwardBatch  # noqa: E402
from inference_worker.exl3_linear import Exl3Linear, exl3_path, triton_matmul  # noqa: E402
from inference_worker.kv_cache import PagedKVCache  # noqa: E402
from inference_worker.loader import load_model  # noqa: E402
from inference_worker.models.decoder import DecoderConfig, DecoderModel  # noqa: E402
from shared.exl3_synth import PRESETS, Preset, synth_model  # noqa: E402
from shared.tokenizer import ModelTokenizer  # noqa: E402
from tests.suite import running_suite  # noqa: E402

triton_matmul.cache_clear()  # forget a kernel function resolved before the reload above

# Hidden 96 and intermediate 160 are padded to 128 and 256; 2 query heads share 1 kv head; a 200-token vocabulary.
TINY = Preset(96, 2, 2, 1, 160, 200, False, 10000.0, 512, 1e-5, 1, 2)
FP16_EPS = 2.0**-10


def greedy(
    model: DecoderModel, config: DecoderConfig, prompt: list[int], steps: int, dtype: torch.dtype = torch.float32
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the float32 logits [steps, vocab] that chose them: one prefill, then one token per forward
    over the paged cache, exactly the batches a worker builds for a lone request."""
    page_size = 16
    pages = -(-(len(prompt) + steps) // page_size)
    cache = PagedKVCache(
        config.num_hidden_layers, pages, page_size, config.num_key_value_heads, config.head_dim, dtype, "cpu"
    )
    table = torch.arange(pages)[None]
    context, new, tokens, logits = list(prompt), list(prompt), [], []
    while len(tokens) < steps:
        positions = torch.arange(len(context) - len(new), len(context))
        batch = ForwardBatch(
            input_ids=torch.tensor(new),
            positions=positions,
            query_lens=[len(new)],
            context_lens=[len(context)],
            block_tables=table,
            slot_mapping=positions,  # pages 0.. in order: slot == position
            logits_indices=torch.tensor([len(new) - 1]),
        )
        with torch.inference_mode():
            row = model(batch, cache)[0]
        token = int(row.argmax())
        tokens.append(token)
        logits.append(row)
        context.append(token)
        new = [token]
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def tiny_exl3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer synthetic EXL3 model: MUL1 codes at 4 bits, the head at 6 (both decode groupings of the kernel)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "tiny-serving", TINY)
        return synth_model("tiny-serving", 4, tmp_path_factory.mktemp("tiny-exl3"), codebook="mul1", head_bits=6)


@pytest.fixture(scope="module")
def interpreter() -> None:
    """Triton's own library functions (tl.zeros, ...) are decorated when triton is first imported: if that happened
    before TRITON_INTERPRET=1 was set, no kernel can run on CPU tensors in this process."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set (by an earlier test module); "
            "set TRITON_INTERPRET=1 before pytest imports any test module (tests/conftest.py) or run this file alone"
        )


def test_fused_triton_path_and_reconstructed_path_agree_on_greedy_tokens_and_logits(
    tiny_exl3_dir: Path, interpreter: None
) -> None:
    dense, config = load_model(tiny_exl3_dir, "cpu", torch.float32)
    with exl3_path("triton"):
        fused, _ = load_model(tiny_exl3_dir, "cpu", torch.float32)
    assert {m.path for m in dense.modules() if isinstance(m, Exl3Linear)} == {"dense"}
    assert {m.path for m in fused.modules() if isinstance(m, Exl3Linear)} == {"triton"}

    # 40 prompt tokens: the prefill (> 32 rows) rebuilds W in the kernel; every later step runs the fused decode.
    prompt = [(7 * i + 3) % TINY.vocab for i in range(40)]
    dense_tokens, dense_logits = greedy(dense, config, prompt, 5)
    fused_tokens, fused_logits = greedy(fused, config, prompt, 5)

    assert fused_tokens == dense_tokens
    # fp16 tolerance: the fused path rounds activations to fp16 between the Hadamards; a few roundings add up.
    tolerance = 8 * FP16_EPS * float(dense_logits.abs().max())
    assert float((fused_logits - dense_logits).abs().max()) <= tolerance
    assert float(dense_logits.std()) > 0.1  # real logits, not a degenerate all-equal row that any path would match


def test_triton_path_keeps_only_the_stored_tensors_on_the_device(tiny_exl3_dir: Path) -> None:
    with exl3_path("triton"):
        model, _ = load_model(tiny_exl3_dir, "cpu", torch.float16)  # fp16: the dtype the file stores
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Exl3Linear)}
    assert len(linears) == TINY.layers * 7 + 1
    stored: dict[str, int] = {}
    with safe_open(str(tiny_exl3_dir / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            stored[key] = t.numel() * t.element_size()

    for m in linears.values():
        assert m.weight is None and {n for n, _ in m.named_buffers()} == {"trellis", "suh", "svh"}
    # every tensor of the model in memory, counted once however many modules share it
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    file_bytes = (tiny_exl3_dir / "model.safetensors").stat().st_size
    assert sum(held.values()) <= 1.05 * file_bytes
    # and the quantized layers hold exactly their stored bytes (the codebook marker scalars aside)
    exl3_bytes = sum(t.numel() * t.element_size() for m in linears.values() for t in m.buffers())
    assert exl3_bytes == sum(b for k, b in stored.items() if k.rsplit(".", 1)[1] in ("trellis", "suh", "svh"))


def test_triton_path_on_cpu_without_the_interpreter_is_refused_by_name(
    tiny_exl3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with exl3_path("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        load_model(tiny_exl3_dir, "cpu", torch.float32)


def test_unknown_exl3_path_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown EXL3 execution path 'fused'"), exl3_path("fused"):
        pass


# --- the whole suite: gateway -> Redis -> worker on a default-model-shaped EXL3 model ------------------------------


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _greedy_in_process(model_dir: Path, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """What the worker must answer: the model run here as the worker runs it on CPU (fp32, dense path)."""
    model, config = load_model(model_dir, "cpu", torch.float32)
    tokens, logits = greedy(model, config, prompt, steps)
    return tokens, logits.log_softmax(-1).max(-1).values.tolist()


@pytest.mark.slow
def test_synthetic_exl3_model_generates_greedy_through_the_suite(
    redis_url: str, default_model_dir: Path, tmp_path: Path
) -> None:
    model_id = "smollm2-135m-exl3-4bpw"
    model_dir = synth_model(
        "smollm2-135m", 4, tmp_path / "models" / model_id, codebook="mul1", tokenizer_dir=default_model_dir
    )
    tokenizer = ModelTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode("The capital of France is")
    new_tokens = 8
    logs = tmp_path / "logs"
    logs.mkdir()
    with ThreadPoolExecutor(1) as pool:
        expected = pool.submit(_greedy_in_process, model_dir, prompt, new_tokens)  # meanwhile the worker loads
        with running_suite(
            redis_url, tmp_path / "models", model_id, logs, TRITON_INTERPRET="0", TRELLIS_KV_CACHE_TOKENS="1024"
        ) as url:
            body = {"model": model_id, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "logprobs": 0}
            resp = _post_json(f"{url}/v1/completions", body | {"ignore_eos": True})
        expected_ids, expected_logprobs = expected.result()
    choice = resp["choices"][0]
    assert resp["usage"]["completion_tokens"] == new_tokens
    assert choice["text"] == tokenizer.decode(expected_ids)
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == new_tokens
    assert max(abs(a - b) for a, b in zip(got, expected_logprobs, strict=True)) < 1e-3
