// Matrix-vector products for one token: EXL2-packed or dense fp16 weights.
//
// A block owns a tile of 32 output columns (128 for the head) and a range of the rows: all of
// them, or one of a few K splits whose partial sums the last split to finish adds in a fixed
// order (no atomics on the outputs: the same result every run). The EXL2 rows are cut into
// chunks that decode on their own (a chunk table per matrix).
// Before the kernel waits for its input (programmatic dependent launch, Hopper) it copies, with
// asynchronous copies that hold no registers, everything that does not depend on the previous
// kernel into shared memory: its chunk-table entries, its permutation rows, the norm's weights,
// and its weight rows (as many as the launcher's window holds; the rest are sent toward L2 and
// read from global memory). So the weights stream in while the previous kernel still runs, with
// every byte of the tile in flight at once. Then the input is gathered through the permutation,
// after an optional RMSNorm/LayerNorm of the fp32 residual stream (fused: no launch of its own),
// and the 256 threads (row slices x column lanes; a lane decodes 4 columns of a packed row, one
// 16-byte word group) compute from shared memory.
// Epilogues: store fp16, add into the fp32 residual, act(gate) * up, act(x), store fp32 (logits).
#include "kodkod.h"
#include "launch.cuh"
#include "trace.cuh"

#include <algorithm>
#include <cstdlib>

namespace kodkod {
namespace {

constexpr int kThreads = 256;
constexpr int kLaneCols = 4;   // columns per thread: one 16-byte load of packed words
constexpr int kMaxWords = 5;   // words per chunk, at most (5-bit)
constexpr int kStage = 1024;   // chunk-table entries a block stages in shared memory
constexpr int kDenseRows = 8;  // rows per dense chunk
constexpr int kMaxSplits = 64;

__host__ __device__ constexpr int chunk_words(int bits) { return bits == 3 || bits == 5 ? bits : (bits == 6 ? 3 : 1); }
__host__ __device__ constexpr int chunk_values(int bits) { return chunk_words(bits) * 32 / bits; }

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half(v)); }

__device__ __forceinline__ uint32_t lane_word(const uint4& w, int c) {
  return c == 0 ? w.x : c == 1 ? w.y : c == 2 ? w.z : w.w;
}

// Value i of column c of a B-bit chunk, minus the format's offset 2^(B-1), as an exact float
// (the magic-number conversion: no integer-to-float instruction).
template <int B>
__device__ __forceinline__ float chunk_value(const uint4* raw, int i, int c) {
  constexpr float kBias = 8388608.f + float(1 << (B - 1));
  const int bit = i * B, wi = bit / 32, sh = bit % 32;
  uint32_t q = lane_word(raw[wi], c) >> sh;
  if (sh + B > 32) q |= lane_word(raw[wi + 1], c) << (32 - sh);
  q &= (1u << B) - 1u;
  return __uint_as_float(0x4B000000u | q) - kBias;
}

// Sum over the block; `red` holds at least 32 floats. Safe to call back to back.
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < (int)blockDim.x / 32; ++i) t += red[i];
  return t;
}

__device__ float activate(float x, int act) {
  switch (act) {
    case kSilu: return x / (1.f + __expf(-x));
    case kGelu: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case kGeluTanh: return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default: return fmaxf(x, 0.f);
  }
}

// Scales of the 4 columns col0.. in group g: (code + 1)^2 * max / 256.
__device__ __forceinline__ void group_scales(uint32_t word, half max, int col0, float (&s)[kLaneCols]) {
  const uint32_t codes = word >> (4 * (col0 % 8));
  const float smax = __half2float(max) * (1.f / 256.f);
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
    const float q = float(((codes >> (4 * c)) & 15u) + 1u);
    s[c] = q * q * smax;
  }
}

// Value rows a chunk covers.
__device__ __forceinline__ int chunk_rows(int4 meta) {
  return meta.w == kDenseBits ? meta.z : chunk_words(meta.w) * 32 / meta.w;
}

// Asynchronous copies to shared memory (sm_80+: cp.async, no registers held until the wait);
// older GPUs copy through registers.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src));
#else
  *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
#endif
}

__device__ __forceinline__ void copy8(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src));
#else
  *reinterpret_cast<uint2*>(dst) = __ldg(reinterpret_cast<const uint2*>(src));
#endif
}

__device__ __forceinline__ void copies_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

__device__ __forceinline__ void copies_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Packed rows a chunk covers.
__device__ __forceinline__ int chunk_packed_rows(int4 meta) { return meta.w == kDenseBits ? meta.z : chunk_words(meta.w); }

