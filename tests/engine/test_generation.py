"""Generation on the exllamav2-written fixtures: logits, sampling, stops, cancellation, streaming text."""
import json.decoder
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import GenerationParams, TokenEvent, load_model
from engine.engine import StopStrings
from engine.sampling import apply_repetition_penalty, filter_logits
from engine.tokenizer import StreamDecoder, Tokenizer
from tests.conftest import fixture_dir

# exl2-format.md: expected max |logits - hf_fp32_logits| and greedy agreement of a correct forward.
CLOSENESS = {"llama-tiny-fp16": (1e-3, 0.99), "llama-tiny-6.5bpw": (0.25, 0.85),
             "llama-tiny-4.0bpw": (1.0, 0.35), "llama-tiny-2.5bpw": (3.5, 0.0)}


@pytest.fixture(scope="module")
def engine():
    return load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu")


@pytest.fixture(scope="module")
def golden():
    return load_file(fixture_dir("llama-tiny-4.0bpw") / "golden.safetensors")


def text_of(events):
    return "".join(e.text for e in events)


@pytest.mark.parametrize("name", list(CLOSENESS))
def test_full_model_logits_close_to_transformers(name, golden):
    eng = load_model(fixture_dir(name), device="cpu")
    assert eng.quantized == (name != "llama-tiny-fp16")
    ref = golden["hf_fp32_logits"].float()
    ours = eng.logits(golden["input_ids"].tolist())
    max_diff, agreement = CLOSENESS[name]
    assert (ours - ref).abs().max().item() <= max_diff
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= agreement


def test_generation_streams_events_and_ends_with_a_finish_event(engine, golden):
    prompt = golden["input_ids"].tolist()[:12]
    events = list(engine.generate(prompt, GenerationParams(max_new_tokens=9)))
    assert all(isinstance(e, TokenEvent) for e in events)
    *tokens, last = events
    assert last.token_id is None and last.finish_reason in ("length", "stop")
    assert all(e.finish_reason is None for e in tokens)
    if last.finish_reason == "length":
        assert len(tokens) == 9
    assert text_of(events) == engine.tokenizer.decode([e.token_id for e in tokens])


def test_generation_is_lazy_and_cancel_stops_within_one_step(engine, golden):
    prompt = golden["input_ids"].tolist()[:20]
    cancel = threading.Event()
    stream = engine.generate(prompt, GenerationParams(max_new_tokens=40, stop_token_ids=()), cancel)
    before = engine.decode_steps
    first = next(stream)
    assert engine.decode_steps == before + 1  # nothing ran ahead of the consumer
    cancel.set()
    at_signal = engine.decode_steps
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert engine.decode_steps - at_signal in (0, 1)
    assert first.finish_reason is None


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_launch_ahead_hands_out_what_plain_decoding_does(engine, golden, depth):
    """The GPU's launch-ahead (the steps after a token are launched before the token is handed out),
    forced on the CPU: the same events for greedy, sampled, stop-token, stop-string, length- and
    context-limited generations; at most `depth` steps ahead of the consumer; a stream dropped with
    steps in flight leaves the cache's ids exact."""
    ahead = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu", draft_tokens=0)  # plain decoding's steps
    assert not ahead.launch_ahead  # off on the CPU
    ahead.launch_ahead = depth
    prompt = golden["input_ids"].tolist()[:16]
    free = [e.token_id for e in engine.generate(prompt, GenerationParams(max_new_tokens=24, stop_token_ids=()))]
    text = engine.tokenizer.decode([t for t in free if t is not None])
    cases = [GenerationParams(max_new_tokens=20), GenerationParams(max_new_tokens=1),
             GenerationParams(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.2),
             GenerationParams(max_new_tokens=20, stop_token_ids=(free[5],)),
             GenerationParams(max_new_tokens=24, stop_strings=(text[8:11],))]
    for params in cases:
        assert list(ahead.generate(prompt, params)) == list(engine.generate(prompt, params)), params
        assert ahead.cache.ids == engine.cache.ids

    cancel = threading.Event()
    stream = ahead.generate(prompt, GenerationParams(max_new_tokens=40, stop_token_ids=()), cancel)
    before = ahead.decode_steps
    next(stream)
    assert ahead.decode_steps == before + 1 + depth  # the prompt, and the steps after the first token
    cancel.set()
    at_signal = ahead.decode_steps
    assert list(stream)[-1].finish_reason == "cancelled"
    assert ahead.decode_steps == at_signal

    stream = ahead.generate(prompt, GenerationParams(max_new_tokens=30))
    next(stream), next(stream)
    stream.close()  # a step in flight, never read
    assert list(ahead.generate(prompt, cases[0])) == list(engine.generate(prompt, cases[0]))
    assert ahead.cache.ids == engine.cache.ids

    short = [load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu", max_seq_len=24, draft_tokens=0)
             for _ in range(2)]
    short[1].launch_ahead = depth
    a, b = (list(e.generate(prompt, GenerationParams(max_new_tokens=20, stop_token_ids=()))) for e in short)
    # the prompt's draw, one token per free row of the 24-row context, then the finish event
    assert a == b and len(a) == 1 + (24 - 16) + 1


def test_cancel_from_another_thread(engine, golden):
    prompt = golden["input_ids"].tolist()[:20]
    cancel = threading.Event()
    steps_at_signal = []
    saw = threading.Event()

    def canceller():
        saw.wait(5)
        steps_at_signal.append(engine.decode_steps)
        cancel.set()

    t = threading.Thread(target=canceller)
    t.start()
    engine.stop_ids, saved = frozenset(), engine.stop_ids
    try:
        events = []
        for ev in engine.generate(prompt, GenerationParams(max_new_tokens=200), cancel):
            events.append(ev)
            if len(events) == 3:
                saw.set()
                t.join()
    finally:
        engine.stop_ids = saved
    assert events[-1].finish_reason == "cancelled"
    assert engine.decode_steps - steps_at_signal[0] in (0, 1)


