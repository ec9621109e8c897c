//! Blend several LoRA adapters at chosen weights into one adapter of a chosen rank.
//! The exact truncated SVD of ΔW = Σ cᵢ·Uᵢ·Vᵢ comes from QR of the stacked factors plus an SVD
//! of a small R×R core, so ΔW (out × n, possibly huge) is never formed.

use anyhow::{Context, bail, ensure};
use candle_core::{DType, Device, Tensor};

use crate::engine::Result;

/// One adapter's update for one layer, `coefficient · up · down`.
pub struct Factor {
    /// (out, r); any float dtype, any device.
    pub up: Tensor,
    /// (r, n); for convolutions n = in·kh·kw, flattened.
    pub down: Tensor,
    pub coefficient: f64,
}

/// The blended update as a single rank-k adapter, `ΔW ≈ up · down`.
pub struct LowRank {
    /// (out, k), f32, on the device of the first factor.
    pub up: Tensor,
    /// (k, n), f32, on the device of the first factor.
    pub down: Tensor,
    /// All singular values of ΔW, descending (min(R, out, n) of them). Values at round-off level
    /// relative to the inputs (4·ε·R·‖[cᵢUᵢ]‖_F·‖[Vᵢ]‖_F or less) are reported as exactly 0.
    pub singular_values: Vec<f64>,
    /// Σ_{i<k} σᵢ² / Σ σᵢ²: the share of ΔW's squared Frobenius norm kept; 1.0 when ΔW = 0.
    pub kept_energy: f64,
}