// One matrix of a block: its chunk range, and its packed rows [r_lo, r_hi) staged in shared
// memory at w (rows from r_hi on are read from global memory).
struct Part {
  int c_lo = 0, c_hi = 0, k_lo = 0, k_hi = 0, r_lo = 0, r_hi = 0, r_end = 0;
  int row_bytes = 0;  // one staged packed row of the tile
  char* w = nullptr;
  int g_lo = 0, g_n = 0;  // scale groups [g_lo, g_lo + g_n) staged (g_n 0: read from global memory)
  uint32_t* codes = nullptr;  // [g_n, words per tile row of scale codes]
  half* smax = nullptr;       // [g_n]
};

// Packed row r of this thread's 4 columns: 16 bytes of words (EXL2) or 8 bytes of halfs (dense).
__device__ __forceinline__ uint4 row16(const Matrix& m, const Part& p, int r, int col0, int lane) {
  if (r < p.r_hi) return *reinterpret_cast<const uint4*>(p.w + (size_t)(r - p.r_lo) * p.row_bytes + lane * 16);
  return __ldg(reinterpret_cast<const uint4*>(m.q_weight + (size_t)r * m.n + col0));
}

__device__ __forceinline__ uint2 row8(const Matrix& m, const Part& p, int r, int col0, int lane) {
  if (r < p.r_hi) return *reinterpret_cast<const uint2*>(p.w + (size_t)(r - p.r_lo) * p.row_bytes + lane * 8);
  return __ldg(reinterpret_cast<const uint2*>(reinterpret_cast<const half*>(m.q_weight) + (size_t)r * m.n + col0));
}

template <int B>
__device__ __forceinline__ void exl2_chunk(int4 meta, const float (&scale)[kLaneCols], const uint4 (&raw)[kMaxWords],
                                           const half* xs, float (&acc)[kLaneCols]) {
  constexpr int V = chunk_values(B);
  constexpr int H = V > 16 ? 16 : V;  // values per pass: bounds the x registers for 32-value chunks
  float sum[kLaneCols] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int h = 0; h < V; h += H) {
    float x[H];
    const half2* xs2 = reinterpret_cast<const half2*>(xs + meta.y + h);
#pragma unroll
    for (int i = 0; i < H / 2; ++i) {
      const float2 f = __half22float2(xs2[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) {
#pragma unroll
      for (int i = 0; i < H; ++i) sum[c] = fmaf(chunk_value<B>(raw, h + i, c), x[i], sum[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) acc[c] = fmaf(sum[c], scale[c], acc[c]);
}

__device__ __forceinline__ void dense_chunk(int4 meta, const uint2 (&r2)[kDenseRows], const half* xs,
                                            float (&acc)[kLaneCols]) {
#pragma unroll
  for (int i = 0; i < kDenseRows; ++i) {
    if (i >= meta.z) break;
    const float x = __half2float(xs[meta.y + i]);
    const float2 a = __half22float2(*reinterpret_cast<const half2*>(&r2[i].x));
    const float2 b = __half22float2(*reinterpret_cast<const half2*>(&r2[i].y));
    acc[0] = fmaf(a.x, x, acc[0]);
    acc[1] = fmaf(a.y, x, acc[1]);
    acc[2] = fmaf(b.x, x, acc[2]);
    acc[3] = fmaf(b.y, x, acc[3]);
  }
}

__device__ __forceinline__ void compute_chunk(const Matrix& m, const Part& p, int4 meta, int col0, int lane,
                                              const half* xs, float (&acc)[kLaneCols]) {
  if (meta.w == kDenseBits) {
    uint2 r2[kDenseRows];
#pragma unroll
    for (int i = 0; i < kDenseRows; ++i) r2[i] = i < meta.z ? row8(m, p, meta.x + i, col0, lane) : make_uint2(0, 0);
    dense_chunk(meta, r2, xs, acc);
    return;
  }
  uint4 raw[kMaxWords];
  const int words = chunk_words(meta.w);
#pragma unroll
  for (int j = 0; j < kMaxWords; ++j)
    if (j < words) raw[j] = row16(m, p, meta.x + j, col0, lane);
  float scale[kLaneCols];
  const int g = meta.z - p.g_lo;
  if (g >= 0 && g < p.g_n)
    group_scales(p.codes[g * (p.row_bytes / 32) + lane / 2], p.smax[g], col0, scale);
  else
    group_scales(__ldg(m.q_scale + (size_t)meta.z * (m.n / 8) + col0 / 8), m.q_scale_max[meta.z], col0, scale);
  switch (meta.w) {
    case 2: exl2_chunk<2>(meta, scale, raw, xs, acc); break;
    case 3: exl2_chunk<3>(meta, scale, raw, xs, acc); break;
    case 4: exl2_chunk<4>(meta, scale, raw, xs, acc); break;
    case 5: exl2_chunk<5>(meta, scale, raw, xs, acc); break;
    case 6: exl2_chunk<6>(meta, scale, raw, xs, acc); break;
    default: exl2_chunk<8>(meta, scale, raw, xs, acc); break;
  }
}

// Chunk-table entries of this block's range: staged in shared memory when they fit, else read
// from global memory.
struct Chunks {
  const int4* staged;  // entry i of the range at staged[i - lo], or nullptr
  const int4* global;
  int lo;
  __device__ __forceinline__ int4 operator[](int i) const { return staged ? staged[i - lo] : __ldg(global + i); }
};

// Sum the slices of each column; thread t < TILE gets column t of the tile. Slices that share a
// warp are added with shuffles first, so each output thread adds one value per warp.
template <int LANES>
__device__ float reduce_slices(float (&acc)[kLaneCols], float* red) {
  constexpr int TILE = LANES * kLaneCols, WARPS = kThreads / 32;
  const int lane = threadIdx.x % LANES, warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
#pragma unroll
    for (int o = LANES; o < 32; o <<= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], o);
  }
  if (threadIdx.x % 32 < LANES)
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) red[warp * (TILE + 1) + lane * kLaneCols + c] = acc[c];
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x < TILE)
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += red[w * (TILE + 1) + threadIdx.x];
  __syncthreads();
  return s;
}

