"""GGUF files for tests, written with the ``gguf`` package as llama.cpp's converter lays them out (Llama's q/k rows
permuted for its rotary layout, 1-D tensors in F32, the others quantized with gguf's own quantizers; Q4_K, which
gguf only reads, by :func:`quantize_q4k`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize


def quantize_q4k(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` (length a multiple of 256) as Q4_K super-blocks, laid out as llama.cpp's ``block_q4_K``: fp16 d
    and dmin, 12 bytes packing 8 six-bit scale and min factors, 128 bytes of nibbles (a plain min/max rounding, not
    llama.cpp's search: a valid file, not a good quantizer)."""
    rows = a.shape[0]
    sub = a.reshape(rows, -1, 8, 32).astype(np.float32)  # (rows, super-blocks, sub-blocks, values)
    lo, hi = np.minimum(sub.min(-1), 0), sub.max(-1)
    scale, low = (hi - lo) / 15, -lo
    d = np.maximum(scale.max(-1), 1e-3) / 63  # (an fp16 d or dmin must not underflow to 0)
    dmin = np.maximum(low.max(-1), 1e-3) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.rint(scale / d16.astype(np.float32)[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(low / dmin16.astype(np.float32)[..., None]), 0, 63).astype(np.uint8)
    eff = d16.astype(np.float32)[..., None] * sc
    q = np.clip(np.rint((sub + (dmin16.astype(np.float32)[..., None] * mn)[..., None])
                        / np.maximum(eff, 1e-12)[..., None]), 0, 15).astype(np.uint8)
    packed = np.concatenate([sc[..., :4] | ((sc[..., 4:] & 0x30) << 2), mn[..., :4] | ((mn[..., 4:] & 0x30) << 2),
                             (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], axis=-1)
    pairs = q.reshape(rows, -1, 4, 2, 32)
    qs = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).reshape(rows, -1, 128)
    blocks = np.concatenate([d16[..., None].view(np.uint8), dmin16[..., None].view(np.uint8), packed, qs], axis=-1)
    return blocks.reshape(rows, -1)


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_PER_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(model: torch.nn.Module, path: Path, qtype: Q, head_qtype: Q | None = None) -> Path:
    """``model`` (a transformers Llama) as a GGUF file of ``qtype`` (its output layer of ``head_qtype``)."""
    c = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in _PER_LAYER.items()})
    for hf, gg in names.items():
        a = sd[hf]
        if gg.endswith("attn_q.weight"):
            a = _permute(a, c.num_attention_heads, c.num_attention_heads)
        if gg.endswith("attn_k.weight"):
            a = _permute(a, c.num_attention_heads, c.num_key_value_heads)
        t = Q.F32 if a.ndim == 1 else head_qtype if gg == "output.weight" and head_qtype is not None else qtype
        if t == Q.F32:
            w.add_tensor(gg, a.astype(np.float32))
        else:
            qa = quantize_q4k(a) if t == Q.Q4_K else quantize(a.astype(np.float32), t)
            w.add_tensor(gg, qa, raw_shape=qa.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
