//! The optimisers (AdamW, Prodigy, Adafactor): the choice between them, their state for each
//! trained tensor and how a checkpoint keeps it, and the global gradient norm used for clipping.
//! The one copy, for the trainer and the built-in model's recipe (`src/bin/pretrain/`, AdamW).

mod adafactor;
mod adamw;
mod prodigy;

use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use adafactor::{Adafactor, AdafactorSettings, AdafactorSlot, SecondMoment};
pub use adamw::{AdamW, Updated};
pub use prodigy::{Prodigy, ProdigyGlobals, ProdigyInput, ProdigySettings, ProdigySlot};

use crate::engine::Result;

/// Which optimiser a run uses (kohya's `--optimizer_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[default]
    AdamW,
    Prodigy,
    Adafactor,
}

impl Optimizer {
    /// In the order a list offers them.
    pub const ALL: [Optimizer; 3] = [Optimizer::AdamW, Optimizer::Prodigy, Optimizer::Adafactor];

    /// The name in words, for a list.
    pub fn label(self) -> &'static str {
        match self {
            Optimizer::AdamW => "AdamW",
            Optimizer::Prodigy => "Prodigy (learning-rate free)",
            Optimizer::Adafactor => "Adafactor",
        }
    }

    /// One sentence on when to pick it.
    pub fn tooltip(self) -> &'static str {
        match self {
            Optimizer::AdamW => {
                "The usual choice: Adam with decoupled weight decay; needs a learning rate such as 1e-4."
            }
            Optimizer::Prodigy => {
                "Finds its own step size as it trains: set the learning rate to 1 and lower it only if training is unstable."
            }
            Optimizer::Adafactor => {
                "Adam-like with a factored second moment, so it needs less memory; takes a learning rate such as 1e-4 (or sets its own with relative step)."
            }
        }
    }

    /// The learning rate it is usually given for a LoRA (Prodigy's is a multiplier of its own
    /// estimate, so 1): what a window may fill in when the choice changes.
    pub fn usual_learning_rate(self) -> f64 {
        match self {
            Optimizer::AdamW | Optimizer::Adafactor => 1e-4,
            Optimizer::Prodigy => 1.0,
        }
    }

    /// The name on the command line and in train.toml.
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::AdamW => "adamw",
            Optimizer::Prodigy => "prodigy",
            Optimizer::Adafactor => "adafactor",
        }
    }
}

impl std::fmt::Display for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Optimizer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adamw" => Ok(Self::AdamW),
            "prodigy" => Ok(Self::Prodigy),
            "adafactor" => Ok(Self::Adafactor),
            other => bail!("unknown optimizer `{other}` (adamw, prodigy or adafactor)"),
        }
    }
}

/// An optimiser with its constants, as a run uses it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    AdamW(AdamW),
    Prodigy(Prodigy),
    Adafactor(Adafactor),
}

/// One trained tensor's optimiser state.
#[derive(Clone, Debug)]
pub enum Slot {
    AdamW { m: Tensor, v: Tensor },
    Prodigy(ProdigySlot),
    Adafactor(AdafactorSlot),
}

/// An optimiser's state for a list of tensors (one slot each, in their order) and, for Prodigy,
/// its run-wide step-size estimate.
#[derive(Clone, Debug)]
pub struct State {
    pub slots: Vec<Slot>,
    pub prodigy: Option<ProdigyGlobals>,
}

/// A step's result, not yet committed: the new state and, per tensor, its new value (none when
/// it does not move).
pub struct Stepped {
    pub state: State,
    pub weights: Vec<Option<Tensor>>,
}

impl Rule {
    pub fn optimizer(&self) -> Optimizer {
        match self {
            Rule::AdamW(_) => Optimizer::AdamW,
            Rule::Prodigy(_) => Optimizer::Prodigy,
            Rule::Adafactor(_) => Optimizer::Adafactor,
        }
    }

