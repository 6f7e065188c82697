// Matrix-vector products for one token (or a pass of up to 8): EXL2-packed or dense fp16 weights,
// multiplied on the tensor cores.
//
// A block owns a tile of 32 output columns (128 for the head) and a range of the rows: all of
// them, or one of a few K splits whose partial sums the last split to finish adds in a fixed
// order (residual adds: each split adds its own with atomics). Grids of more than one wave of
// resident blocks run on gemv_units_kernel instead: a block per slot, taking (tile, split) units
// in turn with its input gathered once (see there). The rows are cut into chunks of
// 16 or 32 that decode on their own (a chunk table per matrix); each warp takes one chunk of 32
// columns at a time: its lanes turn their words into the fp16 A fragment of mma.m16n8k16 (a mask
// and a fused multiply-add per pair of values, exact), the input is the B fragment, and the
// integer products of a chunk are summed in fp32 and then scaled (engine/kernel_layout.py says
// where each value lives).
// Before the kernel waits for its input (programmatic dependent launch, Hopper) it copies, with
// asynchronous copies that hold no registers, everything that does not depend on the previous
// kernel into shared memory: its chunk-table entries, its permutation rows, the norm's weights,
// and its weight rows (as many as the launcher's window holds; the rest are sent toward L2 and
// read from global memory). So the weights stream in while the previous kernel still runs, with
// every byte of the tile in flight at once. Then the input is gathered through the permutation,
// after an optional RMSNorm/LayerNorm of the fp32 residual stream (fused: no launch of its own).
// Epilogues: store fp16, add into the fp32 residual, act(gate) * up, act(x), store fp32 (logits).
#include "kodkod.h"
#include "launch.cuh"
#include "mma.cuh"
#include "trace.cuh"

#include <algorithm>
#include <cstdlib>

namespace kodkod {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kPassTokens = 8; // tokens of one multi-token pass: the mma's n
constexpr int kStage = 1024;   // chunk-table entries a block stages in shared memory
constexpr int kMaxSplits = 64;

// The layout engine/kernel_layout.py writes (read its docstring first): a chunk is 16 (2-bit, dense)
// or 32 rows; a lane of a warp holds 4 columns of a 32-column tile and, per 16-row k-step, the rows
// 2t, 2t+1, 2t+8, 2t+9 (t = lane % 4) as fp16 pairs, exactly the A fragment of mma.m16n8k16.
__host__ __device__ constexpr int chunk_values(int bits) { return bits == 2 || bits == kDenseBits ? 16 : 32; }
__host__ __device__ constexpr int chunk_words(int bits) { return chunk_values(bits) * bits / 32; }
__host__ __device__ constexpr int lo_bits(int bits) { return bits == 3 ? 2 : bits == 5 || bits == 6 ? 4 : bits; }

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half(v)); }

// fp16 bit patterns of exact constants, worked out at compile time.
__host__ __device__ constexpr int ilog2(int m) { int e = 0; while ((m >> e) > 1) ++e; return e; }
__host__ __device__ constexpr bool fp16_exact(int m) { return m > 0 && m <= 65504 && (ilog2(m) <= 10 || ((m >> (ilog2(m) - 10)) << (ilog2(m) - 10)) == m); }
__host__ __device__ constexpr uint32_t fp16_int(int m) {  // a positive integer that fp16 holds exactly
  return uint32_t((ilog2(m) + 15) << 10) | uint32_t((ilog2(m) <= 10 ? m << (10 - ilog2(m)) : m >> (ilog2(m) - 10)) & 0x3FF);
}
__host__ __device__ constexpr uint32_t fp16_pow2(int x) { return uint32_t((x + 15) << 10); }
__host__ __device__ constexpr uint32_t twice(uint32_t h) { return h | h << 16; }

__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Where pair p of a B-bit chunk lives and how it becomes two fp16 values (q - 2^(B-1)), exactly:
// a mask puts each value under the exponent of 1024 (0x6400: 1024 + 2^e * v), one fused
// multiply-add scales it back and removes 1024 and the offset. Two planes: the high plane's
// multiply-add leaves 2^BL * hi - offset - 1024 * 2^-e, and the low plane's adds itself to that.
struct PairCode {
  int lo_word, lo_shift, hi_word, hi_shift;
  uint32_t lo_mask, hi_mask, lo_mul, lo_add, hi_mul, hi_add;
  bool two_planes, exact;
};

__host__ __device__ constexpr PairCode pair_code(int B, int p) {
  const int BL = lo_bits(B), BH = B - BL, OFF = 1 << (B - 1), P = chunk_values(B) / 2;
  const int lpos = BL * (p % (16 / BL)), lsh = lpos >= 8 ? 8 : 0, e = lpos - lsh;
  const int hs = BH ? 16 / BH : 1, hpos = BH * (p % hs), hsh = hpos >= 8 ? 8 : 0, f = hpos - hsh;
  const int lo_unit = 1024 >> e, hi_unit = BL >= f ? 1024 << (BL - f) : 1024 >> (f - BL);
  const int c_one = lo_unit + OFF, c_two = hi_unit + OFF + lo_unit;
  return PairCode{p / (16 / BL), lsh, P * BL / 16 + p / hs, hsh,
                  (((1u << BL) - 1u) << e) * 0x10001u, BH ? (((1u << BH) - 1u) << f) * 0x10001u : 0u,
                  twice(fp16_pow2(-e)), twice(0x8000u | fp16_int(BH ? lo_unit : c_one)),
                  twice(fp16_pow2(BL - f)), twice(0x8000u | fp16_int(c_two)),
                  BH > 0, BH ? fp16_exact(c_two) : fp16_exact(c_one)};
}

// (x & MASK) | exponent in one lop3: the exponent lives in a register (a lop3 takes one immediate).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t mask_or(uint32_t x, uint32_t exponent) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(MASK), "r"(exponent));
  return d;
}

template <int B, int p = 0>
__device__ __forceinline__ void decode_pairs(const uint32_t* w, uint32_t* a, uint32_t exponent) {
  if constexpr (p < chunk_values(B) / 2) {
    constexpr PairCode Q = pair_code(B, p);
    static_assert(Q.exact, "a decode constant fp16 cannot hold");
    const uint32_t lo = mask_or<Q.lo_mask>(w[Q.lo_word] >> Q.lo_shift, exponent);
    if constexpr (!Q.two_planes) {
      a[p] = hfma2(lo, Q.lo_mul, Q.lo_add);
    } else {
      const uint32_t hi = mask_or<Q.hi_mask>(w[Q.hi_word] >> Q.hi_shift, exponent);
      a[p] = hfma2(lo, Q.lo_mul, hfma2(hi, Q.hi_mul, Q.hi_add));
    }
    decode_pairs<B, p + 1>(w, a, exponent);
  }
}

