"""GGUF import: a GGUF written from the tiny fixture comes back as the same HF model."""
import json

import numpy as np
import pytest
import torch

from engine.convert.gguf_import import GGUFImportError, hf_name, import_gguf
from engine.loader import TensorStore


def _permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py `permute`
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(path):
    store = TensorStore(path)
    return {k: store.get(k) for k in store.names()}


def _write_gguf(src, path, arch="llama", q8_key=None):
    import gguf

    cfg = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {a["id"]: a for a in tok["added_tokens"]}
    names = [k for k, _ in vocab]
    for i, a in added.items():
        if i >= len(names):
            names.append(a["content"])
    w.add_token_list(names)
    w.add_token_types([3 if i in added else 1 for i in range(len(names))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_bos_token_id(cfg["bos_token_id"])
    inv = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, t in _hf_tensors(src).items():
        a = t.float().numpy()
        if name in inv:
            gname = inv[name]
        else:
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{parts[mod]}.{kind}"
        if arch == "llama" and "q_proj" in name:
            a = _permute(a, cfg["num_attention_heads"])
        if arch == "llama" and "k_proj" in name:
            a = _permute(a, cfg["num_key_value_heads"])
        if name == q8_key:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_names_map_onto_hf():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_llama_gguf_round_trip(tiny_fp16, tmp_path):
    from engine import load_model

    key = "model.layers.1.mlp.up_proj.weight"
    _write_gguf(tiny_fp16, tmp_path / "tiny.gguf", q8_key=key)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False, log=lambda s: None)
    ref, got = _hf_tensors(tiny_fp16), _hf_tensors(out)
    assert ref.keys() == got.keys()
    for k in ref:
        tol = 0.01 * float(ref[k].float().abs().max()) if k == key else 0.0  # Q8_0: one step of 1/127
        assert torch.allclose(got[k], ref[k].float(), atol=tol, rtol=0), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    # the rebuilt tokenizer encodes like the original
    from tokenizers import Tokenizer
    a, b = Tokenizer.from_file(str(tiny_fp16 / "tokenizer.json")), Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)  # 123\n"
    assert a.encode(text).ids == b.encode(text).ids
    assert b.decode(b.encode(text).ids) == text
    # and the engine runs it like the original
    ids = a.encode(text).ids
    l0 = load_model(tiny_fp16, device="cpu").logits(ids)
    l1 = load_model(out, device="cpu").logits(ids)
    assert float((l0 - l1).abs().max()) < 0.05


def test_unsupported_gguf_is_a_clear_error(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFImportError, match="unsupported GGUF architecture 'mamba'"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out", progress=False)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        import_gguf(tmp_path / "bad.gguf", tmp_path / "out", progress=False)
    from server.cli import main
    assert main(["import-gguf", str(tmp_path / "x.gguf"), "-o", str(tmp_path / "out")]) == 1
