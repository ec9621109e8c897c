//! Training images as kohya users lay them out: image files and folders, captions in same-name
//! `.txt` / `.caption` sidecars, a trigger word, kohya's `N_words` folders (repeats per epoch and
//! class tokens), resize + crop (or aspect-ratio buckets), flips.
//! Unreadable or tiny images are skipped with the reason; nothing here panics on bad files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};

use crate::engine::Result;

pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];
/// Larger images are refused before decoding (a decompression bomb is only a few bytes).
pub const MAX_IMAGE_SIDE: u32 = 16384;
pub const MAX_DECODE_BYTES: u64 = 1 << 30;
/// Image files are read whole; anything bigger than this is not a training image.
pub const MAX_IMAGE_FILE_BYTES: u64 = 512 << 20;

/// How images become training tensors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DatasetOptions {
    /// Target side in pixels (the square's side; with buckets, √ of the target area).
    pub resolution: usize,
    /// Centre crop (true) or a random crop each time the image is used.
    pub center_crop: bool,
    /// Aspect-ratio buckets with sides in multiples of `bucket_step`, instead of square crops.
    pub buckets: bool,
    pub bucket_step: usize,
    /// Mirror images left-right at random.
    pub flip: bool,
    /// Prepended to every caption (kohya's "trigger word" / class token).
    pub trigger: String,
    /// Used for images without a sidecar caption (and, in an `N_words` folder, without `words`).
    pub default_caption: String,
    /// Images whose short side is below this are skipped.
    pub min_side: u32,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            resolution: 512,
            center_crop: true,
            buckets: false,
            bucket_step: 64,
            flip: false,
            trigger: String::new(),
            default_caption: String::new(),
            min_side: 32,
        }
    }
}

/// One usable training image.
#[derive(Clone, Debug)]
pub struct ImageEntry {
    pub path: PathBuf,
    /// The caption as found (sidecar or default), without the trigger word.
    pub caption: String,
    pub caption_file: Option<PathBuf>,
    pub width: u32,
    pub height: u32,
    /// FNV-1a of the file's bytes: duplicate detection and latent cache keys.
    pub content_hash: u64,
    /// The name of the folder the image is in (kohya keys its per-folder records by it).
    pub folder: String,
    /// How many times an epoch shows this image: N for a folder named `N_words`, else 1.
    pub repeats: usize,
}

impl ImageEntry {
    /// The caption the model is trained on: trigger word first, as kohya does.
    pub fn full_caption(&self, trigger: &str) -> String {
        match (trigger.trim(), self.caption.trim()) {
            ("", c) => c.to_string(),
            (t, "") => t.to_string(),
            (t, c) => format!("{t}, {c}"),
        }
    }
}

/// A file that will not be used, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// The most repeats a folder name can ask for. kohya reads any number; above this a leading number
/// is far likelier a date or an ID (`20240101_holiday`) than a wish, so such a folder repeats once.
pub const MAX_REPEATS: usize = 1000;

/// kohya's DreamBooth folder name `N_words`: each image in it is shown N times per epoch, and
/// `words` (everything after the first `_`, possibly empty) are its class tokens. kohya splits at
/// `_` and reads the first part with Python's `int`; here N is ASCII digits (a `+` allowed), the
/// `_` is required (a folder named `2023` is a name, not 2023 repeats), and N above
/// `MAX_REPEATS` or too big to read is a name too: `None` for all of those. `Some((0, …))` is a
/// folder kohya leaves out (its `num_repeats < 1`); the scan skips its images.
pub fn folder_repeats(name: &str) -> Option<(usize, &str)> {
    let (count, words) = name.split_once('_')?;
    let digits = count.strip_prefix('+').unwrap_or(count);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: usize = digits.parse().ok()?;
    (n <= MAX_REPEATS).then_some((n, words))
}

/// One folder of a dataset as kohya records it (`ss_dataset_dirs`, a dataset.toml subset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetFolder {
    pub path: PathBuf,
    /// The folder's own name (`10_sks dog`).
    pub name: String,
    pub repeats: usize,
    /// Usable images in it (without repeats: kohya's `img_count`).
    pub images: usize,
    /// kohya's class tokens: the `words` of an `N_words` name (empty otherwise).
    pub class_tokens: String,
}