// 0x6400 in both halves: 1024 as fp16, the exponent a mask puts each value under.
__device__ __forceinline__ uint32_t fp16_1024x2() {
  uint32_t r;
  asm volatile("mov.b32 %0, 0x64006400;" : "=r"(r));  // volatile: kept in a register, not folded back into an immediate
  return r;
}

// The two mmas of k-step s over the lane's pairs a: columns (0, 1) into d[0], (2, 3) into d[1].
__device__ __forceinline__ void mma_step(float (&d)[2][4], const uint32_t* a, const uint32_t (&b)[2]) {
#pragma unroll
  for (int m = 0; m < 2; ++m) mma(d[m], a[4 * m], a[4 * m + 2], a[4 * m + 1], a[4 * m + 3], b[0], b[1]);
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
__device__ __forceinline__ void group_scales(uint32_t word, half max, int col0, float (&s)[4]) {
  const uint32_t codes = word >> (4 * (col0 % 8));
  const float smax = __half2float(max) * (1.f / 256.f);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float q = float(((codes >> (4 * c)) & 15u) + 1u);
    s[c] = q * q * smax;
  }
}

// Value rows a chunk covers (what the input must hold, zero past K) and its packed rows.
__device__ __forceinline__ int chunk_rows(int4 meta) { return chunk_values(meta.w); }
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

// Where a warp reads: its 32 columns (col = first of them, within the block's tile at sub * 32),
// its lane (g = lane / 4 owns columns 4g..4g+3, t = lane % 4 picks rows) and the inputs of the mma's
// B fragment: one token from shared memory (every n the same), or token g of a pass from global memory.
struct Lane {
  int col, sub, lane, g, t;
  const half* x;  // inputs in permuted row order: the token of this lane's n
};

// Dense row r, the lane's 4 columns.
__device__ __forceinline__ uint2 dense_row(const Matrix& m, const Part& p, int r, const Lane& L) {
  if (r < p.r_hi) return *reinterpret_cast<const uint2*>(p.w + (size_t)(r - p.r_lo) * p.row_bytes + (L.sub * 32 + 4 * L.g) * 2);
  return __ldg(reinterpret_cast<const uint2*>(reinterpret_cast<const half*>(m.q_weight) + (size_t)r * m.n + L.col + 4 * L.g));
}

// B fragment of the k-step at value row k: inputs k + 2t, +1 and k + 2t + 8, +9.
__device__ __forceinline__ void inputs(const Lane& L, int k, uint32_t (&b)[2]) {
  b[0] = *reinterpret_cast<const uint32_t*>(L.x + k + 2 * L.t);
  b[1] = *reinterpret_cast<const uint32_t*>(L.x + k + 2 * L.t + 8);
}

// acc: per mma (lane columns 0-1, 2-3) the C fragment: [0] column 2m, n = 2t; [1] n = 2t + 1;
// [2], [3] column 2m + 1. Per chunk the integer products are summed exactly in fp32, then scaled.
// The chunk's words come from the shared-memory window (rows of TILE words: constant offsets) or,
// past it, from global memory: the caller walks the chunks in the window and those past it in
// loops of their own (WINDOW), so that no chunk issues both paths' instructions.
template <int B, int TILE, bool WINDOW>
__device__ __forceinline__ void load_words(const Matrix& m, const Part& p, int4 meta, const Lane& L,
                                           uint32_t (&w)[chunk_words(B)]) {
  constexpr int W = chunk_words(B);
  if constexpr (WINDOW) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(p.w) + (meta.x - p.r_lo) * TILE + L.sub * 32 + L.lane;
#pragma unroll
    for (int j = 0; j < W; ++j) w[j] = src[j * TILE];
  } else {
    const uint32_t* src = m.q_weight + (size_t)meta.x * m.n + L.col + L.lane;
#pragma unroll
    for (int j = 0; j < W; ++j) w[j] = __ldg(src + (size_t)j * m.n);
  }
}

// acc += the chunk's products: decoded, summed exactly in fp32 by the mmas, then scaled.
template <int B>
__device__ __forceinline__ void chunk_sums(const uint32_t (&w)[chunk_words(B)], const uint32_t (&b)[chunk_values(B) / 16][2],
                                           const float (&scale)[4], float (&acc)[2][4]) {
  constexpr int S = chunk_values(B) / 16;
  uint32_t a[8 * S];
  decode_pairs<B>(w, a, fp16_1024x2());
  float d[2][4] = {};
#pragma unroll
  for (int s = 0; s < S; ++s) mma_step(d, a + 8 * s, b[s]);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    acc[i][0] = fmaf(d[i][0], scale[2 * i], acc[i][0]);
    acc[i][1] = fmaf(d[i][1], scale[2 * i], acc[i][1]);
    acc[i][2] = fmaf(d[i][2], scale[2 * i + 1], acc[i][2]);
    acc[i][3] = fmaf(d[i][3], scale[2 * i + 1], acc[i][3]);
  }
}

template <int B, int TILE, bool WINDOW>
__device__ __forceinline__ void exl2_chunk(const Matrix& m, const Part& p, int4 meta, const Lane& L,
                                           const float (&scale)[4], float (&acc)[2][4]) {
  constexpr int S = chunk_values(B) / 16, W = chunk_words(B);
  uint32_t w[W], b[S][2];
  load_words<B, TILE, WINDOW>(m, p, meta, L, w);
#pragma unroll
  for (int s = 0; s < S; ++s) inputs(L, meta.y + 16 * s, b[s]);
  chunk_sums<B>(w, b, scale, acc);
}

// Two chunks of one bit width: every load of both first, then both decodes and mmas, so that one
// chunk's latency hides behind the other's work (the sums go into acc in chunk order, as one by one).
template <int B, int TILE, bool WINDOW>
__device__ __forceinline__ void exl2_pair(const Matrix& m, const Part& p, int4 m0, int4 m1, const Lane& L,
                                          const float (&s0)[4], const float (&s1)[4], float (&acc)[2][4]) {
  constexpr int S = chunk_values(B) / 16, W = chunk_words(B);
  uint32_t w0[W], w1[W], b0[S][2], b1[S][2];
  load_words<B, TILE, WINDOW>(m, p, m0, L, w0);
  load_words<B, TILE, WINDOW>(m, p, m1, L, w1);
#pragma unroll
  for (int s = 0; s < S; ++s) {
    inputs(L, m0.y + 16 * s, b0[s]);
    inputs(L, m1.y + 16 * s, b1[s]);
  }
  chunk_sums<B>(w0, b0, s0, acc);
  chunk_sums<B>(w1, b1, s1, acc);
}

