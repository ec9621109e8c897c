//! Tests of the single-file mapping against the fixture model and diffusers' reference names.

use candle_core::{DType, Device};

use crate::engine::models::unet::PerBlock;

use super::names::{UNET, unet_param};
use super::*;
use crate::engine::io::weights::read_safetensors;

use crate::engine::builtin::fixtures_dir as fixtures;

struct Fixture {
    unet: HashMap<String, Tensor>,
    text: HashMap<String, Tensor>,
    vae: HashMap<String, Tensor>,
    unet_config: UNetConfig,
    text_config: ClipConfig,
    vae_config: VaeConfig,
}

fn fixture() -> Fixture {
    let dir = fixtures().join("sd1-tiny/model");
    Fixture {
        unet: read_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        text: read_safetensors(&dir.join("text_encoder/model.safetensors")).unwrap(),
        vae: read_safetensors(&dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap(),
        unet_config: UNetConfig::from_file(&dir.join("unet/config.json")).unwrap(),
        text_config: ClipConfig::from_file(&dir.join("text_encoder/config.json")).unwrap(),
        vae_config: VaeConfig::from_file(&dir.join("vae/config.json")).unwrap(),
    }
}

// An independent diffusers → ldm UNet renaming, shared with the integration tests.
#[path = "../../../../tests/support/ldm_names.rs"]
mod ldm_names;
use ldm_names::ldm_unet_name;

/// Returns the ldm name and whether the tensor is a VAE attention linear stored as a 1×1 conv.
fn ldm_vae_name(name: &str, blocks: usize) -> (String, bool) {
    let parts: Vec<&str> = name.split('.').collect();
    let leaf = parts[parts.len() - 1];
    let res = |m: &str| if m == "conv_shortcut" { "nin_shortcut".to_string() } else { m.to_string() };
    let path = match parts[..parts.len() - 1] {
        [m] => m.to_string(),
        [side, "conv_norm_out"] => format!("{side}.norm_out"),
        [side, m] => format!("{side}.{m}"),
        [side, "mid_block", "resnets", j, m] => {
            format!("{side}.mid.block_{}.{}", j.parse::<usize>().unwrap() + 1, res(m))
        }
        [side, "mid_block", "attentions", "0", m] => format!(
            "{side}.mid.attn_1.{}",
            match m {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                other => panic!("{other}"),
            }
        ),
        [side, "mid_block", "attentions", "0", "to_out", "0"] => format!("{side}.mid.attn_1.proj_out"),
        ["encoder", "down_blocks", i, "resnets", j, m] => format!("encoder.down.{i}.block.{j}.{}", res(m)),
        ["encoder", "down_blocks", i, "downsamplers", "0", "conv"] => format!("encoder.down.{i}.downsample.conv"),
        ["decoder", "up_blocks", i, "resnets", j, m] => {
            format!("decoder.up.{}.block.{j}.{}", blocks - 1 - i.parse::<usize>().unwrap(), res(m))
        }
        ["decoder", "up_blocks", i, "upsamplers", "0", "conv"] => {
            format!("decoder.up.{}.upsample.conv", blocks - 1 - i.parse::<usize>().unwrap())
        }
        _ => panic!("unexpected VAE name {name}"),
    };
    let conv1x1 = path.contains(".attn_1.") && !path.ends_with(".norm") && leaf == "weight";
    (format!("first_stage_model.{path}.{leaf}"), conv1x1)
}

/// The fixture written out as an original-layout SD 1.x checkpoint, with the extras real ones carry.
fn ldm_checkpoint(f: &Fixture) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (n, t) in &f.unet {
        assert!(
            out.insert(ldm_unet_name(n, f.unet_config.layers_per_block, &f.unet_config.up_block_types), t.clone())
                .is_none(),
            "{n}"
        );
    }
    for (n, t) in &f.vae {
        let (name, conv1x1) = ldm_vae_name(n, f.vae_config.block_out_channels.len());
        let t = if conv1x1 { t.unsqueeze(2).unwrap().unsqueeze(3).unwrap() } else { t.clone() };
        assert!(out.insert(name, t).is_none(), "{n}");
    }
    for (n, t) in &f.text {
        out.insert(format!("cond_stage_model.transformer.{n}"), t.clone());
    }
    let cpu = &Device::Cpu;
    out.insert("alphas_cumprod".into(), Tensor::ones(1000, DType::F32, cpu).unwrap());
    out.insert("model_ema.decay".into(), Tensor::new(0.9999f32, cpu).unwrap());
    out.insert("model_ema.diffusion_modelinput_blocks00weight".into(), f.unet["conv_in.weight"].clone());
    out.insert(
        "cond_stage_model.transformer.text_model.embeddings.position_ids".into(),
        Tensor::arange(0i64, 77, cpu).unwrap().unsqueeze(0).unwrap(),
    );
    out
}

