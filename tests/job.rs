//! The training job on its worker thread, driven only through its channels.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use lora_studio::engine::adapters::delta::Delta;
use lora_studio::engine::adapters::formats::{Naming, read_adapter};
use lora_studio::engine::train::dataset::DatasetOptions;
use lora_studio::engine::train::trainer::TrainConfig;
use lora_studio::job::{TrainCommand, TrainEvent, TrainJob, TrainJobSpec};

fn make_images(dir: &Path) {
    for i in 0..3u8 {
        let img = image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([i * 80, (x * 6) as u8, (y * 6) as u8]));
        img.save(dir.join(format!("img{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("img{i}.txt")), "a gradient").unwrap();
    }
}

fn spec(dir: &Path, steps: usize, lr: f64) -> TrainJobSpec {
    TrainJobSpec {
        model: sd1_tiny().join("model"),
        data: vec![dir.join("data")],
        out: dir.join("out/adapter.safetensors"),
        config: TrainConfig {
            steps,
            learning_rate: lr,
            save_every: 3,
            dataset: DatasetOptions { resolution: 32, ..Default::default() },
            ..Default::default()
        },
        resume: None,
        naming: Naming::Kohya,
        device: candle_core::Device::Cpu,
        weights: Default::default(),
        overwrite: false,
        in_use: Vec::new(),
    }
}

fn next(job: &TrainJob) -> TrainEvent {
    job.events.recv_timeout(Duration::from_secs(120)).expect("an event within two minutes")
}

#[test]
fn pause_resume_stop_and_resume_from_checkpoint() {
    let dir = tempdir("control");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    make_images(&dir.join("data"));
    let job = TrainJob::start(spec(&dir, 1000, 1e-3), || {}).unwrap();
    // Run until a couple of steps are done, then pause.
    loop {
        if let TrainEvent::Step { step: 2, .. } = next(&job) {
            job.send(TrainCommand::Pause);
            break;
        }
    }
    let paused_at = loop {
        match next(&job) {
            TrainEvent::Paused { step, reason: None } => break step,
            TrainEvent::Step { .. } | TrainEvent::Checkpoint { .. } | TrainEvent::Snapshot { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    // While paused nothing moves.
    assert!(job.events.recv_timeout(Duration::from_millis(300)).is_err());
    job.send(TrainCommand::Resume);
    assert!(matches!(next(&job), TrainEvent::Resumed { step } if step == paused_at));
    job.send(TrainCommand::Stop);
    let mut finished_at = None;
    let mut snapshot_layers = 0;
    while let Ok(e) = job.events.recv_timeout(Duration::from_secs(120)) {
        match e {
            TrainEvent::Finished { step, adapter } => {
                assert!(adapter.exists());
                finished_at = Some(step);
            }
            TrainEvent::Snapshot { layers, .. } => snapshot_layers = layers.len(),
            _ => {}
        }
    }
    assert!(snapshot_layers > 0, "the final save publishes an in-memory snapshot");
    let finished_at = finished_at.expect("Stop saves and finishes");
    assert!(finished_at < 1000);
    job.join();

    // Resume from the checkpoint the stop left behind and run to a new total.
    let mut s = spec(&dir, finished_at + 2, 1e-3);
    s.resume = Some(dir.join("out/adapter.checkpoint.safetensors"));
    let job = TrainJob::start(s, || {}).unwrap();
    let mut start = None;
    let mut end = None;
    while let Ok(e) = job.events.recv_timeout(Duration::from_secs(120)) {
        match e {
            TrainEvent::Started { start_step, .. } => start = Some(start_step),
            TrainEvent::Finished { step, .. } => end = Some(step),
            TrainEvent::Failed { error } => panic!("{error}"),
            _ => {}
        }
    }
    assert_eq!((start, end), (Some(finished_at), Some(finished_at + 2)));
}

#[test]
fn a_nan_loss_pauses_with_the_reason_and_never_writes_a_nan_adapter() {
    let dir = tempdir("nan");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    make_images(&dir.join("data"));
    let mut s = spec(&dir, 50, f64::MAX / 4.0);
    s.config.max_grad_norm = None;
    s.config.save_every = 1;
    let job = TrainJob::start(s, || {}).unwrap();
    let reason = loop {
        match next(&job) {
            TrainEvent::Paused { reason: Some(r), .. } => break r,
            TrainEvent::Failed { error } => panic!("{error}"),
            _ => {}
        }
    };
    assert!(reason.contains("lower the learning rate"), "{reason}");
    assert!(reason.contains("rolled back"), "{reason}");
    job.send(TrainCommand::Stop);
    let mut ended = None;
    while let Ok(e) = job.events.recv_timeout(Duration::from_secs(60)) {
        if matches!(e, TrainEvent::Finished { .. } | TrainEvent::Cancelled) {
            ended = Some(e);
        }
    }
    job.join();
    let adapter = dir.join("out/adapter.safetensors");
    match ended.expect("the stop ends the run") {
        // Rolled back to step 0 (the first step's loss was not finite): a stop there writes
        // nothing, not an untrained adapter and its step-0 checkpoint.
        TrainEvent::Cancelled => {
            assert!(reason.contains("at step 0"), "{reason}");
            assert!(!adapter.exists() && !dir.join("out/adapter.checkpoint.safetensors").exists());
        }
        _ => {
            for l in read_adapter(&adapter).unwrap().layers {
                for t in l.delta.tensors() {
                    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                    assert!(v.iter().all(|x| x.is_finite()), "{} holds non-finite values", l.key);
                }
            }
        }
    }
}

/// Stop while the model and images load is honoured: the run ends as cancelled, writing nothing
/// (no adapter, no step-0 checkpoint).
#[test]
fn a_stop_before_the_first_step_writes_nothing() {
    let dir = tempdir("cancel");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    make_images(&dir.join("data"));
    let job = TrainJob::start(spec(&dir, 50, 1e-3), || {}).unwrap();
    job.send(TrainCommand::Stop);
    let mut events = Vec::new();
    while let Ok(e) = job.events.recv_timeout(Duration::from_secs(60)) {
        events.push(e);
    }
    job.join();
    assert!(matches!(events.last(), Some(TrainEvent::Cancelled)), "{events:?}");
    // Honoured while loading: it never got as far as starting (nor encoding the images).
    let started = |e: &TrainEvent| matches!(e, TrainEvent::Started { .. } | TrainEvent::Encoding { .. });
    assert!(!events.iter().any(started), "{events:?}");
    let out = dir.join("out");
    let written: Vec<_> = std::fs::read_dir(&out).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn a_stop_while_the_images_are_encoded_ends_the_encoding() {
    let dir = tempdir("cancel-encoding");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..40u8 {
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([i * 6, (x * 4) as u8, (y * 4) as u8]));
        img.save(data.join(format!("img{i:02}.png"))).unwrap();
    }
    let job = TrainJob::start(spec(&dir, 50, 1e-3), || {}).unwrap();
    let mut events = Vec::new();
    while let Ok(e) = job.events.recv_timeout(Duration::from_secs(120)) {
        // Stop as soon as the encoding says where it is ("encoding image 0/40").
        if matches!(e, TrainEvent::Encoding { .. }) && !events.iter().any(|e| matches!(e, TrainEvent::Encoding { .. }))
        {
            job.send(TrainCommand::Stop);
        }
        events.push(e);
    }
    job.join();
    assert!(matches!(events.last(), Some(TrainEvent::Cancelled)), "{events:?}");
    // Ended inside the encoding: the last progress is short of all 40 images, and no step ran.
    let done = events.iter().filter_map(|e| if let TrainEvent::Encoding { done, .. } = e { Some(*done) } else { None });
    assert!(done.max().is_some_and(|d| d < 40), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, TrainEvent::Started { .. } | TrainEvent::Step { .. })));
    let written: Vec<_> =
        std::fs::read_dir(dir.join("out")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn a_resume_takes_the_checkpoints_options_and_refuses_another_family_before_loading() {
    let dir = tempdir("resume-options");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    make_images(&dir.join("data"));
    let mut first = spec(&dir, 3, 1e-3);
    first.config.rank = 2;
    let job = TrainJob::start(first, || {}).unwrap();
    while job.events.recv_timeout(Duration::from_secs(120)).is_ok() {}
    job.join();
    let checkpoint = dir.join("out/adapter.checkpoint.safetensors");

    // The form says rank 8 and LoCon; the checkpoint's rank 2 LoRA goes on, to the new total.
    let mut again = spec(&dir, 5, 1e-3);
    again.config.rank = 8;
    again.config.algorithm = lora_studio::engine::train::trainer::Algorithm::Locon;
    again.resume = Some(checkpoint.clone());
    let job = TrainJob::start(again, || {}).unwrap();
    let mut finished = None;
    while let Ok(e) = job.events.recv_timeout(Duration::from_secs(120)) {
        match e {
            TrainEvent::Failed { error } => panic!("{error}"),
            TrainEvent::Finished { step, .. } => finished = Some(step),
            _ => {}
        }
    }
    job.join();
    assert_eq!(finished, Some(5));
    let adapter = read_adapter(&dir.join("out/adapter.safetensors")).unwrap();
    assert!(adapter.layers.iter().all(|l| l.delta.rank() == 2 && matches!(l.delta, Delta::Lora { .. })));

    // An SDXL model for an SD 1.x checkpoint: refused in words, before the model is read.
    let mut wrong = spec(&dir, 6, 1e-3);
    wrong.model = fixtures_dir().join("sdxl-tiny/model");
    wrong.resume = Some(checkpoint);
    let job = TrainJob::start(wrong, || {}).unwrap();
    let mut events = Vec::new();
    while let Ok(e) = job.events.recv_timeout(Duration::from_secs(120)) {
        events.push(e);
    }
    job.join();
    match events.as_slice() {
        [TrainEvent::Failed { error }] => {
            assert!(error.contains("trained on an SD 1.x model") && error.contains("SDXL"), "{error}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_data_fails_with_a_message() {
    let dir = tempdir("empty");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/readme.png"), "not a picture").unwrap();
    let job = TrainJob::start(spec(&dir, 5, 1e-3), || {}).unwrap();
    let error = loop {
        if let TrainEvent::Failed { error } = next(&job) {
            break error;
        }
    };
    assert!(error.contains("no usable images"), "{error}");
}
