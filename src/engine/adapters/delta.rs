//! One adapter's change to one layer, for every kind people share: LoRA / LoCon (with a Tucker
//! core), LoHa, LoKr, GLoRA, full diffs, DoRA over any of them, and orthogonal finetuning
//! (diag-OFT, BOFT). Each kind's math lives here, as LyCORIS and PEFT define it; the formulas and
//! the references they are checked against are in `tests/fixtures/README.md`.

use anyhow::{anyhow, bail};
use candle_core::{DType, Tensor};

use crate::engine::Result;
use crate::engine::kernels::conv::conv2d;
use crate::engine::kernels::frozen;

/// One adapter's update of one layer, stored in LyCORIS' current layout. Base weights are
/// (out, in) for a linear layer and (out, in, kh, kw) for a convolution.
#[derive(Clone, Debug)]
pub enum Delta {
    /// ΔW = up · down. Linear: down (r, in), up (out, r). Conv (LoCon): down (r, in, kh, kw),
    /// up (out, r, 1, 1).
    Lora { down: Tensor, up: Tensor },
    /// LoCon with a Tucker core: ΔW[o,i,k,l] = Σ up[o,a]·mid[a,b,k,l]·down[b,i]; down (r, in, 1, 1),
    /// mid (r, r, kh, kw), up (out, r, 1, 1).
    Tucker { down: Tensor, mid: Tensor, up: Tensor },
    /// GLoRA, ΔW = W·a1·a2 + b1·b2: a learned rescaling of the frozen weight plus a low-rank shift.
    /// Linear: a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in). Conv: a1 (in, r, 1, 1),
    /// a2 (r, in, 1, 1), b1 (out, r, 1, 1), b2 (r, in, kh, kw).
    Glora { a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor },
    /// LoHa, ΔW = (w1a·w1b) ⊙ (w2a·w2b): w1a (out, r), w1b (r, in·kh·kw). With Tucker cores
    /// (t1, t2: (r, r, kh, kw)) each product is rebuilt from w·a (r, out), w·b (r, in) and its core.
    Loha { w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, tucker: Option<(Tensor, Tensor)> },
    /// LoKr, ΔW = w1 ⊗ w2 (Kronecker), each factor stored whole or as a low-rank product.
    Lokr { w1: KronFactor, w2: KronFactor },
    /// A full weight difference, and optionally one for the bias: W + s·diff, b + s·diff_b. On a
    /// norm layer (diff one number per channel) this is LyCORIS' norm update, `w_norm` / `b_norm`.
    Full { diff: Tensor, diff_b: Option<Tensor> },
    /// DoRA over an inner update: D = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm taken along `magnitude`'s
    /// axis, and the change is D − W (so a slider at s gives W + s·(D − W), as A1111 and ComfyUI
    /// blend it). `inner_scale` is the inner update's α / r, which belongs inside the norm.
    Dora { inner: Box<Delta>, inner_scale: f64, magnitude: Tensor },
    /// diag-OFT: per block of `b` output rows, W_k ← R_kᵀ·W_k with R = Cayley(B − Bᵀ); blocks
    /// (n, b, b), n·b = out. `constraint` (LyCORIS' α; 0 = none) bounds ‖Q‖ by constraint · out.
    Oft { blocks: Tensor, constraint: f64 },
    /// BOFT: `m` butterfly stages of block rotations; blocks (m, n, b, b), n·b = out.
    Boft { blocks: Tensor, constraint: f64 },
}

/// One side of a LoKr product: whole, or a (with b and an optional Tucker core) low-rank product.
#[derive(Clone, Debug)]
pub enum KronFactor {
    Whole(Tensor),
    /// a (o, r) · b (r, i[, kh, kw]); with a Tucker core t (r, r, kh, kw): a (r, o), b (r, i).
    LowRank {
        a: Tensor,
        b: Tensor,
        tucker: Option<Tensor>,
    },
}

/// How the slider acts on a kind, for the format doctor.
pub fn strength_semantics(delta: &Delta) -> &'static str {
    match delta {
        Delta::Dora { .. } => {
            "W + s·(D − W), D the DoRA weight at full strength (as A1111 and ComfyUI blend it; LyCORIS \
             scales the magnitude ratio by s and PEFT renormalises W + s·ΔW instead: all agree at s = 1)"
        }
        Delta::Oft { .. } => {
            "each block rotation blended toward identity by s, as LyCORIS does (ComfyUI applies s twice)"
        }
        Delta::Boft { .. } => {
            "each butterfly stage blended toward identity by s, as LyCORIS does (ComfyUI scales the \
             difference by s again; all agree at s = 1)"
        }
        _ => "W + s·ΔW, as every tool applies it",
    }
}

