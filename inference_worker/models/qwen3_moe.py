"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with a sparse MoE under ``mlp``: top-k of ``num_experts``
experts, weights renormalised when ``norm_topk_prob`` is set, no shared expert."""

from inference_worker.models.spec import ArchSpec, MoeSpec, every_layer

SPEC = ArchSpec(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    qk_norm=True,
    sliding_layers=every_layer,
    moe=MoeSpec(block="mlp"),
)