// Dense rows: the pairs of column c are the halves c of rows 2t + 8h and 2t + 8h + 1 (zero past the chunk).
__device__ __forceinline__ void dense_chunk(const Matrix& m, const Part& p, int4 meta, const Lane& L, float (&acc)[2][4]) {
  uint2 r[2][2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int i = 2 * L.t + 8 * h + e;
      r[h][e] = i < meta.z ? dense_row(m, p, meta.x + i, L) : make_uint2(0u, 0u);
    }
  uint32_t a[8], b[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    a[0 + h] = __byte_perm(r[h][0].x, r[h][1].x, 0x5410);
    a[2 + h] = __byte_perm(r[h][0].x, r[h][1].x, 0x7632);
    a[4 + h] = __byte_perm(r[h][0].y, r[h][1].y, 0x5410);
    a[6 + h] = __byte_perm(r[h][0].y, r[h][1].y, 0x7632);
  }
  inputs(L, meta.y, b);
  mma_step(acc, a, b);
}

// The scales of a chunk's group, for the lane's 4 columns: staged, or from global memory.
template <int TILE>
__device__ __forceinline__ void chunk_scales(const Matrix& m, const Part& p, int4 meta, const Lane& L, float (&scale)[4]) {
  const int g = meta.z - p.g_lo, col0 = L.col + 4 * L.g;
  if (g >= 0 && g < p.g_n)
    group_scales(p.codes[g * (TILE / 8) + L.sub * 4 + L.g / 2], p.smax[g], col0, scale);
  else
    group_scales(__ldg(m.q_scale + (size_t)meta.z * (m.n / 8) + col0 / 8), m.q_scale_max[meta.z], col0, scale);
}

// Two EXL2 chunks of the same bit width (exl2_pair).
template <int TILE, bool WINDOW>
__device__ __forceinline__ void compute_pair(const Matrix& m, const Part& p, int4 m0, int4 m1, const Lane& L,
                                             float (&acc)[2][4]) {
  float s0[4], s1[4];
  chunk_scales<TILE>(m, p, m0, L, s0);
  chunk_scales<TILE>(m, p, m1, L, s1);
  switch (m0.w) {
    case 2: exl2_pair<2, TILE, WINDOW>(m, p, m0, m1, L, s0, s1, acc); break;
    case 3: exl2_pair<3, TILE, WINDOW>(m, p, m0, m1, L, s0, s1, acc); break;
    case 4: exl2_pair<4, TILE, WINDOW>(m, p, m0, m1, L, s0, s1, acc); break;
    case 5: exl2_pair<5, TILE, WINDOW>(m, p, m0, m1, L, s0, s1, acc); break;
    case 6: exl2_pair<6, TILE, WINDOW>(m, p, m0, m1, L, s0, s1, acc); break;
    default: exl2_pair<8, TILE, WINDOW>(m, p, m0, m1, L, s0, s1, acc); break;
  }
}

