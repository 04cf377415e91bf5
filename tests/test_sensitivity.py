"""Measured bit allocation: each linear's damage (quant/sensitivity.py) predicts the KL divergence its quantization
error adds, and the allocation spends a bits budget where that damage is largest (quant/bits.py)."""

from __future__ import annotations

import pytest
import torch

from converter_worker.convert import Converter, ConvertOptions
from converter_worker.quant.bits import allocate_bits_by_sensitivity, average_bits
from converter_worker.quant.linear import LinearSpec, quantize_linears
from converter_worker.quant.sensitivity import CODE_ERROR, ldlq_gain, measure_sensitivity
from tests.tiny_models import smollm2_linear_shapes, write_tiny_llama

LAYERS = 2


@pytest.fixture(scope="module")
def converter(tmp_path_factory: pytest.TempPathFactory) -> Converter:
    root = tmp_path_factory.mktemp("sens")
    source = write_tiny_llama(root / "tiny", layers=LAYERS)
    opts = ConvertOptions(
        input=source,
        output=root / "out",
        work_dir=root / "work",
        bits=3,
        cal_rows=16,
        cal_cols=64,
        allocation="measured",
        device="cpu",
    )
    conv = Converter(opts)
    conv._load_model_description(source)
    return conv


def _rows_and_head(conv: Converter) -> tuple[torch.Tensor, object]:
    rows = conv._calibration_rows()
    state = conv._tensor("model.embed_tokens.weight").float()[rows]
    norm = conv._rms(conv._tensor("model.norm.weight"))
    weight = conv._head_weight().float()
    return state, lambda x: torch.nn.functional.linear(norm(x), weight)


def test_damage_predicts_the_kl_growth_of_noise_in_each_linear(converter: Converter) -> None:
    """Gaussian noise of relative size eps in one linear's weights adds about damage * eps^2 / 2 of KL divergence
    per token. The per-token shortcut that ignores attention's mixing of positions under-rated v_proj 5x here."""
    state, head = _rows_and_head(converter)
    damage = measure_sensitivity(state, LAYERS, converter._original_block, head, ldlq=False)
    blocks = [converter._original_block(i) for i in range(LAYERS)]

    def log_probs() -> torch.Tensor:
        s = state
        for block in blocks:
            s = block.forward(s)
        return head(s).log_softmax(-1)

    reference = log_probs()
    eps, gen = 0.05, torch.Generator().manual_seed(1)
    assert len(damage) == 7 * LAYERS
    for name, predicted in damage.items():
        linear = blocks[int(name.split(".")[2])].linears[name]
        original = linear.weight.data.clone()
        rms = original.pow(2).mean().sqrt()
        kl = []
        for _ in range(6):
            linear.weight.data = original + eps * rms * torch.randn(original.shape, generator=gen)
            kl.append((reference.exp() * (reference - log_probs())).sum(-1).mean().item())
        linear.weight.data = original
        ratio = sum(kl) / len(kl) / (predicted * eps**2 / 2)
        assert 0.75 < ratio < 1.35, f"{name}: measured KL / predicted = {ratio:.2f}"


def test_the_measurement_is_repeatable(converter: Converter) -> None:
    state, head = _rows_and_head(converter)
    first = measure_sensitivity(state[:4], LAYERS, converter._original_block, head, seed=3)
    again = measure_sensitivity(state[:4], LAYERS, converter._original_block, head, seed=3)
    assert first == again


def test_the_measured_plan_keeps_the_budget_and_the_groups(converter: Converter) -> None:
    plan = converter._make_plan()
    assert average_bits(converter.shapes, plan) <= 3 + 1e-9
    assert set(plan.values()) <= {2, 3, 4}
    # the plan is the allocation of the measured damage over the first calibration rows
    state, head = _rows_and_head(converter)
    damage = measure_sensitivity(state, LAYERS, converter._original_block, head)
    assert plan == allocate_bits_by_sensitivity(converter.shapes, 3, LAYERS, damage, CODE_ERROR)
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        assert plan[f"{p}.self_attn.q_proj"] == plan[f"{p}.self_attn.k_proj"] == plan[f"{p}.self_attn.v_proj"]
        assert plan[f"{p}.mlp.gate_proj"] == plan[f"{p}.mlp.up_proj"]