    /// Fresh state for `weights`.
    pub fn start(&self, weights: &[&Tensor]) -> Result<State> {
        let slots = weights
            .iter()
            .map(|w| {
                Ok(match self {
                    Rule::AdamW(_) => Slot::AdamW { m: w.zeros_like()?, v: w.zeros_like()? },
                    Rule::Prodigy(p) => Slot::Prodigy(p.slot(w)?),
                    Rule::Adafactor(a) => Slot::Adafactor(a.slot(w)?),
                })
            })
            .collect::<Result<_>>()?;
        let prodigy = match self {
            Rule::Prodigy(p) => Some(p.start()),
            _ => None,
        };
        Ok(State { slots, prodigy })
    }

    /// One step of `weights` with `grads` (already clipped; none: the tensor had no gradient and
    /// stays as it is) at learning rates `lrs` (per tensor, the schedule applied), the run's
    /// `step`-th (1 for the first; AdamW's bias correction). Nothing is written: the caller checks
    /// the result and commits it.
    pub fn step(
        &self,
        state: &State,
        weights: &[Tensor],
        grads: &[Option<Tensor>],
        lrs: &[f64],
        step: usize,
    ) -> Result<Stepped> {
        let mut next = state.clone();
        let mut moved = vec![None; weights.len()];
        match self {
            Rule::AdamW(adamw) => {
                for (i, g) in grads.iter().enumerate() {
                    let (Some(g), Slot::AdamW { m, v }) = (g, &state.slots[i]) else { continue };
                    let u = adamw.update(&weights[i], g, m, v, step, lrs[i])?;
                    next.slots[i] = Slot::AdamW { m: u.m, v: u.v };
                    moved[i] = Some(u.weight);
                }
            }
            Rule::Adafactor(adafactor) => {
                for (i, g) in grads.iter().enumerate() {
                    let (Some(g), Slot::Adafactor(slot)) = (g, &state.slots[i]) else { continue };
                    let (slot, w) = adafactor.update(&weights[i], g, slot, lrs[i])?;
                    next.slots[i] = Slot::Adafactor(slot);
                    moved[i] = Some(w);
                }
            }
            Rule::Prodigy(prodigy) => {
                let globals = state.prodigy.context("Prodigy's state lacks its step-size estimate")?;
                let mut which = Vec::new();
                let mut inputs = Vec::new();
                for (i, g) in grads.iter().enumerate() {
                    let (Some(grad), Slot::Prodigy(slot)) = (g, &state.slots[i]) else { continue };
                    which.push(i);
                    inputs.push(ProdigyInput { weight: &weights[i], grad, slot, lr: lrs[i] });
                }
                let (globals, out) = prodigy.update(&globals, &inputs)?;
                for (i, (slot, w)) in which.into_iter().zip(out) {
                    next.slots[i] = Slot::Prodigy(slot);
                    moved[i] = w;
                }
                next.prodigy = Some(globals);
            }
        }
        Ok(Stepped { state: next, weights: moved })
    }

    /// The rate a step of learning rate `lr` (schedule applied) at the run's `step` really takes,
    /// for showing: Prodigy's d·lr (kohya's `lr/d*lr`), Adafactor's relative step when it sets
    /// its own, else `lr`.
    pub fn effective_lr(&self, state: &State, lr: f64, step: usize) -> f64 {
        match self {
            Rule::AdamW(_) => lr,
            Rule::Prodigy(_) => state.prodigy.map_or(lr, |g| g.d * lr),
            Rule::Adafactor(a) => a.relative_rate(step.max(1), lr),
        }
    }
}

/// The checkpoint keys of one tensor's slot, `KIND/` before the tensor's name (AdamW's are
/// `adam_m/`, `adam_v/`, as in checkpoints written before there was a choice).
pub fn slot_tensors(slot: &Slot) -> Vec<(&'static str, &Tensor)> {
    match slot {
        Slot::AdamW { m, v } => vec![("adam_m", m), ("adam_v", v)],
        Slot::Prodigy(p) => vec![
            ("prodigy_s", &p.s),
            ("prodigy_p0", &p.p0),
            ("prodigy_exp_avg", &p.exp_avg),
            ("prodigy_exp_avg_sq", &p.exp_avg_sq),
        ],
        Slot::Adafactor(a) => match &a.second {
            SecondMoment::Factored { row, col } => vec![("adafactor_row", row), ("adafactor_col", col)],
            SecondMoment::Full(v) => vec![("adafactor_v", v)],
        },
    }
}

