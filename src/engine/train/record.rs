//! What a trained adapter file says about its training, in the keys A1111, ComfyUI and civitai
//! read: kohya sd-scripts' `ss_*` training record and the `modelspec.*` block (Stability AI's model
//! spec, filled as sd-scripts fills it for an SD 1.x / 2.x / SDXL LoRA).

use std::collections::{BTreeMap, HashMap};

use crate::engine::diffusion::schedule::Prediction;
use crate::engine::models::family::ModelFamily;
use crate::engine::pipeline::StableDiffusion;
use crate::engine::train::dataset::DatasetFolder;
use crate::engine::train::optim::Optimizer;
use crate::engine::train::trainer::{LrSchedule, TrainConfig};

/// Which Stable Diffusion a model is, as adapter metadata names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    pub model: ModelFamily,
    pub v_prediction: bool,
}

impl Family {
    /// Read from the model itself (`StableDiffusion::family`) and its scheduler's prediction type.
    pub fn of(model: &StableDiffusion) -> Self {
        Self { model: model.family(), v_prediction: model.prediction() == Prediction::V }
    }

    /// sd-scripts' `ss_base_model_version`: `sd_v1`, `sd_v2` (with `_v` for v-prediction),
    /// `sdxl_base_v1-0`.
    pub fn base_model_version(self) -> String {
        let v = if self.v_prediction { "_v" } else { "" };
        match self.model {
            ModelFamily::Sd1 => format!("sd_v1{v}"),
            ModelFamily::Sd2 => format!("sd_v2{v}"),
            ModelFamily::Sdxl => "sdxl_base_v1-0".to_string(),
        }
    }

    /// The model spec's architecture for a LoRA on this model.
    pub fn architecture(self) -> &'static str {
        match (self.model, self.v_prediction) {
            (ModelFamily::Sd2, true) => "stable-diffusion-v2-768-v/lora",
            (ModelFamily::Sd2, false) => "stable-diffusion-v2-512/lora",
            (ModelFamily::Sdxl, _) => "stable-diffusion-xl-v1-base/lora",
            (ModelFamily::Sd1, _) => "stable-diffusion-v1/lora",
        }
    }
}

/// One run's facts for its file's metadata.
pub struct RunRecord<'a> {
    pub config: &'a TrainConfig,
    pub family: Family,
    /// Optimiser steps done.
    pub step: usize,
    /// The dataset's folders with their images and repeats.
    pub folders: &'a [DatasetFolder],
    /// Optimiser steps per epoch (`dataset::steps_per_epoch`).
    pub steps_per_epoch: usize,
    /// Caption tags counted per image folder, as kohya's `ss_tag_frequency` keys them.
    pub tag_frequency: &'a BTreeMap<String, BTreeMap<String, usize>>,
    /// Unix seconds when the run (not this resumption of it) began.
    pub started_at: u64,
    /// The output file's name without its extension.
    pub output_name: &'a str,
}

fn py_bool(b: bool) -> String {
    // sd-scripts writes `str(bool)`: readers compare against "True".
    if b { "True" } else { "False" }.to_string()
}