impl DatasetFolder {
    /// Images an epoch shows from this folder.
    pub fn per_epoch(&self) -> usize {
        self.images * self.repeats
    }
}

/// Groups image paths (sorted, so each folder's images are together) by their folder.
fn group_by_folder<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<DatasetFolder> {
    let mut out: Vec<DatasetFolder> = Vec::new();
    for p in paths {
        let dir = p.parent().unwrap_or(Path::new(""));
        match out.last_mut() {
            Some(f) if f.path == dir => f.images += 1,
            _ => {
                let name = folder_name(p);
                let (repeats, class_tokens) = folder_repeats(&name).unwrap_or((1, ""));
                let class_tokens = class_tokens.to_string();
                out.push(DatasetFolder { path: dir.to_path_buf(), repeats, images: 1, class_tokens, name });
            }
        }
    }
    out
}

/// The name of the folder a file is in ("" when it has none).
fn folder_name(path: &Path) -> String {
    path.parent().and_then(|d| d.file_name()).map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// The image folders under `paths` with their repeats, from a listing alone (nothing decoded; a
/// folder kohya leaves out, `0_x`, is left out): what a kohya job's subsets are. A given folder
/// with no images under it here (they may be on the machine the job runs on) is one itself.
pub fn image_folders(paths: &[PathBuf]) -> Result<Vec<DatasetFolder>> {
    let (mut files, mut visited, mut skipped) = (Vec::new(), HashSet::new(), Vec::new());
    for p in paths {
        if p.is_dir() {
            collect_images(p, &mut visited, &mut files, &mut skipped)?;
        } else if is_image(p) {
            files.push(p.clone());
        }
    }
    files.sort();
    files.dedup();
    let mut folders = group_by_folder(files.iter().map(PathBuf::as_path));
    for p in paths.iter().filter(|p| !is_image(p)) {
        if !folders.iter().any(|f| f.path.starts_with(p)) {
            let name = p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let (repeats, class_tokens) = folder_repeats(&name).unwrap_or((1, ""));
            let class_tokens = class_tokens.to_string();
            folders.push(DatasetFolder { path: p.clone(), name, repeats, images: 0, class_tokens });
        }
    }
    Ok(folders.into_iter().filter(|f| f.repeats > 0).collect())
}

#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub images: Vec<ImageEntry>,
    pub skipped: Vec<Skipped>,
}

/// Checks the user should see before training starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Preflight {
    pub images: usize,
    pub without_caption: Vec<PathBuf>,
    /// Captions over 75 CLIP tokens (they are cut off), with their token counts.
    pub long_captions: Vec<(PathBuf, usize)>,
    /// Groups of byte-identical images.
    pub duplicates: Vec<Vec<PathBuf>>,
    /// Images smaller than the training size (they are upscaled, which blurs).
    pub upscaled: Vec<PathBuf>,
    /// Images per bucket "W×H".
    pub buckets: BTreeMap<String, usize>,
    pub skipped: Vec<Skipped>,
    /// Each folder's images and repeats.
    pub folders: Vec<DatasetFolder>,
}

impl Preflight {
    /// One line: how many images go to each training size.
    pub fn bucket_summary(&self) -> String {
        if self.buckets.is_empty() {
            return "no usable images".into();
        }
        let parts: Vec<String> = self.buckets.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("training sizes: {}", parts.join(", "))
    }

    /// Images an epoch shows: every image × its folder's repeats.
    pub fn images_per_epoch(&self) -> usize {
        self.folders.iter().map(DatasetFolder::per_epoch).sum()
    }

    /// One line: each folder's images and repeats, and the images per epoch
    /// ("10_sks dog: 24 images × 10 repeats, extra: 3 images × 1; 243 images per epoch").
    pub fn repeats_summary(&self) -> String {
        let parts: Vec<String> = self
            .folders
            .iter()
            .map(|f| {
                format!(
                    "{}: {} × {}",
                    f.name,
                    counted(f.images, "image", "images"),
                    counted(f.repeats, "repeat", "repeats")
                )
            })
            .collect();
        format!("{}; {} per epoch", parts.join(", "), counted(self.images_per_epoch(), "image", "images"))
    }

