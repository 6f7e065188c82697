// Plain C++ view of the kernels: structs of raw pointers and the launchers.
// bindings.cpp turns torch tensors into these; the .cu files never see torch,
// which keeps them quick to compile and usable from any host code.
#pragma once
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace kodkod {

constexpr int kMaxMatrices = 3;  // q, k, v in one launch
constexpr int kDenseBits = 16;   // a chunk-table "bit width" that marks dense fp16 rows

// One weight matrix of a GEMV, stored W[k, n] (input rows, output columns):
// EXL2-packed (q_weight rows in permuted order) or dense fp16 (bits 16, identity order).
// The chunk table cuts the rows into units that decode on their own:
// (first packed row, first value row k0, group or dense row count, bits).
struct Matrix {
  const uint32_t* q_weight;  // EXL2 [R, n] kernel-layout words, dense [K, n] halfs read as words
  const uint32_t* q_scale;   // [G, n/8] 4-bit scale codes (EXL2 only)
  const half* q_scale_max;   // [G]
  const int4* chunks;        // [n_chunks]
  const int* perm;           // [K] x_perm[k] = x[perm[k]]; nullptr: identity
  const uint16_t* perm16;    // the same as 16-bit rows, padded to a multiple of 8 (the GEMV stages it)
  const half* bias;          // [n_out] or nullptr
  int n;                     // row stride in columns (a multiple of 32)
  int n_out;                 // columns that exist
  int n_chunks;
  int rows;                  // packed rows of q_weight (dense: K)
  int groups;                // scale groups (EXL2; 0 for dense)
  int x_len;                 // rows of x the chunks read (K rounded up to whole chunks: a multiple of 16)
  int k;                     // rows that exist (K)
};

enum InputMode { kInHalf = 0, kInRmsNorm = 1, kInLayerNorm = 2 };
// kOutResidualAtomic: set by the launcher for a residual add split over K (each split adds its own).
enum OutputMode { kOutHalf = 0, kOutResidual = 1, kOutGated = 2, kOutAct = 3, kOutFloat = 4, kOutResidualAtomic = 5 };
enum Activation { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

struct GemvArgs {
  Matrix mat[kMaxMatrices];
  int n_mats;
  int in_mode;          // InputMode
  const void* x;        // half [k_in] (kInHalf) or float [k_in] (norms: the residual stream)
  int k_in;
  const half* norm_w;   // norm weight [k_in]
  const half* norm_b;   // LayerNorm bias [k_in]
  float eps;
  int out_mode;         // OutputMode
  int act;              // Activation, for kOutGated / kOutAct
  void* out[kMaxMatrices];  // half [n_out] per matrix; float [n_out] for residual (+=) and float modes
  // fp16 stores put column c at out_index[c]: the permuted order of the next GEMV's input, which
  // then reads it without a gather. nullptr: column c at c.
  const int* out_index;
  // Split-K workspace: blocks that share a column tile leave partial sums here and the last one
  // to finish adds them up in a fixed order. nullptr: no split (each block sums all rows).
  float* partials;
  int partials_size;
  int* counters;  // zeroed once; every launch leaves them zero
  int counters_size;
  int window;                 // set by the launcher: bytes of weight rows a block stages in shared memory
  int scale_groups;           // set by the launcher: scale groups a block stages per part, at most
  unsigned long long* trace;  // trace.cuh (set by the launcher)
  int tokens;                 // set by gemv_tokens: tokens of a multi-token pass
  int x_span;                 // set by the launcher: input rows of one split, at most (a multiple of 8)
  int early;                  // set by the launcher: let the next kernel launch on entry (launch.cuh)
};

void gemv(const GemvArgs& a, cudaStream_t stream);

// What the launcher chose for the last one-token GEMV it launched (for tests and benchmarks):
// K splits, blocks per SM, blocks, and whether the units kernel ran it (a block per resident slot).
struct GemvPlan {
  int splits, min_blocks, blocks;
  bool units;
};
GemvPlan gemv_last_plan();

// The same product for a few tokens at once (1 to kMaxTokens): x [tokens, k_in] fp16 in, out
// [tokens, n_out] fp16 (+ bias); scratch holds 8 x x_len halfs (the inputs of a pass, permuted).
// Weights are read once per pass of 8 tokens.
constexpr int kMaxTokens = 16;
void gemv_tokens(const Matrix& m, const half* x, int tokens, int k_in, half* out, half* scratch, cudaStream_t stream);

// Dequantize one EXL2 matrix to W [k, n] fp16 in the original row order (rows scattered through
// perm), so that a prefill multiplies the activations as they are.
void dequant(const Matrix& m, half* out, cudaStream_t stream);

struct AttentionArgs {
  const half* qkv;        // [heads*d + 2*kv_heads*d]: q, then k, then v of the new token
  half* k_cache;          // this layer's [max_len, kv_heads, d]
  half* v_cache;
  const int* pos;         // device scalar: position of the new token
  const half* cos;        // [table_len, rot_dim] (rotate-half tables, attention scaling folded in)
  const half* sin;
  const half* q_norm;     // per-head RMSNorm weights [d] (Qwen3) or nullptr
  const half* k_norm;
  float norm_eps;
  half* out;              // [heads*d]
  float* scratch;         // [heads, splits, partial_row(d)] partial results: weighted values, max, sum
  int* counters;          // [heads] zeroed once; each launch leaves them zero again
  int heads, kv_heads, d, rot_dim, window, splits;
  int chunk;              // set by the launcher: positions a block stages (attention_chunk)
  int split_len;          // set by the launcher: positions per split where a context exceeds chunk
  float scale;
  unsigned long long* trace;  // trace.cuh (set by the launcher)
};

void decode_attention(const AttentionArgs& a, cudaStream_t stream);
int attention_splits(int max_len, int head_dim);  // splits (and scratch rows per head) a cache needs
// A split's partial result in AttentionArgs::scratch: d weighted values, max, sum, 2 floats of
// padding (16-byte rows). The scratch holds heads * splits of them.
__host__ __device__ inline int partial_row(int d) { return d + 4; }
inline int64_t attention_scratch_floats(int heads, int splits, int d) { return (int64_t)heads * splits * partial_row(d); }

struct SampleArgs {
  const float* logits;       // [vocab]
  int vocab;
  const uint8_t* seen;       // [vocab] tokens of prompt + output (repetition penalty)
  uint8_t* seen_out;         // the same mask, to mark the sampled token; nullptr: leave it
  const float* params;       // device [temperature, penalty, threshold]; threshold: -inf keeps all
  const int64_t* seed;       // device scalar
  int* step;                 // device scalar: draws so far (noise index), incremented
  int64_t* token;            // device scalar: the sampled token
  int* pos;                  // device scalar incremented after the draw, or nullptr
  float* partial;            // [blocks * 2] scratch
  int* counter;              // one int, zeroed once
  unsigned long long* trace; // trace.cuh (set by the launcher)
};

void sample(const SampleArgs& a, cudaStream_t stream);

// Trace builds (trace.cuh): kTracePoints timestamps per block of each launch; forget the launches recorded so far and zero the buffer; copy it out.
constexpr int kTraceSlots = 512, kTraceBlocks = 1024, kTracePoints = 8;
void trace_reset();
bool trace_read(unsigned long long* host, int slots);  // host holds slots x kTraceBlocks x kTracePoints
int trace_launches();
const char* trace_name(int launch);

void embed(const half* table, const int64_t* token, float* out, int hidden, cudaStream_t stream);

// The prompt's T-token forward (prefill.cu): RMSNorm of `rows` rows of x [rows, hidden] into out;
// RoPE of q (in place) and k, with k and v written into the cache rows at device positions.
void rms_norm_rows(const half* x, const half* w, half* out, int rows, int hidden, float eps, cudaStream_t stream);

struct RopeWriteArgs {
  half* q;                      // [tokens, heads, d], rotated in place
  const half* k;                // [tokens, kv_heads, d]
  const half* v;
  const half* cos;              // [tokens, rot_dim]: each token's table row
  const half* sin;
  const int64_t* pos;           // [tokens] cache rows
  half* k_cache;                // this layer's [max_len, kv_heads, d]
  half* v_cache;
  int tokens, heads, kv_heads, d, rot_dim;
};

void rope_write(const RopeWriteArgs& a, cudaStream_t stream);

}  // namespace kodkod
