//! Winograd F(2×2, 3×3) (Lavin & Gray, 2015): a 3×3 stride-1 convolution as 16 GEMMs over
//! transformed 4×4 input tiles, 2.25× fewer multiplies than im2col's one GEMM. `conv.rs` uses it
//! for the forward pass and the input gradient of the layers where it measured faster (`wins`).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::engine::kernels::conv::ConvDims;
use crate::engine::kernels::cpu::{FrozenRows, Shared, Widen, for_each_item, gemm, split_threads};

/// Elements of a transformed tile (4×4): one GEMM each.
const E: usize = 16;

/// Most bytes of one block's transformed input tiles (its GEMM products take about as much): each
/// GEMM's share is 1 MB, about an L2 cache, and the buffers stay in glibc's heap (as
/// `COL_TILE_BYTES` in `conv.rs`). Against 4 MB blocks (51 tiles a GEMM at 1280 channels, which
/// re-reads the transformed kernel too often), SD 1.5 / SDXL layers at 2 threads: 1280 channels at
/// 32×32 0.97–1.04 → 1.25× im2col's speed, 640 at 64×64 1.5 → 1.8×, the rest alike.
const BLOCK_BYTES: usize = 16 << 20;

/// Whether F(2×2, 3×3) is faster than im2col for this 3×3 stride-1 convolution, from
/// `conv::tests::winograd_speed` (2 threads): 1.2–1.8× from 32×32 outputs up with 64 channels or
/// more each way; at 16×16 about even at best (640 channels), and slower for 1280 channels (0.75×:
/// transforming the kernel and reading its 16 transforms cost as much as the multiplies saved on
/// 64 tiles, batch 2 alike) or for the few channels of the first and last layers (0.15–0.9×).
pub(super) fn wins(d: ConvDims) -> bool {
    d.c >= 64 && d.o >= 64 && d.ho * d.wo >= 32 * 32
}

/// `x ⋆ k (+ bias)` for `b` images: (b, c, h, w) with a (o, c, 3, 3) kernel, stride 1 and the
/// given zero padding, into (b, o, ho, wo). F(4×4, 3×3) (6×6 tiles, 36 GEMMs) was tried: a
/// further 1.2–1.5× at 32×32 and 64×64 up to 640 channels, slower at 16×16, but its f32 error
/// reached 1e-5 of the output's scale at 320–512 channels (F(2×2): 5e-7), growing with them.
pub(super) fn conv3x3<T: Widen + Send + Sync>(
    d: ConvDims,
    padding: usize,
    b: usize,
    x: &[T],
    k: &FrozenRows<'_, T>,
    bias: Option<&[T]>,
) -> Vec<T> {
    let u = kernel_transform(d, k);
    let tw = d.wo.div_ceil(2);
    let tiles = d.ho.div_ceil(2) * tw;
    // Tiles per block: the transformed input (c × 16 × n) and products (o × 16 × n) each within
    // BLOCK_BYTES.
    let n_block = (BLOCK_BYTES / (E * d.c.max(d.o) * std::mem::size_of::<T>()).max(1)).clamp(1, tiles.max(1));
    let hw = d.ho * d.wo;
    // Several images: one per thread, each with one-thread GEMMs. One image: every thread on the
    // transforms, and the 16 GEMMs one per thread when the threads divide them evenly, else in
    // turn with every thread in each.
    let (parallel, threads) = split_threads(b);
    let per_gemm = !parallel && E.is_multiple_of(threads);
    let gemm_threads = if parallel || per_gemm { 1 } else { threads };
    let image = |(i, out): (usize, &mut [T])| {
        let img = &x[i * d.c * d.h * d.w..(i + 1) * d.c * d.h * d.w];
        let mut v = vec![T::zero(); d.c * E * n_block];
        let mut m = vec![T::zero(); d.o * E * n_block];
        for t0 in (0..tiles).step_by(n_block) {
            let n = n_block.min(tiles - t0);
            let (v, m) = (&mut v[..d.c * E * n], &mut m[..d.o * E * n]);
            let fill = |(ci, v): (usize, &mut [T])| {
                input_tiles(d, padding, &img[ci * d.h * d.w..(ci + 1) * d.h * d.w], (t0, n, tw), v)
            };
            if parallel {
                v.chunks_exact_mut(E * n).enumerate().for_each(fill);
            } else {
                v.par_chunks_exact_mut(E * n).enumerate().for_each(fill);
            }
            // m[o][e][tile] = Σ_c u[o][e][c] · v[c][e][tile], for each e.
            let (v, dst) = (&*v, Shared(m.as_mut_ptr()));
            for_each_item(E, per_gemm, |e| {
                // SAFETY: GEMM e writes only column block e of each row of m, which no other GEMM
                // touches; the views stay inside u (o × 16c), v (c × 16n) and m (o × 16n).
                unsafe {
                    gemm(
                        (d.o, n, d.c),
                        (dst.at(e * n), (E * n) as isize, 1),
                        false,
                        (u[e * d.c..].as_ptr(), (E * d.c) as isize, 1),
                        (v[e * n..].as_ptr(), (E * n) as isize, 1),
                        T::one(),
                        gemm_threads,
                    );
                }
            });
            let m = &*m;
            let emit = |(oi, plane): (usize, &mut [T])| {
                let bias = bias.map_or(T::zero(), |b| b[oi]);
                output_tiles(d, &m[oi * E * n..(oi + 1) * E * n], (t0, n, tw), bias, plane)
            };
            if parallel {
                out.chunks_exact_mut(hw).enumerate().for_each(emit);
            } else {
                out.par_chunks_exact_mut(hw).enumerate().for_each(emit);
            }
        }
    };
    // Every element is written by the output transform (each output pixel lies in one tile).
    let mut out = vec![T::zero(); b * d.o * hw];
    if parallel {
        out.par_chunks_exact_mut(d.o * hw).enumerate().for_each(image);
    } else {
        out.chunks_exact_mut(d.o * hw).enumerate().for_each(image);
    }
    out
}

