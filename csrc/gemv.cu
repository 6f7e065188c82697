// Matrix-vector products for one token: EXL2-packed or dense fp16 weights.
//
// A block owns a tile of 32 output columns (128 for the head) and a range of the rows: all of
// them, or one of a few K splits whose partial sums the last split to finish adds in a fixed
// order (no atomics on the outputs: the same result every run). Its 256 threads are row slices
// x column lanes; a lane reads 4 columns of a packed row with one 16-byte load and decodes them
// in registers. The EXL2 rows are cut into chunks that decode on their own (a chunk table per
// matrix, staged in shared memory per block); each thread keeps two chunks in flight.
// Before the kernel waits for its input (programmatic dependent launch, Hopper) it stages the
// chunk table, sends its weights toward L2 and loads its first chunks; then the input is
// gathered through the matrix's row permutation into shared memory, after an optional
// RMSNorm/LayerNorm of the fp32 residual stream (fused here: no launch of its own).
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
constexpr int kBufWords = 3;   // words held ahead per chunk; a 5-bit chunk loads its last two when computed
constexpr int kStage = 1024;   // chunk-table entries a block stages in shared memory
constexpr int kDenseRows = 8;  // rows per dense chunk
constexpr int kMaxSplits = 64;

__host__ __device__ constexpr int chunk_words(int bits) { return bits == 3 || bits == 5 ? bits : (bits == 6 ? 3 : 1); }
__host__ __device__ constexpr int chunk_values(int bits) { return chunk_words(bits) * 32 / bits; }

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half(v)); }