// Shared memory of a block (dynamic part), in this order: the gathered input of each part
// (fp16), each part's permutation rows (uint16, staged before the input is ready), and for the
// norm modes the fp32 residual stream and the norm's weight and bias (fp16, staged early too).
struct Smem {
  half* xs;
  uint16_t* perm;
  float* h;
  half* norm_w;
  half* norm_b;
  uint32_t* codes;  // per part a.scale_groups rows of tile_cols / 8 scale-code words
  half* smax;       // per part a.scale_groups group maxima
  char* w;          // the weight window: a.window bytes, split evenly between the parts
};

__host__ __device__ inline int part_stride(const GemvArgs& a) {
  int s = 0;
  for (int i = 0; i < (a.out_mode == kOutGated ? 1 : a.n_mats); ++i) s = max(s, (a.mat[i].x_len + 7) / 8 * 8);
  return s;
}

__host__ __device__ inline size_t smem_bytes(const GemvArgs& a, int tile_cols, Smem* layout = nullptr,
                                             char* base = nullptr) {
  const int parts = a.out_mode == kOutGated ? 2 : 1, stride = part_stride(a);
  const int k_pad = a.in_mode == kInHalf ? 0 : (a.k_in + 7) / 8 * 8;
  const size_t xs = 0, perm = xs + sizeof(half) * parts * stride, h = perm + sizeof(uint16_t) * parts * stride,
               nw = h + sizeof(float) * k_pad, nb = nw + sizeof(half) * k_pad,
               codes = (nb + (a.in_mode == kInLayerNorm ? sizeof(half) * k_pad : 0) + 15) / 16 * 16,
               smax = codes + sizeof(uint32_t) * parts * a.scale_groups * (tile_cols / 8),
               w = (smax + sizeof(half) * parts * a.scale_groups + 15) / 16 * 16;
  if (layout)
    *layout = Smem{reinterpret_cast<half*>(base + xs), reinterpret_cast<uint16_t*>(base + perm),
                   reinterpret_cast<float*>(base + h), reinterpret_cast<half*>(base + nw),
                   reinterpret_cast<half*>(base + nb), reinterpret_cast<uint32_t*>(base + codes),
                   reinterpret_cast<half*>(base + smax), base + w};
  return w + a.window;
}

// Input rows [k_lo, k_hi) of one part into xs, through the staged permutation: fp16 input from
// global memory, or the normalized residual stream from shared memory.
__device__ void gather_input(const GemvArgs& a, const Smem& sm, int j, bool permuted, int k_lo, int k_hi, int stride,
                             float mean, float rstd) {
  half* xs = sm.xs + j * stride;
  const uint16_t* perm = sm.perm + j * stride;
  for (int k = k_lo + threadIdx.x; k < k_hi; k += blockDim.x) {
    float v = 0.f;
    if (k < a.k_in) {
      const int src = permuted ? perm[k] : k;
      if (a.in_mode == kInHalf)
        v = __half2float(static_cast<const half*>(a.x)[src]);
      else if (a.in_mode == kInRmsNorm)
        v = round_half(sm.h[src] * rstd) * __half2float(sm.norm_w[src]);
      else
        v = (sm.h[src] - mean) * rstd * __half2float(sm.norm_w[src]) + __half2float(sm.norm_b[src]);
    }
    xs[k] = __float2half(v);
  }
}

