"""Mistral: Llama's layout, with sliding-window attention in every layer when config.json sets ``sliding_window``
(Mistral 7B v0.1: 4096; later versions set it to null and attend fully)."""

from inference_worker.models.spec import ArchSpec, every_layer

SPEC = ArchSpec(
    name="mistral",
    architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    sliding_layers=every_layer,
)
