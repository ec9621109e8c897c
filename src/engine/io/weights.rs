//! Named tensors loaded from safetensors files, and scoped lookups into them.
//! Models are built by asking a `WeightScope` for `"down_blocks.0.resnets.0.conv1.weight"` with an
//! expected shape, so a wrong or incomplete file fails with the tensor's name, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};

use crate::engine::Result;

/// Largest safetensors JSON header we accept; real checkpoints stay far below this.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// How a model's frozen bulk (its weight matrices: linear and convolution weights, embeddings) is
/// kept in memory. The ops read such a weight in its stored precision and compute in the model's
/// compute dtype (f32) — on the CPU widening a block of rows at a time, elsewhere with the GEMM in
/// half precision; biases, norms and anything trained stay in the compute dtype. kohya's `--full_fp16` stores everything in half; this halves only what is frozen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightPrecision {
    /// As the file stores them: f16 and bf16 weights stay so, f32 ones stay f32.
    #[default]
    Auto,
    /// Everything in the compute dtype (twice the memory of half precision).
    F32,
    F16,
    Bf16,
}

impl WeightPrecision {
    pub const ALL: [WeightPrecision; 4] = [Self::Auto, Self::F16, Self::Bf16, Self::F32];

    /// `auto`, `f32`, `f16` or `bf16` (the CLI's `--weights`).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "f32" | "fp32" | "float" => Self::F32,
            "f16" | "fp16" | "half" => Self::F16,
            "bf16" => Self::Bf16,
            other => bail!("--weights: `{other}` is not one of auto, f16, bf16, f32"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Auto => "auto (as the file stores them)",
            Self::F32 => "f32 (twice the memory)",
            Self::F16 => "f16 (half the memory)",
            Self::Bf16 => "bf16 (half the memory)",
        }
    }

    /// Tensor `name` read from `source`, checked (finite) and converted to the dtype it is kept in.
    /// A value that half precision cannot hold is refused, naming the setting that would.
    pub fn keep(self, source: &str, name: &str, t: Tensor, compute: DType) -> Result<Tensor> {
        if !all_finite(&t)? {
            bail!("{source}: tensor `{name}` contains NaN or infinite values (the file is corrupt)");
        }
        let dtype = self.keep_as(t.dtype(), t.rank(), compute);
        if dtype == t.dtype() {
            return Ok(t);
        }
        let kept = t.to_dtype(dtype)?;
        if !all_finite(&kept)? {
            bail!(
                "{source}: tensor `{name}` has values too large for {dtype:?} weights; load it with --weights f32 (or bf16)"
            );
        }
        Ok(kept)
    }

    /// The dtype a tensor read as `stored`, of `rank` dimensions, is kept in for a model computing
    /// in `compute`: weight matrices (rank ≥ 2) by this setting, everything else in `compute`.
    pub fn keep_as(self, stored: DType, rank: usize, compute: DType) -> DType {
        if rank < 2 || !matches!(stored, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
            return compute;
        }
        match self {
            Self::Auto if matches!(stored, DType::F16 | DType::BF16) => stored,
            Self::Auto | Self::F32 => compute,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Whether two paths name the same file as the file system sees them (symlinks, `..`): how a
/// command tells that an output would land on one of its inputs.
pub fn same_file(a: &Path, b: &Path) -> bool {
    a == b || a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok().is_some_and(|b| a == b))
}

/// `f32`, `f16`, `bf16`, …: how reports and the window name a dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// All tensors of one model component: weight matrices kept as `WeightPrecision` says, the rest
/// converted to the compute dtype on load.
#[derive(Clone)]
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    /// What the tensors were read from, for error messages.
    source: String,
    dtype: DType,
    precision: WeightPrecision,
    device: Device,
    /// Benchmarks build models of real shapes without their weights: missing tensors become noise,
    /// remembered here so the same values can be reused (e.g. as trainable variables).
    synthetic: Option<std::sync::Arc<std::sync::Mutex<HashMap<String, Tensor>>>>,
}

