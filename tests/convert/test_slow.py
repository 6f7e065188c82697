"""Slow tests: need the default model's ~490 MB download (run with KODKOD_SLOW=1)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.convert import models

pytestmark = pytest.mark.slow

TEXT = "import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return [l.rstrip() for l in f]\n"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    home = Path(os.environ.get("KODKOD_TEST_HOME") or tmp_path_factory.mktemp("kkhome"))
    m = models.KNOWN_MODELS[models.DEFAULT_MODEL]
    return models.fetch_gguf(m, models.model_dir(m.name, home) / "model.gguf", progress=False)


@pytest.fixture(scope="module")
def imported(gguf_file, tmp_path_factory) -> Path:
    from engine.convert.gguf_import import import_gguf

    return import_gguf(gguf_file, tmp_path_factory.mktemp("hf") / "qwen", progress=False)


def test_import_matches_transformers_gguf_loader(gguf_file, imported):
    from transformers import AutoModelForCausalLM

    from engine import load_model

    eng = load_model(imported, device="cpu")
    ids = eng.tokenizer.encode(TEXT)
    ours = eng.logits(ids)
    del eng
    ref_model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    assert float((ours - ref).abs().max()) < 1e-3


def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_file, imported):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ours = Tokenizer.from_file(str(imported / "tokenizer.json"))
    text = TEXT + "<|fim_prefix|>x = 1<|fim_suffix|>\n<|fim_middle|>  héllo wörld 12345 \t\n\n"
    assert ours.encode(text).ids == ref(text)["input_ids"]


def test_download_is_quick_and_idempotent(tmp_path):
    env = dict(os.environ, KODKOD_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "server.cli", "download", "--for", "gpu", "--no-progress"]  # EXL2
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    took = time.time() - t0
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_dir() and (path / "config.json").is_file()
    assert took < 600, f"kodkod download took {took:.0f} s"
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and Path(res.stdout.strip().splitlines()[-1]) == path
    assert time.time() - t0 < 30

    from engine import load_model
    from engine.convert.writer import validate

    validate(path)
    eng = load_model(path, device="cpu")
    prompt = "<|fim_prefix|>def fib(n):\n    <|fim_suffix|>\n    return fib(n - 1) + fib(n - 2)<|fim_middle|>"
    from engine import GenerationParams
    ids = [eng.tokenizer.token_id("<|fim_prefix|>")] + eng.tokenizer.encode("def fib(n):\n    ") + \
        [eng.tokenizer.token_id("<|fim_suffix|>")] + eng.tokenizer.encode("\n    return fib(n - 1) + fib(n - 2)") + \
        [eng.tokenizer.token_id("<|fim_middle|>")]
    text = "".join(e.text for e in eng.generate(ids, GenerationParams(max_new_tokens=16)))
    assert "if" in text and "n" in text, (prompt, text)
