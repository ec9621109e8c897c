//! AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW`): bias-corrected first and second
//! moments, decoupled weight decay.

use candle_core::Tensor;

use crate::engine::Result;

/// AdamW's constants (PyTorch's defaults are 0.9, 0.999, 1e-8 and 0.01).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter's AdamW state after an update.
pub struct Updated {
    pub m: Tensor,
    pub v: Tensor,
    pub weight: Tensor,
}

impl AdamW {
    /// The update of weight `w` with gradient `g` (already clipped) and moments `m`, `v`, at
    /// `step` (1 for the first) and learning rate `lr`. Nothing is written: the caller commits
    /// the result (the trainer first checks every parameter's for NaN).
    pub fn update(&self, w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, step: usize, lr: f64) -> Result<Updated> {
        let t = step as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
        let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let direction = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
        let weight = ((w * (1.0 - lr * self.weight_decay))? - (direction * lr)?)?;
        Ok(Updated { m, v, weight })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::engine::train::optim::{clip_factor, global_norm};

    /// Against PyTorch's `torch.optim.AdamW` formula written out by hand in f64, two steps.
    #[test]
    fn two_steps_match_the_formula() {
        let opt = AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let dev = Device::Cpu;
        let w0 = Tensor::new(&[0.5f64, -1.0], &dev).unwrap();
        let g = [Tensor::new(&[0.1f64, 0.2], &dev).unwrap(), Tensor::new(&[-0.3f64, 0.05], &dev).unwrap()];
        let (mut w, mut m, mut v) = (w0.clone(), w0.zeros_like().unwrap(), w0.zeros_like().unwrap());
        for (k, g) in g.iter().enumerate() {
            let u = opt.update(&w, g, &m, &v, k + 1, 1e-2).unwrap();
            (w, m, v) = (u.weight, u.m, u.v);
        }
        // By hand: element 0.
        let (lr, wd, b1, b2, eps) = (1e-2, 0.01, 0.9f64, 0.999f64, 1e-8);
        let (mut w_, mut m_, mut v_) = (0.5f64, 0.0, 0.0);
        for (t, g) in [(1, 0.1f64), (2, -0.3)] {
            m_ = b1 * m_ + (1.0 - b1) * g;
            v_ = b2 * v_ + (1.0 - b2) * g * g;
            let dir = (m_ / (1.0 - b1.powi(t))) / ((v_ / (1.0 - b2.powi(t))).sqrt() + eps);
            w_ = w_ * (1.0 - lr * wd) - lr * dir;
        }
        let got = w.to_vec1::<f64>().unwrap()[0];
        assert!((got - w_).abs() < 1e-12, "{got} vs {w_}");
        assert!((global_norm([&g[0]]).unwrap() - (0.01f64 + 0.04).sqrt()).abs() < 1e-12);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(2.0, 1.0) - 1.0 / (2.0 + 1e-6)).abs() < 1e-15);
    }
}