__host__ __device__ int tiles(const Matrix& m, int tile_cols) { return (m.n_out + tile_cols - 1) / tile_cols; }

// Chunk range [lo, hi) of split ks out of nks.
__device__ __forceinline__ int2 split_range(const Matrix& m, int ks, int nks) {
  return make_int2((int)((long long)m.n_chunks * ks / nks), (int)((long long)m.n_chunks * (ks + 1) / nks));
}

template <int LANES, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) gemv_kernel(const GemvArgs a) {
  constexpr int TILE = LANES * kLaneCols, SLICES = kThreads / LANES;
  extern __shared__ __align__(16) char smem[];
  __shared__ float red[(kThreads / 32) * (TILE + 1)];
  __shared__ float stats[32];
  __shared__ bool last;

  const bool gated = a.out_mode == kOutGated;
  const int parts = gated ? 2 : 1;
  int tile = blockIdx.x, mi = 0;
  if (!gated)
    while (mi + 1 < a.n_mats && tile >= tiles(a.mat[mi], TILE)) tile -= tiles(a.mat[mi++], TILE);
  const int ks = blockIdx.y, nks = gridDim.y;
  const int lane = threadIdx.x % LANES, slice = threadIdx.x / LANES;
  const int col0 = tile * TILE + lane * kLaneCols;
  trace_point(a.trace, 0);
  Smem sm;
  smem_bytes(a, TILE, &sm, smem);
  const int stride = part_stride(a);

  // This block's rows of each part: from the first and last chunk of its range.
  Part p[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    const Matrix& m = a.mat[mi + j];
    const int2 range = split_range(m, ks, nks);
    p[j].c_lo = range.x;
    p[j].c_hi = range.y;
    if (range.x < range.y) {
      const int4 lo = __ldg(m.chunks + range.x), hi = __ldg(m.chunks + range.y - 1);
      p[j].k_lo = lo.y;
      p[j].k_hi = hi.y + chunk_rows(hi);
      p[j].r_lo = lo.x;
      p[j].r_end = hi.x + chunk_packed_rows(hi);
      if (m.q_scale && hi.z - lo.z < a.scale_groups) {
        p[j].g_lo = lo.z;
        p[j].g_n = hi.z - lo.z + 1;
      }
    }
    p[j].codes = sm.codes + j * a.scale_groups * (TILE / 8);
    p[j].smax = sm.smax + j * a.scale_groups;
    p[j].row_bytes = TILE * (m.q_scale ? 4 : 2);
    p[j].w = sm.w + j * (a.window / parts);
    p[j].r_hi = min(p[j].r_end, p[j].r_lo + (a.window / parts) / p[j].row_bytes);
  }

  // Everything that does not depend on the previous kernel, copied into shared memory now (so it
  // may overlap that kernel): chunk-table entries, permutation rows, the norm's weights, weight rows.
  __shared__ int4 staged[kStage];
  Chunks chunks[2];
  const bool stage = p[0].c_hi - p[0].c_lo + (parts > 1 ? p[1].c_hi - p[1].c_lo : 0) <= kStage;
  int offset = 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    const Matrix& m = a.mat[mi + j];
    chunks[j] = Chunks{stage ? staged + offset : nullptr, m.chunks, p[j].c_lo};
    if (stage)
      for (int i = threadIdx.x; i < p[j].c_hi - p[j].c_lo; i += blockDim.x)
        copy16(staged + offset + i, m.chunks + p[j].c_lo + i);
    offset += p[j].c_hi - p[j].c_lo;
    if (m.perm16)  // 4 rows per copy; chunk boundaries are multiples of 4 rows, the table is padded to 8
      for (int k = p[j].k_lo + 4 * (int)threadIdx.x; k < min(p[j].k_hi, m.k); k += 4 * blockDim.x)
        copy8(sm.perm + j * stride + k, m.perm16 + k);
    const int pieces = p[j].row_bytes / 16, elem = m.q_scale ? 4 : 2;
    const char* src = reinterpret_cast<const char*>(m.q_weight) + (size_t)tile * TILE * elem;
    for (int i = threadIdx.x; i < (p[j].r_hi - p[j].r_lo) * pieces; i += blockDim.x) {
      const int r = i / pieces, c = i % pieces;
      if (tile * TILE + c * 16 / elem < m.n)
        copy16(p[j].w + r * p[j].row_bytes + c * 16, src + ((size_t)(p[j].r_lo + r) * m.n) * elem + c * 16);
    }
    for (int i = threadIdx.x; i < p[j].g_n * (TILE / 32); i += blockDim.x) {  // 16 bytes of codes per 32 columns
      const int g = i / (TILE / 32), c = i % (TILE / 32);
      if (tile * TILE + c * 32 < m.n)
        copy16(p[j].codes + g * (TILE / 8) + c * 4,
               m.q_scale + (size_t)(p[j].g_lo + g) * (m.n / 8) + tile * (TILE / 8) + c * 4);
    }
    for (int i = threadIdx.x; i < p[j].g_n; i += blockDim.x) p[j].smax[i] = m.q_scale_max[p[j].g_lo + i];
    for (int r = p[j].r_hi + slice; r < p[j].r_end; r += SLICES)  // beyond the window: toward L2
      prefetch_l2(reinterpret_cast<const char*>(m.q_weight) + ((size_t)r * m.n + col0) * elem);
  }
  if (a.in_mode != kInHalf) {
    for (int i = 4 * threadIdx.x; i < a.k_in; i += 4 * blockDim.x) {
      if (i + 4 <= a.k_in && a.k_in % 4 == 0) {
        copy8(sm.norm_w + i, a.norm_w + i);
        if (a.in_mode == kInLayerNorm) copy8(sm.norm_b + i, a.norm_b + i);
      } else {
        for (int e = i; e < min(i + 4, a.k_in); ++e) {
          sm.norm_w[e] = a.norm_w[e];
          if (a.in_mode == kInLayerNorm) sm.norm_b[e] = a.norm_b[e];
        }
      }
    }
  }
  copies_commit();
  trace_point(a.trace, 1);
  pdl_wait();  // from here on the input (written by the previous kernel) is complete
  pdl_trigger();
  trace_point(a.trace, 2);

  // The residual stream is read once, into shared memory; the norm's sums come from the same pass
  // (LayerNorm: its mean first, then the squares from shared memory). block_sum's barriers publish sm.h.
  float mean = 0.f, rstd = 1.f;
  if (a.in_mode != kInHalf) {
    const float* h = static_cast<const float*>(a.x);
    float s = 0.f;
    for (int i = threadIdx.x; i < a.k_in; i += blockDim.x) {
      const float v = __ldcg(h + i);
      sm.h[i] = v;
      s += a.in_mode == kInLayerNorm ? v : v * v;
    }
    if (a.in_mode == kInLayerNorm) {
      mean = block_sum(s, stats) / a.k_in;
      s = 0.f;
      for (int i = threadIdx.x; i < a.k_in; i += blockDim.x) {
        const float d = sm.h[i] - mean;
        s += d * d;
      }
    }
    rstd = rsqrtf(block_sum(s, stats) / a.k_in + a.eps);
  }
  copies_wait();
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    if (p[j].c_lo >= p[j].c_hi) continue;
    gather_input(a, sm, j, a.mat[mi + j].perm16 != nullptr, p[j].k_lo, p[j].k_hi, stride, mean, rstd);
  }
  __syncthreads();
  trace_point(a.trace, 3);

  float y[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    const Matrix& m = a.mat[mi + j];
    const half* xs = sm.xs + j * stride;
    float acc[kLaneCols] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
    for (int i = p[j].c_lo + slice; i < p[j].c_hi; i += SLICES)
      compute_chunk(m, p[j], chunks[j][i], col0, lane, xs, acc);
    y[j] = reduce_slices<LANES>(acc, red);
  }
  trace_point(a.trace, 4);

  if (nks > 1) {  // the last split of this tile adds every split's partial sums, in order
    float* part = a.partials + (size_t)blockIdx.x * nks * TILE * parts;
    if (threadIdx.x < TILE) {
      part[ks * parts * TILE + threadIdx.x] = y[0];
      if (gated) part[(ks * parts + 1) * TILE + threadIdx.x] = y[1];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(a.counters + blockIdx.x, 1) == nks - 1;
    __syncthreads();
    if (!last) {
      trace_point(a.trace, 5);
      return;
    }
    __threadfence();
    if (threadIdx.x < TILE) {
      y[0] = y[1] = 0.f;
#pragma unroll 8
      for (int k = 0; k < nks; ++k) {
        y[0] += __ldcg(part + k * parts * TILE + threadIdx.x);
        if (gated) y[1] += __ldcg(part + (k * parts + 1) * TILE + threadIdx.x);
      }
    }
    if (threadIdx.x == 0) a.counters[blockIdx.x] = 0;
    trace_point(a.trace, 6);  // the merge's end (last split only)
  }
  trace_point(a.trace, 5);

  if (threadIdx.x >= TILE) return;
  const Matrix& m = a.mat[mi];
  const int col = tile * TILE + threadIdx.x;
  if (col >= m.n_out) return;
  const float b0 = m.bias ? __half2float(m.bias[col]) : 0.f;
  switch (a.out_mode) {
    case kOutHalf: static_cast<half*>(a.out[mi])[col] = __float2half(y[0] + b0); break;
    case kOutFloat: static_cast<float*>(a.out[mi])[col] = y[0] + b0; break;
    case kOutResidual: static_cast<float*>(a.out[mi])[col] += y[0] + b0; break;
    case kOutAct: static_cast<half*>(a.out[mi])[col] = __float2half(activate(round_half(y[0] + b0), a.act)); break;
    case kOutGated: {
      const float b1 = a.mat[1].bias ? __half2float(a.mat[1].bias[col]) : 0.f;
      const float g = round_half(activate(round_half(y[0] + b0), a.act));
      static_cast<half*>(a.out[0])[col] = __float2half(g * round_half(y[1] + b1));
      break;
    }
  }
}