fn assert_identical(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, what: &str) {
    let mut g: Vec<&String> = got.keys().collect();
    let mut w: Vec<&String> = want.keys().collect();
    g.sort();
    w.sort();
    assert_eq!(g, w, "{what}: tensor names differ");
    for (n, t) in want {
        let u = &got[n];
        assert_eq!(u.dims(), t.dims(), "{what}: {n} shape");
        assert_eq!(u.dtype(), t.dtype(), "{what}: {n} dtype");
        let bits = |x: &Tensor| -> Vec<u32> {
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
        };
        assert!(bits(u) == bits(t), "{what}: {n} values differ");
    }
}

#[test]
fn sd1_fixture_round_trip() {
    let f = fixture();
    let m = convert(ldm_checkpoint(&f), "sd1-tiny.safetensors").unwrap();
    assert_eq!(m.family, ModelFamily::Sd1);
    assert_identical(&m.unet, &f.unet, "unet");
    assert_identical(&m.text_encoder, &f.text, "text encoder");
    assert_identical(&m.vae, &f.vae, "vae");
    // The training resolution is the one field the weights cannot tell.
    assert_eq!(m.unet_config, UNetConfig { sample_size: None, ..f.unet_config.clone() });
    assert_eq!(m.text_config, f.text_config);
    assert_eq!(m.vae_config, f.vae_config);
    assert_eq!(m.prediction_hint, Some(Prediction::Epsilon));
}

/// The whole path a user takes: a single `.safetensors` file on disk → the model → outputs
/// equal to the diffusers folder's.
#[test]
fn single_file_model_runs_like_the_diffusers_folder() {
    let f = fixture();
    let dir = std::env::temp_dir().join(format!("lora-studio-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sd1-tiny.safetensors");
    crate::engine::io::weights::write_safetensors(&file, &ldm_checkpoint(&f), None).unwrap();
    let sd = crate::engine::pipeline::StableDiffusion::load(&file, &Device::Cpu).unwrap();
    let r = read_safetensors(&fixtures().join("sd1-tiny/reference.safetensors")).unwrap();
    let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
    let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
    for (name, ours, theirs) in
        [("text_embeddings", &emb, &r["text_embeddings"]), ("noise_pred", &pred, &r["noise_pred"])]
    {
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    assert_eq!(sd.tokenizer.pad_id(), crate::engine::models::tokenizer::END_OF_TEXT);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sd2_open_clip_round_trip() {
    let f = fixture();
    let mut ckpt = ldm_checkpoint(&f);
    ckpt.retain(|n, _| !n.starts_with("cond_stage_model."));
    // SD 2.x UNets use linear proj_in / proj_out.
    for (n, t) in ckpt.iter_mut() {
        if n.ends_with(".proj_in.weight") || n.ends_with(".proj_out.weight") {
            *t = t.flatten_from(1).unwrap();
        }
    }
    let (hidden, inner, layers, vocab) = (32usize, 48usize, 3usize, 100usize);
    let cpu = &Device::Cpu;
    // Distinct values everywhere, so a wrong split or a swapped tensor shows.
    let mut next = 0f32;
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| next + i as f32).collect();
        next += n as f32;
        Tensor::from_vec(v, shape.to_vec(), cpu).unwrap()
    };
    let p = "cond_stage_model.model.";
    let mut put = |k: String, v: Tensor| ckpt.insert(format!("{p}{k}"), v);
    put("token_embedding.weight".into(), t(&[vocab, hidden]));
    put("positional_embedding".into(), t(&[77, hidden]));
    put("ln_final.weight".into(), t(&[hidden]));
    put("ln_final.bias".into(), t(&[hidden]));
    put("text_projection".into(), t(&[hidden, hidden]));
    put("logit_scale".into(), Tensor::new(4.6f32, cpu).unwrap());
    put("visual.conv1.weight".into(), t(&[8, 3, 2, 2]));
    for i in 0..layers {
        let b = format!("transformer.resblocks.{i}.");
        for (k, shape) in [
            ("ln_1.weight", vec![hidden]),
            ("ln_1.bias", vec![hidden]),
            ("attn.in_proj_weight", vec![3 * hidden, hidden]),
            ("attn.in_proj_bias", vec![3 * hidden]),
            ("attn.out_proj.weight", vec![hidden, hidden]),
            ("attn.out_proj.bias", vec![hidden]),
            ("ln_2.weight", vec![hidden]),
            ("ln_2.bias", vec![hidden]),
            ("mlp.c_fc.weight", vec![inner, hidden]),
            ("mlp.c_fc.bias", vec![inner]),
            ("mlp.c_proj.weight", vec![hidden, inner]),
            ("mlp.c_proj.bias", vec![hidden]),
        ] {
            put(format!("{b}{k}"), t(&shape));
        }
    }
    let src = ckpt.clone();
    let m = convert(ckpt, "sd2-tiny.ckpt").unwrap();
    assert_eq!(m.family, ModelFamily::Sd2);
    assert!(m.unet_config.use_linear_projection);
    assert_eq!(m.unet_config.attention_head_dim, PerBlock::Each(vec![1, 2]));
    assert_eq!(m.unet["down_blocks.0.attentions.0.proj_in.weight"].dims(), &[32, 32]);
    assert_eq!(m.text_config.num_hidden_layers, layers - 1);
    assert_eq!(m.text_config.hidden_act, "gelu");
    assert_eq!(m.text_config.num_attention_heads, 4);
    assert_eq!(m.text_config.intermediate_size, inner);
    assert_eq!(m.text_config.vocab_size, vocab);
    assert_eq!(m.text_config.max_position_embeddings, 77);
    assert_eq!(m.text_encoder.len(), 4 + 16 * (layers - 1));
    assert!(!m.text_encoder.keys().any(|k| k.contains(&format!("layers.{}.", layers - 1))));

    let same = |ours: &str, theirs: Tensor| {
        let a = m.text_encoder[ours].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b, "{ours}");
    };
    let s = |k: &str| src[&format!("{p}{k}")].clone();
    same("text_model.embeddings.position_embedding.weight", s("positional_embedding"));
    same("text_model.final_layer_norm.bias", s("ln_final.bias"));
    for i in 0..layers - 1 {
        let b = format!("transformer.resblocks.{i}.");
        let l = format!("text_model.encoder.layers.{i}.");
        for (j, x) in ["q", "k", "v"].iter().enumerate() {
            let w = s(&format!("{b}attn.in_proj_weight")).narrow(0, j * hidden, hidden).unwrap();
            same(&format!("{l}self_attn.{x}_proj.weight"), w);
            let bias = s(&format!("{b}attn.in_proj_bias")).narrow(0, j * hidden, hidden).unwrap();
            same(&format!("{l}self_attn.{x}_proj.bias"), bias);
        }
        same(&format!("{l}self_attn.out_proj.weight"), s(&format!("{b}attn.out_proj.weight")));
        same(&format!("{l}layer_norm1.weight"), s(&format!("{b}ln_1.weight")));
        same(&format!("{l}layer_norm2.bias"), s(&format!("{b}ln_2.bias")));
        same(&format!("{l}mlp.fc1.weight"), s(&format!("{b}mlp.c_fc.weight")));
        same(&format!("{l}mlp.fc2.bias"), s(&format!("{b}mlp.c_proj.bias")));
    }
    assert!(m.prediction_hint.is_some());
}

