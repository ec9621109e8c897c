//! How the process uses the CPU, set once at start-up before candle's pools exist: thread counts
//! and the allocator. Three things in candle 0.11.1 / glibc cost real time on a laptop's few cores:
//! `get_num_threads()`, asked on every matmul, re-reads /proc/cpuinfo unless `RAYON_NUM_THREADS`
//! is set (23 % of a built-in LoRA step in perf); element-wise ops run on a second pool whose
//! threads spin-wait beside the rayon pool the GEMMs use; and glibc hands freed activations back to
//! the kernel, so every step page-faults them in again (~10 % of a step in perf).

/// Fixes the thread count once (`RAYON_NUM_THREADS`, so nothing re-reads /proc/cpuinfo), runs
/// candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`: GEMMs, convolutions
/// and our fused ops keep every core), and keeps freed memory for reuse. A value the user set is
/// kept. Measured with `lora-studio bench` (docs/performance.md).
///
/// # Safety
/// Call it first thing in `main`, before any other thread exists (it sets environment variables).
pub unsafe fn configure() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller promises no other thread is running yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    keep_freed_memory();
}

/// glibc: serve large blocks from the heap (up to its 32 MiB ceiling for mmap'd blocks) and do not
/// trim the heap after each free, so a training step reuses the last step's pages instead of
/// faulting in fresh zeroed ones. Peak memory is unchanged (the same blocks are reused).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some() {
        return; // the user tuned glibc themselves
    }
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
