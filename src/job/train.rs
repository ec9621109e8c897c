//! A training run on a worker thread. Commands: pause, resume, stop, save now, sample now.
//! Events: started, every step (loss, lr, it/s, ETA), samples, checkpoints with validation loss,
//! paused (with the reason), finished, failed. A panic in the worker becomes `Failed`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::engine::Result;
use crate::engine::adapters::formats::{ExportLayer, Naming};
use crate::engine::diffusion::sampler::SamplerKind;
use crate::engine::pipeline::{GenerateRequest, ModelWeights, StableDiffusion};
use crate::engine::train::dataset::Dataset;
use crate::engine::train::trainer::{
    Algorithm, CheckpointSummary, NonFiniteLoss, RunOutputs, TrainConfig, Trainer, checkpoint_path,
};

/// What to train, on what, and where to put it.
#[derive(Clone, Debug)]
pub struct TrainJobSpec {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    /// The adapter file (a model folder for full fine-tuning); its checkpoint goes beside it
    /// (`<name>.checkpoint.safetensors`).
    pub out: PathBuf,
    pub config: TrainConfig,
    pub resume: Option<PathBuf>,
    pub naming: Naming,
    /// Where to compute: the CPU, or a GPU when built with candle's `cuda` / `metal` features.
    pub device: Device,
    /// How the frozen model's weights are kept in memory (the adapters train in f32 either way).
    pub weights: crate::engine::io::weights::WeightPrecision,
    /// Replace an existing output, or an earlier run's checkpoint, instead of refusing.
    pub overwrite: bool,
    /// Adapter files in use elsewhere (the Playground's), which the run must not write over.
    pub in_use: Vec<PathBuf>,
}

#[derive(Clone, Debug)]
pub enum TrainCommand {
    Pause,
    Resume,
    /// Finish the current step, save, and end.
    Stop,
    SaveNow,
    SampleNow(String),
}

#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// Pre-flight findings, before any heavy work.
    Preflight {
        images: usize,
        /// How many images go to each training size.
        buckets: String,
        /// Each folder's images and repeats, and the images per epoch.
        repeats: String,
        /// How many epochs the run's steps are.
        epochs: String,
        warnings: Vec<String>,
    },
    /// The images' latents being encoded before the first step (`done` of `total` images).
    Encoding {
        done: usize,
        total: usize,
    },
    Started {
        total_steps: usize,
        start_step: usize,
        parameters: usize,
        layers: usize,
    },
    Step {
        step: usize,
        total: usize,
        loss: f32,
        lr: f64,
        it_per_s: f64,
        eta: Duration,
    },
    Sample {
        step: usize,
        prompt: String,
        image: image::RgbImage,
    },
    Checkpoint {
        step: usize,
        /// The run's adapter file (rewritten at each save).
        adapter: PathBuf,
        /// This step's adapter, kept: `-stepNNNNNNNN` beside `adapter` for saves before the
        /// end (kohya's naming), else `adapter` itself.
        step_adapter: PathBuf,
        checkpoint: PathBuf,
        validation_loss: f32,
    },
    /// The adapter as it is now, in memory, so the playground can mix it while training goes on
    /// (sent at every checkpoint; not for full fine-tuning).
    Snapshot {
        step: usize,
        layers: std::sync::Arc<Vec<ExportLayer>>,
    },
    Paused {
        step: usize,
        reason: Option<String>,
    },
    Resumed {
        step: usize,
    },
    Finished {
        step: usize,
        adapter: PathBuf,
    },
    /// Stopped before the first step (while loading, or before it ran): nothing was written.
    Cancelled,
    Failed {
        error: String,
    },
}