    /// One line: how many epochs `steps` optimiser steps of `batch` × `grad_accum` images are
    /// ("500 steps = 4.2 epochs of 120 steps").
    pub fn epochs_summary(&self, steps: usize, batch: usize, grad_accum: usize) -> String {
        let per_epoch = steps_per_epoch(self.images_per_epoch(), batch, grad_accum);
        let epochs = steps as f64 / per_epoch as f64;
        format!("{} = {epochs:.1} epochs of {}", counted(steps, "step", "steps"), counted(per_epoch, "step", "steps"))
    }

    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.without_caption.is_empty() {
            let n = self.without_caption.len();
            let (has, they) = if n == 1 { ("has", "it uses") } else { ("have", "they use") };
            w.push(format!(
                "{} {has} no caption file (.txt or .caption); {they} the default caption",
                counted(n, "image", "images")
            ));
        }
        for (p, n) in &self.long_captions {
            w.push(format!("{}: caption is {n} tokens; only the first 75 are used", p.display()));
        }
        for group in &self.duplicates {
            let names: Vec<String> = group.iter().map(|p| p.display().to_string()).collect();
            w.push(format!("identical images: {}", names.join(", ")));
        }
        if !self.upscaled.is_empty() {
            let n = self.upscaled.len();
            let is = if n == 1 { "is" } else { "are" };
            w.push(format!(
                "{} {is} smaller than the training size and will be upscaled",
                counted(n, "image", "images")
            ));
        }
        for s in &self.skipped {
            w.push(format!("{}: skipped: {}", s.path.display(), s.reason));
        }
        w
    }
}

/// FNV-1a: a fast, stable content hash for cache keys and duplicate detection (not cryptographic).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes an image with explicit limits, naming the file in any error.
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<image::DynamicImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    if reader.format().is_none() {
        bail!("{}: not an image (unrecognised contents)", path.display());
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        bail!("{}: cannot decode: truncated JPEG (the file ends before its image data does)", path.display());
    }
    reader.decode().map_err(|e| anyhow::anyhow!("{}: cannot decode: {e}", path.display()))
}

/// Caption from `<stem>.txt` or `<stem>.caption` beside the image: UTF-8 (a byte-order mark is
/// dropped) or UTF-16 with a byte-order mark, as Windows' Notepad saves it. A caption file that is
/// there but cannot be read as text is an error naming it, never "no caption".
fn sidecar_caption(path: &Path) -> std::result::Result<Option<(String, PathBuf)>, String> {
    for ext in ["txt", "caption"] {
        let p = path.with_extension(ext);
        if !p.exists() {
            continue;
        }
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = std::fs::read(&p).map_err(|e| format!("cannot read its caption {name}: {e}"))?;
        let text = decode_caption(&bytes)
            .ok_or_else(|| format!("its caption {name} is not UTF-8 text (re-save it as UTF-8)"))?;
        return Ok(Some((text.trim().to_string(), p)));
    }
    Ok(None)
}

/// Caption bytes as text: UTF-8 (with or without a byte-order mark) or UTF-16 with one.
pub fn decode_caption(bytes: &[u8]) -> Option<String> {
    let utf16 = |bytes: &[u8], read: fn([u8; 2]) -> u16| -> Option<String> {
        if !bytes.len().is_multiple_of(2) {
            return None;
        }
        let units: Vec<u16> = bytes.chunks_exact(2).map(|c| read([c[0], c[1]])).collect();
        String::from_utf16(&units).ok()
    };
    match bytes {
        [0xEF, 0xBB, 0xBF, rest @ ..] => String::from_utf8(rest.to_vec()).ok(),
        [0xFF, 0xFE, rest @ ..] => utf16(rest, u16::from_le_bytes),
        [0xFE, 0xFF, rest @ ..] => utf16(rest, u16::from_be_bytes),
        _ => String::from_utf8(bytes.to_vec()).ok(),
    }
}

/// Whether a JPEG's data runs to its end-of-image marker after the last scan. The decoder fills a
/// truncated file's missing rows with grey and says nothing; PNG's decoder refuses them itself.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    // Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so FF DA is
    // a real start-of-scan and FF D9 a real end-of-image.
    let Some(last_scan) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else { return false };
    bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