impl KronFactor {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            KronFactor::Whole(t) => vec![t],
            KronFactor::LowRank { a, b, tucker } => [Some(a), Some(b), tucker.as_ref()].into_iter().flatten().collect(),
        }
    }

    fn low_rank(&self) -> Option<usize> {
        match self {
            KronFactor::Whole(_) => None,
            KronFactor::LowRank { a, tucker: None, .. } => a.dims().get(1).copied(),
            KronFactor::LowRank { a, .. } => a.dims().first().copied(),
        }
    }

    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match self {
            KronFactor::Whole(t) => KronFactor::Whole(cast(t, dtype)?),
            KronFactor::LowRank { a, b, tucker } => KronFactor::LowRank {
                a: cast(a, dtype)?,
                b: cast(b, dtype)?,
                tucker: tucker.as_ref().map(|t| cast(t, dtype)).transpose()?,
            },
        })
    }

    /// The factor's shape once built: (o, i) or (o, i, kh, kw).
    fn shape(&self) -> Option<Vec<usize>> {
        match self {
            KronFactor::Whole(t) => Some(t.dims().to_vec()),
            KronFactor::LowRank { a, b, tucker: None } => {
                let (ad, bd) = (a.dims(), b.dims());
                (ad.len() == 2 && bd.len() >= 2 && ad[1] == bd[0]).then(|| [&[ad[0]], &bd[1..]].concat())
            }
            KronFactor::LowRank { a, b, tucker: Some(t) } => {
                let (ad, bd, td) = (a.dims(), b.dims(), t.dims());
                (ad.len() == 2 && bd.len() == 2 && td.len() >= 2 && td[0] == ad[0] && td[1] == bd[0])
                    .then(|| [&[ad[1], bd[1]], &td[2..]].concat())
            }
        }
    }

    fn build(&self) -> Result<Tensor> {
        let shape = self.shape().ok_or_else(|| anyhow!("LoKr factor shapes do not chain"))?;
        Ok(match self {
            KronFactor::Whole(t) => t.clone(),
            KronFactor::LowRank { a, b, tucker: None } => a.matmul(&b.flatten_from(1)?)?.reshape(shape)?,
            KronFactor::LowRank { a, b, tucker: Some(t) } => rebuild_tucker(t, a, b)?,
        })
    }
}

fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? })
}

/// Σᵢⱼ t[i,j,k…]·a[i,p]·b[j,q] → (p, q, k…): a Tucker core (r1, r2, kh, kw) between its two modes
/// a (r1, out) and b (r2, in), as LyCORIS rebuilds LoCon, LoHa and LoKr cores.
fn rebuild_tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let td = t.dims().to_vec();
    let (r1, r2) = (td[0], td[1]);
    let kernel = &td[2..];
    let kk: usize = kernel.iter().product();
    let (out, inp) = (a.dims()[1], b.dims()[1]);
    // (out, r1)·(r1, r2·kk) → (out, r2, kk) → (out·kk, r2)·(r2, in) → (out, kk, in) → (out, in, kk).
    let x = a.t()?.contiguous()?.matmul(&t.reshape((r1, r2 * kk))?)?;
    let x = x.reshape((out, r2, kk))?.transpose(1, 2)?.reshape((out * kk, r2))?.matmul(b)?;
    let x = x.reshape((out, kk, inp))?.transpose(1, 2)?.contiguous()?;
    Ok(x.reshape([&[out, inp], kernel].concat())?)
}

impl Delta {
    /// The update's rank as tools report it (the block size for OFT kinds, 1 for a full diff).
    pub fn rank(&self) -> usize {
        let d = |t: &Tensor, i: usize| t.dims().get(i).copied().unwrap_or(1);
        match self {
            Delta::Lora { down, .. } | Delta::Tucker { down, .. } => d(down, 0),
            Delta::Glora { a2, .. } => d(a2, 0),
            Delta::Loha { w1b, .. } => d(w1b, 0),
            Delta::Lokr { w1, w2 } => w1.low_rank().or(w2.low_rank()).unwrap_or(1),
            Delta::Full { .. } => 1,
            Delta::Dora { inner, .. } => inner.rank(),
            Delta::Oft { blocks, .. } => d(blocks, 1),
            Delta::Boft { blocks, .. } => d(blocks, 2),
        }
    }

    /// α / r from a file's α (`None` or 0: α = r), for the kinds α scales. LoKr scales only when a
    /// factor is low-rank; full diffs, DoRA (its α is inside) and OFT (α is a constraint) not at all.
    pub fn scale_from_alpha(&self, alpha: Option<f64>) -> f64 {
        let scaled = match self {
            Delta::Lora { .. } | Delta::Tucker { .. } | Delta::Glora { .. } | Delta::Loha { .. } => true,
            Delta::Lokr { w1, w2 } => w1.low_rank().is_some() || w2.low_rank().is_some(),
            Delta::Full { .. } | Delta::Dora { .. } | Delta::Oft { .. } | Delta::Boft { .. } => false,
        };
        match alpha {
            Some(a) if scaled && a != 0.0 => a / self.rank() as f64,
            _ => 1.0,
        }
    }

