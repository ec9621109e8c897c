//! An independent diffusers → ldm UNet renaming for tests, written from the ldm module tree (one
//! table entry per block), so the engine's ldm → diffusers map is never checked against itself.
//! Used by the single-file unit tests and the adapter integration tests.

/// The original-layout (ldm) name of a diffusers UNet parameter, with its `model.diffusion_model.` prefix.
/// `up_block_types` as in the UNet's config (a block with attention puts its upsampler third).
pub fn ldm_unet_name(name: &str, layers_per_block: usize, up_block_types: &[String]) -> String {
    let l = layers_per_block;
    let mut table: Vec<(String, String)> = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for (i, up_type) in up_block_types.iter().enumerate() {
        for j in 0..l {
            let k = 1 + i * (l + 1) + j;
            table.push((format!("down_blocks.{i}.resnets.{j}."), format!("input_blocks.{k}.0.")));
            table.push((format!("down_blocks.{i}.attentions.{j}."), format!("input_blocks.{k}.1.")));
        }
        table.push((
            format!("down_blocks.{i}.downsamplers.0.conv."),
            format!("input_blocks.{}.0.op.", (i + 1) * (l + 1)),
        ));
        for j in 0..=l {
            let k = i * (l + 1) + j;
            table.push((format!("up_blocks.{i}.resnets.{j}."), format!("output_blocks.{k}.0.")));
            table.push((format!("up_blocks.{i}.attentions.{j}."), format!("output_blocks.{k}.1.")));
        }
        let slot = if up_type == "CrossAttnUpBlock2D" { 2 } else { 1 };
        table.push((
            format!("up_blocks.{i}.upsamplers.0.conv."),
            format!("output_blocks.{}.{slot}.conv.", i * (l + 1) + l),
        ));
    }
    let (from, to) = table.iter().find(|(f, _)| name.starts_with(f.as_str())).unwrap_or_else(|| panic!("{name}"));
    let mut rest = name[from.len()..].to_string();
    if from.contains(".resnets.") {
        for (a, b) in [
            ("norm1.", "in_layers.0."),
            ("conv1.", "in_layers.2."),
            ("time_emb_proj.", "emb_layers.1."),
            ("norm2.", "out_layers.0."),
            ("conv2.", "out_layers.3."),
            ("conv_shortcut.", "skip_connection."),
        ] {
            if let Some(leaf) = rest.strip_prefix(a) {
                rest = format!("{b}{leaf}");
                break;
            }
        }
    }
    format!("model.diffusion_model.{to}{rest}")
}