impl Dataset {
    /// Collects images from files and folders (recursively). Bad files become `skipped` entries.
    pub fn scan(paths: &[PathBuf], opts: &DatasetOptions) -> Result<Self> {
        let mut files = Vec::new();
        let mut ds = Dataset::default();
        let mut visited = HashSet::new();
        for p in paths {
            if p.is_dir() {
                collect_images(p, &mut visited, &mut files, &mut ds.skipped)?;
            } else if p.exists() {
                files.push(p.clone());
            } else {
                bail!("{}: no such file or folder", p.display());
            }
        }
        // The same file reached twice (a folder given twice, or through a link) is one image.
        let mut seen = HashSet::new();
        files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
        files.sort();
        for path in files {
            match Self::entry(&path, opts) {
                Ok(e) => ds.images.push(e),
                Err(reason) => ds.skipped.push(Skipped { path, reason }),
            }
        }
        Ok(ds)
    }

    fn entry(path: &Path, opts: &DatasetOptions) -> std::result::Result<ImageEntry, String> {
        if !is_image(path) {
            return Err("not an image file (expected png, jpg, webp or bmp)".into());
        }
        if let Some((0, _)) = folder_repeats(&folder_name(path)) {
            return Err("its folder's name asks for 0 repeats (`0_…`); kohya leaves such folders out".into());
        }
        let size = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?.len();
        if size == 0 {
            return Err("empty file".into());
        }
        if size > MAX_IMAGE_FILE_BYTES {
            return Err(format!("{size} bytes is larger than the {MAX_IMAGE_FILE_BYTES}-byte limit for an image file"));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        // Reading only the header first catches decompression bombs and non-images cheaply.
        let reader =
            image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format().map_err(|e| e.to_string())?;
        if reader.format().is_none() {
            return Err("not an image (unrecognised contents)".into());
        }
        let (width, height) = reader.into_dimensions().map_err(|e| format!("cannot decode: {e}"))?;
        if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
            return Err(format!("{width}×{height} is larger than {MAX_IMAGE_SIDE} pixels on a side"));
        }
        if width.min(height) < opts.min_side {
            return Err(format!("{width}×{height} is too small (minimum side {})", opts.min_side));
        }
        decode_image(path, &bytes).map_err(|e| format!("{e:#}").replacen(&format!("{}: ", path.display()), "", 1))?;
        let folder = folder_name(path);
        let (repeats, class_tokens) = folder_repeats(&folder).unwrap_or((1, ""));
        // kohya's order: the caption file, else the folder's class tokens, else (kohya: empty) ours.
        let (caption, caption_file) = match sidecar_caption(path)? {
            Some((c, f)) => (c, Some(f)),
            None if !class_tokens.trim().is_empty() => (class_tokens.trim().to_string(), None),
            None => (opts.default_caption.clone(), None),
        };
        let content_hash = fnv1a(&bytes);
        Ok(ImageEntry { path: path.to_path_buf(), caption, caption_file, width, height, content_hash, folder, repeats })
    }

    /// Each folder's images and repeats, in path order.
    pub fn folders(&self) -> Vec<DatasetFolder> {
        group_by_folder(self.images.iter().map(|e| e.path.as_path()))
    }

    /// Images an epoch shows: every image × its folder's repeats (kohya's `num_train_images`).
    pub fn images_per_epoch(&self) -> usize {
        self.images.iter().map(|e| e.repeats).sum()
    }

    /// Optimiser steps per epoch (`steps_per_epoch` of this dataset's images per epoch).
    pub fn steps_per_epoch(&self, batch: usize, grad_accum: usize) -> usize {
        steps_per_epoch(self.images_per_epoch(), batch, grad_accum)
    }

    /// The run length of `epochs` epochs, as sd-scripts turns `--max_train_epochs` into steps:
    /// epochs × steps per epoch (24 images × 10 repeats, batch 2, 10 epochs: 1200 steps).
    pub fn steps_for_epochs(&self, epochs: usize, batch: usize, grad_accum: usize) -> usize {
        steps_for_epochs(epochs, self.images_per_epoch(), batch, grad_accum)
    }