#[test]
fn inpainting_unet_infers_in_channels() {
    let f = fixture();
    let mut ckpt = ldm_checkpoint(&f);
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let w = Tensor::zeros((32, 9, 3, 3), DType::F32, &Device::Cpu).unwrap();
    ckpt.insert(conv_in.into(), w);
    let m = convert(ckpt, "inpaint.safetensors").unwrap();
    assert_eq!(m.unet_config.in_channels, 9);
    assert_eq!(m.unet_config.out_channels, 4);
    assert_eq!(m.unet["conv_in.weight"].dims(), &[32, 9, 3, 3]);
}

fn err(names: &[&str]) -> String {
    detect(names.iter().copied()).unwrap_err().to_string()
}

#[test]
fn other_model_kinds_are_refused_in_one_line() {
    let sdxl = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.ln_final.weight",
    ];
    assert_eq!(detect(sdxl.into_iter()).unwrap(), ModelFamily::Sdxl);
    let refiner = err(&[sdxl[0], sdxl[1], "conditioner.embedders.0.model.ln_final.weight"]);
    assert!(refiner.starts_with("not supported: the SDXL refiner"), "{refiner}");
    let half = err(&[sdxl[0], sdxl[1], sdxl[2]]);
    assert!(half.contains("without SDXL's two text encoders"), "{half}");
    let sdxl = refiner;
    let sd3 = err(&["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]);
    assert!(sd3.contains("SD3"), "{sd3}");
    let flux = err(&["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]);
    assert!(flux.contains("Flux"), "{flux}");
    let none = err(&["first_stage_model.encoder.conv_in.weight"]);
    assert!(none.contains("no Stable Diffusion UNet"), "{none}");
    let no_text = err(&["model.diffusion_model.input_blocks.0.0.weight"]);
    assert!(no_text.contains("no text encoder"), "{no_text}");
    let folder = err(&["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"]);
    assert!(folder.contains("diffusers"), "{folder}");
    for e in [sdxl, sd3, flux, none, no_text, folder] {
        assert!(!e.contains('\n'));
    }
    assert_eq!(
        detect(["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"].into_iter())
            .unwrap(),
        ModelFamily::Sd2
    );
}

#[test]
fn lora_file_is_not_a_model() {
    let path = fixtures().join("sd1-tiny/lora_a_kohya.safetensors");
    let e = convert(read_safetensors(&path).unwrap(), "style.safetensors").unwrap_err().to_string();
    assert!(e.contains("this is a LoRA adapter, not a base model"), "{e}");
    assert!(e.starts_with("style.safetensors: not supported"), "{e}");
    let peft = err(&["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]);
    assert!(peft.contains("LoRA adapter"), "{peft}");
}

#[test]
fn unknown_tensors_are_reported_not_dropped() {
    let f = fixture();
    let mut ckpt = ldm_checkpoint(&f);
    let cpu = &Device::Cpu;
    ckpt.insert(
        "model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor".into(),
        Tensor::ones(1, DType::F32, cpu).unwrap(),
    );
    ckpt.insert("embedding_manager.embedder.weight".into(), Tensor::ones(2, DType::F32, cpu).unwrap());
    let e = convert(ckpt, "odd.safetensors").unwrap_err().to_string();
    assert!(e.starts_with("odd.safetensors: not supported: 2 tensor(s)"), "{e}");
    assert!(e.contains("model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor"), "{e}");
    assert!(e.contains("embedding_manager.embedder.weight"), "{e}");
}

/// Real key names and shapes from SD 1.5 (`v1-5-pruned-emaonly`) and SD 2.1 (`v2-1_768-ema-pruned`).
/// An empty expectation means "deliberately dropped".
#[allow(clippy::type_complexity)]
const SD15: &[(&str, &[usize], &[(&str, &[usize])])] = &[
    ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3], &[("conv_in.weight", &[320, 4, 3, 3])]),
    ("model.diffusion_model.time_embed.0.weight", &[1280, 320], &[("time_embedding.linear_1.weight", &[1280, 320])]),
    ("model.diffusion_model.time_embed.2.bias", &[1280], &[("time_embedding.linear_2.bias", &[1280])]),
    (
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        &[320],
        &[("down_blocks.0.resnets.0.norm1.weight", &[320])],
    ),
    (
        "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight",
        &[320, 1280],
        &[("down_blocks.0.resnets.0.time_emb_proj.weight", &[320, 1280])],
    ),
    (
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        &[320, 320, 1, 1],
        &[("down_blocks.0.attentions.0.proj_in.weight", &[320, 320, 1, 1])],
    ),
    (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        &[320, 320],
        &[("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", &[320, 320])],
    ),
    (
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        &[320, 768],
        &[("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight", &[320, 768])],
    ),
    (
        "model.diffusion_model.input_blocks.3.0.op.weight",
        &[320, 320, 3, 3],
        &[("down_blocks.0.downsamplers.0.conv.weight", &[320, 320, 3, 3])],
    ),
    (
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        &[640, 320, 1, 1],
        &[("down_blocks.1.resnets.0.conv_shortcut.weight", &[640, 320, 1, 1])],
    ),
    (
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
        &[10240, 1280],
        &[("down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight", &[10240, 1280])],
    ),
    (
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        &[1280, 1280, 3, 3],
        &[("down_blocks.3.resnets.1.conv2.weight", &[1280, 1280, 3, 3])],
    ),
    (
        "model.diffusion_model.middle_block.1.transformer_blocks.0.norm3.bias",
        &[1280],
        &[("mid_block.attentions.0.transformer_blocks.0.norm3.bias", &[1280])],
    ),
    (
        "model.diffusion_model.middle_block.2.in_layers.2.weight",
        &[1280, 1280, 3, 3],
        &[("mid_block.resnets.1.conv1.weight", &[1280, 1280, 3, 3])],
    ),
    (
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        &[1280, 1280, 3, 3],
        &[("up_blocks.0.upsamplers.0.conv.weight", &[1280, 1280, 3, 3])],
    ),
    (
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        &[1280, 2560, 1, 1],
        &[("up_blocks.1.resnets.0.conv_shortcut.weight", &[1280, 2560, 1, 1])],
    ),
    ("model.diffusion_model.output_blocks.5.2.conv.bias", &[1280], &[("up_blocks.1.upsamplers.0.conv.bias", &[1280])]),
    (
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        &[320, 320, 1, 1],
        &[("up_blocks.3.attentions.2.proj_out.weight", &[320, 320, 1, 1])],
    ),
    ("model.diffusion_model.out.0.weight", &[320], &[("conv_norm_out.weight", &[320])]),
    ("model.diffusion_model.out.2.weight", &[4, 320, 3, 3], &[("conv_out.weight", &[4, 320, 3, 3])]),
    (
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        &[256, 128, 1, 1],
        &[("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", &[256, 128, 1, 1])],
    ),
    (
        "first_stage_model.encoder.down.3.block.1.conv2.weight",
        &[512, 512, 3, 3],
        &[("encoder.down_blocks.3.resnets.1.conv2.weight", &[512, 512, 3, 3])],
    ),
    (
        "first_stage_model.encoder.mid.attn_1.q.weight",
        &[512, 512, 1, 1],
        &[("encoder.mid_block.attentions.0.to_q.weight", &[512, 512])],
    ),
    (
        "first_stage_model.encoder.mid.attn_1.norm.weight",
        &[512],
        &[("encoder.mid_block.attentions.0.group_norm.weight", &[512])],
    ),
    (
        "first_stage_model.decoder.mid.attn_1.proj_out.bias",
        &[512],
        &[("decoder.mid_block.attentions.0.to_out.0.bias", &[512])],
    ),
    (
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        &[512, 512, 3, 3],
        &[("decoder.up_blocks.0.resnets.0.conv1.weight", &[512, 512, 3, 3])],
    ),
    (
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        &[256, 256, 3, 3],
        &[("decoder.up_blocks.2.upsamplers.0.conv.weight", &[256, 256, 3, 3])],
    ),
    (
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        &[128, 256, 1, 1],
        &[("decoder.up_blocks.3.resnets.0.conv_shortcut.weight", &[128, 256, 1, 1])],
    ),
    ("first_stage_model.encoder.norm_out.weight", &[512], &[("encoder.conv_norm_out.weight", &[512])]),
    ("first_stage_model.quant_conv.weight", &[8, 8, 1, 1], &[("quant_conv.weight", &[8, 8, 1, 1])]),
    (
        "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
        &[768, 768],
        &[("text_model.encoder.layers.11.self_attn.q_proj.weight", &[768, 768])],
    ),
    (
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        &[49408, 768],
        &[("text_model.embeddings.token_embedding.weight", &[49408, 768])],
    ),
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", &[1, 77], &[]),
    ("model_ema.decay", &[], &[]),
    ("alphas_cumprod", &[1000], &[]),
];

#[allow(clippy::type_complexity)]
const SD21: &[(&str, &[usize], &[(&str, &[usize])])] = &[
    ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3], &[("conv_in.weight", &[320, 4, 3, 3])]),
    (
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        &[320, 320],
        &[("down_blocks.0.attentions.0.proj_in.weight", &[320, 320])],
    ),
    (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        &[320, 1024],
        &[("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", &[320, 1024])],
    ),
    ("model.diffusion_model.input_blocks.3.0.op.bias", &[320], &[("down_blocks.0.downsamplers.0.conv.bias", &[320])]),
    (
        "model.diffusion_model.middle_block.1.proj_out.weight",
        &[1280, 1280],
        &[("mid_block.attentions.0.proj_out.weight", &[1280, 1280])],
    ),
    (
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias",
        &[320],
        &[("up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias", &[320])],
    ),
    (
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        &[640, 640, 3, 3],
        &[("up_blocks.2.upsamplers.0.conv.weight", &[640, 640, 3, 3])],
    ),
    (
        "first_stage_model.encoder.down.3.block.0.norm1.weight",
        &[512],
        &[("encoder.down_blocks.3.resnets.0.norm1.weight", &[512])],
    ),
    (
        "first_stage_model.decoder.mid.attn_1.v.weight",
        &[512, 512, 1, 1],
        &[("decoder.mid_block.attentions.0.to_v.weight", &[512, 512])],
    ),
    (
        "cond_stage_model.model.token_embedding.weight",
        &[49408, 1024],
        &[("text_model.embeddings.token_embedding.weight", &[49408, 1024])],
    ),
    (
        "cond_stage_model.model.positional_embedding",
        &[77, 1024],
        &[("text_model.embeddings.position_embedding.weight", &[77, 1024])],
    ),
    ("cond_stage_model.model.ln_final.weight", &[1024], &[("text_model.final_layer_norm.weight", &[1024])]),
    (
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        &[3072, 1024],
        &[
            ("text_model.encoder.layers.0.self_attn.q_proj.weight", &[1024, 1024]),
            ("text_model.encoder.layers.0.self_attn.k_proj.weight", &[1024, 1024]),
            ("text_model.encoder.layers.0.self_attn.v_proj.weight", &[1024, 1024]),
        ],
    ),
    (
        "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_bias",
        &[3072],
        &[
            ("text_model.encoder.layers.5.self_attn.q_proj.bias", &[1024]),
            ("text_model.encoder.layers.5.self_attn.k_proj.bias", &[1024]),
            ("text_model.encoder.layers.5.self_attn.v_proj.bias", &[1024]),
        ],
    ),
    (
        "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight",
        &[1024, 1024],
        &[("text_model.encoder.layers.22.self_attn.out_proj.weight", &[1024, 1024])],
    ),
    (
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight",
        &[4096, 1024],
        &[("text_model.encoder.layers.22.mlp.fc1.weight", &[4096, 1024])],
    ),
    (
        "cond_stage_model.model.transformer.resblocks.10.mlp.c_proj.bias",
        &[1024],
        &[("text_model.encoder.layers.10.mlp.fc2.bias", &[1024])],
    ),
    (
        "cond_stage_model.model.transformer.resblocks.3.ln_2.weight",
        &[1024],
        &[("text_model.encoder.layers.3.layer_norm2.weight", &[1024])],
    ),
    ("cond_stage_model.model.transformer.resblocks.23.ln_1.weight", &[1024], &[]),
    ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", &[3072, 1024], &[]),
    ("cond_stage_model.model.text_projection", &[1024, 1024], &[]),
    ("cond_stage_model.model.logit_scale", &[], &[]),
];

#[test]
fn real_sd15_and_sd21_key_names() {
    for (family, table) in [(ModelFamily::Sd1, SD15), (ModelFamily::Sd2, SD21)] {
        let names = table.iter().map(|(n, _, _)| *n);
        assert_eq!(detect(names.clone()).unwrap(), family);
        let layout = Layout::from_names(family, names).unwrap();
        assert_eq!(layout.unet_layers_per_block, 2);
        assert_eq!(layout.vae_blocks, 4);
        assert_eq!(layout.open_clip_layers, if family == ModelFamily::Sd2 { 24 } else { 0 });
        for (name, shape, want) in table {
            let got: Vec<(String, Vec<usize>)> = match map_key(name, &layout) {
                None => panic!("{name} not recognised"),
                Some(Target::Ignore) => vec![],
                Some(Target::Map(_, op)) => {
                    // Zero bytes of the real shape, so the reshape / split runs for real.
                    let t = Tensor::zeros(shape.to_vec(), DType::U8, &Device::Cpu).unwrap();
                    op.apply(t).unwrap().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect()
                }
            };
            let want: Vec<(String, Vec<usize>)> = want.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
            assert_eq!(got, want, "{name}");
        }
    }
}

/// The one UNet name map, read both ways it is used (checkpoint parameters with `.`, kohya adapter
/// layers flattened with `_`), against diffusers' own pairing of the real SD 1.5 and SD 2.1 names
/// (`tests/fixtures/unet_names`, see its README) and against the test-side renaming above.
mod unet_map {
    use super::*;

    /// SDXL's micro-conditioning embedding, as the sdxl-tiny fixture's README pairs it (SGM
    /// `label_emb.0.0 / .0.2` ↔ diffusers `add_embedding.linear_1 / linear_2`), in both spellings.
    #[test]
    fn sdxl_label_emb_is_the_add_embedding() {
        assert_eq!(unet_module("label_emb.0.0", '.', 2).as_deref(), Some("add_embedding.linear_1"));
        assert_eq!(unet_module("label_emb_0_2", '_', 2).as_deref(), Some("add_embedding.linear_2"));
        assert_eq!(unet_module("label_emb.0.1", '.', 2), None, "the SiLU has no weights");
    }

    /// `(ldm parameter, diffusers parameter)` pairs from a `tests/fixtures/unet_names` file.
    fn pairs(file: &str) -> Vec<(String, String)> {
        let path = crate::engine::builtin::fixtures_dir().join("unet_names").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (ldm, diffusers) = l.split_once('\t').unwrap_or_else(|| panic!("{file}: `{l}`"));
                (ldm.to_string(), diffusers.to_string())
            })
            .collect()
    }

    #[test]
    fn real_sd15_and_sd21_unet_names_map_as_diffusers_maps_them() {
        let up_types: Vec<String> =
            ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).into();
        for file in ["sd15.tsv", "sd21.tsv"] {
            let pairs = pairs(file);
            assert!(pairs.len() > 680, "{file}: {} pairs", pairs.len());
            for (ldm, diffusers) in &pairs {
                assert_eq!(unet_param(ldm, 2).as_deref(), Some(diffusers.as_str()), "{file}: {ldm}");
                // kohya's flattened spelling of the same module names the same layer.
                let (module, leaf) = ldm.rsplit_once('.').unwrap();
                let flat = unet_module(&module.replace('.', "_"), '_', 2);
                assert_eq!(flat.map(|m| format!("{m}.{leaf}")).as_deref(), Some(diffusers.as_str()), "{file}: {ldm}");
                // The test-side renaming used to build ldm files for the fixture model agrees too.
                let back = ldm_unet_name(diffusers, 2, &up_types);
                assert_eq!(back.strip_prefix(UNET), Some(ldm.as_str()), "{file}: {diffusers}");
            }
        }
    }
}