def test_same_seed_same_output_and_seeds_differ(engine, golden):
    prompt = golden["input_ids"].tolist()[:16]
    p = GenerationParams(max_new_tokens=16, temperature=1.0, seed=1234)
    a = [e.token_id for e in engine.generate(prompt, p)]
    b = [e.token_id for e in engine.generate(prompt, p)]
    others = {tuple(e.token_id for e in engine.generate(prompt, GenerationParams(
        max_new_tokens=16, temperature=1.0, seed=s))) for s in range(4)}
    assert a == b
    assert len(others) > 1


def test_top_k_one_is_greedy(engine, golden):
    prompt = golden["input_ids"].tolist()[:16]
    greedy = [e.token_id for e in engine.generate(prompt, GenerationParams(max_new_tokens=10))]
    topk1 = [e.token_id for e in engine.generate(prompt, GenerationParams(max_new_tokens=10, temperature=0.8,
                                                                          top_k=1, seed=5))]
    assert greedy == topk1


def test_stop_token_ids_end_the_stream(engine, golden):
    prompt = golden["input_ids"].tolist()[:16]
    free = [e.token_id for e in engine.generate(prompt, GenerationParams(max_new_tokens=8))][:-1]
    stop_at = free[3]
    first = free.index(stop_at)
    events = list(engine.generate(prompt, GenerationParams(max_new_tokens=8, stop_token_ids=(stop_at,))))
    assert [e.token_id for e in events[:-1]] == free[:first]
    assert events[-1].finish_reason == "stop"


def test_stop_strings_cut_the_text(engine, golden):
    prompt = golden["input_ids"].tolist()[:16]
    full = text_of(engine.generate(prompt, GenerationParams(max_new_tokens=24)))
    stop = full[10:13]
    assert stop and full.find(stop) >= 0
    events = list(engine.generate(prompt, GenerationParams(max_new_tokens=24, stop_strings=(stop, "\x00never"))))
    assert text_of(events) == full[: full.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["\ndef ", "###"])
    assert s.feed("x = 1\n") == ("x = 1", False)
    assert s.feed("de") == ("", False)
    assert s.feed("lta") == ("\ndelta", False)
    assert s.feed("##") == ("", False)
    assert s.feed("#!") == ("", True)
    assert StopStrings([]).feed("abc") == ("abc", False)
    assert StopStrings(["zz"]).flush("tail z") == "tail z"


def test_max_new_tokens_zero(engine):
    events = list(engine.generate([5, 6, 7], GenerationParams(max_new_tokens=0)))
    assert events == [TokenEvent(None, "", "length")]


def test_bad_prompts_are_clear_errors(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], GenerationParams())
    with pytest.raises(ValueError, match="out of range"):
        engine.generate([1, 99999], GenerationParams())
    with pytest.raises(ValueError, match="context"):
        engine.generate([5] * engine.max_seq_len, GenerationParams())


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": 1.5}, "min_p"),
    ({"top_k": -2}, "top_k"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"repetition_penalty": 0}, "repetition"),
])
def test_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)


def test_one_generation_at_a_time(engine):
    first = engine.generate([5, 6, 7], GenerationParams(max_new_tokens=5))
    next(first)
    with pytest.raises(RuntimeError, match="one request at a time"):
        next(engine.generate([5, 6], GenerationParams(max_new_tokens=5)))
    first.close()  # closing the stream releases the engine
    assert list(engine.generate([5, 6], GenerationParams(max_new_tokens=1)))


def test_sampling_filters_match_transformers():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(500, generator=gen) * 3
        hist = torch.randint(0, 500, (30,), generator=gen)
        ids = hist.unsqueeze(0)
        rp = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.unsqueeze(0).clone())[0]
        assert torch.allclose(apply_repetition_penalty(logits, hist, 1.3), rp)
        for ours, theirs in [
            (filter_logits(logits, 17, 1.0, 0.0), TopKLogitsWarper(17)(ids, logits[None].clone())[0]),
            (filter_logits(logits, 0, 0.8, 0.0), TopPLogitsWarper(0.8)(ids, logits[None].clone())[0]),
            (filter_logits(logits, 0, 1.0, 0.05), MinPLogitsWarper(0.05)(ids, logits[None].clone())[0]),
        ]:
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_stream_decoder_never_emits_half_a_character():
    tok = Tokenizer.from_dir(fixture_dir("llama-tiny-fp16"))
    text = "naïve café → 日本語のテキスト 🎉🚀 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 3  # multi-byte characters really are split over tokens
    dec = StreamDecoder(tok, tok.encode("# prompt\n"))
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # some steps had to wait for the rest of a character


def test_encode_equals_the_plain_encode_and_special_text_stays_text():
    """Tokenizer.encode (the library's batch form, no offsets) gives the plain encode's ids, and the
    text of a special token in a prompt never becomes that token."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from tests.languages.lang_fixtures import QWEN_TOKENS

    hf = HFTokenizer.from_file(str(fixture_dir("llama-tiny-fp16") / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_TOKENS])
    tok = Tokenizer(hf)
    import tokenizers
    assert tok._fast or tokenizers.__version__ != "0.23.3"  # the pinned version takes the fast form
    texts = [Path(json.decoder.__file__).read_text(encoding="utf-8"), "", "\n\n  x = 1\r\n",
             "naïve café → 日本語 🎉", "a <|fim_prefix|> b <|fim_middle|>c"]
    for text in texts:
        assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids
    specials = set(tok.special_tokens.values())
    assert specials and not specials & set(tok.encode("".join(QWEN_TOKENS)))