__device__ __forceinline__ uint32_t lane_word(const uint4& w, int c) {
  return c == 0 ? w.x : c == 1 ? w.y : c == 2 ? w.z : w.w;
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
__device__ __forceinline__ void group_scales(const Matrix& m, int g, int col0, float (&s)[kLaneCols]) {
  const uint32_t codes = m.q_scale[(size_t)g * (m.n / 8) + col0 / 8] >> (4 * (col0 % 8));
  const float smax = __half2float(m.q_scale_max[g]) * (1.f / 256.f);
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

// The weights of one chunk for this thread's 4 columns, issued early so the loads are in flight
// while the block does other work (dense chunks: 8 rows of 8 bytes, packed into the same registers).
__device__ __forceinline__ void load_chunk(const Matrix& m, int4 meta, int col0, uint4 (&raw)[kBufWords]) {
  if (meta.w == kDenseBits) {  // 8 rows of 4 halfs: the first 6 rows here, the last 2 when computed
    const half* base = reinterpret_cast<const half*>(m.q_weight) + (size_t)meta.x * m.n + col0;
    uint2* r2 = reinterpret_cast<uint2*>(raw);
#pragma unroll
    for (int i = 0; i < 2 * kBufWords; ++i)
      r2[i] = i < meta.z ? __ldg(reinterpret_cast<const uint2*>(base + (size_t)i * m.n)) : make_uint2(0, 0);
    return;
  }
  const uint32_t* base = m.q_weight + (size_t)meta.x * m.n + col0;
  const int words = chunk_words(meta.w);
#pragma unroll
  for (int j = 0; j < kBufWords; ++j)
    if (j < words) raw[j] = __ldg(reinterpret_cast<const uint4*>(base + (size_t)j * m.n));
}

// The chunk's words: those held ahead, and for a 5-bit chunk the last two, loaded now.
__device__ __forceinline__ void chunk_words_of(const Matrix& m, int4 meta, int col0, const uint4 (&buf)[kBufWords],
                                               uint4 (&raw)[kMaxWords]) {
#pragma unroll
  for (int j = 0; j < kBufWords; ++j) raw[j] = buf[j];
  if (meta.w == 5) {
    const uint32_t* base = m.q_weight + (size_t)meta.x * m.n + col0;
    raw[3] = __ldg(reinterpret_cast<const uint4*>(base + (size_t)3 * m.n));
    raw[4] = __ldg(reinterpret_cast<const uint4*>(base + (size_t)4 * m.n));
  }
}

template <int B>
__device__ __forceinline__ void exl2_chunk(const Matrix& m, int4 meta, int col0, const uint4 (&raw)[kMaxWords],
                                           const half* xs, float (&acc)[kLaneCols]) {
  constexpr int V = chunk_values(B);
  constexpr int H = V > 16 ? 16 : V;  // values per pass: bounds the x registers for 32-value chunks
  constexpr float kBias = 8388608.f + float(1 << (B - 1));
  float scale[kLaneCols];
  group_scales(m, meta.z, col0, scale);
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
      for (int i = 0; i < H; ++i) {
        const int bit = (h + i) * B, wi = bit / 32, sh = bit % 32;
        uint32_t q = lane_word(raw[wi], c) >> sh;
        if (sh + B > 32) q |= lane_word(raw[wi + 1], c) << (32 - sh);
        q &= (1u << B) - 1u;
        sum[c] = fmaf(__uint_as_float(0x4B000000u | q) - kBias, x[i], sum[c]);
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) acc[c] = fmaf(sum[c], scale[c], acc[c]);
}

__device__ __forceinline__ void dense_chunk(const Matrix& m, int4 meta, int col0, const uint4 (&raw)[kMaxWords],
                                            const half* xs, float (&acc)[kLaneCols]) {
  uint2 r2[kDenseRows];
#pragma unroll
  for (int i = 0; i < 2 * kBufWords; ++i) r2[i] = reinterpret_cast<const uint2*>(raw)[i];
  const half* base = reinterpret_cast<const half*>(m.q_weight) + (size_t)meta.x * m.n + col0;
#pragma unroll
  for (int i = 2 * kBufWords; i < kDenseRows; ++i)
    r2[i] = i < meta.z ? __ldg(reinterpret_cast<const uint2*>(base + (size_t)i * m.n)) : make_uint2(0, 0);
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

__device__ __forceinline__ void compute_chunk(const Matrix& m, int4 meta, int col0, const uint4 (&buf)[kBufWords],
                                              const half* xs, float (&acc)[kLaneCols]) {
  uint4 raw[kMaxWords];
  chunk_words_of(m, meta, col0, buf, raw);
  switch (meta.w) {
    case 2: exl2_chunk<2>(m, meta, col0, raw, xs, acc); break;
    case 3: exl2_chunk<3>(m, meta, col0, raw, xs, acc); break;
    case 4: exl2_chunk<4>(m, meta, col0, raw, xs, acc); break;
    case 5: exl2_chunk<5>(m, meta, col0, raw, xs, acc); break;
    case 6: exl2_chunk<6>(m, meta, col0, raw, xs, acc); break;
    case 8: exl2_chunk<8>(m, meta, col0, raw, xs, acc); break;
    default: dense_chunk(m, meta, col0, raw, xs, acc); break;
  }
}

// Chunk-table entries of this block's range: staged in shared memory (one coalesced load for
// the whole block) when they fit, else read from global memory.
struct Chunks {
  const int4* staged;  // entry i of the range at staged[i - lo], or nullptr
  const int4* global;
  int lo;
  __device__ __forceinline__ int4 operator[](int i) const { return staged ? staged[i - lo] : __ldg(global + i); }
};

// One thread's chunks of a tile (first, first + stride, ... below end) with two of them in flight
// ahead of the one being computed. `begin` issues the first two loads (before the kernel waits for
// its input, where it can); `run` computes them all.
template <int SLICES>
struct ChunkPipe {
  int4 meta0 = make_int4(0, 0, 0, 0), meta1 = make_int4(0, 0, 0, 0);
  uint4 buf0[kBufWords], buf1[kBufWords];

  __device__ __forceinline__ void begin(const Matrix& m, const Chunks& chunks, int first, int end, int col0) {
    if (first < end) {
      meta0 = chunks[first];
      load_chunk(m, meta0, col0, buf0);
    }
    if (first + SLICES < end) {
      meta1 = chunks[first + SLICES];
      load_chunk(m, meta1, col0, buf1);
    }
  }

  __device__ __forceinline__ void run(const Matrix& m, const Chunks& chunks, int first, int end, int col0,
                                      const half* xs, float (&acc)[kLaneCols]) {
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) acc[c] = 0.f;
    for (int i = first; i < end; i += SLICES) {
      int4 meta2 = meta1;
      uint4 buf2[kBufWords];
      if (i + 2 * SLICES < end) {
        meta2 = chunks[i + 2 * SLICES];
        load_chunk(m, meta2, col0, buf2);
      }
      compute_chunk(m, meta0, col0, buf0, xs, acc);
      meta0 = meta1;
      meta1 = meta2;
#pragma unroll
      for (int j = 0; j < kBufWords; ++j) {
        buf0[j] = buf1[j];
        buf1[j] = buf2[j];
      }
    }
  }
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
};

__host__ __device__ inline int part_stride(const GemvArgs& a) {
  int s = 0;
  for (int i = 0; i < (a.out_mode == kOutGated ? 1 : a.n_mats); ++i) s = max(s, (a.mat[i].x_len + 7) / 8 * 8);
  return s;
}

__host__ __device__ inline size_t smem_bytes(const GemvArgs& a, Smem* layout = nullptr, char* base = nullptr) {
  const int parts = a.out_mode == kOutGated ? 2 : 1, stride = part_stride(a);
  const int k_pad = a.in_mode == kInHalf ? 0 : (a.k_in + 7) / 8 * 8;
  const size_t xs = 0, perm = xs + sizeof(half) * parts * stride, h = perm + sizeof(uint16_t) * parts * stride,
               nw = h + sizeof(float) * k_pad, nb = nw + sizeof(half) * k_pad,
               end = nb + (a.in_mode == kInLayerNorm ? sizeof(half) * k_pad : 0);
  if (layout)
    *layout = Smem{reinterpret_cast<half*>(base + xs), reinterpret_cast<uint16_t*>(base + perm),
                   reinterpret_cast<float*>(base + h), reinterpret_cast<half*>(base + nw),
                   reinterpret_cast<half*>(base + nb)};
  return end;
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

  // Stage this block's chunk-table entries (weights and tables do not depend on the previous
  // kernel, so all of this may overlap it), then send this thread's weights toward L2.
  __shared__ int4 staged[kStage];
  int2 range[2];
  Chunks chunks[2];
  int total = 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    range[j] = split_range(a.mat[mi + j], ks, nks);
    total += range[j].y - range[j].x;
  }
  const bool stage = total <= kStage;
  int offset = 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    const Matrix& m = a.mat[mi + j];
    chunks[j] = Chunks{stage ? staged + offset : nullptr, m.chunks, range[j].x};
    if (stage)
      for (int i = threadIdx.x; i < range[j].y - range[j].x; i += blockDim.x)
        staged[offset + i] = __ldg(m.chunks + range[j].x + i);
    offset += range[j].y - range[j].x;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    const Matrix& m = a.mat[mi + j];
    for (int i = range[j].x + slice; i < range[j].y; i += SLICES) {
      const int4 c = chunks[j][i];
      const uint32_t* base = m.q_weight + (size_t)c.x * m.n + col0;
      const int rows = c.w == kDenseBits ? c.z : chunk_words(c.w);
      for (int r = 0; r < rows; ++r) prefetch_l2(base + (size_t)r * m.n);
    }
  }
  // The first matrix's first two chunks into registers; the permutation rows and the norm's weights
  // into shared memory.
  Smem sm;
  smem_bytes(a, &sm, smem);
  const int stride = part_stride(a);
  ChunkPipe<SLICES> pipe;
  pipe.begin(a.mat[mi], chunks[0], range[0].x + slice, range[0].y, col0);
  int k_lo[2] = {0, 0}, k_hi[2] = {0, 0};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts || range[j].x >= range[j].y) continue;
    const int4 lo = chunks[j][range[j].x], hi = chunks[j][range[j].y - 1];
    k_lo[j] = lo.y;
    k_hi[j] = hi.y + chunk_rows(hi);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts || !a.mat[mi + j].perm) continue;
    const int* perm = a.mat[mi + j].perm;
    for (int k = k_lo[j] + threadIdx.x; k < min(k_hi[j], a.k_in); k += blockDim.x)
      sm.perm[j * stride + k] = (uint16_t)__ldg(perm + k);
  }
  if (a.in_mode != kInHalf)
    for (int i = threadIdx.x; i < a.k_in; i += blockDim.x) {
      sm.norm_w[i] = a.norm_w[i];
      if (a.in_mode == kInLayerNorm) sm.norm_b[i] = a.norm_b[i];
    }
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
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    if (range[j].x >= range[j].y) continue;
    gather_input(a, sm, j, a.mat[mi + j].perm != nullptr, k_lo[j], k_hi[j], stride, mean, rstd);
  }
  __syncthreads();
  trace_point(a.trace, 3);

  float y[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    float acc[kLaneCols];
    const Matrix& m = a.mat[mi + j];
    if (j == 1) pipe.begin(m, chunks[1], range[1].x + slice, range[1].y, col0);
    pipe.run(m, chunks[j], range[j].x + slice, range[j].y, col0, sm.xs + j * stride, acc);
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
  group_scales(m, meta.z, col0, scale);
  constexpr float kBias = 8388608.f + float(1 << (B - 1));
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int row = meta.y + i;
    if (row >= m.k) break;
    const int wi = i * B / 32, sh = i * B % 32;
    half vals[kLaneCols];
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) {
      uint32_t q = lane_word(raw[wi], c) >> sh;
      if (sh + B > 32) q |= lane_word(raw[wi + 1], c) << (32 - sh);
      q &= (1u << B) - 1u;
      vals[c] = __float2half((__uint_as_float(0x4B000000u | q) - kBias) * scale[c]);
    }
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

