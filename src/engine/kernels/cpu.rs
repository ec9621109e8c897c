//! How the process uses the CPU, set once at start-up before candle's pools exist. Two things in
//! candle 0.11.1 cost real time on a laptop's few cores: `get_num_threads()`, asked on every
//! matmul, re-reads /proc/cpuinfo unless `RAYON_NUM_THREADS` is set (23 % of a built-in LoRA step
//! in perf); and element-wise ops run on a second pool whose threads spin-wait beside the rayon
//! pool the GEMMs use. And glibc maps every block over its mmap threshold afresh, so the kernel
//! zeroes its pages on each use (an SD 1.5 step allocates convolution-kernel-sized blocks of up
//! to 59 MB per layer; page faults were a tenth of its profile). Also the GEMM call, work
//! splitting, storage access and f32/f64 dispatch our own CPU kernels share.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// Fixes the thread count once (`RAYON_NUM_THREADS`, so nothing re-reads /proc/cpuinfo), runs
/// candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`: GEMMs, convolutions
/// and our fused ops keep every core), and keeps freed blocks for reuse. A value the user set is
/// kept. Measured with `lora-studio bench` (docs/performance.md).
///
/// # Safety
/// Call it first thing in `main`, before any other thread exists (it sets environment variables).
pub unsafe fn configure() {
    reuse_freed_blocks();
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

/// glibc: blocks up to 256 MiB come from the heap and the heap is not trimmed after each free, so
/// a step reuses the last step's pages instead of faulting in zeroed ones. SD 1.5 LoRA step,
/// alternating: page faults 2.96 M -> 1.04 M, 3.99 -> 3.26 s, peak RSS 4067 -> 4035 MiB. (A fixed
/// 32 MiB threshold, tried in session 3, left the largest blocks mapped afresh and gained
/// nothing.) Skipped when the user tunes glibc through the environment.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn reuse_freed_blocks() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    if std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_") || k == "GLIBC_TUNABLES") {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters (an older glibc may refuse one: harmless).
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 256 << 20);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn reuse_freed_blocks() {}

/// An f32 or f64 tensor on the CPU: what our fused kernels take (anything else goes the composed
/// candle way, as on every other device).
pub(crate) fn cpu_float(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && !composed_ops()
}

thread_local! {
    static COMPOSED_OPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs the ops on this thread the way a GPU (or any non-CPU device) runs them: composed candle
/// ops with candle's backward, our CPU kernels and the checkpoint op switched off. It lets the CPU
/// test that path, forward and backward, where no GPU is. `LORA_STUDIO_COMPOSED_OPS=1` does the
/// same for a whole process.
pub fn use_composed_ops_on_this_thread(on: bool) {
    COMPOSED_OPS.with(|c| c.set(on));
}

/// Whether our CPU kernels are switched off here (see `use_composed_ops_on_this_thread`).
pub fn composed_ops() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    COMPOSED_OPS.with(|c| c.get())
        || *FROM_ENV.get_or_init(|| std::env::var_os("LORA_STUDIO_COMPOSED_OPS").is_some_and(|v| v == "1"))
}

/// Runs `$body` with the type `$t` standing for `$dtype`'s element type, f32 or f64: the one place
/// our generic kernels are instantiated. Any other dtype is an error naming `$op` (the caller
/// returns `candle_core::Result`). A new storage comes back as `$t::to_cpu_storage_owned(vec)`.
macro_rules! float_dispatch {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: f32 or f64 expected, not {other:?}", $op),
        }
    };
}
pub(crate) use float_dispatch;

/// The dtype two storages share, for an op that takes both; an error naming `op` if they differ.
pub(crate) fn same_dtype(a: &CpuStorage, b: &CpuStorage, op: &str) -> candle_core::Result<DType> {
    if a.dtype() != b.dtype() {
        candle_core::bail!("{op}: inputs of one dtype expected, got {:?} and {:?}", a.dtype(), b.dtype());
    }
    Ok(a.dtype())
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

/// Runs `f` on the elements of several contiguous CPU tensors at once (a backward pass's inputs).
pub(crate) fn with_cpu_slices<T: WithDType, R, const N: usize>(
    tensors: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[T]; N]) -> R,
) -> candle_core::Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("{op}: a tensor is not on the CPU");
        };
        slices.push(contiguous_slice::<T>(cpu, layout, op)?);
    }
    let slices: [&[T]; N] = slices.try_into().unwrap_or_else(|_| unreachable!("one slice per tensor"));
    Ok(f(slices))
}

/// What our kernels compute in (f32, f64), and how a half-precision frozen weight widens to it.
pub(crate) trait Widen: WithDType + Float {
    fn widen_f16(src: &[half::f16], dst: &mut [Self]);
    fn widen_bf16(src: &[half::bf16], dst: &mut [Self]);
    fn narrow_f16(src: &[Self], dst: &mut [half::f16]);
    fn narrow_bf16(src: &[Self], dst: &mut [half::bf16]);
}