    /// The pre-flight report; `count_tokens` is the model's tokenizer.
    pub fn preflight(&self, opts: &DatasetOptions, count_tokens: &dyn Fn(&str) -> usize) -> Preflight {
        let mut pf = Preflight {
            images: self.images.len(),
            skipped: self.skipped.clone(),
            folders: self.folders(),
            ..Default::default()
        };
        let mut by_hash: HashMap<u64, Vec<PathBuf>> = HashMap::new();
        for e in &self.images {
            // An `N_words` folder's words are its images' caption, kohya's DreamBooth way.
            let class_tokens = folder_repeats(&e.folder).is_some_and(|(_, w)| !w.trim().is_empty());
            if e.caption_file.is_none() && !class_tokens {
                pf.without_caption.push(e.path.clone());
            }
            let n = count_tokens(&e.full_caption(&opts.trigger));
            if n > 75 {
                pf.long_captions.push((e.path.clone(), n));
            }
            by_hash.entry(e.content_hash).or_default().push(e.path.clone());
            let (bw, bh) = target_size(e.width, e.height, opts);
            if (e.width as usize) < bw || (e.height as usize) < bh {
                pf.upscaled.push(e.path.clone());
            }
            *pf.buckets.entry(format!("{bw}×{bh}")).or_insert(0) += 1;
        }
        let mut dups: Vec<Vec<PathBuf>> = by_hash.into_values().filter(|g| g.len() > 1).collect();
        dups.sort();
        pf.duplicates = dups;
        pf
    }
}

/// Optimiser steps per epoch, rounded as kohya rounds them: whole batches, then whole
/// accumulation groups, ⌈⌈images per epoch / batch⌉ / accumulation⌉. (With buckets kohya rounds
/// each bucket up to whole batches; our batches mix buckets, so they are counted together.) Our
/// trainer does not end an epoch with a short batch: the extra places take the next epoch's first.
pub fn steps_per_epoch(images_per_epoch: usize, batch: usize, grad_accum: usize) -> usize {
    images_per_epoch.div_ceil(batch.max(1)).div_ceil(grad_accum.max(1)).max(1)
}

/// sd-scripts' `max_train_epochs × steps per epoch`: each epoch rounded up on its own, so 10
/// epochs of 25 images at batch 2 are 130 steps, not ⌈250 / 2⌉ = 125.
pub fn steps_for_epochs(epochs: usize, images_per_epoch: usize, batch: usize, grad_accum: usize) -> usize {
    epochs.saturating_mul(steps_per_epoch(images_per_epoch, batch, grad_accum))
}

