// Decode attention for one new token, with RoPE and the KV-cache write fused in, on the tensor cores.
//
// Grid: (KV head x group of up to 16 of its query heads, split of the sequence). A block takes
// the query heads that share one KV head (GQA) as the 16 rows of mma.m16n8k16, so each cached key
// and value row is read once for all of them. A context that fits one block's shared memory
// (`chunk` positions: 256 at head dim 64) is one split, with no merge; a longer one is cut into
// splits of `split_len`. Before the dependency wait a block copies its split's cached rows into
// shared memory; then:
//   0. the query rows (and, in the split that holds the new position, the new key) are normalized
//      (Qwen3's q/k norms) and rotated in shared memory, rounded to fp16 as the torch path rounds;
//   1. scores S = Q K^T (warps take 16 positions at a time), masked past the split's end, and
//      each warp's row maxima;
//   2. O = P V (warps take 8 output dims at a time, so no merge between warps): every warp turns
//      all the scores into P = exp(S - max) in fp16 itself, straight into the mma's A fragment,
//      and sums the rounded P of its rows.
// One split writes the normalized output itself. Otherwise each split leaves (O, max, sum) in
// scratch and the last split of a head group to finish merges them in a fixed order
// (deterministic), and resets the group's counter for the next launch. The split holding the new
// position writes its key and value into the cache (its first head group).
#include "kodkod.h"
#include "launch.cuh"
#include "mma.cuh"
#include "trace.cuh"

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace kodkod {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kRows = 16;         // query heads of a block: the mma's m
constexpr int kMaxChunk = 256;    // positions a split stages, at most
constexpr int kSplitLen = 64;     // positions per split where a context needs several
constexpr int kSmemBudget = 112 * 1024;

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half(v)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Head dims padded to a whole number of the mma's 16-wide k-steps, as the kernel is built.
__host__ __device__ constexpr int padded_dims(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// Shared memory of a block with head dims padded to DP and `chunk` staged positions. Rows of fp16
// are padded by 16 bytes, so that the 8 rows an ldmatrix reads fall into distinct banks.
struct Smem {
  half *ks, *vs, *qs;  // [chunk][DP + 8] keys, values; [16][DP + 8] query rows
  float* ss;           // [16][chunk + 8] scores
  float* warp_max;     // [warps][16] each warp's row maxima
  float *row_max, *row_sum;  // [16] each
};

__host__ __device__ inline size_t smem_bytes(int dp, int chunk, Smem* s = nullptr, char* base = nullptr) {
  const size_t row = sizeof(half) * (dp + 8);
  const size_t ks = 0, vs = ks + chunk * row, qs = vs + chunk * row, ss = qs + kRows * row,
               wm = ss + sizeof(float) * kRows * (chunk + 8), mx = wm + sizeof(float) * kWarps * kRows,
               sum = mx + sizeof(float) * kRows, end = sum + sizeof(float) * kRows;
  if (s)
    *s = Smem{reinterpret_cast<half*>(base + ks), reinterpret_cast<half*>(base + vs), reinterpret_cast<half*>(base + qs),
              reinterpret_cast<float*>(base + ss), reinterpret_cast<float*>(base + wm),
              reinterpret_cast<float*>(base + mx), reinterpret_cast<float*>(base + sum)};
  return end;
}

// One fp16 row of d values in shared memory, in place: the per-head RMSNorm (Qwen3; norm may be
// nullptr), then rotate-half RoPE on the first rot_dim dims (tables: cat([angles, angles])).
// A warp's lanes own the norm's elements, then the rotation's pairs: a __syncwarp between.
__device__ void norm_rope(half* x, int d, const half* norm, float eps, const half* cos, const half* sin, int rot_dim,
                          int lane) {
  if (norm) {
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += __half2float(x[i]) * __half2float(x[i]);
    const float rstd = rsqrtf(warp_sum(s) / d + eps);
    for (int i = lane; i < d; i += 32)
      x[i] = __float2half(round_half(__half2float(x[i]) * rstd) * __half2float(norm[i]));
    __syncwarp();
  }
  const int h = rot_dim / 2;
  for (int i = lane; i < h; i += 32) {
    const float x1 = __half2float(x[i]), x2 = __half2float(x[i + h]);
    x[i] = __float2half(x1 * __half2float(cos[i]) - x2 * __half2float(sin[i]));
    x[i + h] = __float2half(x2 * __half2float(cos[i + h]) + x1 * __half2float(sin[i + h]));
  }
}

template <int DT>  // head dims padded to 16 * DT
__global__ void __launch_bounds__(kThreads, 1) attention_kernel(const AttentionArgs a) {
  constexpr int DP = 16 * DT, ROW = DP + 8;
  extern __shared__ __align__(16) char smem[];
  __shared__ bool last;
  Smem sm;
  const int chunk = a.chunk, d = a.d, SROW = chunk + 8;  // 8 mod 32 floats: the float2 rows of a half warp in distinct banks
  smem_bytes(DP, chunk, &sm, smem);

  const int group = a.heads / a.kv_heads, groups16 = (group + kRows - 1) / kRows;
  const int kvh = blockIdx.x / groups16, hg = blockIdx.x % groups16;
  const int h0 = kvh * group + hg * kRows, rows = min(kRows, group - hg * kRows);
  const int split = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  trace_point(a.trace, 0);
  pdl_trigger();  // launch.cuh: short kernels let the next launch on entry
  const int pos = *a.pos;  // written by the previous step's sampler, not by the kernel before this one
  const int lo = a.window > 0 ? max(0, pos - a.window + 1) : 0;
  // One block while the context fits its shared memory (no merge), else splits of split_len.
  const int len = pos - lo + 1, per = len <= chunk ? len : a.split_len;
  const int active = (len + per - 1) / per;  // splits that hold positions [lo, pos]
  if (split >= active) return;
  const int t0 = lo + split * per, n = min(pos + 1, t0 + per) - t0, steps = (n + 15) / 16;
  const bool owner = t0 + n == pos + 1;  // this split holds the new position (row n - 1)

  // The split's cached rows do not depend on the QKV kernel: copied while it may still run.
  for (int i = threadIdx.x; i < n * (d / 8); i += kThreads) {
    const int r = i / (d / 8), c = 8 * (i % (d / 8));
    if (t0 + r == pos) continue;
    const size_t at = ((size_t)(t0 + r) * a.kv_heads + kvh) * d + c;
    copy16(sm.ks + r * ROW + c, a.k_cache + at);
    copy16(sm.vs + r * ROW + c, a.v_cache + at);
  }
  copies_commit();
  // Zeros where the mmas read past the data: keys' padded dims, and the rows after the split's
  // last position up to a whole 16 (their scores are masked, but 0 * NaN would not be 0).
  for (int i = threadIdx.x; i < steps * 16 * (DP / 8); i += kThreads) {
    const int r = i / (DP / 8), c = 8 * (i % (DP / 8));
    if (r >= n) {
      *reinterpret_cast<uint4*>(sm.ks + r * ROW + c) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(sm.vs + r * ROW + c) = make_uint4(0u, 0u, 0u, 0u);
    } else if (c >= d) {
      *reinterpret_cast<uint4*>(sm.ks + r * ROW + c) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  trace_point(a.trace, 1);
  pdl_wait();
  trace_point(a.trace, 2);

  // 0. The query rows of the group (zero past them and past d), the new key and value.
  const half* k_new = a.qkv + (size_t)a.heads * d + (size_t)kvh * d;
  const half* v_new = k_new + (size_t)a.kv_heads * d;
  for (int i = threadIdx.x; i < kRows * (DP / 8); i += kThreads) {
    const int r = i / (DP / 8), c = 8 * (i % (DP / 8));
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows && c < d) v = *reinterpret_cast<const uint4*>(a.qkv + (size_t)(h0 + r) * d + c);
    *reinterpret_cast<uint4*>(sm.qs + r * ROW + c) = v;
  }
  if (owner)
    for (int i = threadIdx.x; i < d / 8; i += kThreads) {
      reinterpret_cast<uint4*>(sm.ks + (n - 1) * ROW)[i] = reinterpret_cast<const uint4*>(k_new)[i];
      reinterpret_cast<uint4*>(sm.vs + (n - 1) * ROW)[i] = reinterpret_cast<const uint4*>(v_new)[i];
    }
  copies_wait();
  __syncthreads();
  const half* cos = a.cos + (size_t)pos * a.rot_dim;
  const half* sin = a.sin + (size_t)pos * a.rot_dim;
  for (int r = warp; r < rows + (owner ? 1 : 0); r += kWarps)  // row `rows`: the new key
    norm_rope(r < rows ? sm.qs + r * ROW : sm.ks + (n - 1) * ROW, d, r < rows ? a.q_norm : a.k_norm, a.norm_eps,
              cos, sin, a.rot_dim, lane);
  __syncthreads();
  if (owner && hg == 0) {
    const size_t at = ((size_t)pos * a.kv_heads + kvh) * d;
    for (int i = threadIdx.x; i < d / 8; i += kThreads) {
      reinterpret_cast<uint4*>(a.k_cache + at)[i] = reinterpret_cast<const uint4*>(sm.ks + (n - 1) * ROW)[i];
      reinterpret_cast<uint4*>(a.v_cache + at)[i] = reinterpret_cast<const uint4*>(v_new)[i];
    }
  }
  trace_point(a.trace, 3);

  // 1. Scores of 16 positions per warp turn: two n8 tiles, DT k-steps.
  uint32_t qa[DT][4];
#pragma unroll
  for (int kt = 0; kt < DT; ++kt) ldmatrix4(qa[kt], sm.qs + (lane % 16) * ROW + 16 * kt + 8 * (lane / 16));
  float top_max = -INFINITY, bot_max = -INFINITY;  // rows g and g + 8
  for (int s = warp; s < steps; s += kWarps) {
    float c[2][4] = {};
#pragma unroll
    for (int kt = 0; kt < DT; ++kt) {
      uint32_t kb[4];  // (positions 0-7 | 8-15) x (dims 16kt.. | 16kt + 8..)
      ldmatrix4(kb, sm.ks + (16 * s + lane % 8 + 8 * (lane / 16)) * ROW + 16 * kt + 8 * ((lane / 8) % 2));
      mma(c[0], qa[kt][0], qa[kt][1], qa[kt][2], qa[kt][3], kb[0], kb[1]);
      mma(c[1], qa[kt][0], qa[kt][1], qa[kt][2], qa[kt][3], kb[2], kb[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // c[j]: rows g (0, 1) and g + 8 (2, 3), positions 2t, 2t + 1 of tile j
      const int p = 16 * s + 8 * j + 2 * t;
      const float2 top = make_float2(p < n ? c[j][0] * a.scale : -INFINITY, p + 1 < n ? c[j][1] * a.scale : -INFINITY);
      const float2 bot = make_float2(p < n ? c[j][2] * a.scale : -INFINITY, p + 1 < n ? c[j][3] * a.scale : -INFINITY);
      *reinterpret_cast<float2*>(sm.ss + g * SROW + p) = top;
      *reinterpret_cast<float2*>(sm.ss + (g + 8) * SROW + p) = bot;
      top_max = fmaxf(top_max, fmaxf(top.x, top.y));
      bot_max = fmaxf(bot_max, fmaxf(bot.x, bot.y));
    }
  }
  for (int o = 1; o < 4; o <<= 1) {  // the 4 lanes of a row
    top_max = fmaxf(top_max, __shfl_xor_sync(0xffffffffu, top_max, o));
    bot_max = fmaxf(bot_max, __shfl_xor_sync(0xffffffffu, bot_max, o));
  }
  if (t == 0) {
    sm.warp_max[warp * kRows + g] = top_max;
    sm.warp_max[warp * kRows + g + 8] = bot_max;
  }
  __syncthreads();

  // 2. O = P V, 8 output dims per warp turn (JT turns at most); P of rows g, g + 8 from the scores.
  float m_top = -INFINITY, m_bot = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    m_top = fmaxf(m_top, sm.warp_max[w * kRows + g]);
    m_bot = fmaxf(m_bot, sm.warp_max[w * kRows + g + 8]);
  }
  constexpr int JT = (2 * DT + kWarps - 1) / kWarps;
  float o[JT][4] = {};
  float l_top = 0.f, l_bot = 0.f;
  for (int s = 0; s < steps; ++s) {
    uint32_t pa[4];  // rows g, g + 8 x positions 2t, 2t + 1 and 2t + 8, 2t + 9 of the step
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int row = q % 2 ? g + 8 : g, p = 16 * s + 2 * t + (q / 2) * 8;
      const float2 v = *reinterpret_cast<const float2*>(sm.ss + row * SROW + p);
      const float m = q % 2 ? m_bot : m_top;
      const __half2 e = __floats2half2_rn(__expf(v.x - m), __expf(v.y - m));
      pa[q] = *reinterpret_cast<const uint32_t*>(&e);
      const float2 r = __half22float2(e);
      (q % 2 ? l_bot : l_top) += r.x + r.y;
    }
#pragma unroll
    for (int jj = 0; jj < JT; ++jj) {
      const int j = warp + jj * kWarps;
      if (j >= d / 8) break;
      uint32_t vb[2];  // positions 0-7 and 8-15 of dims 8j.., transposed: the B fragment
      ldmatrix2<true>(vb, sm.vs + (16 * s + lane % 16) * ROW + 8 * j);
      mma(o[jj], pa[0], pa[1], pa[2], pa[3], vb[0], vb[1]);
    }
  }
  for (int o = 1; o < 4; o <<= 1) {
    l_top += __shfl_xor_sync(0xffffffffu, l_top, o);
    l_bot += __shfl_xor_sync(0xffffffffu, l_bot, o);
  }
  trace_point(a.trace, 4);

  const bool alone = active == 1;
#pragma unroll
  for (int jj = 0; jj < JT; ++jj) {
    const int j = warp + jj * kWarps;
    if (j >= d / 8) break;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {  // o[jj][0, 1]: row g, dims 8j + 2t, +1; [2, 3]: row g + 8
      const int r = g + 8 * hh, dim = 8 * j + 2 * t;
      if (r >= rows) continue;
      if (alone) {
        const float inv = 1.f / (hh ? l_bot : l_top);
        *reinterpret_cast<__half2*>(a.out + (size_t)(h0 + r) * d + dim) =
            __floats2half2_rn(o[jj][2 * hh] * inv, o[jj][2 * hh + 1] * inv);
      } else {
        *reinterpret_cast<float2*>(a.scratch + ((size_t)(h0 + r) * a.splits + split) * partial_row(d) + dim) =
            make_float2(o[jj][2 * hh], o[jj][2 * hh + 1]);
      }
    }
  }
  if (alone) {
    trace_point(a.trace, 5);
    return;
  }
  if (warp == 0 && t == 0)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = g + 8 * hh;
      if (r >= rows) continue;
      float* part = a.scratch + ((size_t)(h0 + r) * a.splits + split) * partial_row(d);
      part[d] = hh ? m_bot : m_top;
      part[d + 1] = hh ? l_bot : l_top;
    }

  // The last split of this head group merges every split's partial result, in split order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counters + blockIdx.x, 1) == active - 1;
  __syncthreads();
  if (!last) {
    trace_point(a.trace, 5);
    return;
  }
  __threadfence();
  // Each row's overall max and sum (a warp per row, its lanes over the splits), then each thread
  // four dims of a row: the splits' weighted values in split order, loads of 8 splits in flight.
  const size_t stride = (size_t)a.splits * partial_row(d);
  for (int r = warp; r < rows; r += kWarps) {
    const float* part = a.scratch + (size_t)(h0 + r) * stride;
    float m = -INFINITY;
    for (int s = lane; s < active; s += 32) m = fmaxf(m, __ldcg(part + s * partial_row(d) + d));
    m = warp_max(m);
    float total = 0.f;
    for (int s = lane; s < active; s += 32) total += __expf(__ldcg(part + s * partial_row(d) + d) - m) * __ldcg(part + s * partial_row(d) + d + 1);
    total = warp_sum(total);
    if (lane == 0) {
      sm.row_max[r] = m;
      sm.row_sum[r] = total;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * (d / 4); i += kThreads) {
    const int r = i / (d / 4), dim = 4 * (i % (d / 4));
    const float* part = a.scratch + (size_t)(h0 + r) * stride;
    const float m = sm.row_max[r];
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < active; ++s) {
      const float w = __expf(__ldcg(part + s * partial_row(d) + d) - m);
      const float4 v = __ldcg(reinterpret_cast<const float4*>(part + s * partial_row(d) + dim));
      acc = make_float4(fmaf(w, v.x, acc.x), fmaf(w, v.y, acc.y), fmaf(w, v.z, acc.z), fmaf(w, v.w, acc.w));
    }
    const float inv = 1.f / sm.row_sum[r];
    __half2* o = reinterpret_cast<__half2*>(a.out + (size_t)(h0 + r) * d + dim);
    o[0] = __floats2half2_rn(acc.x * inv, acc.y * inv);
    o[1] = __floats2half2_rn(acc.z * inv, acc.w * inv);
  }
  if (threadIdx.x == 0) a.counters[blockIdx.x] = 0;
  trace_point(a.trace, 6);
  trace_point(a.trace, 5);
}

template <int DT>
void launch_attention(AttentionArgs a, dim3 grid, cudaStream_t stream) {
  const size_t smem = smem_bytes(16 * DT, a.chunk);
  static size_t allowed = 48 * 1024;
  if (smem > allowed) {
    cudaFuncSetAttribute(attention_kernel<DT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    allowed = smem;
  }
  launch(attention_kernel<DT>, grid, dim3(kThreads), smem, stream, a);
}

}  // namespace

// Positions a block can stage: up to kMaxChunk, as shared memory allows (a multiple of 16).
static int attention_chunk(int d) {
  static const int optin = [] {
    int dev = 0, bytes = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return bytes;
  }();
  const int budget = std::min(kSmemBudget, optin - 1024), dp = padded_dims(d);
  int chunk = kMaxChunk;
  while (chunk > 16 && smem_bytes(dp, chunk) + 1024 > (size_t)budget) chunk -= 16;
  return chunk;
}

// Positions per split once a context no longer fits one block: kSplitLen (KODKOD_ATTN_SPLIT: another,
// an experiment knob), at most what a block stages. Shorter splits: more blocks in parallel, more
// partial results to merge.
static int attention_split_len(int d) {
  static const int forced = [] { const char* e = std::getenv("KODKOD_ATTN_SPLIT"); return e ? std::atoi(e) / 16 * 16 : 0; }();
  return std::min(forced >= 16 ? forced : kSplitLen, attention_chunk(d));
}

int attention_splits(int max_len, int d) {
  const int per = attention_split_len(d);
  return std::max(1, (max_len + per - 1) / per);
}

void decode_attention(const AttentionArgs& a, cudaStream_t stream) {
  const int group = a.heads / a.kv_heads;
  const dim3 grid(a.kv_heads * ((group + kRows - 1) / kRows), a.splits);
  AttentionArgs args = a;
  args.chunk = attention_chunk(a.d);
  args.split_len = attention_split_len(a.d);
  args.trace = trace_region("attention", grid.x * grid.y);
  switch (padded_dims(a.d)) {
    case 64: launch_attention<4>(args, grid, stream); break;
    case 128: launch_attention<8>(args, grid, stream); break;
    default: launch_attention<16>(args, grid, stream); break;
  }
}

}  // namespace kodkod