template <int B>
__device__ void dequant_chunk(const Matrix& m, int4 meta, int col0, half* out) {
  constexpr int W = chunk_words(B), V = chunk_values(B);
  uint4 raw[W];
  const uint32_t* base = m.q_weight + (size_t)meta.x * m.n + col0;
#pragma unroll
  for (int j = 0; j < W; ++j) raw[j] = __ldg(reinterpret_cast<const uint4*>(base + (size_t)j * m.n));
  float scale[kLaneCols];
  group_scales(m.q_scale[(size_t)meta.z * (m.n / 8) + col0 / 8], m.q_scale_max[meta.z], col0, scale);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int row = meta.y + i;
    if (row >= m.k) break;
    half vals[kLaneCols];
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) vals[c] = __float2half(chunk_value<B>(raw, i, c) * scale[c]);
    *reinterpret_cast<uint2*>(out + (size_t)m.perm[row] * m.n + col0) = *reinterpret_cast<const uint2*>(vals);
  }
}

__global__ void dequant_kernel(const Matrix m, half* out) {
  const int col0 = (blockIdx.x * blockDim.x + threadIdx.x) * kLaneCols;
  if (col0 >= m.n) return;
  const int4 meta = m.chunks[blockIdx.y];
  switch (meta.w) {
    case 2: dequant_chunk<2>(m, meta, col0, out); break;
    case 3: dequant_chunk<3>(m, meta, col0, out); break;
    case 4: dequant_chunk<4>(m, meta, col0, out); break;
    case 5: dequant_chunk<5>(m, meta, col0, out); break;
    case 6: dequant_chunk<6>(m, meta, col0, out); break;
    case 8: dequant_chunk<8>(m, meta, col0, out); break;
    default: break;
  }
}


