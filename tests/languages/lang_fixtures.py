from __future__ import annotations

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from engine.tokenizer import Tokenizer
from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "llama-tiny-fp16"


def load_tokenizer(extra_special: list[str] = ()) -> Tokenizer:
    hf = HFTokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    if extra_special:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    return Tokenizer(hf, eos_token_ids=(0,))


QWEN_TOKENS = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"]