impl RunRecord<'_> {
    pub fn metadata(&self) -> HashMap<String, String> {
        let c = self.config;
        let mut m = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        let per_step = c.batch_size * c.grad_accum;
        // sd-scripts: the epoch a step falls in, and ⌈max steps / steps per epoch⌉ epochs.
        let per_epoch = self.steps_per_epoch.max(1);
        let epoch = self.step.div_ceil(per_epoch).max(1);
        put("ss_output_name", self.output_name.to_string());
        put("ss_training_started_at", self.started_at.to_string());
        put("ss_network_dim", c.rank.to_string());
        put("ss_network_alpha", c.alpha.to_string());
        put("ss_resolution", format!("({}, {})", c.dataset.resolution, c.dataset.resolution));
        put("ss_steps", self.step.to_string());
        put("ss_max_train_steps", c.steps.to_string());
        put("ss_epoch", epoch.to_string());
        put("ss_num_epochs", c.steps.div_ceil(per_epoch).max(1).to_string());
        put("ss_learning_rate", c.learning_rate.to_string());
        put("ss_unet_lr", c.learning_rate.to_string());
        let te_lr = if c.train_text_encoder { c.text_encoder_lr.unwrap_or(c.learning_rate) } else { 0.0 };
        put("ss_text_encoder_lr", te_lr.to_string());
        let optimizer = kohya_optimizer(c);
        let ss_optimizer = match c.optimizer {
            Optimizer::AdamW => {
                format!("AdamW(betas=({}, {}), eps={}, weight_decay={})", c.beta1, c.beta2, c.eps, c.weight_decay)
            }
            // sd-scripts: the class's module path and the arguments it was given, as Python prints them.
            _ => {
                let args: Vec<String> = optimizer.args.iter().map(|a| format!("{}={}", a.key, a.python)).collect();
                format!("{}({})", optimizer.class, args.join(","))
            }
        };
        put("ss_optimizer", ss_optimizer);
        let schedule = match c.lr_schedule {
            // sd-scripts replaces the schedule by Adafactor's own, named with the initial rate.
            _ if optimizer.own_schedule => format!("adafactor:{}", py_float(c.learning_rate)),
            LrSchedule::Constant => "constant".into(),
            LrSchedule::Cosine => "cosine".into(),
            LrSchedule::Linear => "linear".into(),
        };
        put("ss_lr_scheduler", schedule);
        put("ss_lr_warmup_steps", c.warmup_steps.to_string());
        put("ss_batch_size_per_device", c.batch_size.to_string());
        put("ss_gradient_accumulation_steps", c.grad_accum.to_string());
        put("ss_total_batch_size", per_step.to_string());
        put("ss_gradient_checkpointing", py_bool(c.gradient_checkpointing));
        put("ss_cache_latents", py_bool(true));
        put("ss_flip_aug", py_bool(c.dataset.flip));
        put("ss_mixed_precision", "no".to_string());
        put("ss_seed", c.seed.to_string());
        put("ss_num_train_images", self.folders.iter().map(DatasetFolder::per_epoch).sum::<usize>().to_string());
        put("ss_dataset_dirs", dataset_dirs(self.folders).to_string());
        put("ss_noise_offset", c.noise_offset.to_string());
        put("ss_caption_dropout_rate", c.caption_dropout.to_string());
        if let Some(g) = c.min_snr_gamma {
            put("ss_min_snr_gamma", g.to_string());
        }
        if let Some(n) = c.max_grad_norm {
            put("ss_max_grad_norm", n.to_string());
        }
        put("ss_v2", py_bool(self.family.model == ModelFamily::Sd2));
        // sd-scripts writes `str(args.clip_skip)`: "None" when the option is not given, which is
        // clip skip 1; and "None" for `max_token_length`, its 75 tokens, which our captions have.
        put("ss_clip_skip", if c.clip_skip > 1 { c.clip_skip.to_string() } else { "None".to_string() });
        put("ss_max_token_length", "None".to_string());
        put("ss_base_model_version", self.family.base_model_version());
        put("ss_tag_frequency", serde_json::json!(self.tag_frequency).to_string());
        // The model spec, as sd-scripts fills it for a LoRA.
        put("modelspec.sai_model_spec", "1.0.1".to_string());
        put("modelspec.architecture", self.family.architecture().to_string());
        put("modelspec.implementation", "diffusers".to_string());
        put("modelspec.title", self.output_name.to_string());
        put("modelspec.resolution", format!("{0}x{0}", c.dataset.resolution));
        put("modelspec.date", iso_date(self.started_at));
        put("modelspec.prediction_type", if self.family.v_prediction { "v" } else { "epsilon" }.to_string());
        put("modelspec.implementation_version", format!("lora-studio/{}", env!("CARGO_PKG_VERSION")));
        if !c.dataset.trigger.trim().is_empty() {
            put("modelspec.trigger_phrase", c.dataset.trigger.trim().to_string());
        }
        m
    }
}

/// sd-scripts' `ss_dataset_dirs`: `{"10_sks dog": {"n_repeats": 10, "img_count": 24}}`, keyed by
/// each folder's name; a name met again becomes `name (2)`, `name (3)`, as sd-scripts numbers it.
pub fn dataset_dirs(folders: &[DatasetFolder]) -> serde_json::Value {
    let mut dirs = serde_json::Map::new();
    for f in folders {
        let mut key = f.name.clone();
        let mut i = 2;
        while dirs.contains_key(&key) {
            key = format!("{} ({i})", f.name);
            i += 1;
        }
        dirs.insert(key, serde_json::json!({"n_repeats": f.repeats, "img_count": f.images}));
    }
    serde_json::Value::Object(dirs)
}

/// One keyword argument of the optimiser in sd-scripts' terms.
pub struct KohyaArg {
    pub key: &'static str,
    /// As `--optimizer_args` takes it (`ast.literal_eval`).
    pub literal: String,
    /// As Python prints the value (`ss_optimizer`).
    pub python: String,
}

