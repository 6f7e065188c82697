// Phase timestamps inside kernels, for finding where a decode step's time goes
// (benchmarks/trace_step.py). Only a build with KODKOD_TRACE defined records anything
// (`KODKOD_TRACE=1` when engine/kernels.py builds; it is part of the build key); in every
// other build trace_region() is nullptr and trace_point() compiles to nothing.
//
// Each launch gets a region of kTraceBlocks x kTracePoints timestamps (the global timer, in ns,
// comparable across SMs); thread 0 of each block writes point p when it passes it. A graph
// captured after trace_reset() keeps its launches' regions, so every replay rewrites them.
#pragma once
#include "kodkod.h"

namespace kodkod {

// Where this launch records its points, or nullptr (not a trace build, or every slot used).
// The first call allocates the buffer: make it before any graph capture. (trace.cu)
unsigned long long* trace_region(const char* name, int blocks);

__device__ __forceinline__ void trace_point(unsigned long long* region, int point) {
#ifdef KODKOD_TRACE
  if (!region || threadIdx.x != 0) return;
  const int b = blockIdx.x + blockIdx.y * gridDim.x;
  if (b >= kTraceBlocks) return;
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  region[b * kTracePoints + point] = t;
#endif
}

}  // namespace kodkod
