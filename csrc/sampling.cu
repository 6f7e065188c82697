// Choosing the next token on the GPU, and the embedding lookup that starts a step.
//
// Sampling is the Gumbel-max draw: argmax(logit / T + g_i) with g_i Gumbel noise
// picks token i with probability softmax(logit / T)_i, exactly. The noise comes
// from a counter-based hash of (seed, step, token), so a draw needs no RNG state
// and engine/sampling.py computes the very same noise on any device.
// Filters (top-k, top-p, min-p) arrive as one threshold on logit / T.
#include "kodkod.h"
#include "launch.cuh"
#include "trace.cuh"

#include <cfloat>
#include <climits>

namespace kodkod {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocks = 64;

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x2c1b3c6du;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ bool better(float s, int i, float bs, int bi) { return s > bs || (s == bs && i < bi); }

__device__ void block_best(float& s, int& i, float* red_s, int* red_i) {
  for (int o = 16; o; o >>= 1) {
    const float os = __shfl_xor_sync(0xffffffffu, s, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(os, oi, s, i)) s = os, i = oi;
  }
  if (threadIdx.x % 32 == 0) red_s[threadIdx.x / 32] = s, red_i[threadIdx.x / 32] = i;
  __syncthreads();
  s = red_s[0], i = red_i[0];
  for (int w = 1; w < (int)blockDim.x / 32; ++w)
    if (better(red_s[w], red_i[w], s, i)) s = red_s[w], i = red_i[w];
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const SampleArgs a) {
  __shared__ float red_s[32];
  __shared__ int red_i[32];
  __shared__ bool last;
  trace_point(a.trace, 0);
  pdl_trigger();  // launch.cuh: short kernels let the next launch on entry
  pdl_wait();
  trace_point(a.trace, 2);
  const float temperature = a.params[0], penalty = a.params[1], threshold = a.params[2];
  const bool greedy = temperature <= 1e-5f;
  const uint64_t seed = (uint64_t)*a.seed;
  const uint32_t key = mix32((uint32_t)seed ^ mix32((uint32_t)(seed >> 32) ^ mix32((uint32_t)*a.step)));
  float best = -FLT_MAX;
  int best_i = INT_MAX;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < a.vocab; i += gridDim.x * blockDim.x) {
    float v = a.logits[i];
    if (a.seen[i]) v = v > 0.f ? v / penalty : v * penalty;
    float s = v;
    if (!greedy) {
      s = v / temperature;
      if (s < threshold) continue;
      const uint32_t r = mix32(key ^ mix32((uint32_t)i + 0x9e3779b9u));
      const float u = (float(r >> 8) + 0.5f) * (1.f / 16777216.f);
      s += -logf(-logf(u));
    }
    if (better(s, i, best, best_i)) best = s, best_i = i;
  }
  block_best(best, best_i, red_s, red_i);
  if (threadIdx.x == 0) {
    a.partial[2 * blockIdx.x] = best;
    a.partial[2 * blockIdx.x + 1] = __int_as_float(best_i);
    __threadfence();
    last = atomicAdd(a.counter, 1) == (int)gridDim.x - 1;
  }
  __syncthreads();
  if (!last) {
    trace_point(a.trace, 5);
    return;
  }
  __threadfence();
  best = -FLT_MAX, best_i = INT_MAX;
  for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
    const float s = __ldcg(a.partial + 2 * b);
    const int i = __float_as_int(__ldcg(a.partial + 2 * b + 1));
    if (better(s, i, best, best_i)) best = s, best_i = i;
  }
  __syncthreads();
  block_best(best, best_i, red_s, red_i);
  if (threadIdx.x == 0) {
    const int token = best_i == INT_MAX ? 0 : best_i;
    *a.token = token;
    if (a.seen_out) a.seen_out[token] = 1;
    *a.step += 1;
    if (a.pos) *a.pos += 1;
    *a.counter = 0;
  }
  trace_point(a.trace, 6);
  trace_point(a.trace, 5);
}

__global__ void embed_kernel(const half* table, const int64_t* token, float* out, int hidden) {
  pdl_trigger();  // launch.cuh
  pdl_wait();
  const half* row = table + (size_t)(*token) * hidden;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hidden; i += gridDim.x * blockDim.x)
    out[i] = __half2float(row[i]);
}

}  // namespace

void sample(const SampleArgs& a, cudaStream_t stream) {
  SampleArgs args = a;
  args.trace = trace_region("sample", kBlocks);
  launch(sample_kernel, dim3(kBlocks), dim3(kThreads), 0, stream, args);
}

void embed(const half* table, const int64_t* token, float* out, int hidden, cudaStream_t stream) {
  launch(embed_kernel, dim3((hidden + 255) / 256), dim3(256), 0, stream, table, token, out, hidden);
}

}  // namespace kodkod