template <int TILE, bool WINDOW>
__device__ __forceinline__ void compute_chunk(const Matrix& m, const Part& p, int4 meta, const Lane& L,
                                              float (&acc)[2][4]) {
  if (meta.w == kDenseBits) return dense_chunk(m, p, meta, L, acc);
  float scale[4];
  chunk_scales<TILE>(m, p, meta, L, scale);
  switch (meta.w) {
    case 2: exl2_chunk<2, TILE, WINDOW>(m, p, meta, L, scale, acc); break;
    case 3: exl2_chunk<3, TILE, WINDOW>(m, p, meta, L, scale, acc); break;
    case 4: exl2_chunk<4, TILE, WINDOW>(m, p, meta, L, scale, acc); break;
    case 5: exl2_chunk<5, TILE, WINDOW>(m, p, meta, L, scale, acc); break;
    case 6: exl2_chunk<6, TILE, WINDOW>(m, p, meta, L, scale, acc); break;
    default: exl2_chunk<8, TILE, WINDOW>(m, p, meta, L, scale, acc); break;
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

// The first chunk of [lo, hi) whose packed rows reach past row r_hi (chunks are in row order):
// where a warp's chunks stop coming from the window.
__device__ __forceinline__ int first_beyond(const Chunks& c, int lo, int hi, int r_hi) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const int4 e = c[mid];
    if (e.x + chunk_packed_rows(e) <= r_hi) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// A warp's chunks i, i + SLICES, ... below end, all from the window or all from global memory.
// PAIRS: two chunks at a time where they share a bit width. Returns the first chunk not taken.
template <int TILE, int SLICES, bool PAIRS, bool WINDOW>
__device__ __forceinline__ int walk(const Matrix& m, const Part& p, const Chunks& chunks, int i, int end, const Lane& L,
                                   float (&acc)[2][4]) {
  if constexpr (PAIRS)
    for (; i + SLICES < end; i += 2 * SLICES) {
      const int4 m0 = chunks[i], m1 = chunks[i + SLICES];
      if (m0.w == m1.w && m0.w != kDenseBits) {
        compute_pair<TILE, WINDOW>(m, p, m0, m1, L, acc);
      } else {
        compute_chunk<TILE, WINDOW>(m, p, m0, L, acc);
        compute_chunk<TILE, WINDOW>(m, p, m1, L, acc);
      }
    }
  for (; i < end; i += SLICES) compute_chunk<TILE, WINDOW>(m, p, chunks[i], L, acc);
  return i;
}

// Shared memory of a block (dynamic part), in this order: the gathered input of each part
// (fp16), each part's permutation rows (uint16, staged before the input is ready), and for the
// norm modes the fp32 residual stream and the norm's weight and bias (fp16, staged early too);
// the scale codes and maxima, the warps' sums, the weight window. A multi-token pass reads its
// inputs from global memory: no input, permutation or norm arrays.
struct Smem {
  half* xs;
  uint16_t* perm;
  float* h;
  half* norm_w;
  half* norm_b;
  uint32_t* codes;  // per part a.scale_groups rows of tile_cols / 8 scale-code words
  half* smax;       // per part a.scale_groups group maxima
  float* red;       // [slices, tokens, tile_cols]: the warps' sums
  char* w;          // the weight window: a.window bytes, split evenly between the parts
};

__host__ __device__ inline int part_stride(const GemvArgs& a) {
  int s = 0;
  for (int i = 0; i < (a.out_mode == kOutGated ? 1 : a.n_mats); ++i) s = max(s, (a.mat[i].x_len + 7) / 8 * 8);
  return s;
}

__host__ __device__ inline size_t smem_bytes(const GemvArgs& a, int tile_cols, bool multi, Smem* layout = nullptr,
                                             char* base = nullptr) {
  const int parts = a.out_mode == kOutGated ? 2 : 1, span = multi ? 0 : a.x_span;
  bool permuted = false;
  for (int i = 0; i < a.n_mats; ++i) permuted |= a.mat[i].perm16 != nullptr;
  const int k_pad = a.in_mode == kInHalf ? 0 : (a.k_in + 7) / 8 * 8;
  const int slices = kWarps / (tile_cols / 32);
  const size_t xs = 0, perm = xs + sizeof(half) * parts * span, h = perm + sizeof(uint16_t) * parts * (permuted ? span : 0),
               nw = h + sizeof(float) * k_pad, nb = nw + sizeof(half) * k_pad,
               codes = (nb + (a.in_mode == kInLayerNorm ? sizeof(half) * k_pad : 0) + 15) / 16 * 16,
               smax = codes + sizeof(uint32_t) * parts * a.scale_groups * (tile_cols / 8),
               red = (smax + sizeof(half) * parts * a.scale_groups + 15) / 16 * 16,
               w = red + sizeof(float) * slices * (multi ? kPassTokens : 1) * tile_cols;
  if (layout)
    *layout = Smem{reinterpret_cast<half*>(base + xs), reinterpret_cast<uint16_t*>(base + perm),
                   reinterpret_cast<float*>(base + h), reinterpret_cast<half*>(base + nw),
                   reinterpret_cast<half*>(base + nb), reinterpret_cast<uint32_t*>(base + codes),
                   reinterpret_cast<half*>(base + smax), reinterpret_cast<float*>(base + red), base + w};
  return w + a.window;
}

// Input rows [k_lo, k_hi) of one part into xs[0, k_hi - k_lo), through the staged permutation rows
// (perm[0, ...) likewise): fp16 input from global memory, or the normalized residual stream from
// shared memory. A thread's kGatherBatch values are all read before any is stored: the stores
// could alias the reads as far as the compiler knows, so it would otherwise wait out each read's
// latency (a round trip to L2 for fp16 inputs) one value at a time.
constexpr int kGatherBatch = 8;

__device__ __forceinline__ float input_value(const GemvArgs& a, const Smem& sm, const uint16_t* perm, bool permuted,
                                             int k, int k_lo, float mean, float rstd) {
  if (k >= a.k_in) return 0.f;
  const int src = permuted ? perm[k - k_lo] : k;
  if (a.in_mode == kInHalf) return __half2float(static_cast<const half*>(a.x)[src]);
  if (a.in_mode == kInRmsNorm) return round_half(sm.h[src] * rstd) * __half2float(sm.norm_w[src]);
  return (sm.h[src] - mean) * rstd * __half2float(sm.norm_w[src]) + __half2float(sm.norm_b[src]);
}

__device__ void gather_input(const GemvArgs& a, const Smem& sm, int j, bool permuted, int k_lo, int k_hi,
                             float mean, float rstd) {
  half* xs = sm.xs + j * a.x_span;
  const uint16_t* perm = sm.perm + j * a.x_span;
  for (int k0 = k_lo + threadIdx.x; k0 < k_hi; k0 += kGatherBatch * blockDim.x) {
    float v[kGatherBatch];
#pragma unroll
    for (int u = 0; u < kGatherBatch; ++u) {
      const int k = k0 + u * blockDim.x;
      v[u] = k < k_hi ? input_value(a, sm, perm, permuted, k, k_lo, mean, rstd) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kGatherBatch; ++u) {
      const int k = k0 + u * blockDim.x;
      if (k < k_hi) xs[k - k_lo] = __float2half(v[u]);
    }
  }
}

// The residual stream read once into shared memory (sm.h), with its norm's statistics from the same
// pass (LayerNorm: its mean first, then the squares from shared memory); block_sum's barriers publish
// sm.h. A thread's loads are issued in batches before it waits on any (each is a round trip to L2).
__device__ __forceinline__ void norm_stats(const GemvArgs& a, const Smem& sm, float* stats, float& mean, float& rstd) {
  const float* h = static_cast<const float*>(a.x);
  const bool layer = a.in_mode == kInLayerNorm;
  float s = 0.f;
  for (int i0 = threadIdx.x; i0 < a.k_in; i0 += kGatherBatch * blockDim.x) {
    float v[kGatherBatch];
#pragma unroll
    for (int u = 0; u < kGatherBatch; ++u) {
      const int i = i0 + u * blockDim.x;
      v[u] = i < a.k_in ? __ldcg(h + i) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kGatherBatch; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < a.k_in) sm.h[i] = v[u];
      s += layer ? v[u] : v[u] * v[u];
    }
  }
  if (layer) {
    mean = block_sum(s, stats) / a.k_in;
    s = 0.f;
    for (int i = threadIdx.x; i < a.k_in; i += blockDim.x) {
      const float d = sm.h[i] - mean;
      s += d * d;
    }
  }
  rstd = rsqrtf(block_sum(s, stats) / a.k_in + a.eps);
}

// The epilogue of one output column: y[0] (and y[1], gated: up) is its sum over all rows, or, for
// kOutResidualAtomic, over this split's rows (each split adds its own; with_bias on split 0 only).
__device__ __forceinline__ void store(const GemvArgs& a, int mi, int col, const float (&y)[2], bool with_bias = true) {
  const Matrix& m = a.mat[mi];
  const float b0 = m.bias && with_bias ? __half2float(m.bias[col]) : 0.f;
  const int at = a.out_index ? a.out_index[col] : col;  // fp16 outputs only
  switch (a.out_mode) {
    case kOutHalf: static_cast<half*>(a.out[mi])[at] = __float2half(y[0] + b0); break;
    case kOutFloat: static_cast<float*>(a.out[mi])[col] = y[0] + b0; break;
    case kOutResidual: static_cast<float*>(a.out[mi])[col] += y[0] + b0; break;
    case kOutResidualAtomic: atomicAdd(static_cast<float*>(a.out[mi]) + col, y[0] + b0); break;
    case kOutAct: static_cast<half*>(a.out[mi])[at] = __float2half(activate(round_half(y[0] + b0), a.act)); break;
    case kOutGated: {
      const float b1 = a.mat[1].bias ? __half2float(a.mat[1].bias[col]) : 0.f;
      const float g = round_half(activate(round_half(y[0] + b0), a.act));
      static_cast<half*>(a.out[0])[at] = __float2half(g * round_half(y[1] + b1));
      break;
    }
  }
}

__host__ __device__ int tiles(const Matrix& m, int tile_cols) { return (m.n_out + tile_cols - 1) / tile_cols; }

// Chunk range [lo, hi) of split ks out of nks.
__device__ __forceinline__ int2 split_range(const Matrix& m, int ks, int nks) {
  return make_int2((int)((long long)m.n_chunks * ks / nks), (int)((long long)m.n_chunks * (ks + 1) / nks));
}

// The norm's weight and bias into shared memory (before the dependency wait: they are parameters).
__device__ __forceinline__ void stage_norm(const GemvArgs& a, const Smem& sm) {
  if (a.in_mode == kInHalf) return;
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

// One token: the warps' sums of their slices of K, added per column in slice order (thread i < TILE
// holds column i's). Safe to call back to back.
template <int TILE, int SLICES>
__device__ __forceinline__ float slice_sums(const Smem& sm, const Lane& L, int slice, const float (&acc)[2][4]) {
  if (L.t == 0) {  // every n of the mma holds the token
    float* r = sm.red + slice * TILE + L.sub * 32 + 4 * L.g;
    r[0] = acc[0][0];
    r[1] = acc[0][2];
    r[2] = acc[1][0];
    r[3] = acc[1][2];
  }
  __syncthreads();
  float y = 0.f;
  if (threadIdx.x < TILE)
#pragma unroll
    for (int w = 0; w < SLICES; ++w) y += sm.red[w * TILE + threadIdx.x];
  __syncthreads();
  return y;
}

// A unit's sums y (thread i < TILE: column i of tile `tile` of matrix mi; gated: y[1] up's) to the
// output: split over K (nks > 1), the last split of the tile to finish adds every split's partial
// sums in order (slot: the tile's index over the launch's matrices), or each split adds its own
// into the residual stream (kOutResidualAtomic); then the epilogue.
template <int TILE>
__device__ __forceinline__ void finish(const GemvArgs& a, int mi, int slot, int tile, int ks, int nks, float (&y)[2]) {
  __shared__ bool last;
  const bool gated = a.out_mode == kOutGated, atomic = a.out_mode == kOutResidualAtomic;
  const int parts = gated ? 2 : 1;
  if (nks > 1 && !atomic) {
    float* part = a.partials + (size_t)slot * nks * TILE * parts;
    if (threadIdx.x < TILE) {
      part[ks * parts * TILE + threadIdx.x] = y[0];
      if (gated) part[(ks * parts + 1) * TILE + threadIdx.x] = y[1];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(a.counters + slot, 1) == nks - 1;
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
    if (threadIdx.x == 0) a.counters[slot] = 0;
    trace_point(a.trace, 6);  // the merge's end (last split only)
  }
  trace_point(a.trace, 5);
  const int col = tile * TILE + threadIdx.x;
  if (threadIdx.x < TILE && col < a.mat[mi].n_out) store(a, mi, col, y, !atomic || ks == 0);
}

// A block: 8 warps over a tile of TW x 32 columns; warp w takes columns (w % TW) * 32 and every
// (8 / TW)-th chunk of the block's range. MULTI: a pass of up to 8 tokens (fp16 in and out, no split).
// PAIRS: a warp takes two chunks of one bit width at a time, all their loads first (more registers).
template <int TW, int MIN_BLOCKS, bool MULTI, bool PAIRS = false>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) gemv_kernel(const GemvArgs a) {
  constexpr int TILE = TW * 32, SLICES = kWarps / TW;
  extern __shared__ __align__(16) char smem[];
  __shared__ float stats[32];

  const bool gated = a.out_mode == kOutGated;
  const int parts = gated ? 2 : 1;
  int tile = blockIdx.x, mi = 0;
  if (!gated)
    while (mi + 1 < a.n_mats && tile >= tiles(a.mat[mi], TILE)) tile -= tiles(a.mat[mi++], TILE);
  const int ks = blockIdx.y, nks = gridDim.y;
  const int warp = threadIdx.x / 32, slice = warp / TW;
  trace_point(a.trace, 0);
  if (a.early) pdl_trigger();
  Smem sm;
  smem_bytes(a, TILE, MULTI, &sm, smem);
  const int stride = a.mat[0].x_len;  // MULTI: the rows of the inputs in global memory
  Lane L;
  L.sub = warp % TW;
  L.col = tile * TILE + L.sub * 32;
  L.lane = threadIdx.x % 32;
  L.g = L.lane / 4;
  L.t = L.lane % 4;

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
    if (m.perm16 && !MULTI)  // 4 rows per copy; chunk boundaries are multiples of 4 rows, the table is padded to 8
      for (int k = p[j].k_lo + 4 * (int)threadIdx.x; k < min(p[j].k_hi, m.k); k += 4 * blockDim.x)
        copy8(sm.perm + j * a.x_span + (k - p[j].k_lo), m.perm16 + k);
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
    if (L.col < m.n)  // beyond the window: toward L2, a row of the warp's columns (one line) per lane
      for (int r = p[j].r_hi + slice * 32 + L.lane; r < p[j].r_end; r += SLICES * 32)
        prefetch_l2(reinterpret_cast<const char*>(m.q_weight) + ((size_t)r * m.n + L.col) * elem);
  }
  if (!MULTI) stage_norm(a, sm);
  copies_commit();
  trace_point(a.trace, 1);
  pdl_wait();  // from here on the input (written by the previous kernel) is complete
  if (!a.early) pdl_trigger();
  trace_point(a.trace, 2);

  if constexpr (!MULTI) {
    float mean = 0.f, rstd = 1.f;
    if (a.in_mode != kInHalf) norm_stats(a, sm, stats, mean, rstd);
    copies_wait();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (j >= parts) break;
      if (p[j].c_lo >= p[j].c_hi) continue;
      gather_input(a, sm, j, a.mat[mi + j].perm16 != nullptr, p[j].k_lo, p[j].k_hi, mean, rstd);
    }
  } else {
    copies_wait();
  }
  __syncthreads();
  trace_point(a.trace, 3);

  // Each warp's sums into sm.red; thread i < TILE (one token) adds the slices of column i.
  float y[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= parts) break;
    const Matrix& m = a.mat[mi + j];
    L.x = MULTI ? static_cast<const half*>(a.x) + (size_t)L.g * stride : sm.xs + j * a.x_span - p[j].k_lo;
    float acc[2][4] = {};
    if (L.col < m.n) {
      const int past = p[j].r_hi < p[j].r_end ? first_beyond(chunks[j], p[j].c_lo, p[j].c_hi, p[j].r_hi) : p[j].c_hi;
      const int i = walk<TILE, SLICES, PAIRS, true>(m, p[j], chunks[j], p[j].c_lo + slice, past, L, acc);
      walk<TILE, SLICES, PAIRS, false>(m, p[j], chunks[j], i, p[j].c_hi, L, acc);
    }
    if constexpr (MULTI) {  // the sums of every token: thread i adds token i / TILE, column i % TILE
      const int c = L.sub * 32 + 4 * L.g;
      float* r = sm.red + slice * kPassTokens * TILE;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        r[(2 * L.t) * TILE + c + 2 * i] = acc[i][0];
        r[(2 * L.t + 1) * TILE + c + 2 * i] = acc[i][1];
        r[(2 * L.t) * TILE + c + 2 * i + 1] = acc[i][2];
        r[(2 * L.t + 1) * TILE + c + 2 * i + 1] = acc[i][3];
      }
      __syncthreads();
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < SLICES; ++w) s += sm.red[w * kPassTokens * TILE + threadIdx.x];
      const int token = threadIdx.x / TILE, col = tile * TILE + threadIdx.x % TILE;
      if (token < a.tokens && col < m.n_out)
        static_cast<half*>(a.out[mi])[(size_t)token * m.n_out + col] =
            __float2half(s + (m.bias ? __half2float(m.bias[col]) : 0.f));
      return;
    } else {
      y[j] = slice_sums<TILE, SLICES>(sm, L, slice, acc);
    }
  }
  trace_point(a.trace, 4);

  finish<TILE>(a, mi, blockIdx.x, tile, ks, nks, y);
}