// ---- A few tokens at once (up to kMaxTokens): speculative verification and short prefills. ----
// The same tiles, chunks and decode as one token, but every decoded weight multiplies the inputs
// of all T tokens, so the weights are read once for all of them. The inputs come permuted and
// zero-padded from gather_tokens_kernel (x_perm [tokens, x_stride] in global memory: it is small
// and L1/L2-resident, and T rows of a long K would not fit shared memory); no fused prologue,
// epilogue or split: fp16 in, fp16 (+ bias) out.
__global__ void gather_tokens_kernel(const half* x, int tokens, int k_in, const int* perm, int x_len, int stride,
                                     half* xp) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (k >= stride || t >= tokens) return;
  xp[(size_t)t * stride + k] = k < x_len && k < k_in ? x[(size_t)t * k_in + (perm ? perm[k] : k)] : __float2half(0.f);
}

template <int T>
__device__ __forceinline__ void fma_tokens(const float (&w)[kLaneCols], const half* xp, int stride, int row,
                                           int tokens, float (&acc)[T][kLaneCols]) {
#pragma unroll
  for (int t = 0; t < T; ++t) {
    if (t >= tokens) break;
    const float x = __half2float(__ldg(xp + (size_t)t * stride + row));
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) acc[t][c] = fmaf(w[c], x, acc[t][c]);
  }
}

template <int B, int T>
__device__ __forceinline__ void exl2_chunk_tokens(int4 meta, const float (&scale)[kLaneCols],
                                                  const uint4 (&raw)[kMaxWords], const half* xp, int stride,
                                                  int tokens, float (&acc)[T][kLaneCols]) {
  constexpr int V = chunk_values(B);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    float w[kLaneCols];
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) w[c] = chunk_value<B>(raw, i, c) * scale[c];
    fma_tokens<T>(w, xp, stride, meta.y + i, tokens, acc);
  }
}

