//! How the process uses the CPU, set once at start-up before candle's pools exist. Two things in
//! candle 0.11.1 cost real time on a laptop's few cores: `get_num_threads()`, asked on every
//! matmul, re-reads /proc/cpuinfo unless `RAYON_NUM_THREADS` is set (23 % of a built-in LoRA step
//! in perf); and element-wise ops run on a second pool whose threads spin-wait beside the rayon
//! pool the GEMMs use. (Keeping glibc from trimming its heap cut page faults by a quarter but
//! showed no clear time gain, and risks a larger RSS on SD-sized models; not done.) Also the GEMM
//! call, work splitting and storage access our own CPU kernels share.

use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

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

/// A raw pointer that worker threads may share; every user writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    // A method, not the field: a closure would capture the bare (unshareable) pointer field.
    /// # Safety
    /// `offset` must stay inside the buffer.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

/// A strided matrix view: (pointer, row stride, column stride).
pub(crate) type View<T> = (*const T, isize, isize);

/// `dst = alpha·dst + beta·(a · b)` (`alpha` read only when `accumulate`), over strided views.
///
/// # Safety
/// Every view must address memory valid for the given sizes and strides; `dst` must not alias
/// `a` or `b`, and no other thread may touch the part of `dst` written.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: 'static + Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, isize, isize),
    accumulate: bool,
    a: View<T>,
    b: View<T>,
    beta: T,
    threads: usize,
) {
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            accumulate,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            T::one(),
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Work items run in parallel when there are enough of them for every thread; otherwise they run
/// in turn, each GEMM using all threads.
pub(crate) fn split_threads(items: usize) -> (bool, usize) {
    let threads = candle_core::utils::get_num_threads().max(1);
    if items >= threads { (true, 1) } else { (false, threads) }
}

pub(crate) fn for_each_item(items: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    if parallel {
        (0..items).into_par_iter().for_each(f);
    } else {
        (0..items).for_each(f);
    }
}

/// A contiguous CPU storage's elements, for our ops' `cpu_fwd` (`op` names the op in the error).
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Runs `f` on a CPU tensor's elements, in place (copied first only if not contiguous).
pub(crate) fn with_cpu_data<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("a CPU op got a tensor on another device");
    };
    Ok(f(contiguous_slice::<T>(cpu, layout, "a CPU op")?))
}