// Grids of more than one wave of resident blocks (the 7B MLP's gate+up, the heads): one block per
// resident slot, each taking a contiguous run of the launch's units (tile, K split) in turn. Such a
// grid of gemv_kernel blocks streams weights at about the copy rate while its blocks compute, but
// every block first pays its prologue (the norm, the input gathered) and the last wave runs part
// empty; here a block normalizes and gathers its input once, for all of K (every unit of a matrix
// reads the same input), and streams unit after unit. Weights, chunk tables and scales come from
// global memory: a unit's rows staged in a window would wait on the unit before. One matrix, or
// gate and up.
template <int TW, int MIN_BLOCKS, bool PAIRS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) gemv_units_kernel(const GemvArgs a, int nks) {
  constexpr int TILE = TW * 32, SLICES = kWarps / TW;
  extern __shared__ __align__(16) char smem[];
  __shared__ float stats[32];
  const int parts = a.out_mode == kOutGated ? 2 : 1;
  const int units = tiles(a.mat[0], TILE) * nks;
  const int u_lo = (int)((long long)units * blockIdx.x / gridDim.x);
  const int u_hi = (int)((long long)units * (blockIdx.x + 1) / gridDim.x);
  const int warp = threadIdx.x / 32, slice = warp / TW;
  trace_point(a.trace, 0);
  if (a.early) pdl_trigger();
  Smem sm;
  smem_bytes(a, TILE, false, &sm, smem);
  Lane L;
  L.sub = warp % TW;
  L.lane = threadIdx.x % 32;
  L.g = L.lane / 4;
  L.t = L.lane % 4;

  for (int j = 0; j < parts; ++j) {  // permutation rows of all of K (tables padded to 8 rows)
    const Matrix& m = a.mat[j];
    if (m.perm16)
      for (int k = 4 * (int)threadIdx.x; k < m.k; k += 4 * blockDim.x) copy8(sm.perm + j * a.x_span + k, m.perm16 + k);
  }
  stage_norm(a, sm);
  copies_commit();
  trace_point(a.trace, 1);
  pdl_wait();
  if (!a.early) pdl_trigger();
  trace_point(a.trace, 2);
  float mean = 0.f, rstd = 1.f;
  if (a.in_mode != kInHalf) norm_stats(a, sm, stats, mean, rstd);
  copies_wait();
  __syncthreads();
  // x_span 0: an fp16 input that needs neither norm nor permutation, read where it lies (L2)
  const bool direct = a.x_span == 0;
  if (!direct)
    for (int j = 0; j < parts; ++j) gather_input(a, sm, j, a.mat[j].perm16 != nullptr, 0, a.mat[j].x_len, mean, rstd);
  __syncthreads();
  trace_point(a.trace, 3);

  // A tile whose every split falls in this block's run is one unit of all of K, with no merge
  // (7B's gate+up, 2 splits, 3 units a block: two tiles in three).
  for (int u = u_lo; u < u_hi;) {
    const int tile = u / nks, ks = u % nks;
    const bool whole = nks > 1 && ks == 0 && u + nks <= u_hi;
    L.col = tile * TILE + L.sub * 32;
    float y[2] = {0.f, 0.f};
    for (int j = 0; j < parts; ++j) {
      const Matrix& m = a.mat[j];
      L.x = direct ? static_cast<const half*>(a.x) : sm.xs + j * a.x_span;
      const Part p{};  // no window; scales from global memory
      const int2 range = whole ? make_int2(0, m.n_chunks) : split_range(m, ks, nks);
      float acc[2][4] = {};
      if (L.col < m.n) walk<TILE, SLICES, PAIRS, false>(m, p, Chunks{nullptr, m.chunks, 0}, range.x + slice, range.y, L, acc);
      y[j] = slice_sums<TILE, SLICES>(sm, L, slice, acc);
    }
    trace_point(a.trace, 4);
    finish<TILE>(a, 0, tile, tile, whole ? 0 : ks, whole ? 1 : nks, y);
    u += whole ? nks : 1;
  }
}