/// The caller's handle: send commands, drain events. Dropping it stops the run.
pub struct TrainJob {
    commands: Sender<TrainCommand>,
    pub events: Receiver<TrainEvent>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TrainJob {
    /// Starts the run; `wake` is called after every event (the window requests a repaint). Fails
    /// only when the system will not give a new thread.
    pub fn start(spec: TrainJobSpec, wake: impl Fn() + Send + 'static) -> Result<Self> {
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("training".into())
            .spawn(move || {
                let events = Events { tx: ev_tx, wake: Box::new(wake) };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&spec, &cmd_rx, &events)));
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => events.send(TrainEvent::Failed { error: format!("{e:#}") }),
                    Err(panic) => {
                        let msg = super::panic_message(&*panic);
                        events.send(TrainEvent::Failed { error: format!("the training worker crashed: {msg}") });
                    }
                }
            })
            .context("cannot start the training thread")?;
        Ok(Self { commands: cmd_tx, events: ev_rx, thread: Some(thread) })
    }

    pub fn send(&self, command: TrainCommand) {
        let _ = self.commands.send(command);
    }

    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits for the worker to end (after `Stop`, or when it finishes on its own).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TrainJob {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.commands.send(TrainCommand::Stop);
            let _ = t.join();
        }
    }
}

struct Events {
    tx: Sender<TrainEvent>,
    wake: Box<dyn Fn() + Send>,
}

impl Events {
    fn send(&self, e: TrainEvent) {
        let _ = self.tx.send(e);
        (self.wake)();
    }
}

