from __future__ import annotations

import pytest

from lang_fixtures import FIXTURE, QWEN_TOKENS, Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(FIXTURE)


@pytest.fixture(scope="session")
def qwen_tok() -> Tokenizer:
    return load_tokenizer(QWEN_TOKENS)