/// Blend `factors` into one low-rank adapter of rank `rank`.
///
/// `rank` larger than R = Σ rᵢ (or than out or n) is clamped to min(R, out, n): ΔW cannot have
/// a higher rank, so the extra columns would only hold zeros. `rank == 0`, an empty `factors`,
/// non-2-D tensors, mismatched shapes and non-finite values are errors.
pub fn blend_low_rank(factors: &[Factor], rank: usize) -> Result<LowRank> {
    ensure!(!factors.is_empty(), "blend: no factors to blend");
    ensure!(rank > 0, "blend: requested rank 0; the exported adapter needs rank ≥ 1");

    // Validate all shapes up front so the error names the offending factor.
    let mut out = None;
    let mut n = None;
    let mut total_r = 0;
    for (i, f) in factors.iter().enumerate() {
        let (o, r) =
            f.up.dims2()
                .with_context(|| format!("blend: factor {i}: up must be 2-D (out, r), got {:?}", f.up.dims()))?;
        let (r2, nn) = f
            .down
            .dims2()
            .with_context(|| format!("blend: factor {i}: down must be 2-D (r, n), got {:?}", f.down.dims()))?;
        ensure!(r == r2, "blend: factor {i}: up is {o}×{r} but down is {r2}×{nn}; their inner ranks differ");
        let want_out = *out.get_or_insert(o);
        let want_n = *n.get_or_insert(nn);
        ensure!(o == want_out, "blend: factor {i}: up has {o} output rows but factor 0 has {want_out}");
        ensure!(nn == want_n, "blend: factor {i}: down has {nn} input columns but factor 0 has {want_n}");
        ensure!(f.coefficient.is_finite(), "blend: factor {i}: coefficient {} is not finite", f.coefficient);
        for (name, t) in [("up", &f.up), ("down", &f.down)] {
            ensure!(
                t.dtype().is_float(),
                "blend: factor {i}: {name} has dtype {:?}; a float dtype is needed",
                t.dtype()
            );
        }
        total_r += r;
    }
    let (out, n) = (out.unwrap_or(0), n.unwrap_or(0));
    ensure!(out > 0 && n > 0 && total_r > 0, "blend: empty layer (out = {out}, n = {n}, total rank = {total_r})");

    // Stack U = [c₁U₁ … c_mU_m] (out × R) and Vᵀ = [V₁; …; V_m]ᵀ (n × R), both column-major so
    // each column is contiguous for the Householder sweeps. Row j of a row-major Vᵢ is exactly
    // column j of Vᵀ, so that copy is a plain append.
    let mut u = vec![0.0f64; out * total_r];
    let mut vt = Vec::with_capacity(n * total_r);
    let mut col = 0;
    for (i, f) in factors.iter().enumerate() {
        let (_, r) = f.up.dims2()?;
        let up = to_f64(&f.up).with_context(|| format!("blend: factor {i}: reading up"))?;
        let down = to_f64(&f.down).with_context(|| format!("blend: factor {i}: reading down"))?;
        if up.iter().chain(&down).any(|x| !x.is_finite()) {
            bail!("blend: factor {i}: up or down contains NaN or infinite values");
        }
        for j in 0..r {
            for row in 0..out {
                u[(col + j) * out + row] = f.coefficient * up[row * r + j];
            }
        }
        vt.extend_from_slice(&down);
        col += r;
    }

    // Cancellation (say one adapter at +1 and again at −1) leaves round-off, not signal; anything
    // under this floor is reported as an exact zero so kept_energy and the factors stay clean.
    let frob = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let noise_floor = 4.0 * f64::EPSILON * total_r as f64 * frob(&u) * frob(&vt);

    let (q1, r1, p1) = householder_qr(&mut u, out, total_r);
    let (q2, r2, p2) = householder_qr(&mut vt, n, total_r);

    // Core M = R₁·R₂ᵀ (p1 × p2), column-major.
    let mut core = vec![0.0; p1 * p2];
    for j in 0..p2 {
        for i in 0..p1 {
            // R is upper-triangular, so only t ≥ max(i, j) contributes.
            let mut s = 0.0;
            for t in i.max(j)..total_r {
                s += r1[t * p1 + i] * r2[t * p2 + j];
            }
            core[j * p1 + i] = s;
        }
    }

    // One-sided Jacobi wants a tall matrix; for a wide core decompose Mᵀ and swap the sides.
    let (um, sigma, vm, ncols) = if p1 >= p2 {
        let (uu, s, vv) = jacobi_svd(core, p1, p2);
        (uu, s, vv, p2)
    } else {
        let mut coret = vec![0.0; p1 * p2];
        for j in 0..p2 {
            for i in 0..p1 {
                coret[i * p2 + j] = core[j * p1 + i];
            }
        }
        let (uu, s, vv) = jacobi_svd(coret, p2, p1);
        (vv, s, uu, p1)
    };
    // um: p1 × ncols, vm: p2 × ncols, both column-major; sigma descending.
    let sigma: Vec<f64> = sigma.into_iter().map(|s| if s <= noise_floor { 0.0 } else { s }).collect();
    let k = rank.min(ncols);

    let total: f64 = sigma.iter().map(|s| s * s).sum();
    let kept: f64 = sigma[..k].iter().map(|s| s * s).sum();
    let kept_energy = if total > 0.0 { (kept / total).min(1.0) } else { 1.0 };

    // Split √σ between the sides so up and down have comparable norms (matters for f16 export
    // and for further training of the merged adapter).
    let mut up = vec![0.0f32; out * k];
    let mut down = vec![0.0f32; k * n];
    for l in 0..k {
        let w = sigma[l].sqrt();
        for row in 0..out {
            let mut s = 0.0;
            for t in 0..p1 {
                s += q1[t * out + row] * um[l * p1 + t];
            }
            up[row * k + l] = (s * w) as f32;
        }
        for c in 0..n {
            let mut s = 0.0;
            for t in 0..p2 {
                s += q2[t * n + c] * vm[l * p2 + t];
            }
            down[l * n + c] = (s * w) as f32;
        }
    }

    let device = factors[0].up.device().clone();
    let up = Tensor::from_vec(up, (out, k), &Device::Cpu)?.to_device(&device)?;
    let down = Tensor::from_vec(down, (k, n), &Device::Cpu)?.to_device(&device)?;
    Ok(LowRank { up, down, singular_values: sigma, kept_energy })
}