impl WeightMap {
    /// Every tensor in the compute dtype `dtype`.
    pub fn new(
        tensors: HashMap<String, Tensor>,
        source: impl Into<String>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::with_precision(tensors, source, dtype, WeightPrecision::F32, device)
    }

    /// Weight matrices kept as `precision` says, the rest in the compute dtype `dtype`.
    pub fn with_precision(
        tensors: HashMap<String, Tensor>,
        source: impl Into<String>,
        dtype: DType,
        precision: WeightPrecision,
        device: &Device,
    ) -> Result<Self> {
        let mut map = Self::empty(source.into(), dtype, precision, device);
        for (name, t) in tensors {
            map.add(name, t)?;
        }
        Ok(map)
    }

    fn empty(source: String, dtype: DType, precision: WeightPrecision, device: &Device) -> Self {
        Self { tensors: HashMap::new(), source, dtype, precision, device: device.clone(), synthetic: None }
    }

    /// Checks one tensor read from the source and keeps it in the dtype and on the device it
    /// belongs (converted alone, so loading never holds a second copy of the model).
    fn add(&mut self, name: String, t: Tensor) -> Result<()> {
        let t = self.precision.keep(&self.source, &name, t, self.dtype)?;
        let t = if t.device().same_device(&self.device) { t } else { t.to_device(&self.device)? };
        self.tensors.insert(name, t);
        Ok(())
    }

    /// Reads one or more safetensors files (a sharded component is several), every tensor in the
    /// compute dtype.
    pub fn load(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_precision(paths, dtype, WeightPrecision::F32, device)
    }

    /// Reads one or more safetensors files, weight matrices kept as `precision` says. Each tensor
    /// is converted as it is read.
    pub fn load_with_precision(
        paths: &[PathBuf],
        dtype: DType,
        precision: WeightPrecision,
        device: &Device,
    ) -> Result<Self> {
        let source = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        let mut map = Self::empty(source, dtype, precision, device);
        let mut from: HashMap<String, &Path> = HashMap::new();
        for p in paths {
            read_safetensors_each(p, |name, t| {
                // Shards split a model; a tensor in two of them would make one silently win.
                if let Some(first) = from.insert(name.clone(), p) {
                    bail!(
                        "tensor `{name}` is in both {} and {}; the files do not belong together",
                        first.display(),
                        p.display()
                    );
                }
                map.add(name, t)
            })?;
        }
        Ok(map)
    }

    /// An empty map that answers every lookup with small random values of the asked shape
    /// (for benchmarks of configurations whose weights we do not have).
    pub fn synthetic(dtype: DType, device: &Device) -> Self {
        Self::synthetic_with_precision(dtype, WeightPrecision::F32, device)
    }

    /// As `synthetic`, weight matrices made up in the precision `precision` keeps f32 ones in.
    pub fn synthetic_with_precision(dtype: DType, precision: WeightPrecision, device: &Device) -> Self {
        Self {
            synthetic: Some(Default::default()),
            ..Self::empty("synthetic weights".into(), dtype, precision, device)
        }
    }

    /// The tensors a synthetic map has made up so far.
    pub fn generated(&self) -> HashMap<String, Tensor> {
        self.synthetic.as_ref().map(|g| g.lock().unwrap().clone()).unwrap_or_default()
    }

    pub fn source(&self) -> &str {
        &self.source
    }
    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn precision(&self) -> WeightPrecision {
        self.precision
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
    pub fn insert(&mut self, name: String, t: Tensor) {
        self.tensors.insert(name, t);
    }
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    /// Turns the tensors whose names pass `select` into trainable variables. The model built from
    /// this map afterwards uses them, so `loss.backward()` yields gradients for exactly these.
    /// They train in the compute dtype, whatever precision the frozen weights are kept in.
    pub fn make_trainable(&mut self, select: impl Fn(&str) -> bool) -> Result<Vec<(String, Var)>> {
        let mut names: Vec<String> = self.tensors.keys().filter(|n| select(n)).cloned().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        for name in names {
            let var = Var::from_tensor(&self.tensors[&name].to_dtype(self.dtype)?)?;
            self.tensors.insert(name.clone(), var.as_tensor().clone());
            vars.push((name, var));
        }
        Ok(vars)
    }

    pub fn root(&self) -> WeightScope<'_> {
        WeightScope { map: self, prefix: String::new() }
    }