def test_equal_damage_per_weight_keeps_every_linear_at_the_target() -> None:
    shapes = smollm2_linear_shapes(4)
    plan = allocate_bits_by_sensitivity(shapes, 4.0, 4, {s.name: 1e-3 * s.stored_weights for s in shapes}, CODE_ERROR)
    # damage in proportion to size: every weight is worth the same, so every linear keeps the plain 4 bits
    assert set(plan.values()) == {4}


@pytest.mark.parametrize("target", [2.0, 3.5, 4.0, 5.25])
def test_bits_go_where_the_damage_is(target: float) -> None:
    shapes = smollm2_linear_shapes(6)
    gen = torch.Generator().manual_seed(int(target * 4))
    spread = torch.rand(len(shapes), generator=gen) * 10 ** (torch.rand(len(shapes), generator=gen) * 3)
    damage = {s.name: float(d) for s, d in zip(shapes, spread, strict=True)}
    plan = allocate_bits_by_sensitivity(shapes, target, 6, damage, CODE_ERROR)
    avg = average_bits(shapes, plan)
    assert target - 0.15 <= avg <= target + 1e-9
    base = int(target)
    assert set(plan.values()) <= {base - 1, base, base + 1}

    def expected_kl(p: dict[str, int]) -> float:
        return sum(damage[s.name] * CODE_ERROR[p[s.name]] for s in shapes)

    # better than the same budget spent evenly: every linear at the base, the rest on the most damaged groups
    even = {s.name: base for s in shapes}
    assert expected_kl(plan) < expected_kl(even)
    # no single move of a bit from one group to another (same cost) would lower the expected damage
    names = {(s.layer, s.group): [t.name for t in shapes if (t.layer, t.group) == (s.layer, s.group)] for s in shapes}
    for a, members_a in names.items():
        for b, members_b in names.items():
            if a == b or a[1] != b[1]:
                continue
            moved = dict(plan)
            for n in members_a:
                moved[n] += 1
            for n in members_b:
                moved[n] -= 1
            if min(moved.values()) < base - 1 or max(moved.values()) > base + 1:
                continue
            assert expected_kl(moved) >= expected_kl(plan) - 1e-12


def _correlated_inputs(features: int, mix: float, gen: torch.Generator) -> torch.Tensor:
    """H = X^T X / n of inputs whose channels share ``mix`` of one common signal (0: independent, white)."""
    z = torch.randn(4096, features, generator=gen)
    common = torch.randn(4096, 1, generator=gen) * torch.randn(1, features, generator=gen)
    x = (1 - mix) * z + mix * 4 * common + mix * z @ torch.randn(features, features, generator=gen) / features**0.5
    return x.T @ x / x.shape[0]


def test_ldlq_gain_follows_the_error_ldlq_actually_leaves() -> None:
    """White inputs leave LDLQ nothing to correct (gain near 1); correlated ones let it cancel most of the output
    error, and the estimate ranks problems as the real quantization's output error does."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(128, 128, generator=gen)
    problems = {mix: _correlated_inputs(128, mix, gen) for mix in (0.0, 0.5, 0.9)}
    estimate = {mix: ldlq_gain(weight, h) for mix, h in problems.items()}
    assert 0.8 < estimate[0.0] < 1.25
    assert estimate[0.9] < estimate[0.5] < estimate[0.0]
    assert estimate[0.9] < 0.5
    actual = {}
    for mix, h in problems.items():  # the converter's own quantization (2 bits), error in H's metric, relative
        (result,) = quantize_linears([LinearSpec("w", weight, 2, 0, h)], "mul1", "cpu")
        actual[mix] = result.proxy_error
    assert actual[0.9] < actual[0.5] < actual[0.0]
    # the estimate's ratios between problems agree with the real ones to within 2.5x; it runs low on strongly
    # correlated inputs (here 2.0x at mix 0.9; on the default model's linears 0.7x on average, spread 1.25x)
    for mix in (0.5, 0.9):
        ratio = (estimate[mix] / estimate[0.0]) / (actual[mix] / actual[0.0])
        assert 0.4 < ratio < 2.5, f"mix {mix}: estimated / actual gain ratio {ratio:.2f}"
