// Python binding of the kernels: torch tensors in, raw pointers out, launched on
// torch's current stream (so they can be captured into a CUDA graph).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kodkod.h"

namespace {

void check(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
const T* opt_ptr(const c10::optional<torch::Tensor>& t, torch::ScalarType dtype, const char* name) {
  if (!t.has_value()) return nullptr;
  check(*t, dtype, name);
  return reinterpret_cast<const T*>(t->data_ptr());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(err));
}

// One weight matrix as the kernels see it; holds its tensors so the pointers stay valid.
struct MatrixHandle {
  std::vector<torch::Tensor> keep;
  kodkod::Matrix m{};
};

MatrixHandle make_matrix(torch::Tensor q_weight, c10::optional<torch::Tensor> q_scale,
                         c10::optional<torch::Tensor> q_scale_max, torch::Tensor chunks,
                         c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, int64_t n_out,
                         int64_t x_len) {
  TORCH_CHECK(q_weight.is_cuda() && q_weight.is_contiguous() && q_weight.dim() == 2, "q_weight: contiguous 2-D CUDA");
  TORCH_CHECK(q_weight.scalar_type() == torch::kInt32 || q_weight.scalar_type() == torch::kHalf,
              "q_weight must be int32 (EXL2) or float16 (dense)");
  check(chunks, torch::kInt32, "chunks");
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 4, "chunks must be [n, 4]");
  const int64_t n = q_weight.size(1);
  TORCH_CHECK(n % 32 == 0, "weight columns must be a multiple of 32, got ", n);
  TORCH_CHECK(n_out > 0 && n_out <= n, "n_out out of range");
  TORCH_CHECK(!perm.has_value() || perm->numel() <= 65536, "the kernels take at most 65,536 input rows");
  MatrixHandle h;
  h.keep = {q_weight, chunks};
  for (const auto* t : {&q_scale, &q_scale_max, &perm, &bias})
    if (t->has_value()) h.keep.push_back(**t);
  h.m.q_weight = ptr<const uint32_t>(q_weight);
  h.m.q_scale = opt_ptr<uint32_t>(q_scale, torch::kInt32, "q_scale");
  h.m.q_scale_max = opt_ptr<half>(q_scale_max, torch::kHalf, "q_scale_max");
  h.m.chunks = ptr<const int4>(chunks);
  h.m.perm = opt_ptr<int>(perm, torch::kInt32, "perm");
  if (perm.has_value()) {  // 16-bit rows for the GEMV to copy into shared memory, padded to a multiple of 8
    auto p16 = torch::zeros({(perm->numel() + 7) / 8 * 8}, perm->options().dtype(torch::kInt16));
    p16.narrow(0, 0, perm->numel()).copy_(perm->bitwise_and(0xFFFF).to(torch::kInt16));
    h.keep.push_back(p16);
    h.m.perm16 = reinterpret_cast<const uint16_t*>(p16.data_ptr());
  }
  h.m.bias = opt_ptr<half>(bias, torch::kHalf, "bias");
  h.m.n = static_cast<int>(n);
  h.m.n_out = static_cast<int>(n_out);
  h.m.n_chunks = static_cast<int>(chunks.size(0));
  h.m.rows = static_cast<int>(q_weight.size(0));
  h.m.groups = q_scale_max.has_value() ? static_cast<int>(q_scale_max->numel()) : 0;
  h.m.x_len = static_cast<int>(x_len);
  h.m.k = perm.has_value() ? static_cast<int>(perm->numel()) : static_cast<int>(x_len);
  return h;
}

