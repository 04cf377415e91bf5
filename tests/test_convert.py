"""`trellis convert` on a tiny random Llama on the CPU: a model that loads and serves, a resumable work dir that
survives kill -9 with byte-identical output, bit allocation, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from converter_worker.cli import cli_convert
from converter_worker.convert import ConversionError, ConvertOptions, convert
from converter_worker.eval import evaluate
from converter_worker.quant.bits import allocate_bits, average_bits
from converter_worker.quant.linear import QUANTIZER_REVISION
from inference_worker.loader import load_model
from shared.calibration import text_digest
from shared.exl3_format import read_quantization_config
from tests.tiny_models import HIDDEN, INTERMEDIATE, smollm2_linear_shapes, write_tiny_llama

REPO = Path(__file__).resolve().parent.parent
EVAL_TEXT = (REPO / "tests" / "data" / "eval" / "britannica-11th-slice.txt").read_text(encoding="utf-8")
# cheap but real: 2 blocks, 6 calibration rows of 64 tokens, a checkpoint after every block
# (the measured allocation: its plan must survive kill -9 like everything else)
CONVERT_ARGS = ["-b", "3", "-hb", "4", "--cal-rows", "6", "--cal-cols", "64", "--checkpoint-seconds", "0"]
CONVERT_ARGS += ["--allocation", "measured"]
_CLI = "import sys; from converter_worker.cli import cli_convert; sys.exit(cli_convert(sys.argv[1:]))"


def _run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CLI, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """One uninterrupted conversion through the CLI: (output dir, work dir, stdout, stderr)."""
    root = tmp_path_factory.mktemp("conv")
    proc = _run_cli(["-i", str(source), "-o", str(root / "out"), "-w", str(root / "work"), *CONVERT_ARGS])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return root / "out", root / "work", stdout, stderr


@pytest.mark.slow
def test_converted_model_loads_in_our_loader_and_stays_close_to_the_original(
    converted: tuple[Path, Path, str, str], source: Path
) -> None:
    out, *_ = converted
    model, config = load_model(out, "cpu", torch.float32)
    assert config.hidden_size == HIDDEN and len(model.blocks) == 2
    result = evaluate(out, EVAL_TEXT, reference_dir=source, windows=2, ctx=128, device="cpu")
    assert result.tokens == 2 * 127
    assert result.kl_divergence < 0.05, result
    assert result.top1_agreement > 0.7, result  # an untrained model has many near-ties
    assert abs(result.perplexity / result.reference_perplexity - 1) < 0.05, result


@pytest.mark.slow
def test_output_directory_is_a_padded_exl3_model_with_its_quantization_config(
    converted: tuple[Path, Path, str, str], source: Path
) -> None:
    out, work, *_ = converted
    qcfg = read_quantization_config(out)
    assert qcfg["quant_method"] == "exl3" and qcfg["bits"] == 3.0 and qcfg["head_bits"] == 4
    assert qcfg["codebook"] == "mul1" and qcfg["calibration"] == {"rows": 6, "cols": 64}
    storage = qcfg["tensor_storage"]
    plan = json.loads((work / "plan.json").read_text())
    assert all(storage[name]["bits_per_weight"] == k for name, k in plan.items())
    up = storage["model.layers.1.mlp.up_proj"]
    assert (up["in_features"], up["out_features"]) == (HIDDEN, INTERMEDIATE)
    assert up["stored_tensors"]["model.layers.1.mlp.up_proj.trellis"]["shape"] == [8, 8, 48]
    assert storage["lm_head"]["bits_per_weight"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["bits"] == 3.0
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_cli_prints_progress_with_time_left_and_a_per_tensor_summary(converted: tuple[Path, Path, str, str]) -> None:
    _, work, stdout, stderr = converted
    assert "block 1/2" in stderr and "block 2/2" in stderr and "left" in stderr
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("model.", "lm_head"))]
    assert len(rows) == 2 * 7 + 1
    plan = json.loads((work / "plan.json").read_text())  # the measured allocation spreads 3 bits over 2..4
    assert set(plan.values()) <= {2, 3, 4} and len(plan) == 2 * 7
    for name, bits, err, seconds in rows:
        assert int(bits) == (4 if name == "lm_head" else plan[name])
        assert 0 < float(err) < 0.1 and float(seconds) > 0


@pytest.mark.slow
def test_kill_9_mid_conversion_then_resume_gives_byte_identical_output(
    converted: tuple[Path, Path, str, str], source: Path, tmp_path: Path
) -> None:
    reference_out, *_ = converted
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["-i", str(source), "-o", str(out), "-w", str(work), *CONVERT_ARGS]
    proc = _run_cli(args)
    deadline = time.monotonic() + 300
    while not (work / "blocks" / "block-0000.safetensors").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first block never finished"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.communicate()
    assert proc.returncode == -9
    assert not out.exists()

    resumed = _run_cli([*args, "-r"])
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert _files(out) == _files(reference_out)


def test_resume_refuses_arguments_that_would_change_the_result(source: Path, tmp_path: Path) -> None:
    opts = ConvertOptions(source, tmp_path / "out", tmp_path / "work", bits=3.0, cal_rows=4, cal_cols=16)
    with pytest.raises(ConversionError, match="stopped before block 0"):
        convert(opts, stop=lambda: True)  # records the arguments, then stops at once
    changed = ConvertOptions(source, tmp_path / "out", tmp_path / "work", bits=4.0, cal_rows=4, cal_cols=16)
    with pytest.raises(ConversionError, match=r"cannot resume with bits=4\.0.*started with bits=3\.0"):
        convert(changed, resume=True)
    with pytest.raises(ConversionError, match="pass -r to resume"):
        convert(opts)


def test_resume_refuses_a_different_calibration_text(source: Path, tmp_path: Path) -> None:
    text = tmp_path / "own.txt"
    text.write_text("A few sentences of the user's own domain, repeated. " * 20, encoding="utf-8")
    opts = ConvertOptions(source, tmp_path / "out", tmp_path / "work", bits=3.0, cal_rows=4, cal_cols=16, cal_text=text)
    with pytest.raises(ConversionError, match="stopped before block 0"):
        convert(opts, stop=lambda: True)
    saved = json.loads((tmp_path / "work" / "args.json").read_text())
    assert saved["cal_text_sha256"] == text_digest(text.read_text(encoding="utf-8"))
    default = ConvertOptions(source, tmp_path / "out", tmp_path / "work", bits=3.0, cal_rows=4, cal_cols=16)
    with pytest.raises(ConversionError, match="calibration text differs"):
        convert(default, resume=True)
    text.write_text("Other words now. " * 20, encoding="utf-8")  # same path, new contents: still refused
    with pytest.raises(ConversionError, match="calibration text differs"):
        convert(opts, resume=True)


def test_resume_refuses_a_work_dir_from_another_quantizer_revision(source: Path, tmp_path: Path) -> None:
    opts = ConvertOptions(source, tmp_path / "out", tmp_path / "work", bits=3.0, cal_rows=4, cal_cols=16)
    with pytest.raises(ConversionError, match="stopped before block 0"):
        convert(opts, stop=lambda: True)
    args_path = tmp_path / "work" / "args.json"
    saved = json.loads(args_path.read_text())
    assert saved["quantizer_revision"] == QUANTIZER_REVISION
    del saved["quantizer_revision"]  # as a work dir from before revisions were recorded
    args_path.write_text(json.dumps(saved))
    with pytest.raises(ConversionError, match=r"another version of the quantizer \(revision None"):
        convert(opts, resume=True)


def test_existing_output_is_never_overwritten(source: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    opts = ConvertOptions(source, tmp_path / "out", tmp_path / "work", bits=3.0)
    with pytest.raises(ConversionError, match="already exists"):
        convert(opts)


def test_unreadable_weights_end_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_tiny_llama(tmp_path / "broken", layers=1)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    rc = cli_convert(["-i", str(src), "-o", str(tmp_path / "out"), "-w", str(tmp_path / "w"), "-b", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "trellis convert:" in err and "broken" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-b", "0.5"], "bits per weight must be a number in 1..8"),
        (["-b", "9"], "bits per weight must be a number in 1..8"),
        (["-b", "3", "-hb", "9"], "head bits must be an integer in 1..8, or 16"),
        (["-b", "3", "--cal-rows", "0"], "calibration needs at least 1 row"),
        (["-b", "3", "--cal-text", "/no/such/text.txt"], "/no/such/text.txt is neither a file nor a folder"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(
    extra: list[str], message: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_convert(["-i", str(source), "-o", str(tmp_path / "o"), "-w", str(tmp_path / "w"), *extra])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_missing_input_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_convert(["-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "-w", str(tmp_path / "w"), "-b", "4"])
    assert rc == 1
    assert f"input {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("target", [2.0, 2.5, 3.25, 4.1, 5.9])
def test_fractional_bits_are_reached_by_promoting_whole_groups(target: float) -> None:
    shapes = smollm2_linear_shapes()
    plan = allocate_bits(shapes, target, 30)
    avg = average_bits(shapes, plan)
    assert target - 0.1 <= avg <= target + 1e-9
    assert set(plan.values()) <= {int(target), int(target) + 1}
    for i in range(30):
        assert plan[f"l{i}.q"] == plan[f"l{i}.k"] == plan[f"l{i}.v"]
        assert plan[f"l{i}.gate"] == plan[f"l{i}.up"]


def test_attention_and_the_ends_of_the_stack_are_promoted_first() -> None:
    shapes = smollm2_linear_shapes()
    plan = allocate_bits(shapes, 4.1, 30)
    promoted = [s for s in shapes if plan[s.name] == 5]
    assert promoted and all(s.group in ("qkv", "o") for s in promoted)
    layers = sorted({s.layer for s in promoted})
    assert layers[0] == 0 and layers[-1] == 29  # both ends before the middle
    assert plan["l15.q"] == 4 or all(plan[f"l{i}.q"] == 5 for i in range(30))