fn run(spec: &TrainJobSpec, commands: &Receiver<TrainCommand>, events: &Events) -> Result<()> {
    // A resumed run takes its checkpoint's options (the adapter's kind, rank and targets must be
    // the ones it was made with, and the data and optimiser settings for an exact resume), all
    // but the total of steps, which may be raised to train on; the model is checked before the
    // slow loading.
    let resumed = match &spec.resume {
        Some(resume) => {
            let summary = CheckpointSummary::read(resume)?;
            if let (Some(theirs), Some(ours)) = (summary.family, ModelWeights::probe_family(&spec.model))
                && theirs != ours
            {
                bail!(
                    "{}: this checkpoint was trained on an {} model, and {} is an {} model: open the model it was trained on",
                    resume.display(),
                    theirs.label(),
                    spec.model.display(),
                    ours.label()
                );
            }
            Some(TrainConfig { steps: spec.config.steps, epochs: spec.config.epochs, ..summary.config })
        }
        None => None,
    };
    let cfg = resumed.as_ref().unwrap_or(&spec.config);
    cfg.validate()?;
    // Before the slow loading: a run that could not write its outputs fails now, not at the end.
    RunOutputs {
        out: &spec.out,
        model: &spec.model,
        data: &spec.data,
        in_use: &spec.in_use,
        resume: spec.resume.as_deref(),
        full_finetune: cfg.algorithm == Algorithm::Full,
        overwrite: spec.overwrite,
    }
    .check()?;
    let weights = ModelWeights::load(&spec.model, DType::F32, spec.weights, &spec.device)?;
    if stop_asked(commands) {
        return cancelled(events);
    }
    // The weights are in memory now; what the step needs beyond them must fit in what is left
    // (system memory: on a GPU the activations live elsewhere, and this estimate does not apply).
    if matches!(spec.device, Device::Cpu)
        && let Some(available) = crate::engine::train::memory::available_bytes()
    {
        crate::engine::train::memory::check_training_fits(&weights.unet_config, &weights.vae_config, cfg, available)?;
    }
    let dataset = Dataset::scan(&spec.data, &cfg.dataset)?;
    if stop_asked(commands) {
        return cancelled(events);
    }
    // A run set in epochs is as many steps as they are over this dataset.
    let cfg = &TrainConfig { steps: cfg.total_steps(&dataset), ..cfg.clone() };
    let preflight = dataset.preflight(&cfg.dataset, &|c| weights.tokenizer.count_tokens(c));
    events.send(TrainEvent::Preflight {
        images: dataset.images.len(),
        buckets: preflight.bucket_summary(),
        repeats: preflight.repeats_summary(),
        epochs: preflight.epochs_summary(cfg.steps, cfg.batch_size, cfg.grad_accum),
        warnings: preflight.warnings(),
    });
    // A progress event a second at most: thousands of images take a minute to encode. A Stop
    // is looked for between images, so it ends the encoding within one image.
    let last = std::cell::Cell::new(None::<Instant>);
    let encoded = |done: usize, total: usize| -> Result<()> {
        if done == total || last.get().is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last.set(Some(Instant::now()));
            events.send(TrainEvent::Encoding { done, total });
        }
        if stop_asked(commands) {
            return Err(StoppedWhileLoading.into());
        }
        Ok(())
    };
    let trainer = if cfg.algorithm == Algorithm::Full {
        Trainer::new_full_reporting(weights, cfg.clone(), &dataset, &encoded)
    } else {
        Trainer::new_reporting(StableDiffusion::from_weights(weights)?, cfg.clone(), &dataset, &encoded)
    };
    let mut trainer = match trainer {
        Err(e) if e.is::<StoppedWhileLoading>() => return cancelled(events),
        other => other?,
    };
    if stop_asked(commands) {
        return cancelled(events);
    }
    let ckpt = checkpoint_path(&spec.out);
    // What a killed earlier run may have left half-written under a temporary name.
    crate::engine::io::weights::tidy_temporaries_beside(&spec.out);
    if let Some(resume) = &spec.resume {
        trainer.load_checkpoint(resume)?;
        // A run killed by an older version between its checkpoint and its step adapter.
        let step = trainer.step;
        if !trainer.is_full_finetune()
            && cfg.save_every > 0
            && step > 0
            && step % cfg.save_every == 0
            && step < cfg.steps
        {
            let step_adapter = crate::engine::train::trainer::step_adapter_path(&spec.out, step);
            if !step_adapter.exists() {
                trainer.save_adapter(&step_adapter, spec.naming)?;
            }
        }
    } else {
        // A checkpoint at step 0 means a NaN can always be rolled back.
        trainer.save_checkpoint(&ckpt)?;
    }
    let fresh_checkpoint = spec.resume.is_none();
    let total = trainer.config.steps;
    events.send(TrainEvent::Started {
        total_steps: total,
        start_step: trainer.step,
        parameters: trainer.trainable_parameters(),
        layers: trainer.trained_layers(),
    });
    let started = Instant::now();
    let first_step = trainer.step;
    let mut paused = false;
    let mut stop = false;
    while trainer.step < total && !stop {
        // Commands: non-blocking while running, blocking while paused.
        loop {
            let cmd = if paused {
                match commands.recv() {
                    Ok(c) => c,
                    Err(_) => return Ok(()), // the caller is gone
                }
            } else {
                match commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stop = true;
                        break;
                    }
                }
            };
            match cmd {
                TrainCommand::Pause => {
                    paused = true;
                    events.send(TrainEvent::Paused { step: trainer.step, reason: None });
                }
                TrainCommand::Resume => {
                    if paused {
                        paused = false;
                        events.send(TrainEvent::Resumed { step: trainer.step });
                    }
                }
                TrainCommand::Stop => {
                    stop = true;
                    break;
                }
                TrainCommand::SaveNow => save(&mut trainer, spec, &ckpt, events)?,
                TrainCommand::SampleNow(prompt) => sample(&trainer, &prompt, events)?,
            }
            if !paused {
                break;
            }
        }
        if stop {
            break;
        }
        match trainer.train_step() {
            Ok(loss) => {
                let done = trainer.step - first_step;
                let elapsed = started.elapsed().as_secs_f64();
                let it_per_s = done as f64 / elapsed.max(1e-9);
                let eta = Duration::from_secs_f64((total - trainer.step) as f64 / it_per_s.max(1e-9));
                events.send(TrainEvent::Step {
                    step: trainer.step,
                    total,
                    loss,
                    lr: trainer.current_lr(),
                    it_per_s,
                    eta,
                });
            }
            Err(e) if e.downcast_ref::<NonFiniteLoss>().is_some() => {
                // Roll back to the last good checkpoint and wait for the user.
                trainer.load_checkpoint(&ckpt).context("rolling back to the last checkpoint")?;
                paused = true;
                events.send(TrainEvent::Paused {
                    step: trainer.step,
                    reason: Some(format!("{e}; rolled back to the checkpoint at step {}", trainer.step)),
                });
                continue;
            }
            Err(e) => return Err(e),
        }
        if cfg.save_every > 0 && trainer.step % cfg.save_every == 0 && trainer.step < total {
            save(&mut trainer, spec, &ckpt, events)?;
        }
        if cfg.sample_every > 0 && trainer.step % cfg.sample_every == 0 && !cfg.sample_prompt.is_empty() {
            sample(&trainer, &cfg.sample_prompt, events)?;
        }
    }
    if trainer.step == first_step {
        // Stopped before a step ran: nothing to save, and the step-0 checkpoint this run wrote
        // goes too (an untrained adapter marked best would only mislead).
        if fresh_checkpoint {
            let _ = std::fs::remove_file(&ckpt);
        }
        return cancelled(events);
    }
    save(&mut trainer, spec, &ckpt, events)?;
    events.send(TrainEvent::Finished { step: trainer.step, adapter: spec.out.clone() });
    Ok(())
}

