"""`trellis eval`: perplexity, KL divergence and top-1 agreement over the same windows, on tiny real models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from converter_worker.cli import cli_eval
from converter_worker.eval import evaluate, text_windows
from shared.tokenizer import ModelTokenizer
from tests.test_convert import EVAL_TEXT, write_tiny_llama

EVAL_FILE = Path(__file__).resolve().parent / "data" / "eval" / "britannica-11th-slice.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("eval") / "tiny")


def test_a_model_against_itself_has_zero_kl_and_full_agreement(tiny: Path) -> None:
    r = evaluate(tiny, EVAL_TEXT, reference_dir=tiny, windows=2, ctx=64, device="cpu")
    assert r.tokens == 2 * 63
    assert abs(r.kl_divergence) < 1e-6 and r.top1_agreement == 1.0
    assert r.perplexity == pytest.approx(r.reference_perplexity, rel=1e-9)


def test_perplexity_matches_transformers_on_the_same_windows(tiny: Path) -> None:
    r = evaluate(tiny, EVAL_TEXT, windows=3, ctx=48, device="cpu")
    windows = text_windows(ModelTokenizer.from_dir(tiny), EVAL_TEXT, 3, 48)
    hf = LlamaForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert r.tokens == 3 * 47
    assert r.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_kl_grows_and_agreement_falls_as_the_weights_drift(tiny: Path, tmp_path: Path) -> None:
    slight = write_tiny_llama(tmp_path / "slight", noise=0.03)
    strong = write_tiny_llama(tmp_path / "strong", noise=0.3)
    a = evaluate(slight, EVAL_TEXT, reference_dir=tiny, windows=2, ctx=64, device="cpu")
    b = evaluate(strong, EVAL_TEXT, reference_dir=tiny, windows=2, ctx=64, device="cpu")
    assert 0 < a.kl_divergence < b.kl_divergence
    assert a.top1_agreement > b.top1_agreement
    assert a.reference_perplexity == pytest.approx(b.reference_perplexity, rel=1e-9)  # same reference, same tokens


def test_windows_are_whole_consecutive_slices_without_bos(tiny: Path) -> None:
    tok = ModelTokenizer.from_dir(tiny)
    windows = text_windows(tok, "abcdefghij" * 10, windows=5, ctx=30)
    assert windows.shape == (3, 30)  # only 100 tokens: three whole windows
    assert tok.decode(windows.flatten().tolist()) == ("abcdefghij" * 10)[:90]
    with pytest.raises(ValueError, match="fewer than one window of 512"):
        text_windows(tok, "short", windows=1, ctx=512)


def test_cli_prints_the_figures_and_names_bad_paths(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", str(tiny), "--reference", str(tiny), "--text", str(EVAL_FILE), "--windows", "1", "--ctx", "32"]
    assert cli_eval([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "KL divergence        0.00000" in out and "top-1 agreement      1.0000" in out
    assert cli_eval(["--model", str(tiny), "--text", str(tiny / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err


def test_kv_bits_compare_the_model_with_itself_over_an_unquantized_cache(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kl = {bits: evaluate(tiny, EVAL_TEXT, windows=2, ctx=64, device="cpu", kv_bits=bits).kl_divergence
          for bits in [(8, 8), (2, 2)]}  # fmt: skip
    assert 0 < kl[(8, 8)] < kl[(2, 2)]
    args = ["--model", str(tiny), "--text", str(EVAL_FILE), "--windows", "1", "--ctx", "32", "--device", "cpu"]
    assert cli_eval([*args, "--kv-bits", "3,4"]) == 0
    assert "KL divergence" in capsys.readouterr().out  # the reference is the model itself with an fp cache
    assert cli_eval([*args, "--kv-bits", "9,4"]) == 1
    assert "key bits must be between 2 and 8" in capsys.readouterr().err