/// Images under `dir`, recursively. Each folder is read once (by its real path), so a link that
/// leads back up (`a -> .`) is not followed round and round; it is reported in `skipped`.
fn collect_images(
    dir: &Path,
    visited: &mut HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
    skipped: &mut Vec<Skipped>,
) -> Result<()> {
    let real = dir.canonicalize().with_context(|| format!("{}: cannot read folder", dir.display()))?;
    if !visited.insert(real.clone()) {
        skipped.push(Skipped {
            path: dir.to_path_buf(),
            reason: format!(
                "leads to {}, which is already scanned (a link back, or the same folder twice); not read again",
                real.display()
            ),
        });
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read folder", dir.display()))? {
        entries.push(entry?.path());
    }
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_images(&p, visited, out, skipped)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// The training size for an image: the square, or the bucket whose aspect ratio is closest.
pub fn target_size(width: u32, height: u32, opts: &DatasetOptions) -> (usize, usize) {
    let res = opts.resolution;
    if !opts.buckets {
        return (res, res);
    }
    let step = opts.bucket_step.max(8);
    let area = (res * res) as f64;
    let aspect = width as f64 / height as f64;
    let mut best = (res, res);
    let mut best_err = f64::INFINITY;
    let mut w = step;
    while w <= res * 2 {
        // The tallest height in steps that keeps w·h within the target area.
        let h = ((area / w as f64) as usize / step * step).max(step);
        let err = ((w as f64 / h as f64).ln() - aspect.ln()).abs();
        if h <= res * 2 && err < best_err {
            best = (w, h);
            best_err = err;
        }
        w += step;
    }
    best
}

/// Resizes so the image covers `(w, h)` and crops to it; `crop_offset` in [0,1]² picks the window
/// (0.5, 0.5 is the centre). Returns (3, h, w) in [-1, 1].
/// Where `prepare_image` cuts a `w`×`h` picture from an `iw`×`ih` image: the size it resizes the
/// image to (covering `w`×`h`), and the crop's left and top in that resized image. SDXL is told the
/// crop's top-left (its micro-conditioning), so both places use this one computation.
pub fn crop_window(iw: usize, ih: usize, w: usize, h: usize, crop_offset: (f64, f64)) -> (usize, usize, usize, usize) {
    let (fw, fh) = (iw.max(1) as f64, ih.max(1) as f64);
    let scale = (w as f64 / fw).max(h as f64 / fh);
    let (rw, rh) = (((fw * scale).round() as usize).max(w), ((fh * scale).round() as usize).max(h));
    let x0 = ((rw - w) as f64 * crop_offset.0).round() as usize;
    let y0 = ((rh - h) as f64 * crop_offset.1).round() as usize;
    (rw, rh, x0, y0)
}

pub fn prepare_image(
    img: &image::DynamicImage,
    w: usize,
    h: usize,
    crop_offset: (f64, f64),
    flip: bool,
    device: &Device,
) -> Result<Tensor> {
    let rgb = img.to_rgb8();
    let (rw, rh, x0, y0) = crop_window(rgb.width() as usize, rgb.height() as usize, w, h, crop_offset);
    let resized = image::imageops::resize(&rgb, rw as u32, rh as u32, image::imageops::FilterType::CatmullRom);
    let mut crop = image::imageops::crop_imm(&resized, x0 as u32, y0 as u32, w as u32, h as u32).to_image();
    if flip {
        image::imageops::flip_horizontal_in_place(&mut crop);
    }
    let data: Vec<f32> = crop.into_raw().into_iter().map(|v| v as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?.permute((2, 0, 1))?.contiguous()?)
}

/// A count in words: "1 image", "2 images".
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod wording_tests {
    use std::path::PathBuf;

    use super::{Preflight, counted};

    /// Counts read as words: "1 image has", "2 images have".
    #[test]
    fn warnings_count_in_words() {
        assert_eq!(
            (counted(1, "image", "images"), counted(0, "image", "images")),
            ("1 image".into(), "0 images".into())
        );
        let one = Preflight {
            without_caption: vec![PathBuf::from("a.png")],
            upscaled: vec![PathBuf::from("a.png")],
            ..Default::default()
        };
        assert_eq!(
            one.warnings(),
            [
                "1 image has no caption file (.txt or .caption); it uses the default caption",
                "1 image is smaller than the training size and will be upscaled"
            ]
        );
        let two =
            Preflight { without_caption: vec![PathBuf::from("a.png"), PathBuf::from("b.png")], ..Default::default() };
        assert_eq!(two.warnings(), ["2 images have no caption file (.txt or .caption); they use the default caption"]);
    }
}

#[cfg(test)]
mod repeats_tests {
    use std::path::{Path, PathBuf};

    use super::{Dataset, DatasetOptions, MAX_REPEATS, folder_repeats, steps_for_epochs, steps_per_epoch};

    #[test]
    fn folder_names_read_as_kohya_reads_them() {
        assert_eq!(folder_repeats("10_sks dog"), Some((10, "sks dog")));
        // Only the first `_` splits: kohya joins the rest back with `_`.
        assert_eq!(folder_repeats("3_red_car"), Some((3, "red_car")));
        assert_eq!(folder_repeats("3_"), Some((3, "")));
        assert_eq!(folder_repeats("10_"), Some((10, "")));
        assert_eq!(folder_repeats("+2_x"), Some((2, "x")));
        assert_eq!(folder_repeats("5_猫 ねこ"), Some((5, "猫 ねこ")));
        // 0 is a folder kohya leaves out; the scan skips its images.
        assert_eq!(folder_repeats("0_x"), Some((0, "x")));
        assert_eq!(folder_repeats("abc"), None);
        assert_eq!(folder_repeats("abc_def"), None);
        assert_eq!(folder_repeats("_x"), None);
        assert_eq!(folder_repeats("-3_x"), None);
        // A number without `_`, a date, a number too big to read, non-ASCII digits: names.
        assert_eq!(folder_repeats("2023"), None);
        assert_eq!(folder_repeats("20240101_holiday"), None);
        assert_eq!(folder_repeats("99999999999999999999999_x"), None);
        assert_eq!(folder_repeats("１０_x"), None);
        assert_eq!(folder_repeats(&format!("{MAX_REPEATS}_x")), Some((MAX_REPEATS, "x")));
        assert_eq!(folder_repeats(&format!("{}_x", MAX_REPEATS + 1)), None);
    }

    fn png(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(40, 40, image::Rgb([10, 200, 30])).save(path).unwrap();
    }

    /// `10_sks dog`'s images repeat 10 times and, without a caption file, are captioned `sks dog`
    /// (over the default caption); a caption file still wins; `0_x` is skipped; a plain folder
    /// repeats once and takes the default caption.
    #[test]
    fn repeat_folders_give_repeats_and_class_tokens() {
        let root: PathBuf = std::env::temp_dir().join(format!("lora-studio-repeats-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        png(&root.join("10_sks dog/a.png"));
        png(&root.join("10_sks dog/b.png"));
        std::fs::write(root.join("10_sks dog/b.txt"), "a dog on grass").unwrap();
        png(&root.join("0_unused/c.png"));
        png(&root.join("plain/d.png"));
        let opts = DatasetOptions { default_caption: "a photo".into(), ..Default::default() };
        let ds = Dataset::scan(std::slice::from_ref(&root), &opts).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        let seen: Vec<(&str, usize, &str)> =
            ds.images.iter().map(|e| (e.folder.as_str(), e.repeats, e.caption.as_str())).collect();
        assert_eq!(
            seen,
            [("10_sks dog", 10, "sks dog"), ("10_sks dog", 10, "a dog on grass"), ("plain", 1, "a photo")]
        );
        assert_eq!(ds.skipped.len(), 1, "{:?}", ds.skipped);
        assert!(ds.skipped[0].reason.contains("0 repeats"), "{:?}", ds.skipped);
        assert_eq!(ds.images_per_epoch(), 21);
        let pf = ds.preflight(&opts, &|_| 1);
        assert_eq!(
            pf.repeats_summary(),
            "10_sks dog: 2 images × 10 repeats, plain: 1 image × 1 repeat; 21 images per epoch"
        );
        // batch 2: ⌈21 / 2⌉ = 11 steps an epoch.
        assert_eq!(pf.epochs_summary(33, 2, 1), "33 steps = 3.0 epochs of 11 steps");
        // Only the plain folder's image falls back to the default caption.
        assert_eq!(pf.without_caption.len(), 1);
    }

    /// A kohya job's subsets: each image folder (nested ones too) with its repeats, `0_x` left out,
    /// and a given folder with no images here as itself.
    #[test]
    fn image_folders_list_each_folder_with_its_repeats() {
        let root: PathBuf = std::env::temp_dir().join(format!("lora-studio-repeats-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        png(&root.join("train/10_sks dog/a.png"));
        png(&root.join("train/10_sks dog/b.png"));
        png(&root.join("train/0_unused/c.png"));
        png(&root.join("train/plain/more/d.png"));
        std::fs::create_dir_all(root.join("3_elsewhere")).unwrap();
        let folders = super::image_folders(&[root.join("train"), root.join("3_elsewhere")]).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        let seen: Vec<(&str, usize, usize, &str)> =
            folders.iter().map(|f| (f.name.as_str(), f.repeats, f.images, f.class_tokens.as_str())).collect();
        assert_eq!(seen, [("10_sks dog", 10, 2, "sks dog"), ("more", 1, 1, ""), ("3_elsewhere", 3, 0, "elsewhere")]);
    }

    /// sd-scripts' `--max_train_epochs`: epochs × ⌈⌈images × repeats / batch⌉ / accumulation⌉.
    #[test]
    fn epochs_become_steps_as_sd_scripts_counts_them() {
        // 24 images × 10 repeats, batch 2, 10 epochs: sd-scripts prints 1200 steps.
        assert_eq!(steps_for_epochs(10, 24 * 10, 2, 1), 1200);
        // A ragged batch is a whole step each epoch: 25 images, batch 2 → 13 an epoch, not 12.5.
        assert_eq!(steps_for_epochs(10, 25, 2, 1), 130);
        // Accumulation rounds the batches up again: ⌈⌈25 / 2⌉ / 4⌉ = 4 an epoch.
        assert_eq!(steps_for_epochs(3, 25, 2, 4), 12);
        assert_eq!(steps_per_epoch(0, 2, 1), 1);
    }
}