void gemv(const std::vector<MatrixHandle>& mats, torch::Tensor x, int64_t in_mode,
          c10::optional<torch::Tensor> norm_w, c10::optional<torch::Tensor> norm_b, double eps, int64_t out_mode,
          int64_t act, const std::vector<torch::Tensor>& outs, c10::optional<torch::Tensor> partials,
          c10::optional<torch::Tensor> counters, c10::optional<torch::Tensor> out_index) {
  TORCH_CHECK(!mats.empty() && mats.size() <= kodkod::kMaxMatrices, "1 to 3 matrices per launch");
  TORCH_CHECK(out_mode != kodkod::kOutGated || mats.size() == 2, "a gated launch takes gate and up");
  const bool gated = out_mode == kodkod::kOutGated;
  TORCH_CHECK(outs.size() == (gated ? 1 : mats.size()), "one output per matrix (one for gated)");
  check(x, in_mode == kodkod::kInHalf ? torch::kHalf : torch::kFloat, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  kodkod::GemvArgs a{};
  a.n_mats = static_cast<int>(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) a.mat[i] = mats[i].m;
  a.in_mode = static_cast<int>(in_mode);
  a.x = x.data_ptr();
  a.k_in = static_cast<int>(x.numel());
  a.norm_w = opt_ptr<half>(norm_w, torch::kHalf, "norm_w");
  a.norm_b = opt_ptr<half>(norm_b, torch::kHalf, "norm_b");
  TORCH_CHECK(in_mode == kodkod::kInHalf || a.norm_w, "a norm needs its weight");
  TORCH_CHECK(in_mode != kodkod::kInLayerNorm || a.norm_b, "LayerNorm needs its bias");
  a.eps = static_cast<float>(eps);
  a.out_mode = static_cast<int>(out_mode);
  a.act = static_cast<int>(act);
  const bool float_out = out_mode == kodkod::kOutResidual || out_mode == kodkod::kOutFloat;
  for (size_t i = 0; i < outs.size(); ++i) {
    check(outs[i], float_out ? torch::kFloat : torch::kHalf, "out");
    TORCH_CHECK(outs[i].numel() >= mats[i].m.n_out, "output too small");
    a.out[i] = outs[i].data_ptr();
  }
  for (size_t i = 0; i < mats.size(); ++i)
    TORCH_CHECK(mats[i].m.x_len >= a.k_in, "input longer than the matrix's rows");
  if (partials.has_value() && counters.has_value()) {
    check(*partials, torch::kFloat, "partials");
    check(*counters, torch::kInt32, "counters");
    a.partials = ptr<float>(*partials);
    a.partials_size = static_cast<int>(std::min<int64_t>(partials->numel(), INT32_MAX));
    a.counters = ptr<int>(*counters);
    a.counters_size = static_cast<int>(std::min<int64_t>(counters->numel(), INT32_MAX));
  }
  if (out_index.has_value()) {
    check(*out_index, torch::kInt32, "out_index");
    TORCH_CHECK(mats.size() == 1 || gated, "out_index: one output");
    TORCH_CHECK(out_mode == kodkod::kOutHalf || out_mode == kodkod::kOutAct || gated, "out_index: fp16 outputs only");
    TORCH_CHECK(out_index->numel() >= mats[0].m.n_out, "out_index shorter than the output");
    TORCH_CHECK(outs[0].numel() >= out_index->numel(), "output shorter than out_index's range");
    a.out_index = ptr<const int>(*out_index);
  }
  kodkod::gemv(a, stream());
  check_launch();
}

void gemv_tokens(const MatrixHandle& mat, torch::Tensor x, torch::Tensor out, torch::Tensor scratch) {
  check(x, torch::kHalf, "x");
  check(out, torch::kHalf, "out");
  check(scratch, torch::kHalf, "scratch");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kodkod::kMaxTokens, "x must be [1..16, k]");
  const int64_t tokens = x.size(0), stride = mat.m.x_len;
  TORCH_CHECK(x.size(1) <= mat.m.x_len, "input longer than the matrix's rows");
  TORCH_CHECK(out.numel() >= tokens * mat.m.n_out, "out too small");
  TORCH_CHECK(scratch.numel() >= 8 * stride, "scratch too small: 8 x x_len halfs");
  const c10::cuda::CUDAGuard guard(x.device());
  kodkod::gemv_tokens(mat.m, ptr<const half>(x), static_cast<int>(tokens), static_cast<int>(x.size(1)),
                      ptr<half>(out), ptr<half>(scratch), stream());
  check_launch();
}

void dequant(const MatrixHandle& mat, torch::Tensor out) {
  check(out, torch::kHalf, "out");
  TORCH_CHECK(mat.m.q_scale != nullptr, "dequant needs an EXL2 matrix");
  TORCH_CHECK(mat.m.perm != nullptr, "dequant needs the permutation");
  TORCH_CHECK(out.numel() >= (int64_t)mat.m.k * mat.m.n, "out too small");
  const c10::cuda::CUDAGuard guard(out.device());
  kodkod::dequant(mat.m, ptr<half>(out), stream());
  check_launch();
}

