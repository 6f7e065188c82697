// Decode attention for one new token, with RoPE and the KV-cache write fused in.
//
// Grid: (query head, split of the sequence). Every block rotates its query
// and the new key itself, so no block waits for another to write the cache:
// the new position is taken from registers, not from the cache. One block per
// KV head writes the new key and value. Each split leaves (max, sum, weighted
// values) in scratch; the last split of a head to finish merges them in a
// fixed order (deterministic), and resets the head's counter for the next launch.
#include "kodkod.h"
#include "launch.cuh"
#include "trace.cuh"

#include <algorithm>
#include <cfloat>
#include <cstdlib>

namespace kodkod {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxChunk = 128;  // positions per split, at most
constexpr int kMinChunk = 64;
constexpr int kMaxDim = 256;
constexpr int kMaxSplits = 1024;  // max_len up to 131072

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half(v)); }

__device__ float block_reduce(float v, float* red, bool is_max) {
  for (int o = 16; o; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float t = red[0];
  for (int i = 1; i < (int)blockDim.x / 32; ++i) t = is_max ? fmaxf(t, red[i]) : t + red[i];
  return t;
}

// Per-head RMSNorm (Qwen3's q_norm / k_norm), rounded as the fp16 torch path rounds.
__device__ void head_norm(float* x, const half* w, int d, float eps, float* red) {
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += x[i] * x[i];
  const float rstd = rsqrtf(block_reduce(s, red, false) / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) x[i] = round_half(round_half(x[i] * rstd) * __half2float(w[i]));
  __syncthreads();
}

// Rotate-half RoPE on the first rot_dim dims; tables are cat([angles, angles]).
__device__ void rope(float* x, const half* cos, const half* sin, int rot_dim) {
  const int half_dim = rot_dim / 2;
  for (int i = threadIdx.x; i < half_dim; i += blockDim.x) {
    const float x1 = x[i], x2 = x[i + half_dim];
    x[i] = round_half(x1 * __half2float(cos[i]) - x2 * __half2float(sin[i]));
    x[i + half_dim] = round_half(x2 * __half2float(cos[i + half_dim]) + x1 * __half2float(sin[i + half_dim]));
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) attention_kernel(const AttentionArgs a) {
  __shared__ float q[kMaxDim], kn[kMaxDim], vn[kMaxDim];
  __shared__ float p[kMaxChunk];
  __shared__ float red[32];
  __shared__ float2 part[kThreads * 4];  // [groups][d] partial weighted values (kThreads * 8 floats)
  __shared__ bool last;

  extern __shared__ __align__(16) half kv[];  // staged cache rows: keys [per][d + 8], then values

  const int h = blockIdx.x, split = blockIdx.y, d = a.d, row = d + 8;  // 16 bytes of padding: no bank conflicts
  const int kvh = h / (a.heads / a.kv_heads);
  trace_point(a.trace, 0);
  const int pos = *a.pos;  // written by the previous step's sampler, not by the kernel before this one
  const int lo = a.window > 0 ? max(0, pos - a.window + 1) : 0;
  // At least kMinChunk positions per split: fewer partial results to merge on short contexts.
  const int per = max(kMinChunk, (pos - lo + 1 + a.splits - 1) / a.splits);
  const int t0 = lo + split * per, t1 = min(pos + 1, t0 + per);
  half* ks = kv;
  half* vs = kv + (size_t)per * row;
  // This split's cached key and value rows (all but the new position's) do not depend on the QKV
  // kernel: copied into shared memory while it may still run.
  if (a.stage)
    for (int i = threadIdx.x; i < (t1 - t0) * (d / 8); i += blockDim.x) {
      const int t = t0 + i / (d / 8), c = 8 * (i % (d / 8));
      if (t >= pos) break;
      const size_t at = ((size_t)t * a.kv_heads + kvh) * d + c;
      copy16(ks + (t - t0) * row + c, a.k_cache + at);
      copy16(vs + (t - t0) * row + c, a.v_cache + at);
    }
  copies_commit();
  trace_point(a.trace, 1);
  pdl_wait();
  pdl_trigger();
  trace_point(a.trace, 2);
  const half* qsrc = a.qkv + (size_t)h * d;
  const half* ksrc = a.qkv + (size_t)a.heads * d + (size_t)kvh * d;
  const half* vsrc = ksrc + (size_t)a.kv_heads * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    q[i] = __half2float(qsrc[i]);
    kn[i] = __half2float(ksrc[i]);
    vn[i] = __half2float(vsrc[i]);
  }
  copies_wait();
  __syncthreads();
  if (a.q_norm) {
    head_norm(q, a.q_norm, d, a.norm_eps, red);
    head_norm(kn, a.k_norm, d, a.norm_eps, red);
  }
  const half* cos = a.cos + (size_t)pos * a.rot_dim;
  const half* sin = a.sin + (size_t)pos * a.rot_dim;
  rope(q, cos, sin, a.rot_dim);
  rope(kn, cos, sin, a.rot_dim);
  if (split == 0 && h % (a.heads / a.kv_heads) == 0) {
    const size_t at = ((size_t)pos * a.kv_heads + kvh) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      a.k_cache[at + i] = __float2half(kn[i]);
      a.v_cache[at + i] = __float2half(vn[i]);
    }
  }

  trace_point(a.trace, 3);
  const int active = (pos - lo + 1 + per - 1) / per;
  float* out_part = a.scratch + ((size_t)h * a.splits + split) * (d + 2);
  if (t0 >= t1) {
    if (threadIdx.x == 0) {
      out_part[d] = -FLT_MAX;
      out_part[d + 1] = 0.f;
    }
  } else {
    for (int t = t0 + threadIdx.x; t < t1; t += blockDim.x) {
      float dot = 0.f;
      if (t == pos) {
        for (int i = 0; i < d; ++i) dot = fmaf(q[i], kn[i], dot);
      } else {  // four partial sums: short dependency chains
        float part4[4] = {0.f, 0.f, 0.f, 0.f};
        const uint4* kr = reinterpret_cast<const uint4*>(
            a.stage ? ks + (t - t0) * row : a.k_cache + ((size_t)t * a.kv_heads + kvh) * d);
#pragma unroll 4
        for (int i = 0; i < d / 8; ++i) {
          const uint4 raw = kr[i];
          const half2* h2 = reinterpret_cast<const half2*>(&raw);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 f = __half22float2(h2[j]);
            part4[j] = fmaf(q[8 * i + 2 * j], f.x, part4[j]);
            part4[j] = fmaf(q[8 * i + 2 * j + 1], f.y, part4[j]);
          }
        }
        dot = (part4[0] + part4[1]) + (part4[2] + part4[3]);
      }
      p[t - t0] = dot * a.scale;
    }
    __syncthreads();
    float mx = -FLT_MAX;
    for (int t = threadIdx.x; t < t1 - t0; t += blockDim.x) mx = fmaxf(mx, p[t]);
    mx = block_reduce(mx, red, true);
    float sum = 0.f;
    for (int t = threadIdx.x; t < t1 - t0; t += blockDim.x) {
      const float e = __expf(p[t] - mx);
      p[t] = e;
      sum += e;
    }
    sum = block_reduce(sum, red, false);  // its barrier also publishes p
    // Weighted values: a thread owns 8 dims (one 16-byte load per position) of one group of
    // positions, so a block keeps kThreads / (d / 8) positions' loads in flight at once.
    const int octets = d / 8, groups = kThreads / octets;
    const int lane = threadIdx.x % octets, group = threadIdx.x / octets;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (group < groups) {
      const uint4* vc = reinterpret_cast<const uint4*>(a.v_cache + (size_t)kvh * d) + lane;
      const uint4* vsm = reinterpret_cast<const uint4*>(vs - (size_t)t0 * row) + lane;  // row t at vsm[t * row / 8]
#pragma unroll 4
      for (int t = t0 + group; t < t1; t += groups) {
        const float w = p[t - t0];
        if (t == pos) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] = fmaf(w, vn[8 * lane + e], acc[e]);
        } else {
          const uint4 raw = a.stage ? vsm[(size_t)t * (row / 8)] : vc[(size_t)t * a.kv_heads * octets];
          const half2* h2 = reinterpret_cast<const half2*>(&raw);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h2[e]);
            acc[2 * e] = fmaf(w, f.x, acc[2 * e]);
            acc[2 * e + 1] = fmaf(w, f.y, acc[2 * e + 1]);
          }
        }
      }
    }
    float* vsum = reinterpret_cast<float*>(part);  // [groups][d]
    if (group < groups)
