"""Write a small Hugging Face Llama checkpoint (e.g. the bundled stories260K) as a float32 GGUF file.

The layout follows llama.cpp's converter: llama metadata keys, llama.cpp tensor names with the
q/k rows permuted for its rotary layout (transformers' GGUF loader undoes exactly this), and a
sentencepiece ("llama") tokenizer read from ``tokenizer.model``. With ``arch`` set to another name
the same content is written under that architecture, to test how unsupported files are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# sentencepiece piece kinds -> llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF's half-split rotary -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_vocab(model_file: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(_UNKNOWN)
        elif sp.is_control(i):
            types.append(_CONTROL)
        elif sp.is_byte(i):
            types.append(_BYTE)
        elif sp.is_unused(i):
            types.append(_UNUSED)
        else:
            types.append(_NORMAL)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return tokens, scores, types, ids


def write_llama_gguf(hf_dir: Path, out_file: Path, arch: str = "llama") -> Path:
    """Convert the Llama checkpoint in ``hf_dir`` to a float32 GGUF at ``out_file``; returns ``out_file``."""
    import gguf
    from safetensors.numpy import load_file

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    sd = {k: v.astype(np.float32) for k, v in sd.items()}

    n_layer = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

    w = gguf.GGUFWriter(str(out_file), arch)
    w.add_name(hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, scores, types, ids = _tokenizer_vocab(hf_dir / "tokenizer.model")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_unk_token_id(ids["unk"])
    if ids["pad"] >= 0:
        w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", _permute_rotary(sd[p + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(b + "attn_k.weight", _permute_rotary(sd[p + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.get("tie_word_embeddings", False) and "lm_head.weight" in sd:
        w.add_tensor("output.weight", sd["lm_head.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file
