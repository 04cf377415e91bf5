"""bench/dot_chain_probe.py's forms of the in-kernel input Hadamard agree with the loaded one under the interpreter,
so a form that fails on a GPU points at the compiler, not at the probe."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorators: kernels then run on CPU tensors
for _name in ("kernels.hadamard", "kernels.exl3_reconstruct", "kernels.exl3_matmul", "bench.dot_chain_probe"):
    if _name in sys.modules:  # imported earlier in this process without the interpreter: decorate again
        importlib.reload(sys.modules[_name])

import pytest  # noqa: E402

from bench.dot_chain_probe import FORMS, run_form  # noqa: E402


@pytest.mark.parametrize("form", sorted(set(FORMS) - {0}))
def test_every_form_matches_the_loaded_hadamard_in_the_interpreter(form: int) -> None:
    assert run_form(form, warps=4, device="cpu", rows=3, k=256, n=256) < 2e-3
