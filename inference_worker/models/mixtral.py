"""Mixtral: Mistral with a sparse MoE in every layer. The router ``block_sparse_moe.gate`` picks the top 2 of 8
experts and their weights are renormalised to sum to 1; expert e is ``block_sparse_moe.experts.{e}.w1/w3/w2``
(gate/up/down)."""

from inference_worker.models.spec import ArchSpec, MoeSpec, every_layer

SPEC = ArchSpec(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    sliding_layers=every_layer,
    moe=MoeSpec(block="block_sparse_moe", expert_projs=("w1", "w3", "w2"), always_norm_topk=True),
)
