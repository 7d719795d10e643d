// The CUDA caching allocator's figures for src/model/cuda_memory.rs: bytes
// allocated to tensors and bytes reserved from the driver (cached included)
// on one device, through c10's device-allocator interface (no CUDA headers:
// the same code in every build). Returns -1 where there is no CUDA allocator
// (a binary without libtorch_cuda), where it is not initialised yet (no CUDA
// use so far), and on any C++ exception: nothing throws across the C boundary.
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

extern "C" int ss_cuda_allocator_bytes(int device, int64_t* allocated, int64_t* reserved) {
  try {
    auto* allocator = dynamic_cast<c10::DeviceAllocator*>(c10::GetAllocator(c10::DeviceType::CUDA));
    if (allocator == nullptr || !allocator->initialized()) {
      return -1;
    }
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *reserved = stats.reserved_bytes[all].current;
    return 0;
  } catch (...) {
    return -1;
  }
}