/// U = G·g·Gᵀ for every (out, in) pair, laid out (o, 16, c) so that each output channel's part is
/// one contiguous chunk; GEMM e reads rows of it with stride 16c. A half-precision kernel is
/// widened a block of rows at a time (`FrozenRows`), so the transform is the same as for the
/// kernel widened beforehand.
fn kernel_transform<T: Widen + Send + Sync>(d: ConvDims, k: &FrozenRows<'_, T>) -> Vec<T> {
    let (c, len) = (d.c, d.o * E * d.c);
    let mut u: Vec<T> = Vec::with_capacity(len);
    let half = (T::one() + T::one()).recip();
    let spare = &mut u.spare_capacity_mut()[..len];
    k.for_each_block(9 * c, |o0, rows| {
        let n = rows.len() / (9 * c);
        spare[o0 * E * c..(o0 + n) * E * c].par_chunks_exact_mut(E * c).zip(rows.par_chunks_exact(9 * c)).for_each(
            |(u, g): (&mut [MaybeUninit<T>], &[T])| {
                for (ci, g) in g.chunks_exact(9).enumerate() {
                    // G·g·Gᵀ with G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]: down each column, then along rows.
                    let by_g = |g0: T, g1: T, g2: T| [g0, (g0 + g1 + g2) * half, (g0 - g1 + g2) * half, g2];
                    let gg: [[T; 4]; 3] = std::array::from_fn(|j| by_g(g[j], g[3 + j], g[6 + j]));
                    for r in 0..4 {
                        for (s, t) in by_g(gg[0][r], gg[1][r], gg[2][r]).into_iter().enumerate() {
                            u[(4 * r + s) * c + ci].write(t);
                        }
                    }
                }
            },
        );
    });
    // SAFETY: `for_each_block` visits all o rows of the kernel, and each row wrote its 16·c entries.
    unsafe { u.set_len(len) };
    u
}

/// V = Bᵀ·d·B of one input channel's tiles `t0..t0 + n` (`tw` tiles a row), into `v` laid out
/// (16, n); d is the 4×4 patch at (2·ty - padding, 2·tx - padding), 0 outside the image.
/// Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
fn input_tiles<T: Widen>(d: ConvDims, padding: usize, plane: &[T], (t0, n, tw): (usize, usize, usize), v: &mut [T]) {
    let by_b = |d0: T, d1: T, d2: T, d3: T| [d0 - d2, d1 + d2, d2 - d1, d1 - d3];
    let p = padding as isize;
    for j in 0..n {
        let (ty, tx) = ((t0 + j) / tw, (t0 + j) % tw);
        let (y0, x0) = (2 * ty as isize - p, 2 * tx as isize - p);
        let mut patch = [[T::zero(); 4]; 4];
        if y0 >= 0 && x0 >= 0 && y0 as usize + 4 <= d.h && x0 as usize + 4 <= d.w {
            for (r, row) in patch.iter_mut().enumerate() {
                let at = (y0 as usize + r) * d.w + x0 as usize;
                row.copy_from_slice(&plane[at..at + 4]);
            }
        } else {
            // A border tile: the padding's zeros, and the last tile's overhang past the output.
            for (r, row) in patch.iter_mut().enumerate() {
                let y = y0 + r as isize;
                if y < 0 || y >= d.h as isize {
                    continue;
                }
                for (s, value) in row.iter_mut().enumerate() {
                    let x = x0 + s as isize;
                    if x >= 0 && x < d.w as isize {
                        *value = plane[y as usize * d.w + x as usize];
                    }
                }
            }
        }
        let bd: [[T; 4]; 4] = std::array::from_fn(|s| by_b(patch[0][s], patch[1][s], patch[2][s], patch[3][s]));
        for r in 0..4 {
            for (s, t) in by_b(bd[0][r], bd[1][r], bd[2][r], bd[3][r]).into_iter().enumerate() {
                v[(4 * r + s) * n + j] = t;
            }
        }
    }
}

/// Y = Aᵀ·m·A (+ bias) of one output channel's tiles `t0..t0 + n`, from `m` laid out (16, n), into
/// its (ho, wo) plane; the last row and column of tiles are clipped when ho or wo is odd.
/// Aᵀ = [1 1 1 0; 0 1 -1 -1].
fn output_tiles<T: Widen>(d: ConvDims, m: &[T], (t0, n, tw): (usize, usize, usize), bias: T, plane: &mut [T]) {
    let by_a = |m0: T, m1: T, m2: T, m3: T| [m0 + m1 + m2, m1 - m2 - m3];
    for j in 0..n {
        let (ty, tx) = ((t0 + j) / tw, (t0 + j) % tw);
        let at = |r: usize, s: usize| m[(4 * r + s) * n + j];
        let am: [[T; 2]; 4] = std::array::from_fn(|s| by_a(at(0, s), at(1, s), at(2, s), at(3, s)));
        for r in 0..2.min(d.ho - 2 * ty) {
            let y = by_a(am[0][r], am[1][r], am[2][r], am[3][r]);
            for (s, value) in y.into_iter().enumerate().take(d.wo - 2 * tx) {
                plane[(2 * ty + r) * d.wo + 2 * tx + s] = value + bias;
            }
        }
    }
}