    pub fn algorithm(&self) -> String {
        match self {
            Delta::Lora { down, .. } if down.rank() == 4 => "locon".into(),
            Delta::Lora { .. } => "lora".into(),
            Delta::Tucker { .. } => "locon (tucker)".into(),
            Delta::Glora { .. } => "glora".into(),
            Delta::Loha { tucker: Some(_), .. } => "loha (tucker)".into(),
            Delta::Loha { .. } => "loha".into(),
            Delta::Lokr { .. } => "lokr".into(),
            Delta::Full { diff, .. } if diff.rank() == 1 => "norm".into(),
            Delta::Full { .. } => "full".into(),
            Delta::Dora { inner, magnitude, .. } => {
                let axis =
                    if magnitude.dims().first() == Some(&1) && magnitude.rank() > 1 { "input" } else { "output" };
                format!("{} + dora ({axis} axis)", inner.algorithm())
            }
            Delta::Oft { .. } => "diag-oft".into(),
            Delta::Boft { .. } => "boft".into(),
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Delta::Lora { down, up } => vec![down, up],
            Delta::Tucker { down, mid, up } => vec![down, mid, up],
            Delta::Glora { a1, a2, b1, b2 } => vec![a1, a2, b1, b2],
            Delta::Loha { w1a, w1b, w2a, w2b, tucker } => {
                let mut v = vec![w1a, w1b, w2a, w2b];
                if let Some((t1, t2)) = tucker {
                    v.extend([t1, t2]);
                }
                v
            }
            Delta::Lokr { w1, w2 } => [w1.tensors(), w2.tensors()].concat(),
            Delta::Full { diff, diff_b } => [Some(diff), diff_b.as_ref()].into_iter().flatten().collect(),
            Delta::Dora { inner, magnitude, .. } => [inner.tensors(), vec![magnitude]].concat(),
            Delta::Oft { blocks, .. } | Delta::Boft { blocks, .. } => vec![blocks],
        }
    }

