// Programmatic dependent launch (Hopper and newer): a kernel may start while the one before it
// in the stream is still running. Everything it does before pdl_wait() must not read what the
// previous kernel writes (weights, tables and indices are fine) and must write nothing but shared
// memory; pdl_trigger() lets the next kernel launch and start its own early part. A kernel
// triggers after its wait, or on entry (attention, sampling, the embedding, and the GEMVs that
// pdl_early_gemv picks): then the next kernel's blocks launch once all of this one's have
// started, while this one still waits and runs; their pdl_wait() still waits for this kernel to
// complete (and, through this kernel's wait, for every kernel before). Older GPUs launch normally
// and both calls are no-ops.
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

// Which launches trigger on entry. A/B on the H100 (tok/s, 0.5B / 0.5B fp16 / 1.5B / 7B): after
// the wait everywhere 1,283 / 874 / 660 / 274; on entry everywhere 1,337 / 951 / 642 / 265 (each
// kernel lets the next launch a few us sooner, but 1.5B and 7B lose 3%); attention, sampling and
// the embedding alone 1,283 / 874 / 659 / 275; those and the GEMVs of inputs up to 1,024 rows
// 1,338 / 935 / 659 / 274 (the HTTP median on the fp16 0.5B: 49.2 -> 45.1 ms).
// KODKOD_PDL_EARLY_K: the most input rows of a GEMV that triggers on entry (-1: none).
inline bool pdl_early_gemv(int k) {
  static const int most = [] { const char* e = std::getenv("KODKOD_PDL_EARLY_K"); return e ? std::atoi(e) : 1024; }();
  return k <= most;
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