#pragma unroll
      for (int e = 0; e < 8; ++e) vsum[group * d + 8 * lane + e] = acc[e];
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float s = 0.f;
      for (int g = 0; g < groups; ++g) s += vsum[g * d + i];
      out_part[i] = s;
    }
    if (threadIdx.x == 0) {
      out_part[d] = mx;
      out_part[d + 1] = sum;
    }
  }

  trace_point(a.trace, 4);
  // The last split of this head merges every split's partial result.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counters + h, 1) == a.splits - 1;
  __syncthreads();
  if (!last) {
    trace_point(a.trace, 5);
    return;
  }
  __threadfence();
  const float* parts_h = a.scratch + (size_t)h * a.splits * (d + 2);
  __shared__ float weight[kMaxSplits];  // exp(m_s - max) of each split, then divided by the total
  float m = -FLT_MAX;
  for (int s = threadIdx.x; s < active; s += blockDim.x) m = fmaxf(m, __ldcg(parts_h + s * (d + 2) + d));
  m = block_reduce(m, red, true);
  float total = 0.f;
  for (int s = threadIdx.x; s < active; s += blockDim.x) {
    const float w = __expf(__ldcg(parts_h + s * (d + 2) + d) - m);
    weight[s] = w;
    total += w * __ldcg(parts_h + s * (d + 2) + d + 1);
  }
  total = block_reduce(total, red, false);  // its barrier also publishes weight[]
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float o = 0.f;
#pragma unroll 8
    for (int s = 0; s < active; ++s) o = fmaf(__ldcg(parts_h + s * (d + 2) + i), weight[s], o);
    a.out[(size_t)h * d + i] = __float2half(o / total);
  }
  if (threadIdx.x == 0) a.counters[h] = 0;
  trace_point(a.trace, 6);
  trace_point(a.trace, 5);
}

}  // namespace

int attention_splits(int max_len) { return std::max(1, (max_len + kMaxChunk - 1) / kMaxChunk); }  // <= kMaxSplits

void decode_attention(const AttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(a.heads, a.splits);
  AttentionArgs args = a;
  args.trace = trace_region("attention", a.heads * a.splits);
  // Staged rows: a split holds at most kMaxChunk positions (attention_splits) of keys and values.
  static const bool stage = [] { const char* e = std::getenv("KODKOD_ATTN_STAGE"); return !(e && e[0] == '0'); }();
  const int per = std::max(kMinChunk, (a.max_len + a.splits - 1) / a.splits);
  const size_t smem = stage ? 2 * sizeof(half) * per * (a.d + 8) : 0;
  static size_t allowed = 48 * 1024;
  if (smem > allowed) {
    cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    allowed = smem;
  }
  args.stage = stage;
  launch(attention_kernel, grid, dim3(kThreads), smem, stream, args);
}

}  // namespace kodkod
