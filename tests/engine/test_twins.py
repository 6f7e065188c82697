"""The torch twins of the CUDA kernels, on the CPU: what CI checks of the fast path's math."""
import math

import pytest
import torch

from engine import GenerationParams, exl2, load_model
from engine.convert.quant import Mix, make_groups, rtn
from engine import kernel_layout
from engine.linear import EXL2Linear, linear
from engine.sampling import Sampler, apply_repetition_penalty, draw, filter_logits, filter_threshold, gumbel_noise
from tests.conftest import fixture_dir

MIXES = [Mix(((1.0, b),), gs) for b, gs in ((2, 64), (3, 32), (4, 128), (5, 32), (6, 64), (8, 32))] + [
    Mix(((0.25, 8), (0.25, 6), (0.25, 5), (0.25, 4)), 32), Mix(((0.25, 4), (0.5, 3), (0.25, 2)), 32)]


def layer(out_f, in_f, mix, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
    return rtn(w, make_groups(mix, in_f), torch.rand(in_f, generator=g)).tensors()


@pytest.mark.parametrize("mix, k", [(m, 352) for m in MIXES] + [(Mix(((1.0, b),), 32), 100) for b in (2, 4, 8)])
def test_kernel_layout_holds_every_value_once(mix, k):
    """The GEMV's layout: the chunks tile the rows in order and give back exactly the format's codes."""
    t = layer(64, k, mix, 1)
    groups = exl2.parse_groups(t["q_groups"], t["q_weight"].shape[0], k)
    words, chunks, x_len = kernel_layout.repack(t["q_weight"], groups, block=32)  # several column blocks
    rows, values = 0, 0
    for row, value, g, bits in chunks.tolist():
        assert (row, value, groups[g].bits) == (rows, values, bits)
        rows += kernel_layout.chunk_words(bits)
        values += kernel_layout.chunk_values(bits)
    assert rows == words.shape[0] and values == x_len >= k
    assert torch.equal(kernel_layout.unpack(words, chunks, k), exl2.unpack(t["q_weight"], groups).long())
    own = t["q_weight"].clone()
    again, _, _ = kernel_layout.repack(own, groups, block=64, in_place=True)
    assert torch.equal(again, words) and (again.data_ptr() == own.data_ptr()) == (words.shape == own.shape)


def test_kernel_layout_refuses_groups_that_split_a_chunk():
    groups = [exl2.Group(4, 48), exl2.Group(4, 16)]  # 48 rows: not a whole 32-row chunk
    with pytest.raises(exl2.EXL2FormatError, match="group 0"):
        kernel_layout.chunk_table(groups)


@pytest.mark.parametrize("mix", MIXES)
def test_exl2_linear_twin_is_dequantize_then_matmul(mix):
    t = layer(100, 256, mix, 2)
    bias = torch.randn(100)
    lin = EXL2Linear(t, 100, 256, bias, torch.float32)
    x = torch.randn(3, 256)
    ref = x.double() @ exl2.dequantize(t, 100).double().T + bias.double()
    assert torch.allclose(lin(x).double(), ref, rtol=1e-4, atol=1e-4)
    assert lin.dequantized().shape == (100, 256)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_of_a_few_rows_equals_f_linear(rows, bias):
    """The CPU's few-row path (W x^T, for a speculative verify pass) computes x W^T + b."""
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(300, 96, generator=g), torch.randn(rows, 96, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    y = linear(x, w, b)
    assert y.shape == (rows, 300) and y.is_contiguous()
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_bad_exl2_layers_are_format_errors():
    t = layer(64, 128, MIXES[2], 3)
    with pytest.raises(exl2.EXL2FormatError, match="q_invperm"):
        EXL2Linear(t, 64, 96, None, torch.float32)
    bad = dict(t, q_invperm=torch.zeros(128, dtype=torch.int32))
    with pytest.raises(exl2.EXL2FormatError, match="permutation"):
        EXL2Linear(bad, 64, 128, None, torch.float32)


@pytest.mark.parametrize("seed", range(30))
def test_filter_threshold_keeps_what_filter_logits_keeps(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, generator=g) * 3
    top_k = [0, 1, 5, 40][seed % 4]
    top_p = [1.0, 0.9, 0.5][seed % 3]
    min_p = [0.0, 0.05][seed % 2]
    kept = ~torch.isinf(filter_logits(logits, top_k, top_p, min_p))
    th = filter_threshold(logits, torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p))
    assert torch.equal(logits >= th, kept)


def test_draw_greedy_is_argmax_after_the_penalty():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(500, generator=g) * 3
        hist = torch.randint(0, 500, (40,), generator=g)
        seen = torch.zeros(500, dtype=torch.uint8)
        seen[hist] = 1
        params = torch.tensor([0.0, 1.5, -math.inf])
        token = draw(logits, seen, params, torch.tensor([1]), torch.tensor([0]))
        assert token.item() == apply_repetition_penalty(logits, hist, 1.5).argmax().item()


def test_gumbel_draws_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = torch.tensor([0.7, 1.0, -math.inf])
    seen = torch.zeros(6, dtype=torch.uint8)
    n = 20000
    counts = torch.zeros(6)
    for step in range(n):
        counts[draw(logits, seen, params, torch.tensor([42]), torch.tensor([step]))] += 1
    expected = torch.softmax(logits / 0.7, 0)
    assert (counts / n - expected).abs().max().item() < 0.01


def test_noise_depends_on_seed_and_step_and_is_uniform():
    a = gumbel_noise(torch.tensor([7]), torch.tensor([0]), 50000)
    assert torch.equal(a, gumbel_noise(torch.tensor([7]), torch.tensor([0]), 50000))
    assert not torch.equal(a, gumbel_noise(torch.tensor([7]), torch.tensor([1]), 50000))
    assert not torch.equal(a, gumbel_noise(torch.tensor([8]), torch.tensor([0]), 50000))
    u = torch.exp(-torch.exp(-a))  # back to the uniform draw
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() > 0 and u.max() < 1


def test_sampler_state_steps_and_marks_tokens():
    s = Sampler(100, "cpu")
    s.start(GenerationParams(temperature=0.5, top_k=3, seed=9), [1, 2, 3], 9)
    assert s.filtered and s.seen[[1, 2, 3]].tolist() == [1, 1, 1]
    pos = torch.tensor([10])
    logits = torch.randn(100)
    s(logits, pos)
    assert s.step.item() == 1 and pos.item() == 11 and s.seen[s.token.item()] == 1
    assert s.token.item() in logits.topk(3).indices.tolist()


def test_static_decode_step_equals_the_eager_step():
    """The graph-safe step (device positions, whole cache under a mask) computes what the eager one does."""
    eng = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu")
    prompt = list(range(5, 30))
    with torch.inference_mode():
        eng.model(torch.tensor(prompt), torch.arange(len(prompt)), eng.cache, start=0)
        token, pos = torch.tensor([77]), torch.tensor([len(prompt)])
        static = eng.model(token, pos, eng.cache, last_only=True)[0]
        eager = eng.model(token, pos, eng.cache, last_only=True, start=len(prompt))[0]
        full = eng.model(torch.tensor(prompt + [77]), torch.arange(len(prompt) + 1))[-1]
    assert torch.allclose(static, eager, atol=1e-4)
    assert torch.allclose(static, full, atol=1e-4)


def test_a_continued_prompt_attending_to_the_first_rows_equals_the_eager_one():
    """The static T-token forward of a continued prompt (a prefill bucket's graph body) limited to
    the cache's first `keys` rows computes what the whole cache under the mask and the eager
    continued prompt compute, padding tokens after it included."""
    eng = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu")
    prompt, more = list(range(5, 30)), [77, 78, 79, 80]
    padded = torch.tensor(more + [0, 0, 0])
    positions = torch.arange(len(prompt), len(prompt) + len(padded))
    with torch.inference_mode():
        eng.model(torch.tensor(prompt), torch.arange(len(prompt)), eng.cache, start=0)
        first = eng.model(padded, positions, eng.cache, graph_safe=True, keys=32)[:len(more)]
        whole = eng.model(padded, positions, eng.cache, graph_safe=True)[:len(more)]
        eager = eng.model(torch.tensor(more), positions[:len(more)], eng.cache, start=len(prompt))
    assert torch.allclose(first, whole, atol=1e-4)
    assert torch.allclose(first, eager, atol=1e-4)


def test_blockwise_dequantization_equals_the_whole():
    t = layer(300, 96, MIXES[6], 4)
    lin = EXL2Linear(t, 300, 96, None, torch.float32)
    assert torch.equal(lin.dequantized(block=64), exl2.dequantize(t, 300))


def test_kernels_say_why_they_are_off_without_a_gpu():
    from engine import kernels

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert kernels.load() is None and "GPU" in kernels.reason()
    eng = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu")
    assert eng.backend == "torch" and "CPU" in eng.backend_reason
    with pytest.raises(RuntimeError, match="CUDA backend cannot run"):
        load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu", backend="cuda")


def test_a_top_p_below_float32_resolution_keeps_the_top_token():
    logits = torch.randn(100)
    th = filter_threshold(logits, torch.tensor(0), torch.tensor(5e-324), torch.tensor(0.0))
    assert torch.equal(logits >= th, logits == logits.max())


def test_a_cached_known_model_is_named_by_its_model(tmp_path):
    from engine.engine import model_name

    assert model_name(tmp_path / "models" / "qwen2.5-coder-0.5b" / "hf-fp16") == "qwen2.5-coder-0.5b/hf-fp16"
    assert model_name(tmp_path / "models" / "qwen2.5-coder-0.5b" / "exl2-4bpw") == "qwen2.5-coder-0.5b/exl2-4bpw"
    assert model_name(tmp_path / "my-model") == "my-model"
