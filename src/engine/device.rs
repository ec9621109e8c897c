//! Which compute device a run uses: `cpu`, `cuda[:N]` or `metal[:N]`, as the command line and the
//! environment spell it. A device this build lacks is refused with what to do, never swapped for
//! the CPU behind the user's back.

use anyhow::{Context, bail};
use candle_core::Device;

use crate::engine::Result;
use crate::engine::io::weights::WeightPrecision;

/// The devices this build can use, by name (`cpu` always; `cuda` / `metal` with their features).
pub fn available() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "metal") {
        v.push("metal");
    }
    v
}

/// Where a model runs and how its frozen weights are kept: what `--device` / `--weights` and the
/// window's settings choose. The device stays a spec until used, so a missing GPU is reported by
/// the job that needed it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Placement {
    /// `cpu`, `cuda[:N]` or `metal[:N]` (see `parse`); empty is the CPU.
    pub device: String,
    pub weights: WeightPrecision,
}

impl Default for Placement {
    fn default() -> Self {
        Self { device: "cpu".to_owned(), weights: WeightPrecision::Auto }
    }
}

impl Placement {
    pub fn device(&self) -> Result<Device> {
        parse(&self.device)
    }

    /// "CPU", "CUDA 0", "Metal 1": for the status bar and the picker.
    pub fn device_label(spec: &str) -> String {
        let (kind, index) = spec.trim().split_once(':').unwrap_or((spec.trim(), "0"));
        match kind {
            "cuda" => format!("CUDA GPU {index}"),
            "metal" => format!("Metal GPU {index}"),
            _ => "CPU".to_owned(),
        }
    }

    /// The device specs this build can offer in a picker (GPUs by index 0; more are reachable by
    /// `--device cuda:N`).
    pub fn device_choices() -> Vec<String> {
        available().iter().map(|k| if *k == "cpu" { "cpu".to_owned() } else { format!("{k}:0") }).collect()
    }
}

/// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` → the device (an empty spec is the CPU).
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            (k, i.parse::<usize>().with_context(|| format!("device `{spec}`: `{i}` is not a device number"))?)
        }
        None => (spec, 0),
    };
    let feature = |name: &str| -> Result<()> {
        if !available().contains(&name) {
            bail!(
                "device `{spec}`: this build has no {name} support (built with: {}); build with `--features {name}`",
                available().join(", ")
            );
        }
        Ok(())
    };
    Ok(match kind {
        "" | "cpu" => Device::Cpu,
        "cuda" => {
            feature("cuda")?;
            Device::new_cuda(index).with_context(|| format!("device `{spec}`"))?
        }
        "metal" => {
            feature("metal")?;
            Device::new_metal(index).with_context(|| format!("device `{spec}`"))?
        }
        other => bail!("unknown device `{other}` (cpu, cuda[:N] or metal[:N])"),
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn devices_parse_and_missing_ones_are_refused_in_words() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse("").unwrap().is_cpu());
        let e = format!("{:#}", parse("tpu").unwrap_err());
        assert!(e.contains("unknown device `tpu`"), "{e}");
        let e = format!("{:#}", parse("cuda:x").unwrap_err());
        assert!(e.contains("not a device number"), "{e}");
        if !cfg!(feature = "cuda") {
            let e = format!("{:#}", parse("cuda:1").unwrap_err());
            assert!(e.contains("no cuda support") && e.contains("--features cuda"), "{e}");
        }
    }
}