    /// Tensor `name`, checked against `shape`, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.get_stored(name, shape)?.to_dtype(self.dtype)?)
    }

    /// Tensor `name`, checked against `shape`, as kept: a frozen weight matrix may be in half
    /// precision (the layers that read it this way widen it per use).
    pub fn get_stored(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(t) = self.tensors.get(name) else {
            if let Some(generated) = &self.synthetic {
                let dtype = self.precision.keep_as(DType::F32, shape.len(), self.dtype);
                let t = Tensor::randn(0f32, 0.02, shape, &self.device)?.to_dtype(dtype)?;
                generated.lock().unwrap().insert(name.to_string(), t.clone());
                return Ok(t);
            }
            bail!("{}: tensor `{name}` is missing (is this the right model file?)", self.source);
        };
        if t.dims() != shape {
            bail!("{}: tensor `{name}` has shape {:?}, expected {:?}", self.source, t.dims(), shape);
        }
        Ok(t.clone())
    }
}

/// A prefix into a `WeightMap`, mirroring the module tree: `scope.at("down_blocks").at(0)`.
#[derive(Clone)]
pub struct WeightScope<'a> {
    map: &'a WeightMap,
    prefix: String,
}

impl<'a> WeightScope<'a> {
    pub fn at(&self, part: impl std::fmt::Display) -> WeightScope<'a> {
        let prefix = if self.prefix.is_empty() { part.to_string() } else { format!("{}.{part}", self.prefix) };
        WeightScope { map: self.map, prefix }
    }
    /// The module path this scope stands for, e.g. `down_blocks.0.attentions.0.proj_in`.
    pub fn path(&self) -> &str {
        &self.prefix
    }
    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() { leaf.to_string() } else { format!("{}.{leaf}", self.prefix) }
    }
    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        self.map.get(&self.name(leaf), shape)
    }
    /// As `get`, in the precision the map keeps it in (see `WeightMap::get_stored`).
    pub fn get_stored(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        self.map.get_stored(&self.name(leaf), shape)
    }
    pub fn contains(&self, leaf: &str) -> bool {
        self.map.contains(&self.name(leaf))
    }
    pub fn dtype(&self) -> DType {
        self.map.dtype
    }
    pub fn device(&self) -> &Device {
        &self.map.device
    }
    pub fn map(&self) -> &'a WeightMap {
        self.map
    }
}

/// Reads a safetensors file after checking that its header is sane, so a truncated or hostile file
/// is reported by name instead of exhausting memory.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    read_safetensors_each(path, |name, t| {
        out.insert(name, t);
        Ok(())
    })?;
    Ok(out)
}

/// As `read_safetensors`, handing over each tensor as it is read (in file order) instead of
/// collecting them: a model file is never in memory twice (its bytes and its tensors), and a caller
/// that converts each tensor (to half precision, say) holds only one unconverted tensor at a time.
pub fn read_safetensors_each(
    path: &Path,
    each: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<HashMap<String, String>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let len = file.metadata().with_context(|| format!("{}: cannot read", path.display()))?.len();
    read_tensors(std::io::BufReader::new(file), len, &path.display().to_string(), each)
}

/// As `read_safetensors`, also returning the header's `__metadata__` strings.
pub fn read_safetensors_with_metadata(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut out = HashMap::new();
    let metadata = read_safetensors_each(path, |name, t| {
        out.insert(name, t);
        Ok(())
    })?;
    Ok((out, metadata))
}

/// A safetensors file's `__metadata__` strings, reading only its header (cheap on a 2 GB model).
/// `None` when the file is not safetensors at all.
pub fn read_metadata(path: &Path) -> Result<Option<HashMap<String, String>>> {
    let Some(header) = read_header(path)? else { return Ok(None) };
    let metadata = header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Ok(Some(metadata))
}