impl Widen for f32 {
    fn widen_f16(src: &[half::f16], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn widen_bf16(src: &[half::bf16], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn narrow_f16(src: &[Self], dst: &mut [half::f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    fn narrow_bf16(src: &[Self], dst: &mut [half::bf16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
}

impl Widen for f64 {
    fn widen_f16(src: &[half::f16], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_to_f64_slice(src, dst)
    }
    fn widen_bf16(src: &[half::bf16], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_to_f64_slice(src, dst)
    }
    fn narrow_f16(src: &[Self], dst: &mut [half::f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f64_slice(dst, src)
    }
    fn narrow_bf16(src: &[Self], dst: &mut [half::bf16]) {
        half::slice::HalfFloatSliceExt::convert_from_f64_slice(dst, src)
    }
}

/// Elements per parallel chunk of a whole-tensor conversion.
const CONVERT_CHUNK: usize = 1 << 16;

/// `f(src chunk, dst chunk)` over two equally long slices, in parallel.
fn convert_par<S: Sync, D: Send + Copy + num_traits::Zero>(src: &[S], f: fn(&[S], &mut [D])) -> Vec<D> {
    let mut out = vec![D::zero(); src.len()];
    out.par_chunks_mut(CONVERT_CHUNK).zip(src.par_chunks(CONVERT_CHUNK)).for_each(|(d, s)| f(s, d));
    out
}

/// A CPU tensor's elements as a new `Vec<T>`: widened in parallel when stored in half precision,
/// else copied (it must already be `T`).
pub(crate) fn to_vec_widened<T: Widen>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("a CPU op got a tensor on another device");
    };
    let name = "widen";
    Ok(match cpu.dtype() {
        DType::F16 => convert_par(contiguous_slice::<half::f16>(cpu, layout, name)?, T::widen_f16),
        DType::BF16 => convert_par(contiguous_slice::<half::bf16>(cpu, layout, name)?, T::widen_bf16),
        _ => contiguous_slice::<T>(cpu, layout, name)?.to_vec(),
    })
}

/// `v` as a CPU tensor of `dtype`: `T` itself, or narrowed to f16 / bf16 in parallel (candle's
/// cast runs on one thread).
pub(crate) fn from_vec_narrowed<T: Widen>(
    v: Vec<T>,
    dtype: DType,
    shape: &Shape,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    match dtype {
        DType::F16 => Tensor::from_vec(convert_par(&v, T::narrow_f16), shape, device),
        DType::BF16 => Tensor::from_vec(convert_par(&v, T::narrow_bf16), shape, device),
        _ => Tensor::from_vec(v, shape, device)?.to_dtype(dtype),
    }
}

/// Runs `f` on a frozen CPU weight as a `FrozenRows` operand (see there).
pub(crate) fn with_frozen_rows<T: Widen, R>(
    t: &Tensor,
    f: impl FnOnce(FrozenRows<'_, T>) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("a CPU op got a tensor on another device");
    };
    Ok(f(FrozenRows::of(cpu, layout, "a CPU op")?))
}

/// A frozen weight matrix (rows × cols, row-major, contiguous) as a GEMM operand: used in place
/// when stored as `T`; stored in half precision, it is widened a block of rows at a time into a
/// buffer that stays in cache while the GEMM reads it. So a half-precision weight costs no f32 copy
/// of the layer and no extra pass over memory, only the conversion itself.
pub(crate) enum FrozenRows<'a, T> {
    Same(&'a [T]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
}

/// Bytes of one widened block (at least 256 rows). Measured on an SD 1.5 step against our f32 one
/// (docs/performance.md): 2 MB blocks cost 1.29×, 16 MB 1.18×, whole layers 1.3×: small blocks make
/// many small GEMMs that re-pack the other operand, large ones leave the cache.
const WIDEN_BLOCK_BYTES: usize = 16 << 20;

impl<'a, T: Widen> FrozenRows<'a, T> {
    pub(crate) fn of(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<Self> {
        Ok(match s.dtype() {
            DType::F16 => Self::F16(contiguous_slice(s, l, op)?),
            DType::BF16 => Self::Bf16(contiguous_slice(s, l, op)?),
            _ => Self::Same(contiguous_slice(s, l, op)?),
        })
    }

    /// Calls `f(first_row, block)` over the whole matrix: once with all of it when it is stored as
    /// `T`, else in blocks of whole rows widened to `T`.
    pub(crate) fn for_each_block(&self, cols: usize, mut f: impl FnMut(usize, &[T])) {
        fn blocks<H: Copy + Sync, T: Widen>(
            src: &[H],
            cols: usize,
            convert: fn(&[H], &mut [T]),
            f: &mut dyn FnMut(usize, &[T]),
        ) {
            let rows = src.len() / cols.max(1);
            if rows == 0 {
                return f(0, &[]); // as an empty matrix stored as `T` would be
            }
            let per_block = (WIDEN_BLOCK_BYTES / (cols.max(1) * std::mem::size_of::<T>())).max(256).min(rows.max(1));
            let mut buf = vec![T::zero(); per_block * cols];
            for first in (0..rows).step_by(per_block) {
                let n = per_block.min(rows - first) * cols;
                let (dst, src) = (&mut buf[..n], &src[first * cols..first * cols + n]);
                // On the calling thread: a block converts in far less time than waking the pool.
                convert(src, dst);
                f(first, dst);
            }
        }
        match self {
            Self::Same(w) => f(0, w),
            Self::F16(w) => blocks(w, cols, T::widen_f16, &mut f),
            Self::Bf16(w) => blocks(w, cols, T::widen_bf16, &mut f),
        }
    }
}

/// `t` in `dtype`, a whole copy: a half-precision CPU tensor widened in parallel, anything else by
/// candle's cast (a no-op when the dtype is already right). For the few places that need a frozen
/// layer's weight in full (adapter kinds whose change depends on it, candle's fallback ops); the
/// GEMMs read half-precision weights through `FrozenRows` instead.
pub(crate) fn widen_to(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if !(is_half(t) && t.device().is_cpu() && matches!(dtype, DType::F32 | DType::F64)) {
        return t.to_dtype(dtype);
    }
    float_dispatch!(dtype, "widen", |T| Tensor::from_vec(to_vec_widened::<T>(t)?, t.shape(), t.device()))
}

/// Whether a tensor is stored in half precision (a frozen weight our ops widen as they read it).
pub fn is_half(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F16 | DType::BF16)
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