template <int T>
__global__ void __launch_bounds__(kThreads) gemv_tokens_kernel(const Matrix m, const half* xp, int stride, int tokens,
                                                              half* out) {
  constexpr int LANES = 8, TILE = LANES * kLaneCols, SLICES = kThreads / LANES;
  __shared__ float red[(kThreads / 32) * (TILE + 1)];
  const int tile = blockIdx.x, lane = threadIdx.x % LANES, slice = threadIdx.x / LANES;
  const int col0 = tile * TILE + lane * kLaneCols;
  float acc[T][kLaneCols];
#pragma unroll
  for (int t = 0; t < T; ++t)
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) acc[t][c] = 0.f;
  if (col0 < m.n) {
    for (int i = slice; i < m.n_chunks; i += SLICES) {
      const int4 meta = __ldg(m.chunks + i);
      if (meta.w == kDenseBits) {
        const half* base = reinterpret_cast<const half*>(m.q_weight) + (size_t)meta.x * m.n + col0;
        for (int r = 0; r < meta.z; ++r) {
          const uint2 raw = __ldg(reinterpret_cast<const uint2*>(base + (size_t)r * m.n));
          const float2 a = __half22float2(*reinterpret_cast<const half2*>(&raw.x));
          const float2 b = __half22float2(*reinterpret_cast<const half2*>(&raw.y));
          const float w[kLaneCols] = {a.x, a.y, b.x, b.y};
          fma_tokens<T>(w, xp, stride, meta.y + r, tokens, acc);
        }
        continue;
      }
      uint4 raw[kMaxWords];
      const int words = chunk_words(meta.w);
#pragma unroll
      for (int j = 0; j < kMaxWords; ++j)
        if (j < words) raw[j] = __ldg(reinterpret_cast<const uint4*>(m.q_weight + (size_t)(meta.x + j) * m.n + col0));
      float scale[kLaneCols];
      group_scales(__ldg(m.q_scale + (size_t)meta.z * (m.n / 8) + col0 / 8), m.q_scale_max[meta.z], col0, scale);
      switch (meta.w) {
        case 2: exl2_chunk_tokens<2, T>(meta, scale, raw, xp, stride, tokens, acc); break;
        case 3: exl2_chunk_tokens<3, T>(meta, scale, raw, xp, stride, tokens, acc); break;
        case 4: exl2_chunk_tokens<4, T>(meta, scale, raw, xp, stride, tokens, acc); break;
        case 5: exl2_chunk_tokens<5, T>(meta, scale, raw, xp, stride, tokens, acc); break;
        case 6: exl2_chunk_tokens<6, T>(meta, scale, raw, xp, stride, tokens, acc); break;
        default: exl2_chunk_tokens<8, T>(meta, scale, raw, xp, stride, tokens, acc); break;
      }
    }
  }
  const int col = tile * TILE + threadIdx.x;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    if (t >= tokens) break;  // uniform across the block: every thread leaves together
    const float y = reduce_slices<LANES>(acc[t], red);
    if (threadIdx.x < TILE && col < m.n_out)
      out[(size_t)t * m.n_out + col] = __float2half(y + (m.bias ? __half2float(m.bias[col]) : 0.f));
  }
}

}  // namespace

int sm_count() {
  static int count = 0;
  if (!count) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
  }
  return count;
}

// Shared memory a block of this build may use beyond its static arrays, for MIN_BLOCKS blocks per SM.
template <int LANES, int MIN_BLOCKS>
int dynamic_smem_budget() {
  static int budget = -1;
  if (budget < 0) {
    int dev = 0, per_sm = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    cudaFuncAttributes attr{};
    cudaFuncGetAttributes(&attr, gemv_kernel<LANES, MIN_BLOCKS>);
    budget = std::max(0, per_sm / MIN_BLOCKS - 1024 - (int)attr.sharedSizeBytes) / 16 * 16;  // 1 KB: reserved per block
    if (budget > 48 * 1024)
      cudaFuncSetAttribute(gemv_kernel<LANES, MIN_BLOCKS>, cudaFuncAttributeMaxDynamicSharedMemorySize, budget);
    else
      budget = 48 * 1024 - (int)attr.sharedSizeBytes;
  }
  return budget;
}

