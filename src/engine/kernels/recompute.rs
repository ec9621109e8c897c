//! Gradient checkpointing: a UNet block runs forward without keeping its activations, and the
//! backward pass runs it again to get them — about a third more compute for the memory of every
//! activation inside the block. candle has no such op, so the block's output is re-attached under
//! a custom op whose backward re-runs the block; the gradients of the trainable weights inside
//! reach the trainer through a `GradSink`, since a custom op returns gradients for its inputs only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, TensorId, Var};

use crate::engine::Result;

/// A block as a function of its input and one extra input (time embedding or text context).
pub type Segment = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Collects the gradients of the trainable weights used inside checkpointed blocks.
pub struct GradSink {
    vars: Vec<Var>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradSink({} weights)", self.vars.len())
    }
}

impl GradSink {
    pub fn new(vars: Vec<Var>) -> Arc<Self> {
        Arc::new(Self { vars, grads: Mutex::new(HashMap::new()) })
    }

    fn collect(&self, store: &GradStore) -> candle_core::Result<()> {
        let mut grads = self.grads.lock().unwrap_or_else(|e| e.into_inner());
        for v in &self.vars {
            if let Some(g) = store.get(v.as_tensor()) {
                let g = g.detach();
                let sum = match grads.remove(&v.id()) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                grads.insert(v.id(), sum);
            }
        }
        Ok(())
    }

    /// The gradient gathered for `var` since the last take (none if no block used it).
    pub fn take(&self, var: &Tensor) -> Option<Tensor> {
        self.grads.lock().unwrap_or_else(|e| e.into_inner()).remove(&var.id())
    }
}

/// `segment(x, extra)`, checkpointed when `sink` holds trainable weights and the CPU runs it.
pub fn checkpointed(segment: Segment, x: &Tensor, extra: &Tensor, sink: &Arc<GradSink>) -> Result<Tensor> {
    let Some(anchor) = sink.vars.first() else { return segment(x, extra) };
    if !x.device().is_cpu() || crate::engine::kernels::cpu::composed_ops() {
        // Other devices keep the block's activations: the same gradients, without the saving.
        return segment(x, extra);
    }
    // Detaching the result drops the graph, and with it every activation inside the block.
    let output = segment(&x.detach(), &extra.detach())?.detach();
    let op = Checkpoint { segment, output, sink: sink.clone() };
    // The anchor (a trainable weight) makes sure the op is on the graph even when neither input
    // needs a gradient, so the weights inside still get theirs.
    Ok(x.apply_op3(extra, anchor.as_tensor(), op)?)
}

struct Checkpoint {
    segment: Segment,
    output: Tensor,
    sink: Arc<GradSink>,
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self.output.contiguous()?;
        let (storage, layout) = output.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("checkpoint: the output is not on the CPU");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("checkpoint: the output is not contiguous");
        };
        let data = match cpu {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
            _ => candle_core::bail!("checkpoint: unsupported dtype"),
        };
        Ok((data, layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        extra: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Run the block again, this time keeping its graph, and backpropagate through it.
        let xv = Var::from_tensor(&x.detach())?;
        let ev = Var::from_tensor(&extra.detach())?;
        let y =
            (self.segment)(xv.as_tensor(), ev.as_tensor()).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        self.sink.collect(&store)?;
        let dx = if x.track_op() { store.get(xv.as_tensor()).map(Tensor::detach) } else { None };
        let de = if extra.track_op() { store.get(ev.as_tensor()).map(Tensor::detach) } else { None };
        Ok((dx, de, None))
    }
}