void decode_attention(torch::Tensor qkv, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor pos,
                      torch::Tensor cos, torch::Tensor sin, c10::optional<torch::Tensor> q_norm,
                      c10::optional<torch::Tensor> k_norm, double norm_eps, torch::Tensor out, torch::Tensor scratch,
                      torch::Tensor counters, int64_t heads, int64_t kv_heads, int64_t window, int64_t splits,
                      double scale) {
  check(qkv, torch::kHalf, "qkv");
  check(k_cache, torch::kHalf, "k_cache");
  check(v_cache, torch::kHalf, "v_cache");
  check(pos, torch::kInt32, "pos");
  check(cos, torch::kHalf, "cos");
  check(sin, torch::kHalf, "sin");
  check(out, torch::kHalf, "out");
  check(scratch, torch::kFloat, "scratch");
  check(counters, torch::kInt32, "counters");
  TORCH_CHECK(k_cache.dim() == 3, "k_cache must be [max_len, kv_heads, head_dim]");
  const int64_t d = k_cache.size(2);
  TORCH_CHECK(d % 8 == 0 && d <= 256, "head_dim must be a multiple of 8, at most 256");
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(1) == kv_heads, "bad head counts");
  TORCH_CHECK(qkv.numel() == (heads + 2 * kv_heads) * d, "qkv size");
  TORCH_CHECK(splits >= kodkod::attention_splits(k_cache.size(0), d), "too few splits for the cache length");
  TORCH_CHECK(scratch.numel() >= kodkod::attention_scratch_floats(heads, splits, d) && counters.numel() >= heads,
              "scratch too small");
  const c10::cuda::CUDAGuard guard(qkv.device());
  kodkod::AttentionArgs a{};
  a.qkv = ptr<const half>(qkv);
  a.k_cache = ptr<half>(k_cache);
  a.v_cache = ptr<half>(v_cache);
  a.pos = ptr<const int>(pos);
  a.cos = ptr<const half>(cos);
  a.sin = ptr<const half>(sin);
  a.q_norm = opt_ptr<half>(q_norm, torch::kHalf, "q_norm");
  a.k_norm = opt_ptr<half>(k_norm, torch::kHalf, "k_norm");
  a.norm_eps = static_cast<float>(norm_eps);
  a.out = ptr<half>(out);
  a.scratch = ptr<float>(scratch);
  a.counters = ptr<int>(counters);
  a.heads = static_cast<int>(heads);
  a.kv_heads = static_cast<int>(kv_heads);
  a.d = static_cast<int>(d);
  a.rot_dim = static_cast<int>(cos.size(1));
  a.window = static_cast<int>(window);
  a.splits = static_cast<int>(splits);
  a.scale = static_cast<float>(scale);
  kodkod::decode_attention(a, stream());
  check_launch();
}

void sample(torch::Tensor logits, torch::Tensor seen, bool mark_seen, torch::Tensor params, torch::Tensor seed,
            torch::Tensor step, torch::Tensor token, c10::optional<torch::Tensor> pos, torch::Tensor partial,
            torch::Tensor counter) {
  check(logits, torch::kFloat, "logits");
  check(seen, torch::kUInt8, "seen");
  check(params, torch::kFloat, "params");
  check(seed, torch::kInt64, "seed");
  check(step, torch::kInt32, "step");
  check(token, torch::kInt64, "token");
  check(partial, torch::kFloat, "partial");
  check(counter, torch::kInt32, "counter");
  TORCH_CHECK(seen.numel() == logits.numel() && params.numel() >= 3 && partial.numel() >= 128, "sizes");
  const c10::cuda::CUDAGuard guard(logits.device());
  kodkod::SampleArgs a{};
  a.logits = ptr<const float>(logits);
  a.vocab = static_cast<int>(logits.numel());
  a.seen = ptr<const uint8_t>(seen);
  a.seen_out = mark_seen ? ptr<uint8_t>(seen) : nullptr;
  a.params = ptr<const float>(params);
  a.seed = ptr<const int64_t>(seed);
  a.step = ptr<int>(step);
  a.token = ptr<int64_t>(token);
  a.pos = pos.has_value() ? ptr<int>(*pos) : nullptr;
  if (pos.has_value()) check(*pos, torch::kInt32, "pos");
  a.partial = ptr<float>(partial);
  a.counter = ptr<int>(counter);
  kodkod::sample(a, stream());
  check_launch();
}

void embed(torch::Tensor table, torch::Tensor token, torch::Tensor out) {
  check(table, torch::kHalf, "table");
  check(token, torch::kInt64, "token");
  check(out, torch::kFloat, "out");
  TORCH_CHECK(table.dim() == 2 && out.numel() == table.size(1), "out must hold one row of the table");
  const c10::cuda::CUDAGuard guard(table.device());
  kodkod::embed(ptr<const half>(table), ptr<const int64_t>(token), ptr<float>(out),
                static_cast<int>(table.size(1)), stream());
  check_launch();
}

