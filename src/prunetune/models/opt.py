"""OPT (LayerNorm, learned positions, fc1/fc2 MLP)."""

from .base import ModelAdapter, register_adapter


@register_adapter("opt")
class OPTAdapter(ModelAdapter):
    layers_path = "model.decoder.layers"
    linear_groups = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.out_proj"],
        ["fc1"],
        ["fc2"],
    ]
    embed_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"
    residual_writers = ["self_attn.out_proj", "fc2"]
    residual_readers = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"]
    layer_norms = ["self_attn_layer_norm", "final_layer_norm"]
    norm_kind = "layernorm"

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size
