//! The nominal work of a forward pass, counted from the shapes its layers see: 2·m·n·k FLOPs for
//! each linear, convolution (as its im2col GEMM) and attention product, and the GEMM shapes
//! themselves, so `lora-studio bench` can say how close a run comes to this CPU's GEMM rate.
//! Counting is off unless a `count` is open on the calling thread (the layers run there).

use std::cell::RefCell;
use std::collections::BTreeMap;

/// What one forward pass asked for.
#[derive(Clone, Debug, Default)]
pub struct Work {
    /// FLOPs of linears and convolutions (their frozen weights' GEMMs).
    pub dense: f64,
    /// FLOPs of attention's two products per head (scores and the weighted sum).
    pub attention: f64,
    /// Every GEMM shape (m, n, k) with how many times it ran.
    pub shapes: BTreeMap<(usize, usize, usize), usize>,
}

impl Work {
    pub fn forward(&self) -> f64 {
        self.dense + self.attention
    }

    /// A training step with frozen weights (LoRA): the forward, and a backward that gives each
    /// dense layer's input its gradient (one GEMM of the forward's size) and attention's four
    /// products (twice its forward). Weight gradients of frozen layers are not computed; the
    /// adapters' own are a rounding error beside these, and recomputation (checkpointing) is not
    /// counted as work.
    pub fn frozen_training_step(&self) -> f64 {
        2.0 * self.dense + 3.0 * self.attention
    }
}

thread_local! {
    static OPEN: RefCell<Option<Work>> = const { RefCell::new(None) };
}

/// Runs `f` with counting on for this thread and returns what it counted.
pub fn count<R>(f: impl FnOnce() -> R) -> (R, Work) {
    let before = OPEN.with(|c| c.replace(Some(Work::default())));
    let r = f();
    let work = OPEN.with(|c| std::mem::replace(&mut *c.borrow_mut(), before)).unwrap_or_default();
    (r, work)
}

fn add(shape: (usize, usize, usize), times: usize, attention: bool) {
    OPEN.with(|c| {
        if let Some(w) = c.borrow_mut().as_mut() {
            let flops = 2.0 * (shape.0 * shape.1 * shape.2 * times) as f64;
            if attention {
                w.attention += flops;
            } else {
                w.dense += flops;
            }
            *w.shapes.entry(shape).or_default() += times;
        }
    });
}

/// A linear layer over `rows` rows: (rows × in) · (in × out).
pub(crate) fn linear(rows: usize, inp: usize, out: usize) {
    add((rows, out, inp), 1, false);
}

/// A convolution of `images` images, as the GEMM of its kernel (out × in·kh·kw) with the im2col
/// of one image ((in·kh·kw) × out_pixels).
pub(crate) fn conv(images: usize, out: usize, in_taps: usize, out_pixels: usize) {
    add((out, out_pixels, in_taps), images, false);
}

/// Attention of `heads_total` (batch × heads) heads: scores (queries × dim)·(dim × keys), then
/// (queries × keys)·(keys × dim).
pub(crate) fn attention(heads_total: usize, queries: usize, keys: usize, dim: usize) {
    add((queries, keys, dim), heads_total, true);
    add((queries, dim, keys), heads_total, true);
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::count;
    use crate::engine::adapters::stack::AdapterStack;
    use crate::engine::kernels::attention::attention;
    use crate::engine::models::nn::{Conv2d, Linear};

    /// Each layer counts 2·m·n·k from the shapes it sees (a strided, padded convolution's output
    /// size included), and nothing is counted outside `count`.
    #[test]
    fn layers_count_their_gemms_from_their_shapes() {
        let dev = Device::Cpu;
        let linear = Linear {
            path: "l".into(),
            stack: AdapterStack::new(Tensor::zeros((6, 5), candle_core::DType::F32, &dev).unwrap()),
            bias: None,
        };
        let conv = Conv2d {
            path: "c".into(),
            stack: AdapterStack::new(Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &dev).unwrap()),
            bias: None,
            stride: 2,
            padding: 1,
        };
        let x = Tensor::zeros((2, 7, 5), candle_core::DType::F32, &dev).unwrap();
        let image = Tensor::zeros((2, 3, 9, 8), candle_core::DType::F32, &dev).unwrap();
        let q = Tensor::zeros((2, 10, 8), candle_core::DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((2, 7, 8), candle_core::DType::F32, &dev).unwrap();
        linear.forward(&x).unwrap(); // not counted
        let (_, work) = count(|| {
            linear.forward(&x).unwrap();
            conv.forward(&image).unwrap();
            attention(&q, &kv, &kv, 2, false).unwrap();
        });
        // 14 rows × 5 → 6; 2 images, 4 × 27 taps × (5 × 4) output pixels; 4 heads of 10 × 7 × 4.
        assert_eq!(work.dense, 2.0 * (14 * 5 * 6) as f64 + 2.0 * (2 * 4 * 27 * 20) as f64);
        assert_eq!(work.attention, 2.0 * 2.0 * (4 * 10 * 7 * 4) as f64);
        assert_eq!(work.shapes.get(&(14, 6, 5)), Some(&1));
        assert_eq!(work.shapes.get(&(4, 20, 27)), Some(&2));
        assert_eq!(work.frozen_training_step(), 2.0 * work.dense + 3.0 * work.attention);
    }
}