// W [k, n] fp16 in the original row order from one chunk of one 32-column tile (a warp): the same
// decode as the GEMV, values scaled in fp32 and rounded once.
template <int B>
__device__ void dequant_chunk(const Matrix& m, int4 meta, int col, int lane, half* out) {
  constexpr int S = chunk_values(B) / 16, W = chunk_words(B);
  const int g = lane / 4, t = lane % 4, col0 = col + 4 * g;
  uint32_t w[W], a[8 * S];
#pragma unroll
  for (int j = 0; j < W; ++j) w[j] = __ldg(m.q_weight + (size_t)(meta.x + j) * m.n + col + lane);
  decode_pairs<B>(w, a, fp16_1024x2());
  float scale[4];
  group_scales(__ldg(m.q_scale + (size_t)meta.z * (m.n / 8) + col0 / 8), m.q_scale_max[meta.z], col0, scale);
#pragma unroll
  for (int s = 0; s < S; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = meta.y + 16 * s + 8 * h + 2 * t + e;
        if (row >= m.k) continue;
        half vals[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const half2 pair = *reinterpret_cast<const half2*>(&a[8 * s + 2 * c + h]);
          vals[c] = __float2half(__half2float(e ? __high2half(pair) : __low2half(pair)) * scale[c]);
        }
        *reinterpret_cast<uint2*>(out + (size_t)m.perm[row] * m.n + col0) = *reinterpret_cast<const uint2*>(vals);
      }
}

__global__ void dequant_kernel(const Matrix m, half* out) {
  const int col = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * 32;
  if (col >= m.n) return;
  const int4 meta = m.chunks[blockIdx.y];
  const int lane = threadIdx.x % 32;
  switch (meta.w) {
    case 2: dequant_chunk<2>(m, meta, col, lane, out); break;
    case 3: dequant_chunk<3>(m, meta, col, lane, out); break;
    case 4: dequant_chunk<4>(m, meta, col, lane, out); break;
    case 5: dequant_chunk<5>(m, meta, col, lane, out); break;
    case 6: dequant_chunk<6>(m, meta, col, lane, out); break;
    case 8: dequant_chunk<8>(m, meta, col, lane, out); break;
    default: break;
  }
}

// The inputs of a multi-token pass in permuted row order, 8 rows of x_len (zero past K and past the
// pass's tokens): the mma's n is the token, so lane g reads row g.
__global__ void gather_tokens_kernel(const half* x, int tokens, int k_in, const int* perm, int x_len, half* xp) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (k >= x_len) return;
  xp[(size_t)t * x_len + k] =
      t < tokens && k < k_in ? x[(size_t)t * k_in + (perm ? perm[k] : k)] : __float2half(0.f);
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