/// A run's optimiser as sd-scripts names and builds it.
pub struct KohyaOptimizer {
    /// `--optimizer_type`.
    pub optimizer_type: &'static str,
    /// The optimiser class's module path (how `ss_optimizer` begins).
    pub class: &'static str,
    /// `--optimizer_args`, in order.
    pub args: Vec<KohyaArg>,
    /// Adafactor with `relative_step`: sd-scripts switches to its `adafactor` schedule.
    pub own_schedule: bool,
}

/// The optimiser of `c` as sd-scripts' `get_optimizer` takes it: `--optimizer_type` and the
/// arguments that give our settings (`prodigyopt.Prodigy`, `transformers.optimization.Adafactor`).
pub fn kohya_optimizer(c: &TrainConfig) -> KohyaOptimizer {
    let float = |key: &'static str, x: f64| KohyaArg { key, literal: py_float(x), python: py_float(x) };
    let flag = |key: &'static str, b: bool| KohyaArg { key, literal: py_bool(b), python: py_bool(b) };
    // `betas=0.9,0.999` reads as a tuple, which Python prints in parentheses.
    let betas = KohyaArg {
        key: "betas",
        literal: format!("{},{}", py_float(c.beta1), py_float(c.beta2)),
        python: format!("({}, {})", py_float(c.beta1), py_float(c.beta2)),
    };
    match c.optimizer {
        Optimizer::AdamW => KohyaOptimizer {
            optimizer_type: "AdamW",
            class: "torch.optim.adamw.AdamW",
            args: vec![
                KohyaArg { key: "weight_decay", literal: c.weight_decay.to_string(), python: py_float(c.weight_decay) },
                KohyaArg {
                    key: "betas",
                    literal: format!("{},{}", c.beta1, c.beta2),
                    python: format!("({}, {})", py_float(c.beta1), py_float(c.beta2)),
                },
                KohyaArg { key: "eps", literal: c.eps.to_string(), python: py_float(c.eps) },
            ],
            own_schedule: false,
        },
        Optimizer::Prodigy => {
            let p = &c.prodigy;
            let mut args = vec![
                float("weight_decay", c.weight_decay),
                betas,
                float("eps", c.eps),
                float("d0", p.d0),
                float("d_coef", p.d_coef),
                flag("use_bias_correction", p.use_bias_correction),
                flag("safeguard_warmup", p.safeguard_warmup),
            ];
            if let Some(g) = p.growth_rate {
                args.push(float("growth_rate", g));
            }
            KohyaOptimizer { optimizer_type: "Prodigy", class: "prodigyopt.prodigy.Prodigy", args, own_schedule: false }
        }
        Optimizer::Adafactor => {
            let a = &c.adafactor;
            let mut args = vec![
                flag("scale_parameter", a.scale_parameter),
                flag("relative_step", a.relative_step),
                flag("warmup_init", a.warmup_init),
            ];
            if c.weight_decay != 0.0 {
                args.push(float("weight_decay", c.weight_decay));
            }
            KohyaOptimizer {
                optimizer_type: "Adafactor",
                class: "transformers.optimization.Adafactor",
                args,
                own_schedule: a.relative_step,
            }
        }
    }
}