/// A safetensors file's tensor names, reading only its header; `None` when it is not safetensors.
pub fn read_tensor_names(path: &Path) -> Result<Option<Vec<String>>> {
    let Some(header) = read_header(path)? else { return Ok(None) };
    Ok(Some(header.keys().filter(|k| *k != "__metadata__").cloned().collect()))
}

/// A safetensors file's JSON header; `None` when the file is not safetensors at all.
fn read_header(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES || len > f.metadata()?.len() {
        return Ok(None);
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)?;
    let Ok(serde_json::Value::Object(header)) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return Ok(None);
    };
    Ok(Some(header))
}

/// Parses safetensors bytes (a whole file) after checking the header; errors start with `source`.
pub fn parse_safetensors(bytes: &[u8], source: &str) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut out = HashMap::new();
    let metadata = read_tensors(std::io::Cursor::new(bytes), bytes.len() as u64, source, |name, t| {
        out.insert(name, t);
        Ok(())
    })?;
    Ok((out, metadata))
}

/// The one safetensors reader: checks the header (size, duplicate keys, each tensor's extent, then
/// the library's own validation of offsets and shapes), then reads the tensors one by one in file
/// order and hands each to `each`. Returns the `__metadata__` strings.
fn read_tensors<R: std::io::Read + std::io::Seek>(
    mut r: R,
    file_len: u64,
    source: &str,
    mut each: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<HashMap<String, String>> {
    if file_len < 8 {
        bail!("{source}: not a safetensors file (only {file_len} bytes)");
    }
    let mut len_bytes = [0u8; 8];
    r.read_exact(&mut len_bytes).with_context(|| format!("{source}: cannot read"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    // The first 8 bytes are the header's length: numbers beyond the file mean another format.
    // Say which, when it is one users meet (PyTorch's pickles and zips), in words.
    if header_len > file_len {
        let mut first = [0u8; 1];
        if r.read_exact(&mut first).is_ok() && first[0] == b'{' && header_len <= MAX_HEADER_BYTES {
            bail!(
                "{source}: truncated safetensors file, cut short inside its header (header says {header_len} bytes, \
                 file has {file_len}): the download or copy did not finish"
            );
        }
        let what = match len_bytes {
            [b'P', b'K', ..] => "it is a PyTorch zip archive (.ckpt / .pt / .bin)",
            [0x80, 2..=5, ..] => "it is a Python pickle (.ckpt / .pt / .bin)",
            [0x89, b'P', b'N', b'G', ..] => "it is a PNG image",
            [0xFF, 0xD8, ..] => "it is a JPEG image",
            _ => "it does not start with a safetensors header",
        };
        bail!(
            "{source}: this is not a safetensors file ({what}); LoRA Studio reads .safetensors files only (convert \
             .ckpt / .pt files with the tool that made them, or download the .safetensors version)"
        );
    }
    if header_len > MAX_HEADER_BYTES {
        bail!(
            "{source}: not a usable safetensors file: its header claims {header_len} bytes, more than the \
             {MAX_HEADER_BYTES}-byte limit"
        );
    }
    if 8 + header_len > file_len {
        bail!(
            "{source}: truncated safetensors file, cut short (header says {header_len} bytes, file has {file_len}): \
             the download or copy did not finish"
        );
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    r.read_exact(&mut header_bytes).with_context(|| format!("{source}: cannot read"))?;
    let data_len = file_len - 8 - header_len;
    // The raw header, read once in written order before the library reads it: a key written
    // twice would make one of the two silently win (and later errors blame the other), and the
    // library's own check of each tensor's extent names no tensor; ours says which and how.
    if let Ok(HeaderEntries(entries)) = serde_json::from_slice::<HeaderEntries>(&header_bytes) {
        let mut seen = std::collections::HashSet::new();
        if let Some((dup, _)) = entries.iter().find(|(k, _)| !seen.insert(k.as_str())) {
            bail!("{source}: the header names tensor `{dup}` twice");
        }
        for (name, entry) in entries.iter().filter(|(k, _)| k != "__metadata__") {
            check_extent(entry, data_len).map_err(|e| anyhow::anyhow!("{source}: tensor `{name}` {e}"))?;
        }
    }
    let header: safetensors::tensor::Metadata = serde_json::from_slice(&header_bytes)
        .map_err(|e| anyhow::anyhow!("{source}: invalid safetensors file: {e}"))?;
    if header.data_len() as u64 != data_len {
        bail!(
            "{source}: invalid safetensors file: its tensors take {} bytes but the data section has {data_len}",
            header.data_len()
        );
    }
    for name in header.offset_keys() {
        let info = header.info(&name).expect("a key the header listed");
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::U8 => DType::U8,
            other => bail!("{source}: tensor `{name}` has unsupported dtype {other:?}"),
        };
        let (start, end) = info.data_offsets;
        let mut data = vec![0u8; end - start];
        r.seek(std::io::SeekFrom::Start(8 + header_len + start as u64))
            .and_then(|_| r.read_exact(&mut data))
            .with_context(|| format!("{source}: cannot read tensor `{name}`"))?;
        let t = Tensor::from_raw_buffer(&data, dtype, &info.shape, &Device::Cpu)
            .with_context(|| format!("{source}: tensor `{name}` is malformed"))?;
        drop(data);
        each(name, t)?;
    }
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Checks one header entry's byte range against its shape and dtype and the data section's size.
/// Entries whose fields are malformed are left to the library's parser, which names them.
fn check_extent(entry: &serde_json::Value, data_len: u64) -> Result<()> {
    let (Some(dtype), Some(shape), Some(offsets)) = (
        entry.get("dtype").and_then(|d| d.as_str()),
        entry.get("shape").and_then(|s| s.as_array()),
        entry.get("data_offsets").and_then(|o| o.as_array()),
    ) else {
        return Ok(());
    };
    let bytes_per_element: u64 = match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return Ok(()),
    };
    let (Some(start), Some(end)) = (offsets.first().and_then(|v| v.as_u64()), offsets.get(1).and_then(|v| v.as_u64()))
    else {
        return Ok(());
    };
    let dims: Option<Vec<u64>> = shape.iter().map(|d| d.as_u64()).collect();
    let Some(dims) = dims else { return Ok(()) };
    if start > end || end > data_len {
        bail!("claims bytes {start}..{end} of a {data_len}-byte data section (the file is truncated or damaged)");
    }
    let needed = dims.iter().try_fold(bytes_per_element, |n, &d| n.checked_mul(d));
    if needed != Some(end - start) {
        bail!(
            "has {} bytes of data, but its shape {dims:?} in {dtype} needs {}",
            end - start,
            needed.map_or("more than any file holds".to_string(), |n| n.to_string())
        );
    }
    Ok(())
}

/// The entries of a safetensors header in the order written, duplicates kept.
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    entries.push((key, map.next_value::<serde_json::Value>()?));
                }
                Ok(HeaderEntries(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// Whether every element is finite (no NaN, no ±∞). Integer tensors always are.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let t = match t.dtype() {
        DType::F32 | DType::F64 => t.clone(),
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32)?,
        _ => return Ok(true),
    };
    if t.elem_count() == 0 {
        return Ok(true);
    }
    // One pass without allocating: any NaN or ∞ makes the sum non-finite. Only then check
    // exactly, since finite values can also overflow the sum.
    if t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
        return Ok(true);
    }
    let t = t.to_dtype(DType::F64)?;
    Ok(t.abs()?.le(f64::MAX)?.to_dtype(DType::U32)?.min_all()?.to_scalar::<u32>()? == 1)
}

