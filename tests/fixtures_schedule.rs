//! Noise schedule, DDIM sampler and tokenizer against the diffusers/transformers references in
//! `../shared/fixtures/sd1-tiny`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_studio::engine::rng::Rng;
use lora_studio::engine::sampler::{Sampler, SamplerKind, spaced_timesteps};
use lora_studio::engine::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use lora_studio::engine::tokenizer::ClipTokenizer;

fn config() -> SchedulerConfig {
    SchedulerConfig::from_file(&sd1_tiny().join("model/scheduler/scheduler_config.json")).unwrap()
}

#[test]
fn alphas_cumprod_match() {
    let s = NoiseSchedule::new(&config()).unwrap();
    assert_close("alphas_cumprod", &s.alphas_cumprod_tensor(&Device::Cpu).unwrap(), &reference()["alphas_cumprod"]);
}

#[test]
fn ddim_timesteps_and_one_step_match() {
    let r = reference();
    let cfg = config();
    let ours: Vec<i64> = spaced_timesteps(&cfg, 20).unwrap().into_iter().map(|t| t as i64).collect();
    let theirs: Vec<i64> = r["ddim_timesteps_20"].to_dtype(DType::I64).unwrap().to_vec1().unwrap();
    assert_eq!(ours, theirs);

    let schedule = NoiseSchedule::new(&cfg).unwrap();
    let sampler = Sampler::new(SamplerKind::Ddim, &schedule, &cfg, 20).unwrap();
    let t = r["ddim_step_t"].to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
    let i = sampler.timesteps().iter().position(|&x| x == t).expect("the reference step is one of the 20");
    let x = r["sample"].get(0).unwrap().unsqueeze(0).unwrap();
    let eps = r["noise_pred"].get(0).unwrap().unsqueeze(0).unwrap();
    let prev = sampler.step(&eps, i, &x, &mut Rng::new(0)).unwrap();
    let reference = &r["ddim_step_prev_sample"];
    assert_close("ddim_step_prev_sample", &prev.reshape(reference.dims()).unwrap(), reference);
}

/// A v-prediction model that outputs the v matching an ε-model's ε steps to the same point.
#[test]
fn v_prediction_steps_agree_with_epsilon() {
    let mut rng = Rng::new(3);
    let dev = Device::Cpu;
    let x = rng.randn((1, 4, 8, 8), &dev).unwrap();
    let eps = rng.randn((1, 4, 8, 8), &dev).unwrap();
    let mut eps_cfg = SchedulerConfig::default();
    let mut v_cfg = SchedulerConfig::default();
    eps_cfg.set_prediction(Prediction::Epsilon);
    v_cfg.set_prediction(Prediction::V);
    let (se, sv) = (NoiseSchedule::new(&eps_cfg).unwrap(), NoiseSchedule::new(&v_cfg).unwrap());
    for kind in SamplerKind::ALL {
        let (pe, pv) = (Sampler::new(kind, &se, &eps_cfg, 10).unwrap(), Sampler::new(kind, &sv, &v_cfg, 10).unwrap());
        let i = 3;
        let t = pe.timesteps()[i] as usize;
        let a = se.alphas_cumprod[t];
        // x here is the sampler's own variable; for Euler the model sees x/√(σ²+1) = √ᾱ·x.
        let x_model = pe.scale_model_input(&x, i).unwrap();
        let x0 = ((&x_model - (&eps * (1.0 - a).sqrt()).unwrap()).unwrap() / a.sqrt()).unwrap();
        let v = ((&eps * a.sqrt()).unwrap() - (x0 * (1.0 - a).sqrt()).unwrap()).unwrap();
        let ye = pe.step(&eps, i, &x, &mut Rng::new(9)).unwrap();
        let yv = pv.step(&v, i, &x, &mut Rng::new(9)).unwrap();
        assert_close(&format!("{kind:?} v vs ε"), &yv, &ye);
    }
}

/// With a denoiser that knows the answer, both samplers end at x₀.
#[test]
fn samplers_converge_with_a_perfect_denoiser() {
    let dev = Device::Cpu;
    // DDIM's last step lands on ᾱ₀ unless told to finish at ᾱ = 1.
    let cfg = SchedulerConfig { set_alpha_to_one: true, ..SchedulerConfig::default() };
    let schedule = NoiseSchedule::new(&cfg).unwrap();
    let x0 = (Rng::new(1).randn((1, 4, 8, 8), &dev).unwrap() * 0.5).unwrap();
    for kind in SamplerKind::ALL {
        let sampler = Sampler::new(kind, &schedule, &cfg, 30).unwrap();
        let mut rng = Rng::new(2);
        let mut x = (rng.randn((1, 4, 8, 8), &dev).unwrap() * sampler.init_noise_sigma()).unwrap();
        for (i, &t) in sampler.timesteps().to_vec().iter().enumerate() {
            let a = schedule.alphas_cumprod[t as usize];
            let x_model = sampler.scale_model_input(&x, i).unwrap();
            // ε that maps the current x_t back to x₀ exactly.
            let eps = ((x_model - (&x0 * a.sqrt()).unwrap()).unwrap() / (1.0 - a).sqrt()).unwrap();
            x = sampler.step(&eps, i, &x, &mut rng).unwrap();
        }
        let err = (x - &x0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-3, "{kind:?}: final error {err}");
    }
}

#[test]
fn seeded_sampling_is_deterministic() {
    let dev = Device::Cpu;
    let cfg = SchedulerConfig::default();
    let schedule = NoiseSchedule::new(&cfg).unwrap();
    let run = || {
        let sampler = Sampler::new(SamplerKind::EulerAncestral, &schedule, &cfg, 5).unwrap();
        let mut rng = Rng::new(11);
        let mut x = rng.randn((1, 4, 4, 4), &dev).unwrap();
        for i in 0..5 {
            x = sampler.step(&(&x * 0.1).unwrap(), i, &x, &mut rng).unwrap();
        }
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(run(), run());
}

#[test]
fn tokenizer_matches_reference_ids() {
    let tok = ClipTokenizer::from_folder(&sd1_tiny().join("model/tokenizer")).unwrap();
    let ids = tok.encode_batch(&["a photo of a red circle on a blue background, sks style", ""]);
    let ours: Vec<i64> = ids.into_iter().map(|i| i as i64).collect();
    let theirs: Vec<i64> =
        reference()["input_ids"].to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ours, theirs);
    // SD 2.x pads with id 0; long prompts are cut to 75 tokens plus the markers.
    let sd2 = ClipTokenizer::with_pad_id(0);
    assert_eq!(sd2.encode("a cat")[4..], [0u32; 73]);
    let long = "red ".repeat(100);
    let ids = tok.encode(&long);
    assert_eq!((ids.len(), ids[76], tok.count_tokens(&long)), (77, 49407, 100));
    let _ = Tensor::new(&[0u32], &Device::Cpu).unwrap();
}
