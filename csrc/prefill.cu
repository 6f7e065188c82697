// The prompt's per-token kernels: RMSNorm of T rows, and RoPE of T tokens' queries and keys with
// their keys and values written into the KV cache at device positions.
//
// Why: the prompt's T-token forward (engine/model.py) is captured as CUDA graphs per prompt
// bucket, and in torch ops a layer was about 50 kernels of a few microseconds each whatever the
// number of tokens, so a continued prompt of 16 tokens cost nearly what a fresh one of 1,500 did.
// These two stand for the norm's 8 elementwise kernels and for RoPE + cache write's 12. They round
// as their torch twins (RMSNorm.forward; apply_rope, then KVCache.write_at) round: sums in fp32,
// every fp16 product and sum rounded once, as torch rounds each fp16 op.
#include "kodkod.h"

namespace kodkod {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) rms_norm_rows_kernel(const half* __restrict__ x, const half* __restrict__ w,
                                                                 half* __restrict__ out, int hidden, float eps) {
  const size_t row = (size_t)blockIdx.x * hidden;
  float s = 0.f;
  for (int i = threadIdx.x; i < hidden; i += kThreads) {
    const float v = __half2float(x[row + i]);
    s += v * v;
  }
  __shared__ float part[kThreads / 32];
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) total += part[i];
  const float r = rsqrtf(total / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += kThreads)
    out[row + i] = __hmul(w[i], __float2half(__half2float(x[row + i]) * r));
}

// Block t: token t. Rotate-half RoPE on the first rot_dim dims (cos/sin: the token's table rows,
// cat([angles, angles])): q in place, k into the cache row pos[t]; v and k's unrotated dims copied.
__global__ void __launch_bounds__(kThreads) rope_write_kernel(half* __restrict__ q, const half* __restrict__ k,
                                                              const half* __restrict__ v, const half* __restrict__ cos,
                                                              const half* __restrict__ sin, const int64_t* __restrict__ pos,
                                                              half* __restrict__ k_cache, half* __restrict__ v_cache,
                                                              int heads, int kv_heads, int d, int rot_dim) {
  const int t = blockIdx.x, h2 = rot_dim / 2;
  const half* c = cos + (size_t)t * rot_dim;
  const half* s = sin + (size_t)t * rot_dim;
  const size_t row = (size_t)pos[t] * kv_heads * d;  // the cache row of this token
  for (int i = threadIdx.x; i < (heads + kv_heads) * h2; i += kThreads) {
    const int hh = i / h2, j = i % h2;
    const half* src;
    half* dst;
    if (hh < heads) {
      src = dst = q + ((size_t)t * heads + hh) * d;
    } else {
      src = k + ((size_t)t * kv_heads + hh - heads) * d;
      dst = k_cache + row + (size_t)(hh - heads) * d;
    }
    const half x1 = src[j], x2 = src[j + h2];
    // _rn: no contraction into a fused multiply-add, whose single rounding torch's ops do not have
    dst[j] = __hsub_rn(__hmul_rn(x1, c[j]), __hmul_rn(x2, s[j]));
    dst[j + h2] = __hadd_rn(__hmul_rn(x2, c[j + h2]), __hmul_rn(x1, s[j + h2]));
  }
  for (int i = threadIdx.x; i < kv_heads * d; i += kThreads) {
    v_cache[row + i] = v[(size_t)t * kv_heads * d + i];
    if (i % d >= rot_dim) k_cache[row + i] = k[(size_t)t * kv_heads * d + i];
  }
}

}  // namespace

void rms_norm_rows(const half* x, const half* w, half* out, int rows, int hidden, float eps, cudaStream_t stream) {
  if (rows > 0) rms_norm_rows_kernel<<<rows, kThreads, 0, stream>>>(x, w, out, hidden, eps);
}

void rope_write(const RopeWriteArgs& a, cudaStream_t stream) {
  if (a.tokens > 0)
    rope_write_kernel<<<a.tokens, kThreads, 0, stream>>>(a.q, a.k, a.v, a.cos, a.sin, a.pos, a.k_cache, a.v_cache,
                                                          a.heads, a.kv_heads, a.d, a.rot_dim);
}

}  // namespace kodkod
