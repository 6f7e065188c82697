"""Prompt KV reuse (the pool) and prompt-lookup speculative decoding, on the fixture models (CPU).

Both may only change how much work a generation takes: the tests compare against plain
generation (whole prefill, one token per forward pass) token for token, and check that the
shortcut was really taken (cached prompt tokens, accepted draft tokens), so they cannot pass
by never using it.
"""
import random
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine import GenerationParams, load_model
from engine.decode import Decoder
from engine.kv_cache import KVCache
from engine.kv_pool import KVPool, common_prefix
from engine.sampling import Sampler
from engine.speculate import PromptLookup
from tests.conftest import fixture_dir

SOURCE = Path(textwrap.__file__).read_text(encoding="utf-8")  # real code for real token sequences


@pytest.fixture(scope="module")
def engine():
    return load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu")


def code_prompts(tok, n: int, seed: int = 0, repeat: bool = True) -> list[list[int]]:
    """Token ids of slices of a real source file; with repeat, a piece of each slice comes again at
    its end (code copies itself: what prompt lookup exploits, and what makes the tiny model loop)."""
    ids = tok.encode(SOURCE)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(0, len(ids) - 200)
        p = ids[a:a + rng.randrange(20, 120)]
        if repeat:
            b = rng.randrange(0, len(p) - 4)
            p = p + p[b:b + rng.randrange(2, 12)]
        out.append(p)
    return out


def run(eng, prompt, draft_tokens=0, reuse=True, **kw):
    eng.draft_tokens, eng.reuse_prompts = draft_tokens, reuse
    try:
        params = GenerationParams(max_new_tokens=kw.pop("max_new_tokens", 32), stop_token_ids=(), **kw)
        return [e.token_id for e in eng.generate(prompt, params) if e.token_id is not None]
    finally:
        eng.draft_tokens, eng.reuse_prompts = 0, True


# ---------------------------------------------------------------- prompt lookup
def test_prompt_lookup_drafts_what_followed_the_longest_latest_match():
    lk = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], max_ngram=3)
    lk.push(2)
    lk.push(3)
    # "2 3" occurs twice; the latest earlier occurrence (followed by 7 8) wins
    assert lk.draft(4) == [7, 8, 2, 3]
    assert lk.draft(1) == [7]
    lk.push(4)  # "2 3 4" only at the start: the 3-gram beats the later "3 4"-less matches
    assert lk.draft(3) == [5, 9, 2]
    lk.push(99)
    assert lk.draft(3) == []  # 99 never occurred before
    assert PromptLookup([5]).draft(4) == []


def test_prompt_lookup_grows_past_its_buffer():
    lk = PromptLookup([1, 2])
    for t in range(300):
        lk.push(t % 7)
    assert lk.draft(3) == [300 % 7, 301 % 7, 302 % 7]


# ---------------------------------------------------------------- speculation: greedy identity
@pytest.mark.parametrize("name", ["llama-tiny-4.0bpw", "llama-tiny-2.5bpw", "llama-tiny-fp16"])
def test_greedy_speculation_is_token_for_token_plain_decoding(name):
    eng = load_model(fixture_dir(name), device="cpu")
    prompts = code_prompts(eng.tokenizer, 24, seed=1)
    for k in (1, 4, 8):
        for p in prompts:
            assert run(eng, p, draft_tokens=k) == run(eng, p), (k, p)
    s = eng.stats
    assert s["verify_steps"] > 50 and s["accepted_tokens"] > 0.1 * s["draft_tokens"], s


def test_sampled_speculation_reproduces_plain_sampling_for_each_seed(engine):
    """Same seed, same tokens: the accept step draws with the noise plain decoding would use."""
    prompts = code_prompts(engine.tokenizer, 8, seed=2)
    before = engine.stats["accepted_tokens"]
    settings = [dict(temperature=0.7), dict(temperature=1.0, top_p=0.9), dict(temperature=0.5, top_k=20),
                dict(temperature=0.8, min_p=0.05, repetition_penalty=1.2), dict(repetition_penalty=1.3)]
    for kw in settings:
        for i, p in enumerate(prompts):
            assert run(engine, p, draft_tokens=6, seed=i, **kw) == run(engine, p, seed=i, **kw), (kw, i)
    assert engine.stats["accepted_tokens"] > before