// Shared memory a block of Kernel may use beyond its static arrays, for min_blocks blocks per SM.
template <auto Kernel>
int dynamic_smem_budget(int min_blocks) {
  static int budget = -1;
  if (budget < 0) {
    int dev = 0, per_sm = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    cudaFuncAttributes attr{};
    cudaFuncGetAttributes(&attr, Kernel);
    budget = std::max(0, per_sm / min_blocks - 1024 - (int)attr.sharedSizeBytes) / 16 * 16;  // 1 KB: reserved per block
    if (budget > 48 * 1024)
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, budget);
    else
      budget = 48 * 1024 - (int)attr.sharedSizeBytes;
  }
  return budget;
}

static GemvPlan last_plan{};  // gemv_last_plan()

// The output mode a launch of `splits` K splits runs: a split residual add adds each split's partial
// sums into the fp32 residual stream with atomics (no merge: no second pass, counter or fence); the
// order of the splits' adds varies, so the stream may differ in its last bits from run to run.
// KODKOD_GEMV_ORDERED=1: the ordered merge.
int split_out_mode(const GemvArgs& a, int splits) {
  static const bool ordered = [] { const char* e = std::getenv("KODKOD_GEMV_ORDERED"); return e && e[0] == '1'; }();
  return a.out_mode == kOutResidual && splits > 1 && !ordered ? kOutResidualAtomic : a.out_mode;
}

// The name a launch's blocks are traced under (trace.cuh).
const char* trace_role(const GemvArgs& a, bool multi) {
  return multi ? "tokens" : a.out_mode == kOutGated ? "gate_up" : a.n_mats == 3 ? "qkv" : a.out_mode == kOutFloat ? "head" : "gemv";
}

// Splits of K and resident blocks per SM (2 or 3: the two register budgets) for a launch of `tiles`
// tiles whose smallest matrix has `min_chunks` chunks: 3 blocks per SM for many tiles (where many
// blocks stream weights), else 2 (no spills: better where the grid is small and latency rules);
// split K while the grid fits in one wave of resident blocks and each split keeps at least 20 chunks
// (KODKOD_GEMV_SPLIT_CHUNKS; 20 against 8: 0.5B +7%, 1.5B +1%, 7B the same, with the atomic residual
// adds; so a 0.5B layer's QKV and O projections, 28 chunks, are not split at all). Measured on the
// H100 (docs/performance-log.md): a cost rule that chose splits and 3 blocks per SM to even out
// the SMs' loads was 5% slower at 0.5B and 20% at 7B.
struct Plan {
  int min_blocks, splits;
};

Plan plan_gemv(int tiles, int min_chunks, bool can_split) {
  static const int min_per_split = [] {
    const char* e = std::getenv("KODKOD_GEMV_SPLIT_CHUNKS");
    return e && std::atoi(e) > 0 ? std::atoi(e) : 20;
  }();
  // KODKOD_GEMV_BLOCKS=2 or 3: blocks per SM for every launch, its splits planned with them (an experiment knob)
  static const int forced = [] { const char* e = std::getenv("KODKOD_GEMV_BLOCKS"); return e ? std::atoi(e) : 0; }();
  const int sms = sm_count(), mb = forced == 2 || forced == 3 ? forced : tiles > 2 * sms ? 3 : 2;
  const int most = std::max(1, std::min({kMaxSplits, min_chunks / 4, min_chunks / min_per_split}));
  return {mb, can_split ? std::max(1, std::min(mb * sms / tiles, most)) : 1};
}

template <int TW, int MIN_BLOCKS, bool MULTI = false, bool PAIRS = false>
void launch_gemv(const GemvArgs& a, int splits, cudaStream_t stream) {
  constexpr int TILE = TW * 32;
  const bool gated = a.out_mode == kOutGated;
  const int parts = gated ? 2 : 1;
  int blocks = 0, most_chunks = 0;
  for (int i = 0; i < a.n_mats; ++i) {
    if (!gated || i == 0) blocks += tiles(a.mat[i], TILE);
    most_chunks = std::max(most_chunks, a.mat[i].n_chunks);
  }
  while (splits > 1 && (long long)blocks * splits * TILE * parts > a.partials_size) --splits;
  GemvArgs args = a;
  args.out_mode = split_out_mode(a, splits);
  // Shared memory: the input rows of one split (its chunks hold at most 32 each), scale groups per
  // split with a margin for uneven splits; the rest is the weight window, which holds a block's rows
  // where it can (each part's share of its packed rows, a margin for chunk boundaries and uneven bit
  // widths; rows beyond it are read from global memory after an L2 prefetch).
  args.x_span = std::min(part_stride(a), ((most_chunks + splits - 1) / splits + 1) * 32);
  args.scale_groups = 0;
  int rows = 0;
  for (int i = 0; i < (gated ? 2 : a.n_mats); ++i) {
    args.scale_groups = std::max(args.scale_groups, (a.mat[i].groups * 5 / 4 + splits - 1) / splits + 2);
    rows = std::max(rows, ((a.mat[i].rows * 5 / 4 + splits - 1) / splits + 8) * TILE * (a.mat[i].q_scale ? 4 : 2));
  }
  args.window = 0;
  const int room = std::max(0, dynamic_smem_budget<gemv_kernel<TW, MIN_BLOCKS, MULTI, PAIRS>>(MIN_BLOCKS) -
                                  (int)smem_bytes(args, TILE, MULTI));
  args.window = std::min(rows * parts, room) / (16 * parts) * (16 * parts);
  args.trace = trace_region(trace_role(a, MULTI), blocks * splits);
  args.early = !MULTI && pdl_early_gemv(a.k_in);
  if (!MULTI) last_plan = GemvPlan{splits, MIN_BLOCKS, blocks * splits, false};
  launch(gemv_kernel<TW, MIN_BLOCKS, MULTI, PAIRS>, dim3(blocks, splits), dim3(kThreads), smem_bytes(args, TILE, MULTI), stream, args);
}

// gemv_units_kernel: one block per resident slot (3 per SM), units of `splits` K splits per tile.
// False where it does not fit (workspace, shared memory): the caller launches gemv_kernel.
template <int TW, bool PAIRS>
bool launch_units(const GemvArgs& a, int splits, cudaStream_t stream) {
  constexpr int TILE = TW * 32, MB = 3;
  const int parts = a.out_mode == kOutGated ? 2 : 1, tiles_n = tiles(a.mat[0], TILE);
  if (splits > 1 && ((long long)tiles_n * splits * TILE * parts > a.partials_size || tiles_n > a.counters_size)) return false;
  GemvArgs args = a;
  args.out_mode = split_out_mode(a, splits);
  bool direct = a.in_mode == kInHalf && a.k_in % 8 == 0;  // the input read in place: x_span 0
  for (int j = 0; j < parts; ++j) direct &= a.mat[j].perm16 == nullptr && a.mat[j].x_len <= a.k_in;
  args.x_span = direct ? 0 : part_stride(a);
  args.scale_groups = 0;
  args.window = 0;
  const size_t smem = smem_bytes(args, TILE, false);
  if ((int)smem > dynamic_smem_budget<gemv_units_kernel<TW, MB, PAIRS>>(MB)) return false;
  const int blocks = std::min(tiles_n * splits, MB * sm_count());
  args.trace = trace_region(trace_role(a, false), blocks);
  args.early = pdl_early_gemv(a.k_in);
  last_plan = GemvPlan{splits, MB, blocks, true};
  launch(gemv_units_kernel<TW, MB, PAIRS>, dim3(blocks), dim3(kThreads), smem, stream, args, splits);
  return true;
}

