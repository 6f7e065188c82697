"""The reference forward against transformers on tiny random models of every supported architecture."""
import json

import pytest
import torch

from engine import GenerationParams, ModelError, load_model
from tests.engine.tiny_models import ARCHS, build, hf_logits

IDS = [5, 17, 300, 41, 999, 2, 77, 77, 512, 8, 640, 33, 90, 1000, 4, 61, 250, 7, 19, 700]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("archs")
    return {arch: build(tmp, arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(models, arch):
    path, hf = models[arch]
    eng = load_model(path, device="cpu")
    ours = eng.logits(IDS)
    ref = hf_logits(hf, IDS)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_with_cache_equals_greedy_without(models, arch):
    path, _ = models[arch]
    eng = load_model(path, device="cpu")
    prompt = IDS[:7]
    events = list(eng.generate(prompt, GenerationParams(max_new_tokens=12, stop_token_ids=())))
    cached = [e.token_id for e in events if e.token_id is not None]
    eng.stop_ids = frozenset()  # random models emit token 0 (EOS) now and then; compare the raw stream
    ids = list(prompt)
    for _ in range(len(cached)):
        ids.append(int(eng.logits(ids)[-1].argmax()))
    assert cached == ids[len(prompt):]
    assert len(cached) > 0


def test_prefix_reuse_gives_the_same_tokens(models):
    path, _ = models["qwen2"]
    eng = load_model(path, device="cpu")
    eng.stop_ids = frozenset()
    params = GenerationParams(max_new_tokens=6)
    first = [e.token_id for e in eng.generate(IDS[:12], params)]
    steps = eng.decode_steps
    again = [e.token_id for e in eng.generate(IDS[:12], params)]
    other = [e.token_id for e in eng.generate(IDS[:10] + [3, 4], params)]
    fresh = load_model(path, device="cpu")
    fresh.stop_ids = frozenset()
    assert first == again
    assert other == [e.token_id for e in fresh.generate(IDS[:10] + [3, 4], params)]
    assert eng.decode_steps - steps == 2 * 6  # prefill of a cached prompt is one step, like a decode


ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_scaling_matches_transformers(tmp_path, kind):
    # max_position_embeddings below the prompt length, so dynamic scaling really kicks in.
    rope = {"rope_theta": 5000.0, **ROPES[kind]}
    path, hf = build(tmp_path, "llama", rope_parameters=rope, max_position_embeddings=16)
    ours = load_model(path, device="cpu").logits(IDS)
    assert (ours - hf_logits(hf, IDS)).abs().max().item() < 1e-4


def test_legacy_top_level_rope_settings_are_read(tmp_path):
    path, hf = build(tmp_path, "llama", rope_parameters={"rope_theta": 5000.0, "rope_type": "linear", "factor": 2.0})
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    ours = load_model(path, device="cpu").logits(IDS)
    assert (ours - hf_logits(hf, IDS)).abs().max().item() < 1e-4


def test_sharded_checkpoints_with_index_and_exllamav2_names(tmp_path):
    path, hf = build(tmp_path, "qwen3")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    (sharded / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    ref = hf_logits(hf, IDS)
    assert (load_model(sharded, device="cpu").logits(IDS) - ref).abs().max() < 1e-4
    # exllamav2 writes output-0000N-of-0000M.safetensors with no index.
    (sharded / "model.safetensors.index.json").unlink()
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    for i, f in enumerate(shards):
        f.rename(sharded / f"output-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    assert (load_model(sharded, device="cpu").logits(IDS) - ref).abs().max() < 1e-4


def test_unknown_architecture_names_the_supported_ones(tmp_path, models):
    path, _ = models["llama"]
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="GPTNeoXForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_model(bad, device="cpu")


def test_missing_tensor_and_bad_shape_are_clear_errors(tmp_path, models):
    from safetensors.torch import load_file, save_file

    path, _ = models["llama"]
    tensors = load_file(path / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (broken / f).write_bytes((path / f).read_bytes())
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, broken / "model.safetensors")
    with pytest.raises(ModelError, match="layers.1.mlp.up_proj.weight.*missing"):
        load_model(broken, device="cpu")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelError, match="q_proj: weight shape"):
        load_model(broken, device="cpu")