    /// The name of each tensor in `tensors()` order, as LyCORIS calls it (a trainer's parameter
    /// names; GLoRA keeps our short names).
    pub fn tensor_names(&self) -> Vec<&'static str> {
        match self {
            Delta::Lora { .. } => vec!["lora_down", "lora_up"],
            Delta::Tucker { .. } => vec!["lora_down", "lora_mid", "lora_up"],
            Delta::Glora { .. } => vec!["a1", "a2", "b1", "b2"],
            Delta::Loha { tucker, .. } => {
                let mut v = vec!["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
                if tucker.is_some() {
                    v.extend(["hada_t1", "hada_t2"]);
                }
                v
            }
            Delta::Lokr { w1, w2 } => {
                let names = |f: &KronFactor, side: &'static [&'static str; 4]| match f {
                    KronFactor::Whole(_) => vec![side[0]],
                    KronFactor::LowRank { tucker: None, .. } => vec![side[1], side[2]],
                    KronFactor::LowRank { .. } => vec![side[1], side[2], side[3]],
                };
                [
                    names(w1, &["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t1"]),
                    names(w2, &["lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]),
                ]
                .concat()
            }
            Delta::Full { diff_b, .. } => {
                if diff_b.is_some() {
                    vec!["diff", "diff_b"]
                } else {
                    vec!["diff"]
                }
            }
            Delta::Dora { inner, .. } => [inner.tensor_names(), vec!["dora_scale"]].concat(),
            Delta::Oft { .. } | Delta::Boft { .. } => vec!["oft_blocks"],
        }
    }

    /// The same kind of update with its tensors replaced, given in `tensors()` order (a trainer
    /// swaps in its variables, and takes them out again to save).
    pub fn with_tensors(&self, new: &[Tensor]) -> Result<Delta> {
        if new.len() != self.tensors().len() {
            bail!("{}: {} tensors given for {}", self.algorithm(), new.len(), self.tensors().len());
        }
        let mut it = new.iter().cloned();
        let mut next = || it.next().expect("counted above");
        Ok(self.rebuilt(&mut next))
    }

    fn rebuilt(&self, next: &mut dyn FnMut() -> Tensor) -> Delta {
        let factor = |f: &KronFactor, next: &mut dyn FnMut() -> Tensor| match f {
            KronFactor::Whole(_) => KronFactor::Whole(next()),
            KronFactor::LowRank { tucker, .. } => {
                KronFactor::LowRank { a: next(), b: next(), tucker: tucker.as_ref().map(|_| next()) }
            }
        };
        match self {
            Delta::Lora { .. } => Delta::Lora { down: next(), up: next() },
            Delta::Tucker { .. } => Delta::Tucker { down: next(), mid: next(), up: next() },
            Delta::Glora { .. } => Delta::Glora { a1: next(), a2: next(), b1: next(), b2: next() },
            Delta::Loha { tucker, .. } => Delta::Loha {
                w1a: next(),
                w1b: next(),
                w2a: next(),
                w2b: next(),
                tucker: tucker.as_ref().map(|_| (next(), next())),
            },
            Delta::Lokr { w1, w2 } => {
                let w1 = factor(w1, next);
                Delta::Lokr { w1, w2: factor(w2, next) }
            }
            Delta::Full { diff_b, .. } => Delta::Full { diff: next(), diff_b: diff_b.as_ref().map(|_| next()) },
            Delta::Dora { inner, inner_scale, .. } => {
                let inner = Box::new(inner.rebuilt(next));
                Delta::Dora { inner, inner_scale: *inner_scale, magnitude: next() }
            }
            Delta::Oft { constraint, .. } => Delta::Oft { blocks: next(), constraint: *constraint },
            Delta::Boft { constraint, .. } => Delta::Boft { blocks: next(), constraint: *constraint },
        }
    }

    /// The same update with every tensor in `dtype`. Files store factors in f16, bf16, f32 or f64;
    /// the layer computes in its own dtype, and candle refuses mixed dtypes in one op.
    pub fn to_dtype(&self, dtype: DType) -> Result<Delta> {
        let c = |t: &Tensor| cast(t, dtype);
        Ok(match self {
            Delta::Lora { down, up } => Delta::Lora { down: c(down)?, up: c(up)? },
            Delta::Tucker { down, mid, up } => Delta::Tucker { down: c(down)?, mid: c(mid)?, up: c(up)? },
            Delta::Glora { a1, a2, b1, b2 } => Delta::Glora { a1: c(a1)?, a2: c(a2)?, b1: c(b1)?, b2: c(b2)? },
            Delta::Loha { w1a, w1b, w2a, w2b, tucker } => Delta::Loha {
                w1a: c(w1a)?,
                w1b: c(w1b)?,
                w2a: c(w2a)?,
                w2b: c(w2b)?,
                tucker: match tucker {
                    Some((t1, t2)) => Some((c(t1)?, c(t2)?)),
                    None => None,
                },
            },
            Delta::Lokr { w1, w2 } => Delta::Lokr { w1: w1.to_dtype(dtype)?, w2: w2.to_dtype(dtype)? },
            Delta::Full { diff, diff_b } => {
                Delta::Full { diff: c(diff)?, diff_b: diff_b.as_ref().map(&c).transpose()? }
            }
            Delta::Dora { inner, inner_scale, magnitude } => Delta::Dora {
                inner: Box::new(inner.to_dtype(dtype)?),
                inner_scale: *inner_scale,
                magnitude: c(magnitude)?,
            },
            Delta::Oft { blocks, constraint } => Delta::Oft { blocks: c(blocks)?, constraint: *constraint },
            Delta::Boft { blocks, constraint } => Delta::Boft { blocks: c(blocks)?, constraint: *constraint },
        })
    }

    /// The input width the update expects (for telling an SD 1.x file from an SD 2.x one).
    pub fn input_width(&self) -> Option<usize> {
        let d = |t: &Tensor, i: usize| t.dims().get(i).copied();
        match self {
            Delta::Lora { down, .. } | Delta::Tucker { down, .. } => d(down, 1),
            Delta::Glora { a2, .. } => d(a2, 1),
            Delta::Loha { w1b, .. } => d(w1b, 1),
            Delta::Lokr { w1, w2 } => Some(w1.shape()?.get(1)? * w2.shape()?.get(1)?),
            Delta::Full { diff, .. } => d(diff, 1),
            Delta::Dora { inner, .. } => inner.input_width(),
            Delta::Oft { .. } | Delta::Boft { .. } => None,
        }
    }

    /// Checks each tensor has the number of dimensions its kind stores (before any model is
    /// known), so later shape checks and math meet only well-formed updates.
    pub fn check_form(&self) -> Result<()> {
        let n = |t: &Tensor| t.rank();
        let layer = |ranks: &[usize]| ranks.iter().all(|&r| r == 2) || ranks.iter().all(|&r| r == 4);
        let ok = match self {
            Delta::Lora { down, up } => layer(&[n(down), n(up)]),
            Delta::Tucker { down, mid, up } => [down, mid, up].iter().all(|t| n(t) == 4),
            Delta::Glora { a1, a2, b1, b2 } => layer(&[n(a1), n(a2), n(b1), n(b2)]),
            Delta::Loha { w1a, w1b, w2a, w2b, tucker } => {
                [w1a, w1b, w2a, w2b].iter().all(|t| n(t) == 2 || (tucker.is_none() && n(t) == 4))
                    && tucker.as_ref().is_none_or(|(t1, t2)| n(t1) >= 3 && n(t2) >= 3)
            }
            Delta::Lokr { w1, w2 } => [w1, w2].iter().all(|f| f.tensors().iter().all(|t| n(t) == 2 || n(t) == 4)),
            Delta::Full { diff, diff_b } => matches!(n(diff), 1 | 2 | 4) && diff_b.as_ref().is_none_or(|b| n(b) == 1),
            Delta::Dora { inner, magnitude, .. } => {
                inner.check_form()?;
                matches!(n(magnitude), 1 | 2 | 4)
            }
            Delta::Oft { blocks, .. } => n(blocks) == 3,
            Delta::Boft { blocks, .. } => n(blocks) == 4,
        };
        if !ok {
            let shapes: Vec<String> = self.tensors().iter().map(|t| format!("{:?}", t.dims())).collect();
            bail!(
                "{} tensors have shapes {}; expected 2 (linear) or 4 (conv) dimensions for its factors",
                self.algorithm(),
                shapes.join(" ")
            );
        }
        Ok(())
    }

    /// Checks the update against the base weight's shape, naming what does not fit.
    pub fn check_shapes(&self, base: &[usize]) -> Result<()> {
        if base.len() == 1 {
            // A norm's scale: only a norm update (LyCORIS' w_norm / b_norm) fits it.
            return match self {
                Delta::Full { diff, diff_b }
                    if diff.dims() == base && diff_b.as_ref().is_none_or(|b| b.dims() == base) =>
                {
                    Ok(())
                }
                _ => bail!(
                    "{} tensors do not fit a normalisation layer of {} channels (only w_norm / b_norm updates do)",
                    self.algorithm(),
                    base[0]
                ),
            };
        }
        if base.len() < 2 {
            bail!("a layer of shape {base:?} takes no adapter");
        }
        let (out, inp) = (base[0], base[1]);
        let kernel: &[usize] = &base[2..];
        let kk: usize = kernel.iter().product();
        let dims = |t: &Tensor| t.dims().to_vec();
        let ones = |d: &[usize]| d.iter().all(|&x| x == 1);
        let ok = match self {
            Delta::Lora { down, up } => {
                let (d, u) = (dims(down), dims(up));
                d.len() >= 2
                    && u.len() >= 2
                    && d[1] == inp
                    && d[2..] == *kernel
                    && u[0] == out
                    && u[1] == d[0]
                    && ones(&u[2..])
            }
            Delta::Tucker { down, mid, up } => {
                let (d, m, u) = (dims(down), dims(mid), dims(up));
                d.len() == 4
                    && m.len() == 4
                    && u.len() == 4
                    && d[1] == inp
                    && ones(&d[2..])
                    && m[1] == d[0]
                    && m[2..] == *kernel
                    && u[0] == out
                    && u[1] == m[0]
                    && ones(&u[2..])
            }
            Delta::Glora { a1, a2, b1, b2 } => {
                let (a1, a2, b1, b2) = (dims(a1), dims(a2), dims(b1), dims(b2));
                a1.len() >= 2 && a2.len() >= 2 && b1.len() >= 2 && b2.len() >= 2 && {
                    let r = a2[0];
                    a1[..2] == [inp, r]
                        && a2[1] == inp
                        && b1[..2] == [out, r]
                        && b2[..2] == [r, inp]
                        && b2[2..] == *kernel
                }
            }
            Delta::Loha { w1a, w1b, w2a, w2b, tucker: None } => {
                let (a1, b1, a2, b2) = (dims(w1a), dims(w1b), dims(w2a), dims(w2b));
                [&a1, &b1, &a2, &b2].iter().all(|d| d.len() >= 2)
                    && a1[0] == out
                    && a2[0] == out
                    && a1[1] == b1[0]
                    && a2[1] == b2[0]
                    && b1[1..].iter().product::<usize>() == inp * kk
                    && b2[1..].iter().product::<usize>() == inp * kk
            }
            Delta::Loha { w1a, w1b, w2a, w2b, tucker: Some((t1, t2)) } => {
                let (a1, b1, a2, b2, t1, t2) = (dims(w1a), dims(w1b), dims(w2a), dims(w2b), dims(t1), dims(t2));
                [&a1, &b1, &a2, &b2].iter().all(|d| d.len() == 2)
                    && t1.len() == 2 + kernel.len()
                    && t2.len() == 2 + kernel.len()
                    && a1[1] == out
                    && a2[1] == out
                    && b1[1] == inp
                    && b2[1] == inp
                    && t1[..2] == [a1[0], b1[0]]
                    && t2[..2] == [a2[0], b2[0]]
                    && t1[2..] == *kernel
                    && t2[2..] == *kernel
            }
            Delta::Lokr { w1, w2 } => match (w1.shape(), w2.shape()) {
                (Some(s1), Some(s2)) if s1.len() >= 2 && s2.len() >= 2 && s1[1] > 0 => {
                    // w1 is (o1, i1[, 1, 1]); w2 carries the kernel, as (o2, i2, kh, kw) or flat
                    // (o2, i2·kh·kw) as LyCORIS stores a low-rank conv factor.
                    let i2 = inp / s1[1];
                    ones(&s1[2..])
                        && s1[0] * s2[0] == out
                        && inp % s1[1] == 0
                        && s2[1..].iter().product::<usize>() == i2 * kk
                }
                _ => false,
            },
            Delta::Full { diff, diff_b } => {
                diff.elem_count() == out * inp * kk
                    && diff.dims().first() == Some(&out)
                    && diff_b.as_ref().is_none_or(|b| b.elem_count() == out)
            }
            Delta::Dora { inner, magnitude, .. } => {
                inner.check_shapes(base)?;
                dora_axis(magnitude, out, inp).is_some()
            }
            Delta::Oft { blocks, .. } => {
                let b = dims(blocks);
                b.len() == 3 && b[1] == b[2] && b[0] * b[1] == out
            }
            Delta::Boft { blocks, .. } => {
                let b = dims(blocks);
                b.len() == 4 && b[2] == b[3] && b[1] * b[2] == out && b[2] % 2 == 0 && {
                    // Every stage regroups the rows in runs of 2·2ⁱ·(b/2).
                    (0..b[0]).all(|i| out % (2usize.saturating_pow(i as u32) * b[2]) == 0)
                }
            }
        };
        if !ok {
            let shapes: Vec<String> = self.tensors().iter().map(|t| format!("{:?}", t.dims())).collect();
            bail!("{} tensors {} do not fit a layer of shape {:?}", self.algorithm(), shapes.join(" "), base);
        }
        Ok(())
    }

    /// Whether the factored forward (`apply_linear` / `apply_conv`) exists for this kind; others
    /// run through their full ΔW.
    pub fn is_factored(&self) -> bool {
        matches!(self, Delta::Lora { .. } | Delta::Glora { .. })
    }

    /// The full-size ΔW before α / r and the slider, for kinds linear in the slider (every kind
    /// but BOFT, whose stages each move with it: use `weight_change`).
    pub fn delta_weight(&self, base: &Tensor) -> Result<Tensor> {
        let shape = base.dims().to_vec();
        if let (Delta::Full { diff, .. }, [_]) = (self, shape.as_slice()) {
            return Ok(diff.reshape(shape)?); // a norm's scale
        }
        if shape.len() < 2 {
            bail!("{} does not apply to a layer of shape {shape:?}", self.algorithm());
        }
        let (out, inp) = (shape[0], shape[1]);
        let flat = |t: &Tensor| -> Result<Tensor> { Ok(t.flatten_from(1)?) };
        Ok(match self {
            Delta::Lora { down, up } => flat(up)?.matmul(&flat(down)?)?.reshape(shape)?,
            Delta::Tucker { down, mid, up } => rebuild_tucker(mid, &flat(up)?.t()?, &flat(down)?)?.reshape(shape)?,
            Delta::Glora { a1, a2, b1, b2 } => {
                let m = flat(a1)?.matmul(&flat(a2)?)?; // (in, in)
                // W·M contracts W's input channel with M, for every kernel position.
                let kk: usize = shape[2..].iter().product();
                let w = base.reshape((out, inp, kk))?.transpose(1, 2)?.reshape((out * kk, inp))?;
                let wm = w.matmul(&m)?.reshape((out, kk, inp))?.transpose(1, 2)?.reshape(shape.as_slice())?;
                (wm + flat(b1)?.matmul(&flat(b2)?)?.reshape(shape.as_slice())?)?
            }
            Delta::Loha { w1a, w1b, w2a, w2b, tucker: None } => {
                let p1 = w1a.matmul(&flat(w1b)?)?;
                let p2 = w2a.matmul(&flat(w2b)?)?;
                (p1 * p2)?.reshape(shape)?
            }
            Delta::Loha { w1a, w1b, w2a, w2b, tucker: Some((t1, t2)) } => {
                (rebuild_tucker(t1, w1a, w1b)? * rebuild_tucker(t2, w2a, w2b)?)?.reshape(shape)?
            }
            Delta::Lokr { w1, w2 } => kron(&w1.build()?, &w2.build()?)?.reshape(shape)?,
            Delta::Full { diff, .. } => diff.reshape(shape)?,
            Delta::Dora { inner, inner_scale, magnitude } => {
                let adapted = (base + (inner.delta_weight(base)? * *inner_scale)?)?;
                (dora_weight(&adapted, magnitude)? - base)?
            }
            Delta::Oft { blocks, constraint } => {
                let r = cayley(blocks, *constraint, out)?;
                let eye = Tensor::eye(r.dims()[1], r.dtype(), r.device())?.unsqueeze(0)?;
                block_rotate(&(r.broadcast_sub(&eye))?.transpose(1, 2)?.contiguous()?, base)?
            }
            Delta::Boft { .. } => (self.boft_weight(base, 1.0)? - base)?,
        })
    }

    /// scale · ΔW at slider `multiplier`: the change the layer's weight gets. Every kind but BOFT
    /// is linear in the slider; BOFT's butterfly stages each move toward identity with it.
    pub fn weight_change(&self, base: &Tensor, scale: f64, multiplier: f64) -> Result<Tensor> {
        match self {
            Delta::Boft { .. } => Ok((self.boft_weight(base, multiplier)? - base)?),
            _ => Ok((self.delta_weight(base)? * (scale * multiplier))?),
        }
    }

    /// The bias change at full strength, for the kinds that carry one (full diffs).
    pub fn bias_delta(&self) -> Option<&Tensor> {
        match self {
            Delta::Full { diff_b, .. } => diff_b.as_ref(),
            _ => None,
        }
    }

    /// BOFT's adapted weight with every stage R_i blended to s·R_i + (1 − s)·I, as LyCORIS does.
    fn boft_weight(&self, base: &Tensor, s: f64) -> Result<Tensor> {
        let Delta::Boft { blocks, constraint } = self else { bail!("not a BOFT update") };
        let (m, b) = (blocks.dims()[0], blocks.dims()[2]);
        let out = base.dims()[0];
        let rest = base.elem_count() / out;
        let r = cayley(&blocks.flatten_to(1)?, *constraint, out)?.reshape(blocks.dims())?;
        let eye = Tensor::eye(b, r.dtype(), r.device())?.unsqueeze(0)?;
        let mut x = base.reshape((out, rest))?;
        for i in 0..m {
            let mut ri = r.get(i)?;
            if s != 1.0 {
                ri = ((ri * s)?.broadcast_add(&(&eye * (1.0 - s))?))?;
            }
            // Stage i pairs rows 2ⁱ·(b/2) apart: group them, rotate each block, ungroup.
            let k = (1usize << i) * (b / 2);
            let grouped = x.reshape((out / (2 * k), 2, k, rest))?.transpose(1, 2)?.contiguous()?;
            let rotated = ri.matmul(&grouped.reshape((out / b, b, rest))?)?;
            x = rotated.reshape((out / (2 * k), k, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape((out, rest))?;
        }
        Ok(x.reshape(base.dims())?)
    }

    /// ΔW·x through the factors for a linear layer (x: (…, in)), never materialising ΔW.
    /// Only for `is_factored` kinds.
    pub fn apply_linear(&self, x: &Tensor, base: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Delta::Lora { down, up } => matmul_last(&matmul_last(x, down)?, up)?,
            Delta::Glora { a1, a2, b1, b2 } => {
                let rescaled = matmul_last(&matmul_last(&matmul_last(x, a2)?, a1)?, base)?;
                (rescaled + matmul_last(&matmul_last(x, b2)?, b1)?)?
            }
            _ => bail!("{} has no factored form; use its weight change", self.algorithm()),
        })
    }

    /// ΔW ⊛ x through the factors for a convolution with the base layer's padding and stride (in
    /// that order, as every convolution here and in candle takes them). Only for `is_factored` kinds.
    pub fn apply_conv(&self, x: &Tensor, base: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        Ok(match self {
            Delta::Lora { down, up } => conv1x1(&conv2d(x, down, padding, stride)?, up)?,
            Delta::Glora { a1, a2, b1, b2 } => {
                let mixed = conv1x1(&conv1x1(x, a2)?, a1)?;
                let rescaled = conv2d(&mixed, base, padding, stride)?;
                (rescaled + conv1x1(&conv2d(x, b2, padding, stride)?, b1)?)?
            }
            _ => bail!("{} has no factored form; use its weight change", self.algorithm()),
        })
    }
}

/// w1 ⊗ w2 for w1 (o1, i1[, 1, 1]) and w2 (o2, i2[, kh, kw]) → (o1·o2, i1·i2·kh·kw); the caller
/// reshapes it to the layer. With w2 flattened to (o2, i2·kh·kw) the Kronecker product of the two
/// matrices already orders the columns as (input channel, kernel position).
fn kron(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (o1, i1) = (w1.dims()[0], w1.elem_count() / w1.dims()[0]);
    let w2 = w2.flatten_from(1)?;
    let (o2, n2) = w2.dims2()?;
    let a = w1.reshape((o1, 1, i1, 1))?;
    let b = w2.reshape((1, o2, 1, n2))?;
    Ok(a.broadcast_mul(&b)?.reshape((o1 * o2, i1 * n2))?)
}

/// Which axis a DoRA magnitude scales: the output rows ((out), (out, 1), (out, 1, 1, 1), as
/// LyCORIS 4 and PEFT write it) or the input columns ((1, in[, 1, 1]), LyCORIS' `wd_on_out=False`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DoraAxis {
    Output,
    Input,
}

