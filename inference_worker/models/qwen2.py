"""Qwen2 and Qwen2.5: Llama's layout with biases on q/k/v (found and loaded by ``build_linear`` from the tensors).

A sliding window applies only with ``use_sliding_window``, to the layers from ``max_window_layers`` on."""

from inference_worker.models.spec import ArchSpec, layers_from_max_window_layers

SPEC = ArchSpec(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    sliding_layers=layers_from_max_window_layers,
)