void rms_norm_rows(torch::Tensor x, torch::Tensor w, torch::Tensor out, double eps) {
  check(x, torch::kHalf, "x");
  check(w, torch::kHalf, "w");
  check(out, torch::kHalf, "out");
  TORCH_CHECK(x.dim() == 2 && w.numel() == x.size(1) && out.sizes() == x.sizes(), "x, out [rows, hidden]; w [hidden]");
  const c10::cuda::CUDAGuard guard(x.device());
  kodkod::rms_norm_rows(ptr<const half>(x), ptr<const half>(w), ptr<half>(out), static_cast<int>(x.size(0)),
                        static_cast<int>(x.size(1)), static_cast<float>(eps), stream());
  check_launch();
}

void rope_write(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                torch::Tensor pos, torch::Tensor k_cache, torch::Tensor v_cache) {
  check(q, torch::kHalf, "q");
  check(k, torch::kHalf, "k");
  check(v, torch::kHalf, "v");
  check(cos, torch::kHalf, "cos");
  check(sin, torch::kHalf, "sin");
  check(k_cache, torch::kHalf, "k_cache");
  check(v_cache, torch::kHalf, "v_cache");
  check(pos, torch::kInt64, "pos");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && k_cache.dim() == 3 &&
                  k_cache.sizes() == v_cache.sizes(), "q [T, heads, d]; k, v [T, kv_heads, d]; caches [len, kv_heads, d]");
  const int64_t t = q.size(0), d = q.size(2), rot = cos.size(-1);
  TORCH_CHECK(k.size(0) == t && k.size(2) == d && k_cache.size(1) == k.size(1) && k_cache.size(2) == d &&
                  pos.numel() == t && cos.numel() == t * rot && sin.numel() == t * rot && rot % 2 == 0 && rot <= d,
              "shapes do not agree");
  const c10::cuda::CUDAGuard guard(q.device());
  kodkod::RopeWriteArgs a{};
  a.q = ptr<half>(q);
  a.k = ptr<const half>(k);
  a.v = ptr<const half>(v);
  a.cos = ptr<const half>(cos);
  a.sin = ptr<const half>(sin);
  a.pos = ptr<const int64_t>(pos);
  a.k_cache = ptr<half>(k_cache);
  a.v_cache = ptr<half>(v_cache);
  a.tokens = static_cast<int>(t);
  a.heads = static_cast<int>(q.size(1));
  a.kv_heads = static_cast<int>(k.size(1));
  a.d = static_cast<int>(d);
  a.rot_dim = static_cast<int>(rot);
  kodkod::rope_write(a, stream());
  check_launch();
}

// Trace builds: the launches recorded since trace_reset(), and their timestamps [launches, blocks, points].
pybind11::tuple trace_read() {
  const int n = kodkod::trace_launches();
  auto stamps = torch::zeros({n, kodkod::kTraceBlocks, kodkod::kTracePoints}, torch::kInt64);
  if (n) TORCH_CHECK(kodkod::trace_read(reinterpret_cast<unsigned long long*>(stamps.data_ptr()), n), "trace_read");
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) names.emplace_back(kodkod::trace_name(i));
  return pybind11::make_tuple(names, stamps);
}

pybind11::dict gemv_last_plan() {
  const kodkod::GemvPlan p = kodkod::gemv_last_plan();
  pybind11::dict d;
  d["splits"] = p.splits;
  d["min_blocks"] = p.min_blocks;
  d["blocks"] = p.blocks;
  d["units"] = p.units;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<MatrixHandle>(m, "Matrix");
  m.def("make_matrix", &make_matrix);
  m.def("gemv", &gemv, pybind11::arg("mats"), pybind11::arg("x"), pybind11::arg("in_mode"),
        pybind11::arg("norm_w"), pybind11::arg("norm_b"), pybind11::arg("eps"), pybind11::arg("out_mode"),
        pybind11::arg("act"), pybind11::arg("outs"), pybind11::arg("partials") = pybind11::none(),
        pybind11::arg("counters") = pybind11::none(), pybind11::arg("out_index") = pybind11::none());
  m.def("gemv_last_plan", &gemv_last_plan);
  m.def("dequant", &dequant);
  m.def("gemv_tokens", &gemv_tokens);
  m.def("decode_attention", &decode_attention);
  m.def("attention_splits", &kodkod::attention_splits);
  m.def("attention_scratch_floats", &kodkod::attention_scratch_floats);
  m.def("sample", &sample);
  m.def("embed", &embed);
  m.def("rms_norm_rows", &rms_norm_rows);
  m.def("rope_write", &rope_write);
  m.def("trace_reset", &kodkod::trace_reset);
  m.def("trace_read", &trace_read);
}