/// Row-major f64 copy. Moves to the CPU first because some backends (Metal) have no f64.
fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Thin Householder QR of the column-major m × c matrix `a` (overwritten).
///
/// Returns (Q, R, p) with p = min(m, c), Q m × p column-major with orthonormal columns and
/// R p × c column-major upper-triangular. Householder rather than Gram–Schmidt because Q stays
/// orthonormal even when columns are duplicated or zero; a zero remainder just skips its
/// reflector and leaves a zero on R's diagonal, so no division by zero can occur.
fn householder_qr(a: &mut [f64], m: usize, c: usize) -> (Vec<f64>, Vec<f64>, usize) {
    let p = m.min(c);
    // Unit reflector vectors, stored for rows j..m; None where the column was already zero.
    let mut reflectors: Vec<Option<Vec<f64>>> = Vec::with_capacity(p);
    for j in 0..p {
        let x = &a[j * m + j..(j + 1) * m];
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            reflectors.push(None);
            continue;
        }
        // Reflect onto -sign(x₀)·‖x‖·e₁ so v₀ never suffers cancellation.
        let alpha = if x[0] >= 0.0 { -norm } else { norm };
        let mut v = x.to_vec();
        v[0] -= alpha;
        let vnorm = v.iter().map(|t| t * t).sum::<f64>().sqrt();
        if vnorm == 0.0 || !vnorm.is_finite() {
            reflectors.push(None);
            continue;
        }
        v.iter_mut().for_each(|t| *t /= vnorm);
        for l in j..c {
            let colv = &mut a[l * m + j..(l + 1) * m];
            let d: f64 = v.iter().zip(colv.iter()).map(|(a, b)| a * b).sum();
            for (t, vi) in colv.iter_mut().zip(&v) {
                *t -= 2.0 * d * vi;
            }
        }
        // Exact values where the reflector is meant to produce them.
        a[j * m + j] = alpha;
        a[j * m + j + 1..(j + 1) * m].iter_mut().for_each(|t| *t = 0.0);
        reflectors.push(Some(v));
    }

    let mut r = vec![0.0; p * c];
    for l in 0..c {
        for i in 0..=l.min(p - 1) {
            r[l * p + i] = a[l * m + i];
        }
    }

    // Q = H₀·H₁·…·H_{p−1}·[I_p; 0], applied from the right-most reflector inwards; columns
    // below j are still unit vectors with zeros in rows ≥ j, so H_j leaves them alone.
    let mut q = vec![0.0; m * p];
    for j in 0..p {
        q[j * m + j] = 1.0;
    }
    for j in (0..p).rev() {
        let Some(v) = &reflectors[j] else { continue };
        for l in j..p {
            let colq = &mut q[l * m + j..(l + 1) * m];
            let d: f64 = v.iter().zip(colq.iter()).map(|(a, b)| a * b).sum();
            for (t, vi) in colq.iter_mut().zip(v) {
                *t -= 2.0 * d * vi;
            }
        }
    }
    (q, r, p)
}