void gemv(const GemvArgs& a, cudaStream_t stream) {
  // Wide tiles (128 columns) for very wide outputs (the head): fewer blocks repeat the prologue.
  const bool wide = a.out_mode != kOutGated && a.n_mats == 1 && a.mat[0].n_out >= 32 * 1024;
  int tiles_total = 0, min_chunks = 1 << 30;
  for (int i = 0; i < (a.out_mode == kOutGated ? 1 : a.n_mats); ++i) tiles_total += tiles(a.mat[i], wide ? 128 : 32);
  for (int i = 0; i < a.n_mats; ++i) min_chunks = std::min(min_chunks, a.mat[i].n_chunks);
  const bool can_split = a.partials && a.counters && tiles_total <= a.counters_size;
  Plan plan = plan_gemv(tiles_total, min_chunks, can_split);
  // Two chunks per warp turn (PAIRS) where a warp walks many chunks. A/B on the H100 (tok/s 0.5B /
  // 1.5B / 7B): pairs nowhere 1,184-1,185 / 649-650 / 213; from 4 chunks a warp 1,199 / 646 / 232;
  // from 6 1,197-1,200 / 647 / 232; from 10 1,198 / 657 / 230 (8 and 10 choose the same launches in
  // these shapes). Few chunks a warp: more registers, too little latency to hide. An experiment knob:
  // KODKOD_GEMV_PAIR_CHUNKS, the least chunks per warp for pairs.
  static const int pair_chunks = [] {
    const char* e = std::getenv("KODKOD_GEMV_PAIR_CHUNKS");
    return e && std::atoi(e) > 0 ? std::atoi(e) : 8;
  }();
  // The units kernel, for one matrix or gate and up: (1) more tiles than one wave of resident
  // blocks (3 per SM); (2) EXL2 tiles of one matrix that each stream at least 256 KB (7B's down
  // projection: 303 KB tiles, 3.99 -> 3.62 ms a step; 1.5B's, 143 KB, lost 2.5% that way; dense
  // fp16 tiles not measured yet, so they stay on the wave kernel: KODKOD_GEMV_LONG_DENSE=1 puts
  // them there too, an experiment knob), with up to 16 K splits. K splits: the least work per
  // block (ceil(tiles * s / slots) / s tiles), the fewest on ties; pairs from 4 chunks per warp and
  // unit. KODKOD_GEMV_UNITS=0: gemv_kernel's waves (read per launch, so that tests can take both
  // paths); KODKOD_GEMV_UNITS=g: every gate+up on the units kernel, split like long tiles (an
  // experiment knob: 1.5B's 280 gate+up tiles on 396 slots leave SMs with 2 and 3 blocks).
  const char* units_env = std::getenv("KODKOD_GEMV_UNITS");
  const char units_mode = units_env ? units_env[0] : '1';
  const bool gated_units = units_mode == 'g' && a.out_mode == kOutGated;
  const int slots = 3 * sm_count();
  static const bool long_dense = [] { const char* e = std::getenv("KODKOD_GEMV_LONG_DENSE"); return e && e[0] == '1'; }();
  const bool long_tiles = a.n_mats == 1 && a.out_mode != kOutGated && tiles_total <= slots && (a.mat[0].q_scale || long_dense) &&
                          (long long)a.mat[0].rows * (wide ? 128 : 32) * (a.mat[0].q_scale ? 4 : 2) >= 256 * 1024;
  if (units_mode != '0' && (a.out_mode == kOutGated || a.n_mats == 1) &&
      ((plan.min_blocks == 3 && tiles_total > slots) || long_tiles || gated_units)) {
    const auto units_each = [&](int s) { return (long long)(tiles_total * s + slots - 1) / slots; };  // per block, at most
    int splits = 1;
    for (int s = 2; s <= (long_tiles || gated_units ? 16 : 4) && can_split && min_chunks / s >= 8; ++s)
      if (units_each(s) * splits < units_each(splits) * s) splits = s;  // units_each(s) / s tiles of work
    const bool pairs = min_chunks / splits / (wide ? 2 : 8) >= 4;
    if (wide ? (pairs ? launch_units<4, true>(a, splits, stream) : launch_units<4, false>(a, splits, stream))
             : (pairs ? launch_units<1, true>(a, splits, stream) : launch_units<1, false>(a, splits, stream)))
      return;
  }
  const bool two = min_chunks / plan.splits / (wide ? 2 : 8) >= pair_chunks;  // 8 / TW warps share a tile's chunks
  if (wide) {
    if (plan.min_blocks == 3)
      two ? launch_gemv<4, 3, false, true>(a, plan.splits, stream) : launch_gemv<4, 3>(a, plan.splits, stream);
    else
      two ? launch_gemv<4, 2, false, true>(a, plan.splits, stream) : launch_gemv<4, 2>(a, plan.splits, stream);
  } else {
    if (plan.min_blocks == 3)
      two ? launch_gemv<1, 3, false, true>(a, plan.splits, stream) : launch_gemv<1, 3>(a, plan.splits, stream);
    else
      two ? launch_gemv<1, 2, false, true>(a, plan.splits, stream) : launch_gemv<1, 2>(a, plan.splits, stream);
  }
}

GemvPlan gemv_last_plan() { return last_plan; }

void gemv_tokens(const Matrix& m, const half* x, int tokens, int k_in, half* out, half* scratch,
                 cudaStream_t stream) {
  for (int t0 = 0; t0 < tokens; t0 += kPassTokens) {  // passes of 8: the weights are read once per pass
    const int n = std::min(kPassTokens, tokens - t0);
    gather_tokens_kernel<<<dim3((m.x_len + 255) / 256, kPassTokens), 256, 0, stream>>>(
        x + (size_t)t0 * k_in, n, k_in, m.perm, m.x_len, scratch);
    GemvArgs a{};
    a.mat[0] = m;
    a.n_mats = 1;
    a.in_mode = kInHalf;
    a.x = scratch;
    a.k_in = k_in;
    a.out_mode = kOutHalf;
    a.out[0] = out + (size_t)t0 * m.n_out;
    a.tokens = n;
    launch_gemv<1, 2, true>(a, 1, stream);
  }
}

void dequant(const Matrix& m, half* out, cudaStream_t stream) {
  const int warps = 4;
  const dim3 grid((m.n / 32 + warps - 1) / warps, m.n_chunks);
  dequant_kernel<<<grid, warps * 32, 0, stream>>>(m, out);
}

}  // namespace kodkod
