//! Adapters: the per-layer stack that applies them (`stack`), their files (`formats`), blending by
//! exact SVD (`svd`), and a model's live mix exported or folded into its weights (`mix`).

pub mod delta;
pub mod formats;
pub mod mix;
pub mod stack;
pub mod svd;
