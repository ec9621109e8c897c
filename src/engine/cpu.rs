//! How the process uses the CPU, set once at start-up before candle's pools exist. Two things in
//! candle 0.11.1 cost real time on a laptop's few cores: `get_num_threads()`, asked on every
//! matmul, re-reads /proc/cpuinfo unless `RAYON_NUM_THREADS` is set (23 % of a built-in LoRA step
//! in perf); and element-wise ops run on a second pool whose threads spin-wait beside the rayon
//! pool the GEMMs use. (Keeping glibc from trimming its heap cut page faults by a quarter but
//! showed no clear time gain, and risks a larger RSS on SD-sized models; not done.)

/// Fixes the thread count once (`RAYON_NUM_THREADS`, so nothing re-reads /proc/cpuinfo), runs
/// candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`: GEMMs, convolutions
/// and our fused ops keep every core). A value the user set is kept. Measured with `lora-studio bench` (docs/performance.md).
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
}
