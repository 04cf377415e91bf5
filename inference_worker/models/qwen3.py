"""Qwen3: Qwen2's layout without the q/k/v biases, plus an RMSNorm over each head of q and k before rotary
(``self_attn.q_norm`` / ``self_attn.k_norm``); ``head_dim`` is set explicitly and need not be hidden / heads."""

from inference_worker.models.spec import ArchSpec, layers_from_max_window_layers

SPEC = ArchSpec(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    qk_norm=True,
    sliding_layers=layers_from_max_window_layers,
)
