"""Llama family: Llama 2/3, Mistral, Qwen2/Qwen3, SmolLM (GQA and tied embeddings included)."""

from .base import ModelAdapter, register_adapter


@register_adapter("llama", "mistral", "qwen2", "qwen3")
class LlamaAdapter(ModelAdapter):
    layers_path = "model.layers"
    linear_groups = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    embed_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    residual_writers = ["self_attn.o_proj", "mlp.down_proj"]
    residual_readers = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    layer_norms = ["input_layernorm", "post_attention_layernorm"]
    norm_kind = "rmsnorm"
    norm_readers = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}
    mlp_units = ("mlp.down_proj", ["mlp.gate_proj", "mlp.up_proj"], "intermediate_size")
    head_units = ("self_attn", "self_attn.o_proj", "self_attn.q_proj", ["self_attn.k_proj", "self_attn.v_proj"])