fn dora_axis(magnitude: &Tensor, out: usize, inp: usize) -> Option<DoraAxis> {
    let d = magnitude.dims();
    let rest_ones = |from: usize| d.iter().skip(from).all(|&x| x == 1);
    if d.first() == Some(&out) && rest_ones(1) && magnitude.elem_count() == out {
        Some(DoraAxis::Output)
    } else if d.len() >= 2 && d[0] == 1 && d[1] == inp && rest_ones(2) {
        Some(DoraAxis::Input)
    } else {
        None
    }
}

/// m ⊙ V / ‖V‖ with the norm along the magnitude's axis (no epsilon: see the fixtures' README).
fn dora_weight(adapted: &Tensor, magnitude: &Tensor) -> Result<Tensor> {
    let dims = adapted.dims().to_vec();
    let (out, inp) = (dims[0], dims[1]);
    let axis =
        dora_axis(magnitude, out, inp).ok_or_else(|| anyhow!("DoRA magnitude {:?} fits no axis", magnitude.dims()))?;
    let kk: usize = dims[2..].iter().product();
    let v = adapted.reshape((out, inp, kk))?;
    let (norm, m) = match axis {
        DoraAxis::Output => (v.sqr()?.sum_keepdim(2)?.sum_keepdim(1)?.sqrt()?, magnitude.reshape((out, 1, 1))?),
        DoraAxis::Input => (v.sqr()?.sum_keepdim(2)?.sum_keepdim(0)?.sqrt()?, magnitude.reshape((1, inp, 1))?),
    };
    Ok(v.broadcast_mul(&m.broadcast_div(&norm)?)?.reshape(dims)?)
}

