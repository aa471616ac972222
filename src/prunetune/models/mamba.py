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
    # the mixer multiplies by dt_proj.weight directly; its input is the time-step slice of x_proj's output
    derived_inputs = {"mixer.dt_proj": "mixer.x_proj"}

    def derive_input(self, layer, name, source_output):
        return source_output[..., : layer.mixer.time_step_rank]
