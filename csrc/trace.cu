// The host side of trace.cuh: one buffer, the names of the launches recorded into it.
#include "kodkod.h"
#include "trace.cuh"

#include <string>
#include <vector>

namespace kodkod {
namespace {

struct TraceLog {
  unsigned long long* buf = nullptr;  // [kTraceSlots, kTraceBlocks, kTracePoints]
  std::vector<std::string> names;     // per launch, in launch order
};

TraceLog& trace_log() {
  static TraceLog log;
  return log;
}

constexpr size_t kTraceBytes = sizeof(unsigned long long) * kTraceSlots * kTraceBlocks * kTracePoints;

}  // namespace

unsigned long long* trace_region(const char* name, int blocks) {
#ifdef KODKOD_TRACE
  TraceLog& t = trace_log();
  if (!t.buf) {
    if (cudaMalloc(&t.buf, kTraceBytes) != cudaSuccess) return t.buf = nullptr;
    cudaMemset(t.buf, 0, kTraceBytes);
  }
  if ((int)t.names.size() >= kTraceSlots) return nullptr;
  t.names.push_back(std::string(name) + "/" + std::to_string(blocks));
  return t.buf + (t.names.size() - 1) * (size_t)kTraceBlocks * kTracePoints;
#else
  (void)name;
  (void)blocks;
  return nullptr;
#endif
}

void trace_reset() {
  TraceLog& t = trace_log();
  t.names.clear();
  if (t.buf) cudaMemset(t.buf, 0, kTraceBytes);
}

bool trace_read(unsigned long long* host, int slots) {
  TraceLog& t = trace_log();
  if (!t.buf) return false;
  const int n = slots < kTraceSlots ? slots : kTraceSlots;
  return cudaMemcpy(host, t.buf, sizeof(unsigned long long) * n * kTraceBlocks * kTracePoints,
                    cudaMemcpyDeviceToHost) == cudaSuccess;
}

int trace_launches() { return (int)trace_log().names.size(); }

const char* trace_name(int launch) { return trace_log().names.at(launch).c_str(); }

}  // namespace kodkod