/// The non-tensor part of the state, kept in a checkpoint's JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scalars {
    pub prodigy: Option<ProdigyGlobals>,
    /// Adafactor: each tensor's step count, in the tensors' order.
    pub adafactor_steps: Vec<usize>,
}

impl State {
    pub fn scalars(&self) -> Scalars {
        let adafactor_steps =
            self.slots.iter().filter_map(|s| if let Slot::Adafactor(a) = s { Some(a.step) } else { None }).collect();
        Scalars { prodigy: self.prodigy, adafactor_steps }
    }

    /// The state written by `slot_tensors` and `scalars`, read back for `weights` under `rule`:
    /// `get(KIND)` fetches one tensor's `KIND/…` entry, already checked for shape by the caller.
    pub fn restore(
        rule: &Rule,
        weights: &[&Tensor],
        scalars: &Scalars,
        get: &dyn Fn(usize, &str) -> Result<Tensor>,
    ) -> Result<State> {
        let fresh = rule.start(weights)?;
        let mut slots = Vec::with_capacity(weights.len());
        for (i, slot) in fresh.slots.into_iter().enumerate() {
            let read = |kind: &str, like: &Tensor| -> Result<Tensor> {
                let t = get(i, kind)?;
                if t.dims() != like.dims() {
                    bail!("the optimiser's `{kind}` has the wrong shape");
                }
                Ok(t.to_dtype(like.dtype())?)
            };
            slots.push(match slot {
                Slot::AdamW { m, v } => Slot::AdamW { m: read("adam_m", &m)?, v: read("adam_v", &v)? },
                Slot::Prodigy(p) => Slot::Prodigy(ProdigySlot {
                    s: read("prodigy_s", &p.s)?,
                    p0: read("prodigy_p0", &p.p0)?,
                    exp_avg: read("prodigy_exp_avg", &p.exp_avg)?,
                    exp_avg_sq: read("prodigy_exp_avg_sq", &p.exp_avg_sq)?,
                }),
                Slot::Adafactor(a) => {
                    let step = *scalars
                        .adafactor_steps
                        .get(i)
                        .context("the checkpoint lacks Adafactor's step count of a trained tensor")?;
                    let second = match a.second {
                        SecondMoment::Factored { row, col } => SecondMoment::Factored {
                            row: read("adafactor_row", &row)?,
                            col: read("adafactor_col", &col)?,
                        },
                        SecondMoment::Full(v) => SecondMoment::Full(read("adafactor_v", &v)?),
                    };
                    Slot::Adafactor(AdafactorSlot { step, second })
                }
            });
        }
        let prodigy = match rule {
            Rule::Prodigy(_) => Some(scalars.prodigy.context("the checkpoint lacks Prodigy's step-size estimate")?),
            _ => None,
        };
        Ok(State { slots, prodigy })
    }
}

/// ‖g‖₂ over all gradients together (what gradient clipping compares with its limit).
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// The factor that scales gradients of norm `norm` down to `max_norm` (1 when within it).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_names_round_trip() {
        for o in Optimizer::ALL {
            assert_eq!(o.to_string().parse::<Optimizer>().unwrap(), o);
            assert_eq!(serde_json::to_value(o).unwrap(), serde_json::Value::String(o.name().into()));
            assert!(!o.label().is_empty() && o.tooltip().ends_with('.'));
        }
        assert_eq!("AdamW".parse::<Optimizer>().unwrap(), Optimizer::AdamW);
        assert_eq!(Optimizer::default(), Optimizer::AdamW);
        assert_eq!(Optimizer::Prodigy.usual_learning_rate(), 1.0);
        assert!("sgd".parse::<Optimizer>().unwrap_err().to_string().contains("adamw, prodigy or adafactor"));
    }
}
