// Programmatic dependent launch (Hopper and newer): a kernel may start while the one before it
// in the stream is still running. Everything it does before pdl_wait() must not read what the
// previous kernel writes (weights, tables and indices are fine) and must write nothing but shared
// memory; pdl_trigger() lets the next kernel launch and start its own early part. A kernel
// triggers after its wait, or on entry where the launcher says so (pdl_early_*): then the next
// kernel's blocks launch once all of this one's have started, while this one still waits and
// runs; its own pdl_wait() still waits for this kernel to complete (and, through this kernel's
// wait, for every kernel before). Older GPUs launch normally and both calls are no-ops.
#pragma once
#include <cstdlib>
#include <cuda_runtime.h>

namespace kodkod {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
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

inline bool pdl_enabled() {
  static int enabled = -1;
  if (enabled < 0) {
    int dev = 0, major = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    const char* env = std::getenv("KODKOD_PDL");
    enabled = major >= 9 && !(env && env[0] == '0');
  }
  return enabled;
}

// Which launches trigger on entry. Measured on the H100 with every kernel triggering on entry (tok/s,
// 0.5B / 0.5B fp16 / 1.5B / 7B): 1,281 -> 1,336 / 872 -> 953 / 662 -> 641 / 274 -> 266.
// KODKOD_PDL_EARLY_KB: GEMV launches of at most this many KB of weights (-1: none);
// KODKOD_PDL_EARLY_SMALL=1: attention, sampling and the embedding lookup.
// KODKOD_PDL_EARLY_K: GEMV launches whose input has at most this many rows.
inline bool pdl_early_gemv(long long weight_bytes, int k) {
  static const long long most = [] { const char* e = std::getenv("KODKOD_PDL_EARLY_KB"); return e ? std::atoll(e) : -1LL; }();
  static const int most_k = [] { const char* e = std::getenv("KODKOD_PDL_EARLY_K"); return e ? std::atoi(e) : -1; }();
  return (most >= 0 && weight_bytes <= most * 1024) || k <= most_k;
}

inline bool pdl_early_small() {
  static const bool early = [] { const char* e = std::getenv("KODKOD_PDL_EARLY_SMALL"); return e && e[0] == '1'; }();
  return early;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace kodkod