/// The SDXL fixture written out as an original SGM-layout checkpoint, as kohya, A1111 and ComfyUI
/// save them: `model.diffusion_model.*` (with `label_emb`), CLIP-L under
/// `conditioner.embedders.0.transformer.`, OpenCLIP-bigG under `conditioner.embedders.1.model.`
/// (q, k, v stacked in `in_proj`, the projection stored as `x @ P`), the VAE under
/// `first_stage_model.`.
pub(crate) fn sgm_checkpoint() -> HashMap<String, Tensor> {
    let dir = fixtures().join("sdxl-tiny/model");
    let read = |p: &str| read_safetensors(&dir.join(p)).unwrap();
    let unet_config = UNetConfig::from_file(&dir.join("unet/config.json")).unwrap();
    let vae_config = VaeConfig::from_file(&dir.join("vae/config.json")).unwrap();
    let mut out = HashMap::new();
    for (n, t) in read("unet/diffusion_pytorch_model.safetensors") {
        let name = ldm_unet_name(&n, unet_config.layers_per_block, &unet_config.up_block_types);
        assert!(out.insert(name, t).is_none(), "{n}");
    }
    for (n, t) in read("vae/diffusion_pytorch_model.safetensors") {
        let (name, conv1x1) = ldm_vae_name(&n, vae_config.block_out_channels.len());
        let t = if conv1x1 { t.unsqueeze(2).unwrap().unsqueeze(3).unwrap() } else { t };
        assert!(out.insert(name, t).is_none(), "{n}");
    }
    for (n, t) in read("text_encoder/model.safetensors") {
        out.insert(format!("conditioner.embedders.0.transformer.{n}"), t);
    }
    let second = read("text_encoder_2/model.safetensors");
    let p = "conditioner.embedders.1.model.";
    let mut packed: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    for (n, t) in &second {
        let n = n.strip_prefix("text_model.").unwrap_or(n);
        let name = match n {
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
            "text_projection.weight" => {
                out.insert(format!("{p}text_projection"), t.t().unwrap().contiguous().unwrap());
                continue;
            }
            _ if n.starts_with("final_layer_norm.") => n.replace("final_layer_norm", "ln_final"),
            _ => {
                let rest = n.strip_prefix("encoder.layers.").unwrap();
                let (i, leaf) = rest.split_once('.').unwrap();
                if let Some(qkv) = leaf.strip_prefix("self_attn.").and_then(|l| l.split_once("_proj."))
                    && let Some(slot) = ["q", "k", "v"].iter().position(|x| *x == qkv.0)
                {
                    let key = format!("{p}transformer.resblocks.{i}.attn.in_proj_{}", qkv.1);
                    packed.entry(key).or_default()[slot] = Some(t.clone());
                    continue;
                }
                let leaf = [
                    ("layer_norm1.", "ln_1."),
                    ("layer_norm2.", "ln_2."),
                    ("self_attn.out_proj.", "attn.out_proj."),
                    ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."),
                ]
                .iter()
                .find_map(|(a, b)| leaf.strip_prefix(a).map(|l| format!("{b}{l}")))
                .unwrap_or_else(|| panic!("{n}"));
                format!("transformer.resblocks.{i}.{leaf}")
            }
        };
        out.insert(format!("{p}{name}"), t.clone());
    }
    for (key, [q, k, v]) in packed {
        out.insert(key, Tensor::cat(&[q.unwrap(), k.unwrap(), v.unwrap()], 0).unwrap());
    }
    let cpu = &Device::Cpu;
    out.insert(format!("{p}logit_scale"), Tensor::new(4.6f32, cpu).unwrap());
    out.insert(
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids".into(),
        Tensor::arange(0i64, 77, cpu).unwrap().unsqueeze(0).unwrap(),
    );
    out
}