/// One-sided (Hestenes) Jacobi SVD of the column-major m × c matrix `a`, m ≥ c.
///
/// Returns (U m × c, σ descending, V c × c), column-major, with a = U·diag(σ)·Vᵀ. Columns of U
/// belonging to σ = 0 are left zero: callers scale them by √σ = 0, so they never matter.
/// Chosen because it is short, needs no bidiagonalisation, and is accurate for small σ too.
fn jacobi_svd(mut a: Vec<f64>, m: usize, c: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; c * c];
    for i in 0..c {
        v[i * c + i] = 1.0;
    }
    let eps = f64::EPSILON;
    // Convergence is quadratic; the cap only guards against pathological inputs.
    for _sweep in 0..60 {
        let mut rotated = false;
        for i in 0..c {
            for j in i + 1..c {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for t in 0..m {
                    let (x, y) = (a[i * m + t], a[j * m + t]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                // Zero columns give gamma = 0 and are skipped, which keeps NaN out.
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                rotate(&mut a, m, i, j, cs, sn);
                rotate(&mut v, c, i, j, cs, sn);
            }
        }
        if !rotated {
            break;
        }
    }

    let mut sigma: Vec<f64> = (0..c).map(|j| a[j * m..(j + 1) * m].iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&x, &y| sigma[y].total_cmp(&sigma[x]));

    let mut u_sorted = vec![0.0; m * c];
    let mut v_sorted = vec![0.0; c * c];
    for (dst, &src) in order.iter().enumerate() {
        let s = sigma[src];
        if s > 0.0 {
            for t in 0..m {
                u_sorted[dst * m + t] = a[src * m + t] / s;
            }
        }
        v_sorted[dst * c..(dst + 1) * c].copy_from_slice(&v[src * c..(src + 1) * c]);
    }
    sigma = order.iter().map(|&i| sigma[i]).collect();
    (u_sorted, sigma, v_sorted)
}

/// Apply the plane rotation to columns i and j of a column-major matrix with `m` rows.
fn rotate(a: &mut [f64], m: usize, i: usize, j: usize, cs: f64, sn: f64) {
    for t in 0..m {
        let (x, y) = (a[i * m + t], a[j * m + t]);
        a[i * m + t] = cs * x - sn * y;
        a[j * m + t] = sn * x + cs * y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic test data without a rand dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform in [-1, 1).
        fn uniform(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
        fn vec(&mut self, len: usize) -> Vec<f64> {
            (0..len).map(|_| self.uniform()).collect()
        }
    }

    /// Row-major matrix of `rows × cols` as a tensor of `dtype`; returns the values the tensor
    /// really holds (after rounding to `dtype`) so references use exactly the same inputs.
    fn tensor(data: &[f64], rows: usize, cols: usize, dtype: DType) -> (Tensor, Vec<f64>) {
        let t = Tensor::from_vec(data.to_vec(), (rows, cols), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let back = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        (t, back)
    }

    /// A factor plus its row-major up/down values for the plain-loop reference.
    struct Case {
        factor: Factor,
        up: Vec<f64>,
        down: Vec<f64>,
        r: usize,
    }

    fn case(up: &[f64], down: &[f64], out: usize, r: usize, n: usize, c: f64, dtype: DType) -> Case {
        let (tu, up) = tensor(up, out, r, dtype);
        let (td, down) = tensor(down, r, n, dtype);
        Case { factor: Factor { up: tu, down: td, coefficient: c }, up, down, r }
    }

    fn random_case(rng: &mut Rng, out: usize, r: usize, n: usize, c: f64) -> Case {
        let up = rng.vec(out * r);
        let down = rng.vec(r * n);
        case(&up, &down, out, r, n, c, DType::F32)
    }

    /// ΔW = Σ cᵢ·Uᵢ·Vᵢ by plain loops, row-major out × n.
    fn explicit_delta(cases: &[Case], out: usize, n: usize) -> Vec<f64> {
        let mut w = vec![0.0; out * n];
        for cs in cases {
            for i in 0..out {
                for t in 0..cs.r {
                    let a = cs.factor.coefficient * cs.up[i * cs.r + t];
                    for j in 0..n {
                        w[i * n + j] += a * cs.down[t * n + j];
                    }
                }
            }
        }
        w
    }

    /// up·down of the result by plain loops, row-major out × n.
    fn product(lr: &LowRank) -> (Vec<f64>, usize, usize) {
        let up = lr.up.to_vec2::<f32>().unwrap();
        let down = lr.down.to_vec2::<f32>().unwrap();
        let (out, k, n) = (up.len(), down.len(), down[0].len());
        let mut w = vec![0.0; out * n];
        for i in 0..out {
            for t in 0..k {
                for j in 0..n {
                    w[i * n + j] += up[i][t] as f64 * down[t][j] as f64;
                }
            }
        }
        (w, out, n)
    }

    fn max_abs(x: &[f64]) -> f64 {
        x.iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
        let d = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        d / max_abs(b)
    }

    fn factors(cases: &[Case]) -> Vec<Factor> {
        cases
            .iter()
            .map(|c| Factor { up: c.factor.up.clone(), down: c.factor.down.clone(), coefficient: c.factor.coefficient })
            .collect()
    }

    /// Eigenvalues of a symmetric row-major s × s matrix by the classical cyclic two-sided
    /// Jacobi method — deliberately a different algorithm from the code under test.
    fn sym_eigenvalues(mut a: Vec<f64>, s: usize) -> Vec<f64> {
        for _ in 0..100 {
            let off: f64 = (0..s)
                .flat_map(|i| (0..s).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| a[i * s + j].powi(2))
                .sum();
            let diag: f64 = (0..s).map(|i| a[i * s + i].powi(2)).sum();
            if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
                break;
            }
            for p in 0..s {
                for q in p + 1..s {
                    let apq = a[p * s + q];
                    if apq == 0.0 {
                        continue;
                    }
                    let theta = (a[q * s + q] - a[p * s + p]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let sn = t * c;
                    for k in 0..s {
                        let (akp, akq) = (a[k * s + p], a[k * s + q]);
                        a[k * s + p] = c * akp - sn * akq;
                        a[k * s + q] = sn * akp + c * akq;
                    }
                    for k in 0..s {
                        let (apk, aqk) = (a[p * s + k], a[q * s + k]);
                        a[p * s + k] = c * apk - sn * aqk;
                        a[q * s + k] = sn * apk + c * aqk;
                    }
                }
            }
        }
        let mut e: Vec<f64> = (0..s).map(|i| a[i * s + i]).collect();
        e.sort_by(|x, y| y.total_cmp(x));
        e
    }

    /// Singular values of a row-major out × n matrix via eigenvalues of its smaller Gram matrix.
    fn reference_singular_values(w: &[f64], out: usize, n: usize) -> Vec<f64> {
        let s = out.min(n);
        let mut g = vec![0.0; s * s];
        for i in 0..s {
            for j in 0..s {
                g[i * s + j] = if out <= n {
                    (0..n).map(|t| w[i * n + t] * w[j * n + t]).sum()
                } else {
                    (0..out).map(|t| w[t * n + i] * w[t * n + j]).sum()
                };
            }
        }
        sym_eigenvalues(g, s).into_iter().map(|l| l.max(0.0).sqrt()).collect()
    }

    #[test]
    fn full_rank_reproduces_blend() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (out, n) = (24, 40);
        let cases = vec![
            random_case(&mut rng, out, 4, n, 0.8),
            random_case(&mut rng, out, 3, n, -0.35),
            random_case(&mut rng, out, 5, n, 1.7),
        ];
        let lr = blend_low_rank(&factors(&cases), 12).unwrap();
        assert_eq!(lr.up.dims(), &[out, 12]);
        assert_eq!(lr.down.dims(), &[12, n]);
        assert_eq!(lr.up.dtype(), DType::F32);
        let (got, _, _) = product(&lr);
        let want = explicit_delta(&cases, out, n);
        let rel = rel_diff(&got, &want);
        eprintln!("full-rank relative max-abs error: {rel:.3e}");
        assert!(rel <= 1e-5, "relative error {rel}");
        assert!((lr.kept_energy - 1.0).abs() < 1e-12);

        // Rank above R is clamped, not an error.
        let lr = blend_low_rank(&factors(&cases), 100).unwrap();
        assert_eq!(lr.up.dims(), &[out, 12]);
        assert_eq!(lr.singular_values.len(), 12);
    }

    #[test]
    fn full_rank_f64_and_f16_inputs() {
        let mut rng = Rng(7);
        let (out, r, n) = (9, 3, 13);
        // Multiples of 1/8 in [-1, 1] are exact in f16, so the reference sees the same data.
        let mut grid = |len| (0..len).map(|_| ((rng.next() % 17) as f64 - 8.0) / 8.0).collect::<Vec<_>>();
        let (u1, d1, u2, d2) = (grid(out * r), grid(r * n), grid(out * r), grid(r * n));
        let cases = vec![case(&u1, &d1, out, r, n, 0.5, DType::F16), case(&u2, &d2, out, r, n, 1.25, DType::F64)];
        let lr = blend_low_rank(&factors(&cases), 6).unwrap();
        let (got, _, _) = product(&lr);
        let rel = rel_diff(&got, &explicit_delta(&cases, out, n));
        assert!(rel <= 1e-5, "relative error {rel}");
    }

    #[test]
    fn singular_values_match_explicit_delta() {
        let mut rng = Rng(0xdead_beef_1234_5678);
        // Wide and tall layers, so both the Gram-matrix orientation and the core transpose run.
        for (out, n) in [(30, 18), (12, 35)] {
            let cases = vec![
                random_case(&mut rng, out, 3, n, 1.0),
                random_case(&mut rng, out, 2, n, -2.0),
                random_case(&mut rng, out, 4, n, 0.25),
            ];
            let lr = blend_low_rank(&factors(&cases), 3).unwrap();
            let w = explicit_delta(&cases, out, n);
            let want = reference_singular_values(&w, out, n);
            let smax = want[0];
            let mut worst: f64 = 0.0;
            for (i, &s) in lr.singular_values.iter().enumerate() {
                worst = worst.max((s - want[i]).abs() / smax);
            }
            // Everything past R = 9 must be (numerically) zero in the reference.
            for &s in &want[lr.singular_values.len()..] {
                assert!(s <= 1e-6 * smax, "reference has extra singular value {s}");
            }
            eprintln!("{out}×{n}: singular values {:?}, worst rel diff {worst:.3e}", &lr.singular_values);
            assert_eq!(lr.singular_values.len(), 9);
            assert!(worst <= 1e-9, "singular values differ by {worst}");
            let total: f64 = want.iter().map(|s| s * s).sum();
            let kept: f64 = want[..3].iter().map(|s| s * s).sum();
            assert!((lr.kept_energy - kept / total).abs() < 1e-9);
        }
    }

    /// m × c column-major matrix with orthonormal columns, by modified Gram–Schmidt applied twice.
    fn orthonormal(rng: &mut Rng, m: usize, c: usize) -> Vec<f64> {
        let mut q = rng.vec(m * c);
        for j in 0..c {
            for _ in 0..2 {
                for i in 0..j {
                    let d: f64 = (0..m).map(|t| q[i * m + t] * q[j * m + t]).sum();
                    for t in 0..m {
                        q[j * m + t] -= d * q[i * m + t];
                    }
                }
            }
            let norm: f64 = (0..m).map(|t| q[j * m + t].powi(2)).sum::<f64>().sqrt();
            for t in 0..m {
                q[j * m + t] /= norm;
            }
        }
        q
    }

    #[test]
    fn truncation_drops_exactly_the_small_singular_values() {
        let mut rng = Rng(42);
        let (out, n) = (20, 15);
        let sigma = [10.0, 5.0, 1.0, 0.1];
        let uq = orthonormal(&mut rng, out, 4);
        let vq = orthonormal(&mut rng, n, 4);
        // Two factors: (σ₀, σ₁) directly, and (σ₂, σ₃) doubled with coefficient 0.5.
        let mk = |cols: [usize; 2], scale: f64| {
            let mut up = vec![0.0; out * 2];
            let mut down = vec![0.0; 2 * n];
            for (l, &c) in cols.iter().enumerate() {
                for i in 0..out {
                    up[i * 2 + l] = uq[c * out + i] * sigma[c] * scale;
                }
                for j in 0..n {
                    down[l * n + j] = vq[c * n + j];
                }
            }
            (up, down)
        };
        let (u1, d1) = mk([0, 1], 1.0);
        let (u2, d2) = mk([2, 3], 2.0);
        // f64 inputs so the known spectrum is exact up to f64 rounding.
        let cases = vec![case(&u1, &d1, out, 2, n, 1.0, DType::F64), case(&u2, &d2, out, 2, n, 0.5, DType::F64)];
        let lr = blend_low_rank(&factors(&cases), 2).unwrap();
        for (got, want) in lr.singular_values.iter().zip(sigma) {
            assert!((got - want).abs() <= 1e-12 * 10.0, "σ {got} vs {want}");
        }
        let worst = lr.singular_values.iter().zip(sigma).fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
        eprintln!("known spectrum: worst |σ − σ_true| = {worst:.3e}");

        // √σ split: column l of up and row l of down both have norm √σ_l.
        let up = lr.up.to_vec2::<f32>().unwrap();
        let down = lr.down.to_vec2::<f32>().unwrap();
        for l in 0..2 {
            let cu = up.iter().map(|row| (row[l] as f64).powi(2)).sum::<f64>().sqrt();
            let rd = down[l].iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let want = sigma[l].sqrt();
            assert!((cu - want).abs() < 1e-6 * want && (rd - want).abs() < 1e-6 * want, "{cu} {rd}");
        }

        let expected_energy = 125.0 / 126.01;
        assert!((lr.kept_energy - expected_energy).abs() < 1e-12, "{}", lr.kept_energy);

        let (approx, _, _) = product(&lr);
        let w = explicit_delta(&cases, out, n);
        let err: Vec<f64> = w.iter().zip(&approx).map(|(a, b)| a - b).collect();
        let fro = err.iter().map(|e| e * e).sum::<f64>().sqrt();
        let spectral = reference_singular_values(&err, out, n)[0];
        eprintln!(
            "rank-2 error: Frobenius off by {:.2e}, spectral off by {:.2e}",
            (fro - 1.01f64.sqrt()).abs(),
            (spectral - 1.0).abs()
        );
        // The output is f32, so agreement is to f32 precision of the entries.
        assert!((fro - 1.01f64.sqrt()).abs() < 1e-5, "Frobenius {fro}");
        assert!((spectral - 1.0).abs() < 1e-5, "spectral {spectral}");
    }

    #[test]
    fn cancelling_factors_give_zero_without_nan() {
        let mut rng = Rng(3);
        let (out, r, n) = (10, 3, 8);
        let up = rng.vec(out * r);
        let down = rng.vec(r * n);
        let cases = vec![case(&up, &down, out, r, n, 1.0, DType::F32), case(&up, &down, out, r, n, -1.0, DType::F32)];
        for k in [1, 3, 6] {
            let lr = blend_low_rank(&factors(&cases), k).unwrap();
            assert_eq!(lr.kept_energy, 1.0);
            assert!(lr.singular_values.iter().all(|s| *s == 0.0), "{:?}", lr.singular_values);
            let (w, _, _) = product(&lr);
            assert!(w.iter().all(|x| x.is_finite()));
            assert!(max_abs(&w) < 1e-12);
        }
    }

    #[test]
    fn duplicated_and_zero_columns_are_handled() {
        let mut rng = Rng(11);
        let (out, r, n) = (16, 4, 12);
        let mut up = rng.vec(out * r);
        let mut down = rng.vec(r * n);
        // Zero column in up (rank drops on the left) and a zero row in down (on the right).
        for i in 0..out {
            up[i * r + 1] = 0.0;
        }
        for j in 0..n {
            down[3 * n + j] = 0.0;
        }
        let other_up = rng.vec(out * 2);
        let other_down = rng.vec(2 * n);
        let cases = vec![
            case(&up, &down, out, r, n, 0.7, DType::F32),
            // Same factor again: duplicated columns in the stacked U and V.
            case(&up, &down, out, r, n, 0.3, DType::F32),
            case(&other_up, &other_down, out, 2, n, -1.1, DType::F32),
        ];
        let lr = blend_low_rank(&factors(&cases), 10).unwrap();
        let (got, _, _) = product(&lr);
        assert!(got.iter().all(|x| x.is_finite()));
        let rel = rel_diff(&got, &explicit_delta(&cases, out, n));
        assert!(rel <= 1e-5, "relative error {rel}");
        // True rank is 2 (first factor, columns 0 and 2) + 2 = 4; the rest must vanish.
        let s = &lr.singular_values;
        assert!(s[3] > 1e-3 * s[0]);
        assert!(s[4..].iter().all(|x| *x <= 1e-12 * s[0]), "{s:?}");

        // Rank 4 is then already exact.
        let lr4 = blend_low_rank(&factors(&cases), 4).unwrap();
        let (got4, _, _) = product(&lr4);
        assert!(rel_diff(&got4, &explicit_delta(&cases, out, n)) <= 1e-5);
        assert!((lr4.kept_energy - 1.0).abs() < 1e-12);

        // An all-zero factor alone is ΔW = 0.
        let zero = vec![case(&vec![0.0; out * 2], &vec![0.0; 2 * n], out, 2, n, 1.0, DType::F32)];
        let lr = blend_low_rank(&factors(&zero), 2).unwrap();
        assert_eq!(lr.kept_energy, 1.0);
        assert!(lr.up.to_vec2::<f32>().unwrap().iter().flatten().all(|x| *x == 0.0));
    }

    #[test]
    fn more_rank_than_layer_dimensions() {
        // out = 3 < R = 8: the core is wide and only 3 singular values exist.
        let mut rng = Rng(5);
        let (out, n) = (3, 20);
        let cases = vec![random_case(&mut rng, out, 4, n, 1.0), random_case(&mut rng, out, 4, n, 0.5)];
        let lr = blend_low_rank(&factors(&cases), 8).unwrap();
        assert_eq!(lr.up.dims(), &[out, 3]);
        assert_eq!(lr.singular_values.len(), 3);
        let (got, _, _) = product(&lr);
        assert!(rel_diff(&got, &explicit_delta(&cases, out, n)) <= 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let z = |r, c| Tensor::zeros((r, c), DType::F32, &dev).unwrap();
        let f = |up: Tensor, down: Tensor| Factor { up, down, coefficient: 1.0 };
        let msg = |fs: &[Factor], k| blend_low_rank(fs, k).err().map(|e| format!("{e:#}")).unwrap_or_default();

        assert!(msg(&[], 2).contains("no factors"));
        assert!(msg(&[f(z(4, 2), z(2, 5))], 0).contains("rank 0"));
        let m = msg(&[f(z(4, 2), z(3, 5))], 2);
        assert!(m.contains("factor 0") && m.contains("inner ranks"), "{m}");
        let m = msg(&[f(z(4, 2), z(2, 5)), f(z(6, 2), z(2, 5))], 2);
        assert!(m.contains("factor 1") && m.contains("output rows"), "{m}");
        let m = msg(&[f(z(4, 2), z(2, 5)), f(z(4, 1), z(1, 7))], 2);
        assert!(m.contains("factor 1") && m.contains("input columns"), "{m}");
        let three_d = Tensor::zeros((4, 2, 1), DType::F32, &dev).unwrap();
        let m = msg(&[f(three_d, z(2, 5))], 2);
        assert!(m.contains("factor 0") && m.contains("2-D"), "{m}");
        let ints = Tensor::zeros((4, 2), DType::U32, &dev).unwrap();
        assert!(msg(&[f(ints, z(2, 5))], 2).contains("float dtype"));
        let nan = Tensor::from_vec(vec![f32::NAN; 8], (4, 2), &dev).unwrap();
        assert!(msg(&[f(nan, z(2, 5))], 2).contains("NaN"));
        let mut bad = f(z(4, 2), z(2, 5));
        bad.coefficient = f64::INFINITY;
        assert!(msg(&[bad], 2).contains("coefficient"));
    }

    #[test]
    fn layer_sized_blend_at_full_rank_is_exact() {
        let mut rng = Rng(0x1234_5678);
        let (out, n) = (1280, 320);
        let cases: Vec<Case> = (0..4).map(|i| random_case(&mut rng, out, 4, n, 0.5 + i as f64 * 0.25)).collect();
        let fs = factors(&cases);
        let start = std::time::Instant::now();
        let lr = blend_low_rank(&fs, 8).unwrap();
        let elapsed = start.elapsed();
        eprintln!("1280×320, R = 16, k = 8: {elapsed:?}, kept energy {:.4}", lr.kept_energy);
        let full = blend_low_rank(&fs, 16).unwrap();
        let (got, _, _) = product(&full);
        let rel = rel_diff(&got, &explicit_delta(&cases, out, n));
        eprintln!("1280×320 full-rank relative error {rel:.3e}");
        assert!(rel <= 1e-5);
    }
}