/// R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ, with LyCORIS' constraint (‖Q‖ ≤ constraint · out
/// over all blocks) when it is positive. Blocks are small; this runs in f64 on the host.
fn cayley(blocks: &Tensor, constraint: f64, out: usize) -> Result<Tensor> {
    let (n, b) = (blocks.dims()[0], blocks.dims()[1]);
    let values = blocks.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut q = vec![0f64; values.len()];
    for k in 0..n {
        for i in 0..b {
            for j in 0..b {
                q[(k * b + i) * b + j] = values[(k * b + i) * b + j] - values[(k * b + j) * b + i];
            }
        }
    }
    let limit = constraint * out as f64;
    if limit > 0.0 {
        let norm = q.iter().map(|x| x * x).sum::<f64>().sqrt() + 1e-8;
        if norm > limit {
            q.iter_mut().for_each(|x| *x *= limit / norm);
        }
    }
    let mut r = Vec::with_capacity(q.len());
    for k in 0..n {
        let block = &q[k * b * b..(k + 1) * b * b];
        let plus: Vec<f64> = (0..b * b).map(|e| block[e] + (e / b == e % b) as u8 as f64).collect();
        let minus: Vec<f64> = (0..b * b).map(|e| -block[e] + (e / b == e % b) as u8 as f64).collect();
        let inv = invert(&minus, b).ok_or_else(|| anyhow!("OFT block {k}: I − Q is singular"))?;
        for i in 0..b {
            for j in 0..b {
                r.push((0..b).map(|t| plus[i * b + t] * inv[t * b + j]).sum::<f64>());
            }
        }
    }
    Ok(Tensor::from_vec(r, (n, b, b), blocks.device())?.to_dtype(blocks.dtype())?)
}