/// Writes tensors atomically: to a temporary name beside `path`, flushed, then renamed.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = serialize_safetensors(tensors, metadata).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    write_atomic(path, &bytes)
}

/// A safetensors file's bytes, as `write_safetensors` writes them.
pub fn serialize_safetensors(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut owned = Vec::with_capacity(names.len());
    for name in names {
        let t = tensors[name].to_device(&Device::Cpu)?.contiguous()?;
        owned.push((name.clone(), t));
    }
    safetensors::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| anyhow::anyhow!("cannot serialise: {e}"))
}

/// The hashes sd-scripts stores in every adapter it writes and A1111's additional-networks and
/// civitai use to recognise it (`sshs_model_hash`, `sshs_legacy_hash`): SHA-256 of the tensor data
/// (everything after the header), and the first 8 hex digits of SHA-256 over the bytes from 1 MiB
/// to 1 MiB + 64 KiB, both of the file serialised with only its `ss_*` metadata (the training
/// record, which does not change; other metadata may).
pub fn addnet_hashes(
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<(String, String)> {
    use sha2::{Digest, Sha256};
    let training: HashMap<String, String> =
        metadata.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let bytes = serialize_safetensors(tensors, Some(training))?;
    let header = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let hex = |digest: &[u8]| digest.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let model = hex(&Sha256::digest(&bytes[(8 + header).min(bytes.len())..]));
    let window = &bytes[bytes.len().min(0x100000)..bytes.len().min(0x110000)];
    let legacy = hex(&Sha256::digest(window))[..8].to_string();
    Ok((model, legacy))
}

/// The temporary name a write to `path` goes through: `.NAME.tmp-lora-studio-PID` beside it, so a kill
/// leaves a file that `tidy_temporaries` can tell is garbage (its process is gone).
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    Ok(dir.join(format!(".{}{TEMPORARY_MARK}{}", file_name.to_string_lossy(), std::process::id())))
}