def test_speculation_keeps_cache_ids_exact(engine):
    """After rejected drafts, cache.ids still says what every cached row holds: a fresh prefill of
    cache.ids writes the same keys and values."""
    for p in code_prompts(engine.tokenizer, 4, seed=3):
        run(engine, p, draft_tokens=8, max_new_tokens=40)
        ids = list(engine.cache.ids)
        assert len(ids) >= len(p) + 39
        ref = KVCache(engine.config.num_layers, engine.config.num_kv_heads, engine.config.head_dim,
                      engine.max_seq_len, "cpu", engine.dtype)
        with torch.inference_mode():
            engine.model(torch.tensor(ids), torch.arange(len(ids)), ref, start=0)
        torch.testing.assert_close(engine.cache.k[:, :len(ids)], ref.k[:, :len(ids)], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(engine.cache.v[:, :len(ids)], ref.v[:, :len(ids)], atol=1e-4, rtol=1e-4)


def test_speculation_stays_lazy(engine):
    """Each next() runs at most one forward pass, also when one pass made several tokens."""
    p = code_prompts(engine.tokenizer, 1, seed=4)[0]
    engine.draft_tokens = 8
    try:
        stream = engine.generate(p, GenerationParams(max_new_tokens=40, stop_token_ids=()))
        steps = []
        for _ in stream:
            steps.append(engine.decode_steps)
    finally:
        engine.draft_tokens = 0
    assert all(b - a in (0, 1) for a, b in zip(steps, steps[1:]))
    assert steps[-1] - steps[0] < 39  # some pass made more than one token


def test_accept_follows_the_speculative_sampling_rule():
    """A draft token d is kept with probability p(d); otherwise the token is drawn from p without d,
    renormalized; after a kept d the next token is drawn from the next row. Checked over 6,000
    seeds on a five-token vocabulary with a chi-square bound (fixed seeds: the test is deterministic)."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0], [0.0, 1.5, 0.3, -1.0, 0.4]])
    p0, p1 = torch.softmax(logits[0], 0), torch.softmax(logits[1], 0)
    d = 3
    sampler = Sampler(5, torch.device("cpu"))
    dec = Decoder.__new__(Decoder)  # accept() needs only the sampler and the positions
    dec.sampler, dec.pos, dec.host_pos = sampler, torch.zeros(1, dtype=torch.int64), 0
    first, second, n = Counter(), Counter(), 6000
    for seed in range(n):
        sampler.start(GenerationParams(temperature=1.0), [0], seed)
        sampler.seen.zero_()  # no penalty in play (penalty 1.0 anyway)
        dec.host_pos = 0
        out = dec.accept([d], logits.clone())
        first[out[0]] += 1
        if out[0] == d:
            second[out[1]] += 1
        assert dec.host_pos == len(out)

    def chi2(counts, probs, total):
        return sum((counts[i] - total * float(probs[i])) ** 2 / (total * float(probs[i])) for i in range(len(probs)))

    # first token: p0 exactly (accepted d with p0[d], else p0 without d renormalized: together p0)
    assert chi2(first, p0, n) < 18.5  # 4 degrees of freedom, p = 0.001
    rejected = Counter({t: c for t, c in first.items() if t != d})
    q = p0.clone()
    q[d] = 0
    q /= q.sum()
    total_rej = sum(rejected.values())
    assert abs(first[d] / n - float(p0[d])) < 4 * (float(p0[d]) * (1 - float(p0[d])) / n) ** 0.5
    assert sum((rejected[i] - total_rej * float(q[i])) ** 2 / (total_rej * float(q[i]))
               for i in range(5) if i != d) < 16.3  # 3 degrees of freedom, p = 0.001
    assert chi2(second, p1, first[d]) < 18.5


# ---------------------------------------------------------------- the KV pool
def test_common_prefix():
    import numpy as np

    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 9])) == 2
    assert common_prefix(a, np.array([1, 2])) == 2
    assert common_prefix(a, np.array([7])) == 0


def test_pool_restores_a_file_switched_back_to_and_output_is_unchanged(engine):
    """File A, then file B, then A again with a few more tokens typed: the third prompt prefills only
    what was typed (its prefix comes from the pool), and every output equals a whole prefill's."""
    a, b = code_prompts(engine.tokenizer, 2, seed=5, repeat=False)
    a2 = a + engine.tokenizer.encode("    return value\n")
    engine.kv_pool.clear()
    engine.cache.ids = []
    outs = []
    for p in (a, b, a2):
        before = dict(engine.stats)
        outs.append(run(engine, p))
        cached = engine.stats["prompt_tokens_cached"] - before["prompt_tokens_cached"]
        prefilled = engine.stats["prompt_tokens_prefilled"] - before["prompt_tokens_prefilled"]
        assert cached + prefilled == len(p)
    assert cached == len(a) and prefilled == len(a2) - len(a)  # the last prompt: A's rows came back
    assert len(engine.kv_pool) == 2
    for p, out in zip((a, b, a2), outs):
        assert out == run(engine, p, reuse=False)


def test_pool_replaces_a_keystrokes_entry_in_place_and_evicts_least_recently_used(engine):
    cfg = engine.config
    row_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    pool = KVPool(3 * 256 * row_bytes)  # three entries of one 256-row granule
    cache = engine.cache
    base = code_prompts(engine.tokenizer, 3, seed=6, repeat=False)
    typed = base[0]
    for extra in ([11], [11, 12], [11, 12, 13]):  # typing: one entry, updated
        pool.save(typed + extra, cache)
    assert len(pool) == 1
    pool.save(base[1], cache)
    pool.save(base[2], cache)
    assert len(pool) == 3
    assert pool.restore(typed + [11, 12, 13, 14], cache, 0) == len(typed) + 3  # typed's entry: now the newest
    pool.save([1000 + i for i in range(50)], cache)  # a fourth: base[1], the least recently used, goes
    assert len(pool) == 3 and pool.nbytes <= pool.budget_bytes
    assert pool.restore(base[1] + [5], cache, 0) == 0
    assert pool.restore(base[2] + [5], cache, 0) == len(base[2])
    assert KVPool(0).restore(typed, cache, 3) == 3  # off: the cache's own prefix only
    small = KVPool(row_bytes)  # one row: nothing fits, nothing is kept
    small.save(typed, cache)
    assert len(small) == 0


def test_pool_tells_entries_apart_by_their_first_tokens(engine):
    """An entry sharing fewer than HEAD leading tokens with a prompt is passed over without a
    whole-prompt comparison; one sharing more is found among many; short prompts still match."""
    from engine.kv_pool import HEAD

    cache = engine.cache
    pool = KVPool(1 << 30)
    shared = list(range(100, 100 + HEAD + 20))
    for i in range(30):  # thirty prompts that part from `shared` early (by token i % HEAD)
        p = shared[:i % HEAD] + [5000 + i] + shared[:40]
        pool.save(p, cache)
    pool.save(shared + [7, 8, 9], cache)
    assert len(pool) == 31
    assert pool.restore(shared + [7, 8, 1, 2], cache, 0) == len(shared) + 2
    assert pool.restore(shared[:HEAD - 1] + [1, 2, 3, 4], cache, 0) == 0  # fewer than HEAD shared
    tiny = KVPool(1 << 30)
    tiny.save([3, 4, 5], cache)
    assert tiny.restore([3, 4, 6], cache, 0) == 2  # prompts shorter than HEAD: compared whole