/// A float as Python's `repr` writes it: shortest round trip, `1.0` for whole numbers,
/// exponent form below 1e-4 and from 1e16 (`1e-06`, `1e+16`).
pub fn py_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("a whole exponent");
    if x != 0.0 && !(-4..16).contains(&exp) {
        return format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let plain = x.to_string();
    if plain.contains('.') { plain } else { format!("{plain}.0") }
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for Unix seconds: the model spec's ISO-8601 date.
pub fn iso_date(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_prints_them() {
        // `repr` in Python 3.11.
        for (x, py) in [
            (1e-8, "1e-08"),
            (1e-6, "1e-06"),
            (0.0001, "0.0001"),
            (1.5e-5, "1.5e-05"),
            (0.01, "0.01"),
            (1.0, "1.0"),
            (0.0, "0.0"),
            (0.999, "0.999"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (123456.0, "123456.0"),
        ] {
            assert_eq!(py_float(x), py, "{x}");
        }
    }

    #[test]
    fn optimisers_are_named_as_sd_scripts_names_them() {
        let prodigy = TrainConfig { optimizer: Optimizer::Prodigy, learning_rate: 1.0, ..Default::default() };
        let k = kohya_optimizer(&prodigy);
        let args: Vec<String> = k.args.iter().map(|a| format!("{}={}", a.key, a.python)).collect();
        assert_eq!(
            format!("{}({})", k.class, args.join(",")),
            "prodigyopt.prodigy.Prodigy(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08,d0=1e-06,d_coef=1.0,use_bias_correction=False,safeguard_warmup=False)"
        );
        let adafactor = TrainConfig { optimizer: Optimizer::Adafactor, weight_decay: 0.0, ..Default::default() };
        let k = kohya_optimizer(&adafactor);
        let args: Vec<String> = k.args.iter().map(|a| format!("{}={}", a.key, a.literal)).collect();
        assert_eq!((k.optimizer_type, k.own_schedule), ("Adafactor", false));
        assert_eq!(args.join(" "), "scale_parameter=False relative_step=False warmup_init=False");
    }

    #[test]
    fn iso_dates_match_known_instants() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00");
        // `date -u -d @1689811200` and @1796428800.
        assert_eq!(iso_date(1_689_811_200), "2023-07-20T00:00:00");
        assert_eq!(iso_date(1_796_428_800 + 3661), "2026-12-05T01:01:01");
        assert_eq!(iso_date(951_782_400), "2000-02-29T00:00:00");
    }

    #[test]
    fn clip_skip_is_recorded_as_sd_scripts_writes_it() {
        let tags = BTreeMap::new();
        let family = Family { model: ModelFamily::Sd1, v_prediction: false };
        let mut config = TrainConfig::default();
        let record = |c: &TrainConfig| {
            RunRecord {
                config: c,
                family,
                step: 1,
                folders: &[],
                steps_per_epoch: 1,
                tag_frequency: &tags,
                started_at: 0,
                output_name: "x",
            }
            .metadata()
        };
        assert_eq!(record(&config)["ss_clip_skip"], "None");
        assert_eq!(record(&config)["ss_max_token_length"], "None");
        config.clip_skip = 2;
        assert_eq!(record(&config)["ss_clip_skip"], "2");
    }

    /// `ss_dataset_dirs`, `ss_num_train_images` and the epochs count repeats as sd-scripts does.
    #[test]
    fn dataset_folders_are_recorded_with_their_repeats() {
        let tags = BTreeMap::new();
        let folder = |path: &str, repeats, images| DatasetFolder {
            path: path.into(),
            name: path.rsplit('/').next().unwrap().into(),
            repeats,
            images,
            class_tokens: String::new(),
        };
        let folders = [folder("a/10_sks dog", 10, 24), folder("a/extra", 1, 3), folder("b/extra", 1, 2)];
        // 24 × 10 + 3 + 2 = 245 images an epoch; batch 2: 123 steps an epoch.
        let config = TrainConfig { batch_size: 2, steps: 1230, ..TrainConfig::default() };
        let m = RunRecord {
            config: &config,
            family: Family { model: ModelFamily::Sd1, v_prediction: false },
            step: 124,
            folders: &folders,
            steps_per_epoch: 123,
            tag_frequency: &tags,
            started_at: 0,
            output_name: "x",
        }
        .metadata();
        let dirs: serde_json::Value = serde_json::from_str(&m["ss_dataset_dirs"]).unwrap();
        assert_eq!(
            dirs,
            serde_json::json!({
                "10_sks dog": {"n_repeats": 10, "img_count": 24},
                "extra": {"n_repeats": 1, "img_count": 3},
                "extra (2)": {"n_repeats": 1, "img_count": 2},
            })
        );
        assert_eq!(m["ss_num_train_images"], "245");
        assert_eq!((m["ss_epoch"].as_str(), m["ss_num_epochs"].as_str()), ("2", "10"));
    }

    #[test]
    fn families_name_themselves_as_sd_scripts_does() {
        let f = |v2, v_prediction| Family { model: if v2 { ModelFamily::Sd2 } else { ModelFamily::Sd1 }, v_prediction };
        assert_eq!(f(false, false).base_model_version(), "sd_v1");
        assert_eq!(f(true, false).base_model_version(), "sd_v2");
        assert_eq!(f(true, true).base_model_version(), "sd_v2_v");
        assert_eq!(f(true, true).architecture(), "stable-diffusion-v2-768-v/lora");
        assert_eq!(f(true, false).architecture(), "stable-diffusion-v2-512/lora");
        assert_eq!(f(false, false).architecture(), "stable-diffusion-v1/lora");
        let xl = Family { model: ModelFamily::Sdxl, v_prediction: false };
        assert_eq!(
            (xl.base_model_version().as_str(), xl.architecture()),
            ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")
        );
    }
}