/// Our own marks, so tidying never touches another program's temporary files.
const TEMPORARY_MARK: &str = ".tmp-lora-studio-";
/// Folders written whole (merged models) go through `.NAME.partial-lora-studio-PID`.
pub const PARTIAL_MARK: &str = ".partial-lora-studio-";

/// Temporary file + fsync + rename: a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_checked(path, |tmp| Ok(std::fs::write(tmp, bytes)?), |_| Ok(()))
}

/// Writes `path` through its temporary name: `write` fills the temporary file, `check` reads it
/// back, and only a file that passes replaces `path` (a good file is never swapped for a bad
/// one). On any failure the temporary file is removed and `path` is left as it was.
pub fn write_checked(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
    check: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = temporary_path(path)?;
    let io = |e: anyhow::Error| -> anyhow::Error {
        // I/O errors name the destination as the user knows it, not the temporary name (nested
        // writes, such as an adapter written through here, report their innermost cause).
        match e.root_cause().downcast_ref::<std::io::Error>() {
            Some(cause) => anyhow::Error::new(std::io::Error::new(cause.kind(), cause.to_string()))
                .context(format!("{}: cannot write", path.display())),
            None => e,
        }
    };
    let result = (|| -> Result<()> {
        write(&tmp).map_err(io)?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io(e.into()))?;
        check(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| io(e.into()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether process `pid` is still running (Linux: /proc; elsewhere assume it is, and keep its files).
fn process_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes, in `dir`, the temporary files (`.NAME.tmp-lora-studio-PID`) and partial folders
/// (`.NAME.partial-lora-studio-PID`) that killed LoRA Studio processes left behind. Those of running processes (another
/// LoRA Studio writing beside us) are kept. Every command that writes calls it on start.
pub fn tidy_temporaries(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        for mark in [TEMPORARY_MARK, PARTIAL_MARK] {
            let Some((_, pid)) = name.rsplit_once(mark) else { continue };
            let Ok(pid) = pid.parse::<u32>() else { continue };
            if pid == std::process::id() || process_alive(pid) {
                continue;
            }
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// `tidy_temporaries` for the folder `path` is written in.
pub fn tidy_temporaries_beside(path: &Path) {
    tidy_temporaries(path.parent().unwrap_or(Path::new(".")));
}
