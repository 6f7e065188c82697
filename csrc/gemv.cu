// Matrix-vector products for one token: EXL2-packed or dense fp16 weights.
//
// A block owns 32 output columns of one matrix and all of its rows, so every
// output is summed in one fixed order (no atomics, same result every run).
// Its 256 threads are 32 row slices x 8 column lanes; a lane reads 4 columns
// of a packed row with one 16-byte load and decodes them in registers.
// The input is gathered through the matrix's row permutation into shared
// memory once, after an optional RMSNorm/LayerNorm of the fp32 residual
// stream (the norm is fused here so it costs no launch of its own).
// Epilogues: store fp16, add into the fp32 residual, act(gate) * up, act(x),
// or store fp32 (logits).
#include "kodkod.h"

#include <algorithm>

namespace kodkod {
namespace {

constexpr int kThreads = 256;
constexpr int kTileCols = 32;
constexpr int kLaneCols = 4;
constexpr int kLanes = kTileCols / kLaneCols;  // 8 threads cover a tile's row
constexpr int kSlices = kThreads / kLanes;     // 32 row slices
constexpr int kDenseRows = 8;                  // rows per dense chunk

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

// Codes of one chunk minus the zero point, as floats: value i is bits [i*B, i*B+B)
// of the chunk's little-endian bit stream. 2^23 + v built from bits avoids an int->float convert.
template <int B>
__device__ __forceinline__ void decode(const uint32_t (&w)[chunk_words(B)], float (&v)[chunk_values(B)]) {
  constexpr float kBias = 8388608.f + float(1 << (B - 1));
#pragma unroll
  for (int i = 0; i < chunk_values(B); ++i) {
    const int wi = i * B / 32, sh = i * B % 32;
    uint32_t q = w[wi] >> sh;
    if (sh + B > 32) q |= w[wi + 1] << (32 - sh);
    q &= (1u << B) - 1u;
    v[i] = __uint_as_float(0x4B000000u | q) - kBias;
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

template <int B>
__device__ __forceinline__ void exl2_chunk(const Matrix& m, int4 meta, int col0, const half* xs,
                                           float (&acc)[kLaneCols]) {
  constexpr int W = chunk_words(B), V = chunk_values(B);
  uint4 raw[W];
  const uint32_t* base = m.q_weight + (size_t)meta.x * m.n + col0;
#pragma unroll
  for (int j = 0; j < W; ++j) raw[j] = __ldg(reinterpret_cast<const uint4*>(base + (size_t)j * m.n));
  float scale[kLaneCols];
  group_scales(m, meta.z, col0, scale);
  float x[V];
  const half2* xs2 = reinterpret_cast<const half2*>(xs + meta.y);
#pragma unroll
  for (int i = 0; i < V / 2; ++i) {
    const float2 f = __half22float2(xs2[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
    uint32_t w[W];
#pragma unroll
    for (int j = 0; j < W; ++j) w[j] = lane_word(raw[j], c);
    float v[V];
    decode<B>(w, v);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) s = fmaf(v[i], x[i], s);
    acc[c] = fmaf(s, scale[c], acc[c]);
  }
}

// Dense fp16 rows: meta = (first row, first x row, rows in this chunk, 16).
__device__ __forceinline__ void dense_chunk(const Matrix& m, int4 meta, int col0, const half* xs,
                                            float (&acc)[kLaneCols]) {
  const half* base = reinterpret_cast<const half*>(m.q_weight) + (size_t)meta.x * m.n + col0;
  uint2 raw[kDenseRows];
#pragma unroll
  for (int i = 0; i < kDenseRows; ++i)
    if (i < meta.z) raw[i] = __ldg(reinterpret_cast<const uint2*>(base + (size_t)i * m.n));
#pragma unroll
  for (int i = 0; i < kDenseRows; ++i) {
    if (i >= meta.z) break;
    const float x = __half2float(xs[meta.y + i]);
    const float2 a = __half22float2(*reinterpret_cast<const half2*>(&raw[i].x));
    const float2 b = __half22float2(*reinterpret_cast<const half2*>(&raw[i].y));
    acc[0] = fmaf(a.x, x, acc[0]);
    acc[1] = fmaf(a.y, x, acc[1]);
    acc[2] = fmaf(b.x, x, acc[2]);
    acc[3] = fmaf(b.y, x, acc[3]);
  }
}

__device__ void matrix_tile(const Matrix& m, int tile, const half* xs, float (&acc)[kLaneCols]) {
  const int lane = threadIdx.x % kLanes, slice = threadIdx.x / kLanes;
  const int col0 = tile * kTileCols + lane * kLaneCols;
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) acc[c] = 0.f;
  for (int i = slice; i < m.n_chunks; i += kSlices) {
    const int4 meta = __ldg(m.chunks + i);
    switch (meta.w) {
      case 2: exl2_chunk<2>(m, meta, col0, xs, acc); break;
      case 3: exl2_chunk<3>(m, meta, col0, xs, acc); break;
      case 4: exl2_chunk<4>(m, meta, col0, xs, acc); break;
      case 5: exl2_chunk<5>(m, meta, col0, xs, acc); break;
      case 6: exl2_chunk<6>(m, meta, col0, xs, acc); break;
      case 8: exl2_chunk<8>(m, meta, col0, xs, acc); break;
      default: dense_chunk(m, meta, col0, xs, acc); break;
    }
  }
}

// Sum the 32 slices of each column; thread t < 32 gets column t of the tile.
__device__ float reduce_slices(const float (&acc)[kLaneCols], float (*red)[kTileCols + 1]) {
  const int lane = threadIdx.x % kLanes, slice = threadIdx.x / kLanes;
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) red[slice][lane * kLaneCols + c] = acc[c];
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x < kTileCols)
    for (int i = 0; i < kSlices; ++i) s += red[i][threadIdx.x];
  __syncthreads();
  return s;
}

__device__ void gather_input(const GemvArgs& a, const Matrix& m, half* xs, float mean, float rstd) {
  for (int k = threadIdx.x; k < m.x_len; k += blockDim.x) {
    float v = 0.f;
    if (k < a.k_in) {
      const int src = m.perm ? m.perm[k] : k;
      if (a.in_mode == kInHalf) {
        v = __half2float(static_cast<const half*>(a.x)[src]);
      } else {
        const float h = static_cast<const float*>(a.x)[src];
        if (a.in_mode == kInRmsNorm)
          v = round_half(h * rstd) * __half2float(a.norm_w[src]);
        else
          v = (h - mean) * rstd * __half2float(a.norm_w[src]) + __half2float(a.norm_b[src]);
      }
    }
    xs[k] = __float2half(v);
  }
}

__host__ __device__ int tiles(const Matrix& m) { return (m.n_out + kTileCols - 1) / kTileCols; }
__host__ __device__ int x_stride(const Matrix& m) { return (m.x_len + 7) / 8 * 8; }

__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvArgs a) {
  extern __shared__ __align__(16) half xs[];
  __shared__ float red[kSlices][kTileCols + 1];
  __shared__ float stats[32];

  const bool gated = a.out_mode == kOutGated;
  int tile = blockIdx.x, mi = 0;
  if (!gated)
    while (mi + 1 < a.n_mats && tile >= tiles(a.mat[mi])) tile -= tiles(a.mat[mi++]);

  float mean = 0.f, rstd = 1.f;
  if (a.in_mode != kInHalf) {
    const float* h = static_cast<const float*>(a.x);
    float s = 0.f;
    if (a.in_mode == kInLayerNorm) {
      for (int i = threadIdx.x; i < a.k_in; i += blockDim.x) s += h[i];
      mean = block_sum(s, stats) / a.k_in;
    }
    s = 0.f;
    for (int i = threadIdx.x; i < a.k_in; i += blockDim.x) {
      const float d = h[i] - mean;
      s += d * d;
    }
    rstd = rsqrtf(block_sum(s, stats) / a.k_in + a.eps);
  }
  const int parts = gated ? 2 : 1;
  half* xs1 = xs + x_stride(a.mat[mi]);
  gather_input(a, a.mat[mi], xs, mean, rstd);
  if (gated) gather_input(a, a.mat[1], xs1, mean, rstd);
  __syncthreads();

  float acc[kLaneCols];
  matrix_tile(a.mat[mi], tile, xs, acc);
  const float y0 = reduce_slices(acc, red);
  float y1 = 0.f;
  if (parts == 2) {
    matrix_tile(a.mat[1], tile, xs1, acc);
    y1 = reduce_slices(acc, red);
  }
  if (threadIdx.x >= kTileCols) return;
  const Matrix& m = a.mat[mi];
  const int col = tile * kTileCols + threadIdx.x;
  if (col >= m.n_out) return;
  const float b0 = m.bias ? __half2float(m.bias[col]) : 0.f;
  switch (a.out_mode) {
    case kOutHalf: static_cast<half*>(a.out[mi])[col] = __float2half(y0 + b0); break;
    case kOutFloat: static_cast<float*>(a.out[mi])[col] = y0 + b0; break;
    case kOutResidual: static_cast<float*>(a.out[mi])[col] += y0 + b0; break;
    case kOutAct: static_cast<half*>(a.out[mi])[col] = __float2half(activate(round_half(y0 + b0), a.act)); break;
    case kOutGated: {
      const float b1 = a.mat[1].bias ? __half2float(a.mat[1].bias[col]) : 0.f;
      const float g = round_half(activate(round_half(y0 + b0), a.act));
      static_cast<half*>(a.out[0])[col] = __float2half(g * round_half(y1 + b1));
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
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
    uint32_t w[W];
#pragma unroll
    for (int j = 0; j < W; ++j) w[j] = lane_word(raw[j], c);
    float v[V];
    decode<B>(w, v);
#pragma unroll
    for (int i = 0; i < V; ++i) out[(size_t)(meta.y + i) * m.n + col0 + c] = __float2half(v[i] * scale[c]);
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

void gemv(const GemvArgs& a, cudaStream_t stream) {
  int blocks = 0;
  size_t smem = 0;
  if (a.out_mode == kOutGated) {
    blocks = tiles(a.mat[0]);
    smem = (x_stride(a.mat[0]) + x_stride(a.mat[1])) * sizeof(half);
  } else {
    for (int i = 0; i < a.n_mats; ++i) {
      blocks += tiles(a.mat[i]);
      smem = std::max(smem, x_stride(a.mat[i]) * sizeof(half));
    }
  }
  static size_t smem_opt_in = 48 * 1024;
  if (smem > smem_opt_in) {
    cudaFuncSetAttribute(gemv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    smem_opt_in = smem;
  }
  gemv_kernel<<<blocks, kThreads, smem, stream>>>(a);
}

void dequant(const Matrix& m, half* out, cudaStream_t stream) {
  const int threads = 128;
  const dim3 grid((m.n / kLaneCols + threads - 1) / threads, m.n_chunks);
  dequant_kernel<<<grid, threads, 0, stream>>>(m, out);
}

}  // namespace kodkod
