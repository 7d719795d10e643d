//! The CUDA caching allocator's figures for one device: bytes allocated to
//! tensors and bytes reserved from the driver (what the allocator caches
//! included), from the C++ shim `csrc/cuda_memory.cpp` (built by build.rs in
//! every build). In a binary without libtorch_cuda, and before the allocator's
//! first use, there are no figures.
//!
//! The one `unsafe` is the shim's call: it takes two out-pointers to locals
//! and catches every C++ exception.

/// Allocated and reserved bytes of the caching allocator on CUDA device
/// `device`, or None (no CUDA allocator in this binary, or none on it yet).
/// Cheap (the allocator's own counters under its lock); callable from any thread.
pub fn allocator_bytes(device: u32) -> Option<(u64, u64)> {
    let device = i32::try_from(device).ok()?;
    read(device)
}

#[allow(unsafe_code)]
fn read(device: i32) -> Option<(u64, u64)> {
    unsafe extern "C" {
        fn ss_cuda_allocator_bytes(device: i32, allocated: *mut i64, reserved: *mut i64) -> i32;
    }
    let (mut allocated, mut reserved) = (0i64, 0i64);
    // SAFETY: the shim writes only through the two pointers, to these locals,
    // and returns non-zero (touching nothing) on any error.
    let rc = unsafe { ss_cuda_allocator_bytes(device, &mut allocated, &mut reserved) };
    (rc == 0).then(|| (allocated.max(0) as u64, reserved.max(0) as u64))
}

#[cfg(test)]
mod tests {
    /// On a machine without a GPU (or before any CUDA use) there are no
    /// figures, never zeros, and asking cannot crash the process.
    #[test]
    fn no_figures_without_an_initialised_cuda_allocator() {
        if tch::Cuda::is_available() {
            return; // a GPU host: tests/gpu.rs and make gpu-check read real figures
        }
        assert_eq!(super::allocator_bytes(0), None);
        assert_eq!(super::allocator_bytes(u32::MAX), None);
    }
}