template <int LANES, int MIN_BLOCKS>
void launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  constexpr int TILE = LANES * kLaneCols;
  const bool gated = a.out_mode == kOutGated;
  const int parts = gated ? 2 : 1;
  int blocks = 0, min_chunks = 1 << 30;
  for (int i = 0; i < a.n_mats; ++i) {
    if (!gated || i == 0) blocks += tiles(a.mat[i], TILE);
    min_chunks = std::min(min_chunks, a.mat[i].n_chunks);
  }
  GemvArgs args = a;
  args.window = 0;
  args.scale_groups = 0;
  // Staged bytes per block for `splits` splits: each part's share of its packed rows (a margin for
  // chunk boundaries and uneven bit widths), the same window for every part.
  auto window = [&](int splits) {
    int w = 0;
    for (int i = 0; i < (gated ? 2 : a.n_mats); ++i) {
      const int row_bytes = TILE * (a.mat[i].q_scale ? 4 : 2);
      w = std::max(w, ((a.mat[i].rows * 5 / 4 + splits - 1) / splits + 8) * row_bytes);
    }
    return w * parts;
  };
  // Split K while the grid fits in one wave of resident blocks and each split keeps enough chunks.
  // The window holds a block's weight rows where shared memory allows; rows beyond it are read
  // from global memory (after an L2 prefetch).
  const int resident = MIN_BLOCKS * sm_count();
  int splits = 1;
  if (a.partials && a.counters && blocks <= a.counters_size) {
    static const int min_per_split = [] {  // KODKOD_GEMV_SPLIT_CHUNKS: an experiment knob
      const char* e = std::getenv("KODKOD_GEMV_SPLIT_CHUNKS");
      return e && std::atoi(e) > 0 ? std::atoi(e) : 32;
    }();
    const int most = std::max(1, std::min(kMaxSplits, min_chunks / 4));
    splits = std::max(1, std::min({resident / blocks, min_chunks / min_per_split, most}));
    while (splits > 1 && (long long)blocks * splits * TILE * parts > a.partials_size) --splits;
  }
  for (int i = 0; i < (gated ? 2 : a.n_mats); ++i)  // scale groups per split, with a margin for uneven splits
    args.scale_groups = std::max(args.scale_groups, (a.mat[i].groups * 5 / 4 + splits - 1) / splits + 2);
  const int room = std::max(0, dynamic_smem_budget<LANES, MIN_BLOCKS>() - (int)smem_bytes(args, TILE));
  args.window = std::min(window(splits), room) / (16 * parts) * (16 * parts);
  args.trace = trace_region(gated ? "gate_up" : a.n_mats == 3 ? "qkv" : a.out_mode == kOutFloat ? "head" : "gemv",
                            blocks * splits);
  launch(gemv_kernel<LANES, MIN_BLOCKS>, dim3(blocks, splits), dim3(kThreads), smem_bytes(args, TILE), stream, args);
}

void gemv(const GemvArgs& a, cudaStream_t stream) {
  // Wide tiles (128 columns) for very wide outputs (the head): fewer blocks repeat the prologue.
  const bool wide = a.out_mode != kOutGated && a.n_mats == 1 && a.mat[0].n_out >= 32 * 1024;
  // Two builds: registers for 2 resident blocks per SM (no spills: better where the grid is small and
  // latency rules) and for 3 (80 registers: better where many blocks stream weights; measured on an
  // H100, docs/performance.md). KODKOD_GEMV_BLOCKS=2 or 3 forces one.
  static const int forced = [] { const char* e = std::getenv("KODKOD_GEMV_BLOCKS"); return e ? std::atoi(e) : 0; }();
  int tiles_total = 0;
  for (int i = 0; i < (a.out_mode == kOutGated ? 1 : a.n_mats); ++i) tiles_total += tiles(a.mat[i], 32);
  const bool three = forced ? forced == 3 : tiles_total > 2 * sm_count();
  if (wide)
    three ? launch_gemv<32, 3>(a, stream) : launch_gemv<32, 2>(a, stream);
  else
    three ? launch_gemv<8, 3>(a, stream) : launch_gemv<8, 2>(a, stream);
}

template <int T>
void launch_gemv_tokens(const Matrix& m, const half* xp, int stride, int tokens, half* out, cudaStream_t stream) {
  gemv_tokens_kernel<T><<<(m.n_out + 31) / 32, kThreads, 0, stream>>>(m, xp, stride, tokens, out);
}

void gemv_tokens(const Matrix& m, const half* x, int tokens, int k_in, half* out, half* scratch,
                 cudaStream_t stream) {
  const int stride = (m.x_len + 7) / 8 * 8;
  gather_tokens_kernel<<<dim3((stride + 255) / 256, tokens), 256, 0, stream>>>(x, tokens, k_in, m.perm, m.x_len,
                                                                              stride, scratch);
  if (tokens <= 2)
    launch_gemv_tokens<2>(m, scratch, stride, tokens, out, stream);
  else if (tokens <= 4)
    launch_gemv_tokens<4>(m, scratch, stride, tokens, out, stream);
  else if (tokens <= 8)
    launch_gemv_tokens<8>(m, scratch, stride, tokens, out, stream);
  else
    launch_gemv_tokens<16>(m, scratch, stride, tokens, out, stream);
}

void dequant(const Matrix& m, half* out, cudaStream_t stream) {
  const int threads = 128;
  const dim3 grid((m.n / kLaneCols + threads - 1) / threads, m.n_chunks);
  dequant_kernel<<<grid, threads, 0, stream>>>(m, out);
}

}  // namespace kodkod