template <int LANES, int MIN_BLOCKS>
void launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  constexpr int TILE = LANES * kLaneCols;
  const bool gated = a.out_mode == kOutGated;
  const int parts = gated ? 2 : 1;
  int blocks = 0, min_chunks = 1 << 30;
  size_t smem = 0;
  for (int i = 0; i < a.n_mats; ++i) {
    if (!gated || i == 0) blocks += tiles(a.mat[i], TILE);
    min_chunks = std::min(min_chunks, a.mat[i].n_chunks);
  }
  smem = smem_bytes(a);
  // Split K while the grid still fits in one wave of resident blocks, keeping at least 32 chunks per split.
  static int resident = 0;
  if (!resident) {
    int per_sm = 1;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_kernel<LANES, MIN_BLOCKS>, kThreads, 16 * 1024);
    resident = std::max(1, per_sm) * sm_count();
  }
  int splits = 1;
  if (a.partials && a.counters && blocks <= a.counters_size) {
    static const int min_per_split = [] {  // KODKOD_GEMV_SPLIT_CHUNKS: an experiment knob
      const char* e = std::getenv("KODKOD_GEMV_SPLIT_CHUNKS");
      return e && std::atoi(e) > 0 ? std::atoi(e) : 32;
    }();
    splits = std::max(1, std::min({resident / blocks, min_chunks / min_per_split, kMaxSplits}));
    while (splits > 1 && (long long)blocks * splits * TILE * parts > a.partials_size) --splits;
  }
  static size_t smem_opt_in = 48 * 1024 - 24 * 1024;  // per instantiation; about 21 KB are static
  if (smem > smem_opt_in) {
    cudaFuncSetAttribute(gemv_kernel<LANES, MIN_BLOCKS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         (int)std::max(smem, (size_t)48 * 1024));
    smem_opt_in = smem;
  }
  GemvArgs args = a;
  args.trace = trace_region(gated ? "gate_up" : a.n_mats == 3 ? "qkv" : a.out_mode == kOutFloat ? "head" : "gemv",
                            blocks * splits);
  launch(gemv_kernel<LANES, MIN_BLOCKS>, dim3(blocks, splits), dim3(kThreads), smem, stream, args);
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

void dequant(const Matrix& m, half* out, cudaStream_t stream) {
  const int threads = 128;
  const dim3 grid((m.n / kLaneCols + threads - 1) / threads, m.n_chunks);
  dequant_kernel<<<grid, threads, 0, stream>>>(m, out);
}

}  // namespace kodkod
