"""Qwen2-MoE (and Qwen1.5-MoE): Qwen2 with a sparse MoE under ``mlp``: top-k of ``num_experts`` routed experts
(weights renormalised only with ``norm_topk_prob``) plus a shared expert every token uses, scaled by
sigmoid(``mlp.shared_expert_gate``). Layers in ``mlp_only_layers`` keep a dense MLP."""

from inference_worker.models.spec import ArchSpec, MoeSpec, even_layers_below_max_window_layers

SPEC = ArchSpec(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe",),
    sliding_layers=even_layers_below_max_window_layers,
    moe=MoeSpec(block="mlp", shared_expert=True),
)