/// Whether Stop was sent (or the caller is gone) while the run was loading; other commands make
/// no sense before the first step and are dropped.
fn stop_asked(commands: &Receiver<TrainCommand>) -> bool {
    loop {
        match commands.try_recv() {
            Ok(TrainCommand::Stop) | Err(TryRecvError::Disconnected) => return true,
            Ok(_) => {}
            Err(TryRecvError::Empty) => return false,
        }
    }
}

/// The encoding of the images ended by a Stop.
#[derive(Debug)]
struct StoppedWhileLoading;

impl std::fmt::Display for StoppedWhileLoading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped while the images were being encoded")
    }
}

impl std::error::Error for StoppedWhileLoading {}

fn cancelled(events: &Events) -> Result<()> {
    events.send(TrainEvent::Cancelled);
    Ok(())
}

fn save(trainer: &mut Trainer, spec: &TrainJobSpec, ckpt: &std::path::Path, events: &Events) -> Result<()> {
    // The adapters first and the checkpoint last: a kill in between resumes from the previous
    // checkpoint and writes these again, so no `-stepN` file is ever skipped.
    let mut step_adapter = spec.out.clone();
    if trainer.is_full_finetune() {
        trainer.save_model(&spec.out)?;
    } else {
        trainer.save_adapter(&spec.out, spec.naming)?;
        if trainer.step < trainer.config.steps {
            step_adapter = crate::engine::train::trainer::step_adapter_path(&spec.out, trainer.step);
            trainer.save_adapter(&step_adapter, spec.naming)?;
        }
        events.send(TrainEvent::Snapshot { step: trainer.step, layers: std::sync::Arc::new(trainer.export_layers()?) });
    }
    trainer.save_checkpoint(ckpt)?;
    let validation_loss = trainer.validation_loss()?;
    events.send(TrainEvent::Checkpoint {
        step: trainer.step,
        adapter: spec.out.clone(),
        step_adapter,
        checkpoint: ckpt.to_path_buf(),
        validation_loss,
    });
    Ok(())
}

fn sample(trainer: &Trainer, prompt: &str, events: &Events) -> Result<()> {
    let sd = &trainer.model;
    let side = trainer.config.dataset.resolution / sd.size_multiple() * sd.size_multiple();
    let req = GenerateRequest {
        prompt: prompt.to_string(),
        negative: String::new(),
        seed: trainer.config.seed,
        steps: 20,
        guidance: 7.5,
        sampler: SamplerKind::Ddim,
        width: side.max(sd.size_multiple()),
        height: side.max(sd.size_multiple()),
        clip_skip: trainer.config.clip_skip,
    };
    let image = sd.generate(&req, &mut |_, _| {})?;
    events.send(TrainEvent::Sample { step: trainer.step, prompt: prompt.to_string(), image });
    Ok(())
}
