"""Mamba: the linears of each mixer are pruned; the depthwise conv and SSM parameters stay dense."""

from .base import ModelAdapter, register_adapter


@register_adapter("mamba")
class MambaAdapter(ModelAdapter):
    layers_path = "backbone.layers"
    linear_groups = [["mixer.in_proj"], ["mixer.x_proj"], ["mixer.dt_proj"], ["mixer.out_proj"]]
    embed_path = "backbone.embeddings"
    final_norm_path = "backbone.norm_f"
    residual_writers = ["mixer.out_proj"]
    residual_readers = ["mixer.in_proj"]
    layer_norms = ["norm"]
    norm_kind = "rmsnorm"