/// An SGM-layout SDXL checkpoint converts to exactly the diffusers folder's tensors, and every
/// config field the weights can tell comes out as the folder's config says.
#[test]
fn sdxl_sgm_round_trip() {
    let dir = fixtures().join("sdxl-tiny/model");
    let read = |p: &str| read_safetensors(&dir.join(p)).unwrap();
    let m = convert(sgm_checkpoint(), "sdxl-tiny.safetensors").unwrap();
    assert_eq!(m.family, ModelFamily::Sdxl);
    assert_identical(&m.unet, &read("unet/diffusion_pytorch_model.safetensors"), "unet");
    assert_identical(&m.text_encoder, &read("text_encoder/model.safetensors"), "text encoder");
    let (second, second_config) = m.text_encoder_2.as_ref().expect("SDXL's second text encoder");
    assert_identical(second, &read("text_encoder_2/model.safetensors"), "second text encoder");
    assert_identical(&m.vae, &read("vae/diffusion_pytorch_model.safetensors"), "vae");

    // Group and head counts are not in the weights: real SDXL's (32 groups, 64-channel heads)
    // are assumed, and this tiny model differs there only.
    let unet = UNetConfig::from_file(&dir.join("unet/config.json")).unwrap();
    let ours = &m.unet_config;
    assert_eq!(
        (&ours.transformer_layers_per_block, ours.addition_time_embed_dim, ours.projection_class_embeddings_input_dim),
        (&unet.transformer_layers_per_block, unet.addition_time_embed_dim, unet.projection_class_embeddings_input_dim)
    );
    assert_eq!(ours.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!((&ours.down_block_types, &ours.up_block_types), (&unet.down_block_types, &unet.up_block_types));
    assert_eq!((ours.cross_attention_dim, ours.use_linear_projection), (12, true));
    let text_2 = ClipConfig::from_file(&dir.join("text_encoder_2/config.json")).unwrap();
    assert_eq!(second_config.hidden_act, "gelu");
    assert_eq!(m.text_config.hidden_act, "quick_gelu");
    assert_eq!(
        (second_config.num_hidden_layers, second_config.hidden_size, second_config.intermediate_size),
        (text_2.num_hidden_layers, text_2.hidden_size, text_2.intermediate_size)
    );
    assert_eq!(m.vae_config.scaling_factor, 0.13025);
    assert_eq!(m.prediction_hint, Some(Prediction::Epsilon));
}

/// A user's SDXL single file on disk → the model → diffusers' prompt embeddings, pooled embedding
/// and noise prediction (the few config numbers the weights cannot tell, set as the folder has
/// them: this tiny model's group and head counts and its VAE scale).
#[test]
fn sdxl_single_file_runs_like_the_diffusers_folder() {
    use crate::engine::io::weights::WeightPrecision;
    use crate::engine::pipeline::{ModelWeights, StableDiffusion};
    let dir = std::env::temp_dir().join(format!("lora-studio-sdxl-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sdxl-tiny.safetensors");
    crate::engine::io::weights::write_safetensors(&file, &sgm_checkpoint(), None).unwrap();
    let mut w = ModelWeights::load(&file, DType::F32, WeightPrecision::Auto, &Device::Cpu).unwrap();
    let folder = fixtures().join("sdxl-tiny/model");
    let unet = UNetConfig::from_file(&folder.join("unet/config.json")).unwrap();
    (w.unet_config.norm_num_groups, w.unet_config.attention_head_dim) = (unet.norm_num_groups, unet.attention_head_dim);
    w.vae_config = VaeConfig::from_file(&folder.join("vae/config.json")).unwrap();
    w.text_config = ClipConfig::from_file(&folder.join("text_encoder/config.json")).unwrap();
    let second = w.text_encoder_2.as_mut().expect("SDXL's second text encoder");
    second.config.num_attention_heads =
        ClipConfig::from_file(&folder.join("text_encoder_2/config.json")).unwrap().num_attention_heads;
    assert_eq!(second.tokenizer.pad_id(), 0, "SDXL's second tokenizer pads with `!`");
    assert!(w.force_zeros_for_empty_prompt);
    let sd = StableDiffusion::from_weights(w).unwrap();
    let r = read_safetensors(&fixtures().join("sdxl-tiny/reference.safetensors")).unwrap();
    let text = sd.encode_ids(&r["input_ids"], Some(&r["input_ids_2"])).unwrap();
    let pred = sd.predict(&r["sample"], &r["timestep"], &text, Some(&r["add_time_ids"])).unwrap();
    for (name, ours, theirs) in [
        ("prompt_embeds", &text.context, &r["prompt_embeds"]),
        ("pooled_prompt_embeds", text.pooled.as_ref().unwrap(), &r["pooled_prompt_embeds"]),
        ("noise_pred", &pred, &r["noise_pred"]),
    ] {
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let size = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-4 * size, "{name}: {diff} of {size}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The family is told before a model is loaded (the CLI picks SDXL's training defaults from it):
/// from a folder's layout and configs, or a single file's tensor names.
#[test]
fn families_are_probed_without_loading() {
    use crate::engine::pipeline::ModelWeights;
    assert_eq!(ModelWeights::probe_family(&fixtures().join("sdxl-tiny/model")), Some(ModelFamily::Sdxl));
    assert_eq!(ModelWeights::probe_family(&fixtures().join("sd1-tiny/model")), Some(ModelFamily::Sd1));
    let dir = std::env::temp_dir().join(format!("lora-studio-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sdxl.safetensors");
    crate::engine::io::weights::write_safetensors(&file, &sgm_checkpoint(), None).unwrap();
    assert_eq!(ModelWeights::probe_family(&file), Some(ModelFamily::Sdxl));
    let file = dir.join("sd1.safetensors");
    crate::engine::io::weights::write_safetensors(&file, &ldm_checkpoint(&fixture()), None).unwrap();
    assert_eq!(ModelWeights::probe_family(&file), Some(ModelFamily::Sd1));
    assert_eq!(ModelWeights::probe_family(&dir.join("missing.safetensors")), None);
    let _ = std::fs::remove_dir_all(&dir);
}
