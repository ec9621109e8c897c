//! CPU kernels with their own backward passes where candle's are missing, wrong or slow:
//! fused attention, convolution (im2col, and Winograd for large 3×3 layers), frozen-weight ops,
//! GEGLU, SiLU, normalisation, and gradient recomputation; `cpu` holds the thread settings and the
//! GEMM and storage helpers they share; `flops` counts the nominal work of a forward pass for the
//! benchmarks.

pub mod attention;
pub mod conv;
pub mod cpu;
pub mod flops;
pub mod frozen;
pub mod geglu;
pub mod normalise;
pub mod recompute;
pub mod silu;
mod winograd;
