"""Random-weight models in the real shapes (engine.convert.synthetic): what `kodkod bench engine` times."""
from __future__ import annotations

import json

import pytest
import torch

from engine import GenerationParams, load_model
from engine.convert.synthetic import SHAPES, parse_model_name, random_model, step_bytes
from engine.linear import EXL2Linear, Linear


def _linears(model):
    return [m for m in model.modules() if isinstance(m, (Linear, EXL2Linear))]


@pytest.mark.parametrize("name, bits", [("0.5b", 4.0), ("0.5b-8bpw", 8.0), ("0.5b-fp16", None)])
def test_random_models_load_in_their_format_and_generate(tmp_path, name, bits):
    path = random_model(tmp_path / name, name, vocab=512, layers=1)
    eng = load_model(path, device="cpu")
    kinds = {type(m) for m in _linears(eng.model)}
    assert kinds == ({Linear} if bits is None else {EXL2Linear}), kinds
    assert (eng.config.quantization or {}).get("bits") == bits
    weights = [m.weight for m in _linears(eng.model) if isinstance(m, Linear)]
    assert all(w.abs().max() > 0 for w in weights)  # never zeros
    events = list(eng.generate([5, 6, 7], GenerationParams(max_new_tokens=4, temperature=0.0)))
    assert sum(e.token_id is not None for e in events) == 4 and events[-1].finish_reason == "length"


def test_step_bytes_count_every_weight_a_step_reads(tmp_path):
    """fp16: two bytes per parameter of every tensor but the embedding (the head has its own);
    EXL2 4.0 bpw reads about a quarter of that, 8.0 bpw about half."""
    dense = random_model(tmp_path / "d", "0.5b-fp16", vocab=512, layers=1)
    h, inter = SHAPES["0.5b"]["hidden_size"], SHAPES["0.5b"]["intermediate_size"]
    kv = h // SHAPES["0.5b"]["num_attention_heads"] * SHAPES["0.5b"]["num_key_value_heads"]
    params = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * inter + 2 * h + h + 512 * h  # layer, biases, norms, head
    assert step_bytes(dense) == 2 * params
    quant = random_model(tmp_path / "q", "0.5b", vocab=512, layers=1)
    assert 0.2 < step_bytes(quant) / step_bytes(dense) < 0.4
    eight = random_model(tmp_path / "e", "0.5b-8bpw", vocab=512, layers=1)
    assert 0.45 < step_bytes(eight) / step_bytes(dense) < 0.6


@pytest.mark.parametrize("name, form", [("0.5b", "4bpw"), ("1.5b-fp16", "fp16"), ("7b-8bpw", "8bpw"), ("7b-4bpw", "4bpw")])
def test_model_names_parse(name, form):
    assert parse_model_name(name) == (name.partition("-")[0], form)


@pytest.mark.parametrize("name", ["9b", "0.5b-int4", "", "0.5b-"])
def test_unknown_model_names_are_refused_clearly(name):
    with pytest.raises(ValueError, match="one of 0.5b, 1.5b, 7b"):
        parse_model_name(name)


def test_bench_engine_refuses_an_unknown_shape_before_anything_else(capsys):
    from server.cli import main

    assert main(["bench", "engine", "--shapes", "0.5b,9b"]) == 2
    assert "unknown model '9b'" in capsys.readouterr().err


def test_fp16_models_tie_nothing(tmp_path):
    """The fp16 model writes its head as a tensor of its own, so a step reads it as a tied one would."""
    path = random_model(tmp_path / "d", "0.5b-fp16", vocab=512, layers=1)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"] is None
    eng = load_model(path, device="cpu")
    assert not torch.equal(eng.model.lm_head.weight.float(), eng.model.embed_tokens.float())