/// The inverse of an n × n matrix by Gauss–Jordan with partial pivoting; `None` when singular.
fn invert(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..n * n).map(|e| (e / n == e % n) as u8 as f64).collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| m[x * n + col].abs().total_cmp(&m[y * n + col].abs()))?;
        if m[pivot * n + col].abs() < 1e-300 {
            return None;
        }
        for j in 0..n {
            m.swap(col * n + j, pivot * n + j);
            inv.swap(col * n + j, pivot * n + j);
        }
        let p = m[col * n + col];
        for j in 0..n {
            m[col * n + j] /= p;
            inv[col * n + j] /= p;
        }
        for row in (0..n).filter(|&r| r != col) {
            let f = m[row * n + col];
            if f != 0.0 {
                for j in 0..n {
                    m[row * n + j] -= f * m[col * n + j];
                    inv[row * n + j] -= f * inv[col * n + j];
                }
            }
        }
    }
    Some(inv)
}

/// Mₖ·Wₖ for each block of b output rows: ms (n, b, b), W (n·b, …).
fn block_rotate(ms: &Tensor, base: &Tensor) -> Result<Tensor> {
    let (n, b) = (ms.dims()[0], ms.dims()[1]);
    let rest = base.elem_count() / (n * b);
    Ok(ms.matmul(&base.reshape((n, b, rest))?)?.reshape(base.dims())?)
}

/// x (…, in) · Wᵀ for W (out, in).
fn matmul_last(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen::linear(x, w, None)
}

/// A 1×1 convolution as a matmul (w: (out, in, 1, 1) or (out, in)).
fn conv1x1(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen::pointwise(x, w, None)
}
