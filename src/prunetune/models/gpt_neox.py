"""GPT-NeoX / Pythia (fused QKV, parallel residual, LayerNorm)."""

from .base import ModelAdapter, register_adapter


@register_adapter("gpt_neox")
class GPTNeoXAdapter(ModelAdapter):
    layers_path = "gpt_neox.layers"
    linear_groups = [
        ["attention.query_key_value"],
        ["attention.dense"],
        ["mlp.dense_h_to_4h"],
        ["mlp.dense_4h_to_h"],
    ]
    embed_path = "gpt_neox.embed_in"
    final_norm_path = "gpt_neox.final_layer_norm"
    lm_head_path = "embed_out"
    residual_writers = ["attention.dense", "mlp.dense_4h_to_h"]
    residual_readers = ["attention.query_key_value", "mlp.dense_h_to_4h"]
    layer_norms = ["input_layernorm", "post_attention_layernorm"]
    norm_kind = "layernorm"
