//! A corpus of bad inputs, made here (nothing is downloaded), each sent through the engine and the
//! `lora-studio` binary. Every one must give a clear one-line error naming the file and the
//! problem, exit code 1, no panic, and no partial output file; odd-but-valid images must load.

mod common;

use lora_studio::engine::io::weights::WeightPrecision;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_studio::engine::adapters::formats::read_adapter;
use lora_studio::engine::io::weights::{read_safetensors, read_safetensors_with_metadata, write_safetensors};
use lora_studio::engine::pipeline::{GenerateRequest, ModelWeights, StableDiffusion};
use lora_studio::engine::train::dataset::{Dataset, DatasetOptions, decode_image, prepare_image};

// ---------------------------------------------------------------------------------------------
// Running the binary

fn studio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-studio")).args(args).output().expect("run lora-studio")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failed run: exit code 1, exactly one line on stderr holding every needle, and no panic.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` in: {err}");
    }
}

/// A run that failed after printing progress: exit 1, no panic, the error alone on the last line.
fn assert_last_line_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "last line: {err}");
    for needle in needles {
        assert!(last.contains(needle), "`{needle}` in: {last}");
    }
}

/// No output file, and no temporary file of an interrupted write, in `out`'s folder.
fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} was left behind", out.display());
    if let Some(dir) = out.parent().filter(|d| d.is_dir()) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "temporary file {name} left in {}", dir.display());
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn model_copy(dir: &Path, name: &str) -> PathBuf {
    let m = dir.join(name);
    copy_dir(&sd1_tiny().join("model"), &m);
    m
}

const UNET_FILE: &str = "unet/diffusion_pytorch_model.safetensors";

// ---------------------------------------------------------------------------------------------
// Making images

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

/// A PNG with the given IHDR size (8-bit RGB) and `idat` as its only image data.
fn png_with(width: u32, height: u32, idat: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", idat);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// zlib "stored" (uncompressed) stream of `data`.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut z = vec![0x78, 0x01, 0x01];
    let n = data.len() as u16;
    z.extend(n.to_le_bytes());
    z.extend((!n).to_le_bytes());
    z.extend(data);
    z.extend(adler32(data).to_be_bytes());
    z
}

fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
    bytes
}

fn rgb(side: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
    }))
}

fn webp_lossless(img: &image::DynamicImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    let rgba = img.to_rgba8();
    image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
        .encode(&rgba, rgba.width(), rgba.height(), image::ExtendedColorType::Rgba8)
        .unwrap();
    bytes
}

/// A baseline CMYK JPEG (four components, Adobe APP14 marker, no colour transform) of one flat
/// colour, written by hand since the `image` crate only encodes grey and RGB JPEGs. Every 8×8
/// block is DC-only: the first block of each component carries the DC value, the rest a zero diff.
fn cmyk_jpeg(side: u16) -> Vec<u8> {
    assert_eq!(side % 8, 0);
    let mut j = vec![0xff, 0xd8];
    // APP14 "Adobe", version 100, flags 0, transform 0 (CMYK as stored).
    j.extend([0xff, 0xee, 0, 14]);
    j.extend(b"Adobe");
    j.extend([0, 100, 0, 0, 0, 0, 0]);
    // One quantisation table of ones.
    j.extend([0xff, 0xdb, 0, 67, 0]);
    j.extend([1u8; 64]);
    // SOF0: 8-bit, side×side, four components with 1×1 sampling and table 0.
    j.extend([0xff, 0xc0, 0, 20, 8]);
    j.extend(side.to_be_bytes());
    j.extend(side.to_be_bytes());
    j.push(4);
    for id in 1..=4u8 {
        j.extend([id, 0x11, 0]);
    }
    // Huffman tables: DC {00 → category 0, 01 → category 10}; AC {00 → end of block}.
    j.extend([0xff, 0xc4, 0, 39]);
    j.push(0x00);
    j.extend([0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    j.extend([0, 10]);
    j.push(0x10);
    j.extend([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    j.push(0);
    // SOS: all four components, DC table 0 / AC table 0.
    j.extend([0xff, 0xda, 0, 14, 4]);
    for id in 1..=4u8 {
        j.extend([id, 0x00]);
    }
    j.extend([0, 63, 0]);
    let mut bits: Vec<bool> = Vec::new();
    let put = |value: u32, n: u32, bits: &mut Vec<bool>| {
        for i in (0..n).rev() {
            bits.push(value >> i & 1 == 1);
        }
    };
    // Levels ≥ 192 give DC = 8 · (v − 128) in category 10 (512..1023), the one the table codes.
    for v in [200u32, 230, 250, 196] {
        put(0b01, 2, &mut bits);
        put(8 * (v - 128), 10, &mut bits);
        put(0b00, 2, &mut bits);
    }
    let blocks = (side as u32 / 8).pow(2);
    for _ in 1..blocks {
        for _ in 0..4 {
            put(0b0000, 4, &mut bits);
        }
    }
    while !bits.len().is_multiple_of(8) {
        bits.push(true);
    }
    for byte in bits.chunks(8) {
        let b = byte.iter().fold(0u8, |acc, &bit| acc << 1 | bit as u8);
        j.push(b);
        if b == 0xff {
            j.push(0);
        }
    }
    j.extend([0xff, 0xd9]);
    j
}

/// Bad image files: (file name, contents, words the skip reason must contain).
fn bad_images() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let png = encode(&rgb(40), image::ImageFormat::Png);
    let jpg = encode(&rgb(40), image::ImageFormat::Jpeg);
    let webp = webp_lossless(&rgb(40));

    // A PNG whose IDAT is not a deflate stream (checksums valid, so only decoding finds it).
    let corrupt_png = png_with(40, 40, &[0x78, 0x9c, 0xff, 0xee, 0xdd, 0xcc, 0x00, 0x11, 0x22, 0x33]);
    // A JPEG whose quantisation table segment claims to run past the end of the file.
    let mut corrupt_jpg = jpg[..2].to_vec();
    corrupt_jpg.extend([0xff, 0xdb, 0xff, 0xf0, 0x00]);
    corrupt_jpg.extend([7u8; 100]);
    // A WebP whose lossless bitstream is garbage.
    let mut corrupt_webp = webp[..12].to_vec();
    let payload = [0x2f, 0x27, 0xc0, 0x09, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    corrupt_webp.extend(b"VP8L");
    corrupt_webp.extend((payload.len() as u32).to_le_bytes());
    corrupt_webp.extend(payload);
    let riff_len = (corrupt_webp.len() - 8) as u32;
    corrupt_webp[4..8].copy_from_slice(&riff_len.to_le_bytes());

    // A JPEG cut inside its image data: headers whole, so the decoder alone fills the rest with grey.
    let detailed = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(256, 256, |x, y| {
        image::Rgb([((x * 7) ^ (y * 13)) as u8, (x * y) as u8, (x + 3 * y) as u8])
    }));
    let big_jpg = encode(&detailed, image::ImageFormat::Jpeg);
    let cut_jpg = big_jpg[..big_jpg.len() * 9 / 10].to_vec();

    // Decompression bomb: a valid 30000×30000 header and a tiny (valid) IDAT.
    let bomb = png_with(30000, 30000, &zlib_stored(&[0u8; 64]));

    vec![
        ("zero.png", Vec::new(), "empty file"),
        ("zero.jpg", Vec::new(), "empty file"),
        ("zero.webp", Vec::new(), "empty file"),
        ("truncated.png", png[..png.len() / 2].to_vec(), "cannot decode"),
        ("truncated.jpg", jpg[..jpg.len() / 2].to_vec(), "cannot decode"),
        ("truncated.webp", webp[..webp.len() / 2].to_vec(), "cannot decode"),
        ("cut-in-the-data.jpg", cut_jpg, "truncated JPEG"),
        ("corrupt.png", corrupt_png, "cannot decode"),
        ("corrupt.jpg", corrupt_jpg, "cannot decode"),
        ("corrupt.webp", corrupt_webp, "cannot decode"),
        ("bomb 30000.png", bomb, "30000×30000 is larger than 16384"),
        ("notes.jpg", b"These are my notes, not a picture.\n".to_vec(), "not an image"),
        ("one-pixel.png", encode(&rgb(1), image::ImageFormat::Png), "1×1 is too small"),
    ]
}

/// Valid images of unusual kinds, all 40×40.
fn odd_images() -> Vec<(&'static str, Vec<u8>)> {
    use image::DynamicImage as D;
    let base = rgb(40);
    let png = |img: D| encode(&img, image::ImageFormat::Png);
    vec![
        ("grey8.png", png(D::ImageLuma8(base.to_luma8()))),
        ("grey16.png", png(D::ImageLuma16(base.to_luma16()))),
        ("grey-alpha.png", png(D::ImageLumaA8(base.to_luma_alpha8()))),
        ("rgb16.png", png(D::ImageRgb16(base.to_rgb16()))),
        ("rgba8.png", png(D::ImageRgba8(base.to_rgba8()))),
        ("rgba16.png", png(D::ImageRgba16(base.to_rgba16()))),
        ("grey.jpg", encode(&D::ImageLuma8(base.to_luma8()), image::ImageFormat::Jpeg)),
        ("cmyk.jpg", cmyk_jpeg(40)),
        ("alpha.webp", webp_lossless(&D::ImageRgba8(base.to_rgba8()))),
        ("picture.bmp", encode(&base, image::ImageFormat::Bmp)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Training data

#[test]
fn bad_images_are_skipped_with_reasons_and_an_all_bad_folder_is_refused() {
    let dir = tempdir("images");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let bad = bad_images();
    for (name, bytes, _) in &bad {
        std::fs::write(data.join(name), bytes).unwrap();
    }

    // The engine: nothing usable, every file skipped with its reason; the bomb is refused from
    // its header (decoding it would need 2.7 GB).
    let started = std::time::Instant::now();
    let ds = Dataset::scan(std::slice::from_ref(&data), &DatasetOptions::default()).unwrap();
    assert!(started.elapsed().as_secs() < 10, "scanning took {:?}", started.elapsed());
    assert!(ds.images.is_empty(), "{:?}", ds.images);
    assert_eq!(ds.skipped.len(), bad.len(), "{:?}", ds.skipped);
    for (name, _, reason) in &bad {
        let s = ds.skipped.iter().find(|s| file_name(&s.path) == *name).unwrap_or_else(|| panic!("{name} not skipped"));
        eprintln!("{name}: {}", s.reason);
        assert!(s.reason.contains(reason), "{name}: `{reason}` in `{}`", s.reason);
    }
    for (name, bytes, _) in &bad {
        let path = data.join(name);
        if let Err(e) = decode_image(&path, bytes) {
            assert!(format!("{e:#}").contains(name), "{e:#}");
        }
    }

    // The binary: each file listed as skipped with its reason, then one error line, exit 1.
    let out = dir.join("out/style.safetensors");
    let run = studio(&[
        "train",
        "--model",
        p(&sd1_tiny().join("model")),
        "--data",
        p(&data),
        "--out",
        p(&out),
        "--steps",
        "2",
        "--resolution",
        "32",
    ]);
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for (name, _, reason) in &bad {
        assert!(err.lines().any(|l| l.contains(name) && l.contains("skipped") && l.contains(reason)), "{name}: {err}");
    }
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.starts_with("error: ") && last.contains("no usable images"), "{err}");
    assert_no_output(&out);
}

#[test]
fn odd_but_valid_images_load_and_train() {
    let dir = tempdir("odd-images");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let odd = odd_images();
    for (name, bytes) in &odd {
        std::fs::write(data.join(name), bytes).unwrap();
    }
    let ds = Dataset::scan(std::slice::from_ref(&data), &DatasetOptions::default()).unwrap();
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped);
    assert_eq!(ds.images.len(), odd.len());
    for e in &ds.images {
        assert_eq!((e.width, e.height), (40, 40), "{}", e.path.display());
        let img = decode_image(&e.path, &std::fs::read(&e.path).unwrap()).unwrap();
        let t = prepare_image(&img, 32, 32, (0.5, 0.5), false, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [3, 32, 32]);
        let (lo, hi) =
            (t.min_all().unwrap().to_scalar::<f32>().unwrap(), t.max_all().unwrap().to_scalar::<f32>().unwrap());
        assert!((-1.0..=1.0).contains(&lo) && (-1.0..=1.0).contains(&hi), "{}: {lo}..{hi}", e.path.display());
    }
    // The hand-made CMYK JPEG is one flat colour; it must not come out black or white.
    let cmyk = data.join("cmyk.jpg");
    let px = decode_image(&cmyk, &std::fs::read(&cmyk).unwrap()).unwrap().to_rgb8();
    eprintln!("cmyk.jpg decodes to {:?}", px.get_pixel(20, 20));
    assert!(px.pixels().all(|q| q == px.get_pixel(0, 0)), "a flat colour");

    // One training step end to end on them; the 1×1 image beside them is skipped, not fatal.
    std::fs::write(data.join("one-pixel.png"), encode(&rgb(1), image::ImageFormat::Png)).unwrap();
    let out = dir.join("odd.safetensors");
    let run = studio(&[
        "train",
        "--model",
        p(&sd1_tiny().join("model")),
        "--data",
        p(&data),
        "--out",
        p(&out),
        "--steps",
        "1",
        "--resolution",
        "32",
    ]);
    let err = stderr(&run);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("one-pixel.png: skipped: 1×1 is too small"), "{err}");
    assert!(out.exists());
}

// ---------------------------------------------------------------------------------------------
// safetensors files

/// A safetensors file from a JSON header and raw data.
fn st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn with_len(len: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = len.to_le_bytes().to_vec();
    out.extend(rest);
    out
}

/// Malformed files that no reader may accept: (name, bytes, words of the error).
fn bad_safetensors() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let one = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    vec![
        ("three-bytes.safetensors", b"abc".to_vec(), "not a safetensors file (only 3 bytes)"),
        ("empty.safetensors", Vec::new(), "not a safetensors file (only 0 bytes)"),
        ("truncated-header.safetensors", with_len(200, &[b'{'; 50]), "truncated safetensors file"),
        (
            "header-100mb.safetensors",
            with_len(100 * 1024 * 1024, br#"{"w":{}}"#),
            "truncated safetensors file, cut short inside its header (header says 104857600 bytes",
        ),
        (
            "header-1gb.safetensors",
            with_len(1 << 30, br#"{"w":{}}"#),
            "this is not a safetensors file (it does not start",
        ),
        ("header-u64max.safetensors", with_len(u64::MAX, b"{}"), "this is not a safetensors file"),
        ("pickle.safetensors", [&[0x80u8, 2, b']', b'q'][..], &[0u8; 40]].concat(), "it is a Python pickle"),
        ("zip.safetensors", [&b"PK\x03\x04"[..], &[0u8; 40]].concat(), "it is a PyTorch zip archive"),
        ("not-json.safetensors", st("this is not JSON at all", &[]), "invalid safetensors file"),
        ("truncated-data.safetensors", st(one, &[0u8; 8]), "tensor `w` claims bytes 0..16 of a 8-byte data section"),
        (
            "shape-lies.safetensors",
            st(r#"{"w":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,16]}}"#, &[0u8; 16]),
            "tensor `w` has 16 bytes of data, but its shape [1000, 1000] in F32 needs 4000000",
        ),
        (
            "offsets-past-end.safetensors",
            st(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,1600000]}}"#, &[0u8; 16]),
            "tensor `w` claims bytes 0..1600000 of a 16-byte data section",
        ),
        (
            "offsets-overlap.safetensors",
            st(
                r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
                &[0u8; 16],
            ),
            "invalid safetensors file",
        ),
        (
            "shape-overflow.safetensors",
            st(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#, &[0u8; 16]),
            "tensor `w` has 16 bytes of data",
        ),
        (
            "duplicate-key.safetensors",
            st(
                r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[1],"data_offsets":[16,20]},"a":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#,
                &[0u8; 20],
            ),
            "the header names tensor `a` twice",
        ),
        (
            "int8.safetensors",
            st(r#"{"lora_unet_x.lora_down.weight":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#, &[1u8; 4]),
            "unsupported dtype I8",
        ),
        (
            "bool.safetensors",
            st(r#"{"model.diffusion_model.w":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}}"#, &[1u8; 4]),
            "unsupported dtype BOOL",
        ),
    ]
}

#[test]
fn malformed_safetensors_are_refused_as_adapters_and_as_models() {
    let dir = tempdir("safetensors");
    let png = dir.join("x.png");
    for (name, bytes, needle) in bad_safetensors() {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();

        let e = format!("{:#}", read_safetensors(&path).unwrap_err());
        assert!(e.contains(name) && e.contains(needle), "{name}: `{needle}` in `{e}`");
        let e = format!("{:#}", read_adapter(&path).unwrap_err());
        assert!(e.contains(name) && e.contains(needle), "{name}: `{needle}` in `{e}`");
        let e =
            format!("{:#}", ModelWeights::load(&path, DType::F32, WeightPrecision::Auto, &Device::Cpu).err().unwrap());
        assert!(e.contains(name) && e.contains(needle), "{name}: `{needle}` in `{e}`");

        assert_one_line_error(&studio(&["adapter", "info", p(&path)]), &[name, needle]);
        assert_one_line_error(
            &studio(&["generate", "--model", p(&path), "--prompt", "x", "--steps", "1", "--out", p(&png)]),
            &[name, needle],
        );
        assert_no_output(&png);
    }
}

fn f32s(shape: &[usize], value: f32) -> Tensor {
    Tensor::full(value, shape, &Device::Cpu).unwrap()
}

/// Rewrites one tensor of a model file (keeping the rest).
fn alter_tensor(file: &Path, name: &str, f: impl Fn(&Tensor) -> Tensor) {
    let mut tensors = read_safetensors(file).unwrap();
    let t = f(&tensors[name]);
    tensors.insert(name.to_string(), t);
    write_safetensors(file, &tensors, None).unwrap();
}

/// Appends a raw tensor of any dtype to a safetensors file, editing its header as JSON.
fn append_raw_tensor(file: &Path, name: &str, dtype: &str, shape: &[usize], data: &[u8]) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let body = &bytes[8 + n..];
    header.insert(
        name.into(),
        serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [body.len(), body.len() + data.len()]}),
    );
    let mut json = serde_json::to_string(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json.as_bytes());
    out.extend(body);
    out.extend(data);
    std::fs::write(file, out).unwrap();
}

fn generate_with(model: &Path, png: &Path) -> Output {
    studio(&["generate", "--model", p(model), "--prompt", "x", "--steps", "2", "--seed", "3", "--out", p(png)])
}

#[test]
fn broken_model_folders_are_refused() {
    let dir = tempdir("models");
    let png = dir.join("x.png");

    // NaN weights: refused on load, naming the file and the tensor.
    let nan = model_copy(&dir, "nan-model");
    alter_tensor(&nan.join(UNET_FILE), "conv_in.weight", |t| {
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[3] = f32::NAN;
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    });
    let e = format!("{:#}", ModelWeights::load(&nan, DType::F32, WeightPrecision::Auto, &Device::Cpu).err().unwrap());
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("conv_in.weight") && e.contains("NaN"),
        "{e}"
    );
    assert_one_line_error(
        &generate_with(&nan, &png),
        &["diffusion_pytorch_model.safetensors", "`conv_in.weight`", "NaN"],
    );
    assert_no_output(&png);

    // An infinite weight likewise.
    let inf = model_copy(&dir, "inf-model");
    alter_tensor(&inf.join("vae/diffusion_pytorch_model.safetensors"), "decoder.conv_out.bias", |t| {
        f32s(t.dims(), f32::INFINITY)
    });
    assert_one_line_error(&generate_with(&inf, &png), &["vae/diffusion_pytorch_model.safetensors", "infinite"]);
    assert_no_output(&png);

    // Finite weights that overflow f32 in use: generation must fail, not write a flat PNG.
    let huge = model_copy(&dir, "huge-model");
    alter_tensor(&huge.join(UNET_FILE), "conv_in.weight", |t| f32s(t.dims(), 3e38));
    assert_one_line_error(&generate_with(&huge, &png), &["generation failed", "NaN or infinite"]);
    assert_no_output(&png);

    // Integer and boolean tensors where weights belong.
    for (dtype, needle) in
        [("I8", "unsupported dtype I8"), ("BOOL", "unsupported dtype BOOL"), ("I16", "unsupported dtype I16")]
    {
        let m = model_copy(&dir, &format!("{dtype}-model"));
        append_raw_tensor(
            &m.join(UNET_FILE),
            "extra.weight",
            dtype,
            &[2, 2],
            &[1u8; 8][..if dtype == "I16" { 8 } else { 4 }],
        );
        assert_one_line_error(&generate_with(&m, &png), &["diffusion_pytorch_model.safetensors", needle]);
        assert_no_output(&png);
    }

    // A weight of the wrong dtype-compatible shape, and one missing.
    let wrong = model_copy(&dir, "wrong-shape");
    alter_tensor(&wrong.join(UNET_FILE), "conv_in.weight", |_| f32s(&[3, 3], 0.0));
    assert_one_line_error(&generate_with(&wrong, &png), &["conv_in.weight", "has shape [3, 3], expected"]);
    let missing = model_copy(&dir, "missing-tensor");
    let mut tensors = read_safetensors(&missing.join(UNET_FILE)).unwrap();
    tensors.remove("conv_in.weight");
    write_safetensors(&missing.join(UNET_FILE), &tensors, None).unwrap();
    assert_one_line_error(&generate_with(&missing, &png), &["conv_in.weight", "is missing"]);

    // Missing components and weights.
    for component in ["unet", "text_encoder", "vae"] {
        let m = model_copy(&dir, &format!("no-{component}"));
        std::fs::remove_dir_all(m.join(component)).unwrap();
        assert_one_line_error(&generate_with(&m, &png), &[&format!("missing its `{component}` component")]);
    }
    let no_weights = model_copy(&dir, "no-weights");
    std::fs::remove_file(no_weights.join(UNET_FILE)).unwrap();
    assert_one_line_error(&generate_with(&no_weights, &png), &["unet", "no .safetensors weights"]);
    let no_index = model_copy(&dir, "no-index");
    std::fs::remove_file(no_index.join("model_index.json")).unwrap();
    assert_one_line_error(&generate_with(&no_index, &png), &["no-index", "no model_index.json"]);

    // A scheduler asking for an absurd table.
    let sched = model_copy(&dir, "huge-schedule");
    let cfg = sched.join("scheduler/scheduler_config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["num_train_timesteps"] = serde_json::json!(1_000_000_000_000u64);
    std::fs::write(&cfg, json.to_string()).unwrap();
    assert_one_line_error(&generate_with(&sched, &png), &["scheduler_config.json", "num_train_timesteps"]);

    // An image size no machine can allocate.
    let run = studio(&[
        "generate",
        "--model",
        p(&sd1_tiny().join("model")),
        "--prompt",
        "x",
        "--width",
        "1048576",
        "--height",
        "1048576",
        "--out",
        p(&png),
    ]);
    assert_one_line_error(&run, &["1048576×1048576", "limit"]);
    assert_no_output(&png);
}

#[test]
fn non_finite_output_is_refused_by_the_engine() {
    // Weights changed after loading (as training could leave them): the output check catches it.
    let mut w = ModelWeights::load(&sd1_tiny().join("model"), DType::F32, WeightPrecision::Auto, &Device::Cpu).unwrap();
    let t = w.vae.tensor("decoder.conv_out.bias").unwrap().clone();
    w.vae.insert("decoder.conv_out.bias".into(), f32s(t.dims(), f32::NAN));
    let sd = StableDiffusion::from_weights(w).unwrap();
    let req = GenerateRequest {
        prompt: "x".into(),
        negative: String::new(),
        seed: 1,
        steps: 1,
        guidance: 1.0,
        sampler: lora_studio::engine::diffusion::sampler::SamplerKind::Ddim,
        width: 32,
        height: 32,
        clip_skip: 1,
    };
    let e = format!("{:#}", sd.generate(&req, &mut |_, _| {}).unwrap_err());
    assert!(e.contains("VAE decoder produced NaN or infinite values"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Adapters

fn kohya_layer(tensors: &mut HashMap<String, Tensor>, name: &str, down: Tensor, up: Tensor, alpha: Option<f32>) {
    tensors.insert(format!("{name}.lora_down.weight"), down);
    tensors.insert(format!("{name}.lora_up.weight"), up);
    if let Some(a) = alpha {
        tensors.insert(format!("{name}.alpha"), Tensor::new(a, &Device::Cpu).unwrap());
    }
}

const TO_Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
const TO_K: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";

/// Broken adapter files: (name, tensors, words of the error).
fn bad_adapters() -> Vec<(&'static str, HashMap<String, Tensor>, &'static str)> {
    let good = |t: &mut HashMap<String, Tensor>| {
        kohya_layer(t, TO_K, f32s(&[4, 32], 0.01), f32s(&[32, 4], 0.01), Some(4.0));
    };
    let mut cases = Vec::new();

    let mut t = HashMap::new();
    good(&mut t);
    let mut up = vec![0.01f32; 32 * 4];
    up[17] = f32::NAN;
    kohya_layer(&mut t, TO_Q, f32s(&[4, 32], 0.01), Tensor::from_vec(up, (32, 4), &Device::Cpu).unwrap(), Some(4.0));
    cases.push(("nan-factor.safetensors", t, "NaN or infinite"));

    let mut t = HashMap::new();
    good(&mut t);
    kohya_layer(&mut t, TO_Q, f32s(&[4, 32], f32::INFINITY), f32s(&[32, 4], 0.01), Some(4.0));
    cases.push(("inf-factor.safetensors", t, "NaN or infinite"));

    let mut t = HashMap::new();
    good(&mut t);
    kohya_layer(&mut t, TO_Q, f32s(&[4, 32], 0.01), f32s(&[32, 4], 0.01), Some(f32::NAN));
    cases.push(("nan-alpha.safetensors", t, "alpha is NaN"));

    let mut t = HashMap::new();
    good(&mut t);
    kohya_layer(&mut t, TO_Q, f32s(&[4, 32], 0.01), f32s(&[32, 4], 0.01), None);
    t.insert(format!("{TO_Q}.alpha"), f32s(&[4], 4.0));
    cases.push(("vector-alpha.safetensors", t, "alpha holds 4 numbers"));

    let mut t = HashMap::new();
    good(&mut t);
    kohya_layer(&mut t, TO_Q, f32s(&[128], 0.01), f32s(&[32, 4], 0.01), None);
    cases.push(("one-dim-factor.safetensors", t, "expected 2 (linear) or 4 (conv) dimensions"));

    let mut t = HashMap::new();
    good(&mut t);
    kohya_layer(&mut t, TO_Q, f32s(&[0, 32], 0.0), f32s(&[32, 0], 0.0), None);
    cases.push(("rank-zero.safetensors", t, "empty shape"));

    let mut t = HashMap::new();
    good(&mut t);
    kohya_layer(&mut t, TO_Q, Tensor::zeros((4, 32), DType::U8, &Device::Cpu).unwrap(), f32s(&[32, 4], 0.01), None);
    cases.push(("u8-factor.safetensors", t, "floating point"));

    // Names that match no layer of the model at all (a Flux adapter's).
    let mut t = HashMap::new();
    for block in ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"] {
        kohya_layer(&mut t, block, f32s(&[4, 32], 0.01), f32s(&[32, 4], 0.01), Some(4.0));
    }
    cases.push((
        "another-model.safetensors",
        t,
        "0 of 2 adapter layers match the model; 2 name no layer of this model",
    ));

    let mut t = HashMap::new();
    t.insert("lora_unet_x.lora_down.weight".into(), f32s(&[4, 32], 0.01));
    cases.push(("half-a-layer.safetensors", t, "lacks `lora_up.weight`"));

    cases
}

#[test]
fn broken_adapters_are_refused_on_load() {
    let dir = tempdir("adapters");
    let model = sd1_tiny().join("model");
    let inputs = sd1_tiny().join("inputs.safetensors");
    let out = dir.join("out.safetensors");
    for (name, tensors, needle) in bad_adapters() {
        let path = dir.join(name);
        write_safetensors(&path, &tensors, None).unwrap();
        if name != "another-model.safetensors" {
            let e = format!("{:#}", read_adapter(&path).unwrap_err());
            assert!(e.contains(name) && e.contains(needle), "{name}: `{needle}` in `{e}`");
            assert_one_line_error(&studio(&["adapter", "info", p(&path)]), &[name, needle]);
        }
        let run = studio(&[
            "forward",
            "--model",
            p(&model),
            "--adapter",
            p(&path),
            "--inputs",
            p(&inputs),
            "--output",
            p(&out),
        ]);
        assert_one_line_error(&run, &[name, needle]);
        assert_no_output(&out);
        let png = dir.join("x.png");
        let with = format!("{}:0.8", p(&path));
        let run = studio(&[
            "generate",
            "--model",
            p(&model),
            "--adapter",
            &with,
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            p(&png),
        ]);
        assert_one_line_error(&run, &[name, needle]);
        assert_no_output(&png);
    }
}

// ---------------------------------------------------------------------------------------------
// Paths and outputs

#[test]
fn unicode_and_space_filled_paths_work_end_to_end() {
    let dir = tempdir("unicode");
    let model = model_copy(&dir, "mödel ✓ with spaces");
    let adapter = dir.join("ädapter 🎨 a (copy).safetensors");
    std::fs::copy(sd1_tiny().join("lora_a_kohya.safetensors"), &adapter).unwrap();
    let out_dir = dir.join("résultats 出力");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("noise pred ✓.safetensors");
    let with = format!("{}:0.7", p(&adapter));
    let run = studio(&[
        "forward",
        "--model",
        p(&model),
        "--adapter",
        &with,
        "--inputs",
        p(&sd1_tiny().join("inputs.safetensors")),
        "--output",
        p(&out),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let r = reference();
    assert_close(
        "noise_pred_a07 via unicode paths",
        &read_safetensors(&out).unwrap()["noise_pred"],
        &r["noise_pred_a07"],
    );

    // The errors name such paths intact.
    let missing = dir.join("nö such ✗ folder");
    let run = generate_with(&missing, &out_dir.join("x.png"));
    assert_one_line_error(&run, &["nö such ✗ folder", "no such file or folder"]);
}

fn blend_to(out: &Path) -> Output {
    let a = format!("{}:0.5", p(&sd1_tiny().join("lora_a_kohya.safetensors")));
    let b = format!("{}:0.8", p(&sd1_tiny().join("lora_b_peft.safetensors")));
    studio(&["adapter", "blend", &a, &b, "--model", p(&sd1_tiny().join("model")), "--rank", "6", "--out", p(out)])
}

#[test]
fn unwritable_outputs_fail_cleanly() {
    let dir = tempdir("unwritable");
    // A path "under" a file: no user, root included, can create it.
    let file = dir.join("file.txt");
    std::fs::write(&file, "not a folder").unwrap();
    let out = file.join("out.safetensors");
    assert_one_line_error(&blend_to(&out), &["file.txt/out.safetensors", "cannot write", "Not a directory"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a folder");

    // A folder that does not exist.
    let out = dir.join("no-such-folder/out.safetensors");
    assert_one_line_error(&blend_to(&out), &["no-such-folder/out.safetensors", "cannot write"]);
    assert!(!dir.join("no-such-folder").exists());

    // A read-only folder (root ignores the permission bits, so only where they hold).
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = ro.join("probe");
    if std::fs::write(&probe, b"").is_ok() {
        std::fs::remove_file(&probe).unwrap();
        eprintln!(
            "note: as root a read-only folder is writable; a_read_only_file_system_fails_cleanly (--ignored) covers root"
        );
    } else {
        let out = ro.join("out.safetensors");
        assert_one_line_error(&blend_to(&out), &["read-only/out.safetensors", "cannot write", "Permission denied"]);
        assert_no_output(&out);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs `mount` with `args`, panicking with its message when it fails (the tests that call it are
/// `#[ignore]`d, so they run only when asked for, as CI does as root with `--ignored`).
fn mount(args: &[&str]) {
    let out = Command::new("mount").args(args).output().expect("run mount");
    assert!(out.status.success(), "mount {args:?} (needs root): {}", String::from_utf8_lossy(&out.stderr));
}

/// Unmounts a mount point when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk: a tiny tmpfs filled to the brim.
#[test]
#[ignore = "needs root to mount a tmpfs; CI runs it (`.ci/run`: --ignored)"]
fn a_full_disk_fails_cleanly() {
    let dir = tempdir("full-disk");
    let mnt = dir.join("full");
    std::fs::create_dir_all(&mnt).unwrap();
    mount(&["-t", "tmpfs", "-o", "size=16k", "lora-studio-full", p(&mnt)]);
    let _guard = Unmount(mnt.clone());
    // Fill it up.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(mnt.join("filler")).unwrap();
        while f.write_all(&[0u8; 1024]).is_ok() {}
    }
    let before: Vec<_> = std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name()).collect();

    let out = mnt.join("blend.safetensors");
    assert_one_line_error(&blend_to(&out), &["blend.safetensors", "cannot write", "No space left on device"]);
    assert_no_output(&out);

    let png = mnt.join("x.png");
    // (generate prints its progress first; the error is the last line.)
    assert_last_line_error(&generate_with(&sd1_tiny().join("model"), &png), &["x.png", "No space left on device"]);
    assert_no_output(&png);

    let after: Vec<_> = std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "nothing new on the full disk");
}

/// A read-only file system, which even root cannot write (a read-only bind mount).
#[test]
#[ignore = "needs root to bind-mount a folder read-only; CI runs it (`.ci/run`: --ignored)"]
fn a_read_only_file_system_fails_cleanly() {
    let dir = tempdir("read-only-fs");
    let ro = dir.join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("keep.txt"), "mine").unwrap();
    mount(&["--bind", p(&ro), p(&ro)]);
    let _guard = Unmount(ro.clone());
    mount(&["-o", "remount,ro,bind", p(&ro)]);
    let out = ro.join("out.safetensors");
    assert_one_line_error(&blend_to(&out), &["read-only/out.safetensors", "cannot write", "Read-only file system"]);
    assert_no_output(&out);
    let data = small_dataset(&dir);
    let run = train_run(&sd1_tiny().join("model"), &data, &ro.join("style.safetensors"), &[]);
    assert_one_line_error(&run, &["style.safetensors", "Read-only file system"]);
    assert_eq!(std::fs::read_to_string(ro.join("keep.txt")).unwrap(), "mine");
}

/// A safetensors file of one-element F32 tensors with these names.
fn st_names(names: &[&str]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        header.insert(
            n.to_string(),
            serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}),
        );
    }
    st(&serde_json::Value::Object(header).to_string(), &vec![0u8; 4 * names.len()])
}

#[test]
fn hostile_single_file_checkpoints_are_refused() {
    let dir = tempdir("single-file");
    let png = dir.join("x.png");
    let u = "model.diffusion_model.input_blocks";
    let te = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        // Found by fuzzing (single_file_keys): a downsampler at block 0 underflowed the layout
        // arithmetic (a panic in debug builds, a division by zero in release builds).
        (
            "op-at-zero.safetensors",
            vec![format!("{u}.0.0.op.weight"), format!("{u}.1.0.in_layers.0.weight")],
            "no resnet blocks",
        ),
        (
            "huge-block-index.safetensors",
            vec![format!("{u}.18446744073709551615.0.in_layers.0.weight")],
            "layers per UNet block (limit 64)",
        ),
        (
            "many-blocks.safetensors",
            vec![format!("{u}.100000.0.in_layers.0.weight")],
            "layers per UNet block (limit 64)",
        ),
    ];
    for (name, mut names, needle) in cases {
        names.push(te.to_string());
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let path = dir.join(name);
        std::fs::write(&path, st_names(&names)).unwrap();
        let e =
            format!("{:#}", ModelWeights::load(&path, DType::F32, WeightPrecision::Auto, &Device::Cpu).err().unwrap());
        assert!(e.contains(name) && e.contains(needle), "{name}: `{needle}` in `{e}`");
        assert_one_line_error(&generate_with(&path, &png), &[name, needle]);
        assert_no_output(&png);
    }
}

// ---------------------------------------------------------------------------------------------
// Half-precision adapters (issue 16, item 1)

/// A copy of an adapter file with every floating-point tensor stored in `dtype`.
fn converted_copy(file: &Path, dtype: DType, out: &Path) {
    let (tensors, metadata) = read_safetensors_with_metadata(file).unwrap();
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() { t.to_dtype(dtype).unwrap() } else { t };
            (k, t)
        })
        .collect();
    write_safetensors(out, &tensors, Some(metadata)).unwrap();
}

/// max|ours − ref| / max|ref|.
fn relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    let ours = ours.to_dtype(DType::F64).unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
    let max_ref = reference.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let diff = (ours - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    diff / max_ref
}

/// Nearly every shared LoRA is stored in f16: every float dtype safetensors allows loads, and the
/// outputs match diffusers' / LyCORIS' f32 references within the storage dtype's rounding.
#[test]
fn half_precision_adapters_load_and_match_the_references() {
    let dir = tempdir("half-precision");
    let base = reference();
    let lyco = read_safetensors(&sd1_tiny().join("adapters/reference.safetensors")).unwrap();
    let inputs = read_safetensors(&sd1_tiny().join("inputs.safetensors")).unwrap();
    // (files with their weights, text-embedding reference, noise reference, inputs)
    let a = sd1_tiny().join("lora_a_kohya.safetensors");
    let b = sd1_tiny().join("lora_b_peft.safetensors");
    let locon = sd1_tiny().join("adapters/lyco_locon.safetensors");
    let glora = sd1_tiny().join("adapters/lyco_glora.safetensors");
    type Case<'a> = (Vec<(PathBuf, f64)>, Option<&'a Tensor>, &'a Tensor, &'a HashMap<String, Tensor>);
    let cases: Vec<Case> = vec![
        (vec![(a.clone(), 0.7)], Some(&base["text_embeddings_a07"]), &base["noise_pred_a07"], &base),
        (vec![(a, 0.5), (b, 0.8)], None, &base["noise_pred_a05_b08"], &base),
        (vec![(locon, 0.7)], Some(&lyco["text_embeddings_lyco_locon"]), &lyco["noise_pred_lyco_locon"], &inputs),
        (vec![(glora, 0.7)], Some(&lyco["text_embeddings_lyco_glora"]), &lyco["noise_pred_lyco_glora"], &inputs),
    ];
    // Every other kind as LyCORIS / PEFT wrote it, stored in each dtype too.
    let kinds = [
        "lyco_loha",
        "lyco_lokr",
        "lyco_locon_tucker",
        "lyco_locon_dora",
        "lyco_diag_oft",
        "lyco_boft",
        "lyco_full",
        "peft_dora",
    ];
    let cases: Vec<Case> = cases
        .into_iter()
        .chain(kinds.iter().map(|k| -> Case {
            (
                vec![(sd1_tiny().join(format!("adapters/{k}.safetensors")), 0.7)],
                Some(&lyco[&format!("text_embeddings_{k}")]),
                &lyco[&format!("noise_pred_{k}")],
                &inputs,
            )
        }))
        .collect();
    // The worst relative error each storage dtype may add: a few units of its rounding (f16 keeps
    // 11 significant bits, bf16 8) on top of the fixtures' 1e-4.
    for (dtype, tolerance) in [(DType::F64, 1e-4), (DType::F32, 1e-4), (DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
        for (files, emb_ref, pred_ref, inputs) in &cases {
            let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
            for (i, (file, weight)) in files.iter().enumerate() {
                let copy = dir.join(format!("{dtype:?}-{}", file_name(file)));
                converted_copy(file, dtype, &copy);
                let report = sd
                    .load_adapter(&format!("a{i}"), &copy, *weight)
                    .unwrap_or_else(|e| panic!("{dtype:?} copy of {} does not load: {e:#}", file_name(file)));
                assert_eq!(report.matched, report.total, "{}", report.summary());
            }
            let emb = sd.text_encoder.forward(&inputs["input_ids"]).unwrap();
            let pred = sd.unet.forward(&inputs["sample"], &inputs["timestep"], &emb).unwrap();
            let what = format!("{dtype:?} {}", file_name(&files[0].0));
            if let Some(emb_ref) = emb_ref {
                let e = relative_error(&emb, emb_ref);
                eprintln!("{what}: text embeddings {e:.2e}");
                assert!(e <= tolerance, "{what}: text embeddings off by {e:.2e} (allowed {tolerance:.0e})");
            }
            let e = relative_error(&pred, pred_ref);
            eprintln!("{what}: noise prediction {e:.2e}");
            assert!(e <= tolerance, "{what}: noise prediction off by {e:.2e} (allowed {tolerance:.0e})");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outputs that must never replace good files (issue 16, items 2 and 6)

/// No `.NAME.tmp-PID` file or `.NAME.partial-PID` folder left in `dir`.
fn assert_no_temporaries(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-") && !name.contains(".partial"), "{name} left in {}", dir.display());
    }
}

#[test]
fn a_blend_that_overflows_never_replaces_a_good_file() {
    let dir = tempdir("bad-blend");
    let model = sd1_tiny().join("model");
    let keep = dir.join("keep.safetensors");
    let out = blend_to(&keep);
    assert!(out.status.success(), "{}", stderr(&out));
    let good = std::fs::read(&keep).unwrap();
    let huge = format!("{}:1e300", p(&sd1_tiny().join("lora_a_kohya.safetensors")));
    let out = studio(&["adapter", "blend", &huge, "--model", p(&model), "--rank", "6", "--out", p(&keep)]);
    assert_one_line_error(&out, &["keep.safetensors", "NaN or infinite", "nothing was written"]);
    assert!(std::fs::read(&keep).unwrap() == good, "keep.safetensors was replaced");
    assert_no_temporaries(&dir);

    // The same for a merged model: no folder, no partial folder.
    let merged = dir.join("merged");
    let out = studio(&["adapter", "merge", &huge, "--model", p(&model), "--out", p(&merged)]);
    assert_one_line_error(&out, &["merged", "NaN or infinite", "nothing was written"]);
    assert!(!merged.exists());
    assert_no_temporaries(&dir);

    // An f16 blend is checked by loading it back, and other commands use it.
    let half = dir.join("half.safetensors");
    let a = format!("{}:0.5", p(&sd1_tiny().join("lora_a_kohya.safetensors")));
    let out = studio(&["adapter", "blend", &a, "--model", p(&model), "--rank", "4", "--f16", "--out", p(&half)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (tensors, _) = read_safetensors_with_metadata(&half).unwrap();
    assert!(tensors.values().any(|t| t.dtype() == DType::F16), "the blend is stored in f16");
    let spec = format!("{}:0.7", p(&half));
    let inputs = sd1_tiny().join("inputs.safetensors");
    let result = dir.join("forward.safetensors");
    let out =
        studio(&["forward", "--model", p(&model), "--adapter", &spec, "--inputs", p(&inputs), "--output", p(&result)]);
    assert!(out.status.success(), "forward with an f16 adapter: {}", stderr(&out));
}

/// Temporary files of killed runs are tidied by the next command that writes in that folder;
/// those of a process still running are kept.
#[test]
fn temporaries_of_killed_processes_are_tidied_on_start() {
    let dir = tempdir("tidy");
    // A process that has ended: its PID is free (or reused by something that is not us, which
    // `tidy_temporaries` cannot tell apart; a fresh child's PID is the surest dead one).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let alive = std::process::id();
    let stale_file = dir.join(format!(".keep.safetensors.tmp-lora-studio-{dead}"));
    let stale_step = dir.join(format!(".keep-step00000006.safetensors.tmp-lora-studio-{dead}"));
    let stale_merge = dir.join(format!(".merged.partial-lora-studio-{dead}"));
    let live_file = dir.join(format!(".other.safetensors.tmp-lora-studio-{alive}"));
    // Another program's temporary file of a similar shape is not ours to remove.
    let foreign = dir.join(format!(".notes.txt.tmp-{dead}"));
    std::fs::write(&foreign, b"x").unwrap();
    std::fs::write(&stale_file, b"x").unwrap();
    std::fs::write(&stale_step, b"x").unwrap();
    std::fs::create_dir_all(stale_merge.join("unet")).unwrap();
    std::fs::write(&live_file, b"x").unwrap();
    let out = blend_to(&dir.join("keep.safetensors"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stale_file.exists() && !stale_step.exists() && !stale_merge.exists(), "stale temporaries tidied");
    assert!(live_file.exists(), "a running process's temporary file is kept");
    assert!(foreign.exists(), "another program's temporary file is kept");
}

// ---------------------------------------------------------------------------------------------
// Training outputs (issue 16, items 3, 4 and 11)

/// Three small captioned images in `dir/data`.
fn small_dataset(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..3u8 {
        let img = image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([i * 80, (x * 6) as u8, (y * 6) as u8]));
        img.save(data.join(format!("img{i}.png"))).unwrap();
        std::fs::write(data.join(format!("img{i}.txt")), "a gradient").unwrap();
    }
    data
}

fn train_run(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model",
        p(model),
        "--data",
        p(data),
        "--out",
        p(out),
        "--steps",
        "2",
        "--resolution",
        "32",
        "--no-latent-cache",
    ];
    args.extend_from_slice(extra);
    studio(&args)
}

#[test]
fn training_never_writes_over_its_inputs_or_an_earlier_run() {
    let dir = tempdir("train-outputs");
    let model = model_copy(&dir, "model");
    let data = small_dataset(&dir);
    let unchanged = |path: &Path, before: &[u8]| {
        assert!(std::fs::read(path).unwrap() == before, "{} was changed", path.display());
    };

    // The base model's own files, a training image and a caption: refused, even with --overwrite.
    for (target, needle) in [
        (model.join(UNET_FILE), "base model"),
        (data.join("img0.png"), "training data"),
        (data.join("img0.txt"), "training data"),
    ] {
        let before = std::fs::read(&target).unwrap();
        for extra in [&[][..], &["--overwrite"][..]] {
            let out = train_run(&model, &data, &target, extra);
            assert_one_line_error(&out, &[&file_name(&target), needle]);
            unchanged(&target, &before);
        }
    }
    assert_no_temporaries(&model.join("unet"));

    // An existing folder as --out: refused before the first step (it used to train, then fail).
    let folder = dir.join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    let out = train_run(&model, &data, &folder, &[]);
    assert_one_line_error(&out, &["folder", "is a folder"]);

    // A file of the user's that is not an adapter we wrote: refused unless --overwrite.
    let theirs = dir.join("theirs.safetensors");
    write_safetensors(&theirs, &HashMap::from([("x".to_string(), f32s(&[2], 1.0))]), None).unwrap();
    let before = std::fs::read(&theirs).unwrap();
    assert_one_line_error(&train_run(&model, &data, &theirs, &[]), &["theirs.safetensors", "--overwrite"]);
    unchanged(&theirs, &before);

    // Running the same command again: refused, the checkpoint untouched; --resume or --overwrite go on.
    let style = dir.join("style.safetensors");
    let first = train_run(&model, &data, &style, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let ckpt = dir.join("style.checkpoint.safetensors");
    let saved = std::fs::read(&ckpt).unwrap();
    let again = train_run(&model, &data, &style, &[]);
    assert_one_line_error(&again, &["a run of 2 steps exists", "--resume", "--overwrite"]);
    unchanged(&ckpt, &saved);
    let over = train_run(&model, &data, &style, &["--overwrite"]);
    assert!(over.status.success(), "{}", stderr(&over));

    // An earlier run's adapter without its checkpoint is still not replaced without asking.
    std::fs::remove_file(&ckpt).unwrap();
    let adapter = std::fs::read(&style).unwrap();
    let again = train_run(&model, &data, &style, &[]);
    assert_one_line_error(&again, &["style.safetensors", "an adapter from an earlier run", "--overwrite"]);
    unchanged(&style, &adapter);
}

// ---------------------------------------------------------------------------------------------
// export-job's script (issue 16, item 9)

/// Values from a train.toml reach `train.sh` as data, never as shell code: the script is run with
/// a stand-in `accelerate` that records its arguments, which must be the values exactly.
#[test]
fn export_job_quotes_every_value_for_the_shell() {
    let dir = tempdir("export-hostile");
    let hostile = [
        "$(touch pwned1)",
        "`touch pwned2`",
        "a;touch pwned3",
        "it's \"quoted\" \\ and $HOME",
        "line\nbreak && touch pwned4",
        "$SD_SCRIPTS/$(touch pwned5)",
        "$JOB_DIR/x'$(touch pwned6)'",
        "$JOB_DIR/output",
        "$SD_SCRIPTS/train_network.py",
        "$HOME",
        "$JOB_DIR/$(touch pwned7)",
        "it's",
        "'",
        "`touch pwned8`'$(touch pwned9)'",
        "multi\nline $(touch pwned10)\n`touch pwned11`",
        "back\\slash \"quote\" ]\n[x]\n",
    ];
    for (i, value) in hostile.iter().enumerate() {
        let case = dir.join(format!("case{i}"));
        std::fs::create_dir_all(&case).unwrap();
        let toml_file = case.join("train.toml");
        let text = format!(
            "model = {}\ndata = [{}]\nout = {}\nsample_prompt = {}\n[dataset]\ntrigger = {}\n",
            toml_quoted(value),
            toml_quoted(value),
            toml_quoted(&format!("{value}.safetensors")),
            toml_quoted(value),
            toml_quoted(value),
        );
        std::fs::write(&toml_file, text).unwrap();
        let job = case.join("job");
        let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&job)]);
        assert!(run.status.success(), "{value:?}: {}", stderr(&run));
        // A stand-in `accelerate` that writes its arguments, NUL-separated.
        let bin = case.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake = bin.join("accelerate");
        std::fs::write(&fake, "#!/bin/sh\nprintf '%s\\0' \"$@\" > \"$ARGS_OUT\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let args_out = case.join("args.bin");
        let path = format!("{}:{}", p(&bin), std::env::var("PATH").unwrap_or_default());
        let ran = Command::new("bash")
            .arg(job.join("train.sh"))
            .current_dir(&case)
            .env("PATH", path)
            .env("ARGS_OUT", &args_out)
            .env("SD_SCRIPTS", "/sd-scripts")
            .output()
            .unwrap();
        assert!(ran.status.success(), "{value:?}: train.sh failed: {}", String::from_utf8_lossy(&ran.stderr));
        let args: Vec<String> =
            String::from_utf8(std::fs::read(&args_out).unwrap()).unwrap().split('\0').map(str::to_string).collect();
        let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
        assert_eq!(after("--pretrained_model_name_or_path").as_deref(), Some(*value), "{args:?}");
        let stem = Path::new(&format!("{value}.safetensors")).file_stem().unwrap().to_string_lossy().into_owned();
        assert_eq!(after("--output_name"), Some(stem), "{args:?}");
        assert!(args.contains(&"/sd-scripts/train_network.py".to_string()), "our own variables expand: {args:?}");
        let job_dir = std::fs::canonicalize(&job).unwrap();
        assert_eq!(after("--output_dir"), Some(format!("{}/output", p(&job_dir))), "{args:?}");
        assert_eq!(after("--dataset_config"), Some(format!("{}/dataset.toml", p(&job_dir))), "{args:?}");
        // dataset.toml holds the values exactly too: none ends its string early.
        let dataset: toml::Value = toml::from_str(&std::fs::read_to_string(job.join("dataset.toml")).unwrap())
            .unwrap_or_else(|e| panic!("{value:?}: dataset.toml does not parse: {e}"));
        let subset = &dataset["datasets"][0]["subsets"][0];
        assert_eq!(subset["image_dir"].as_str(), Some(*value), "{dataset:?}");
        if !value.trim().is_empty() {
            assert_eq!(subset["caption_prefix"].as_str(), Some(format!("{},", value.trim()).as_str()), "{dataset:?}");
        }
        for entry in std::fs::read_dir(&case).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with("pwned"), "{value:?}: the script ran code from a value ({name})");
        }
    }
}

fn toml_quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

// ---------------------------------------------------------------------------------------------
// α (issue 16, item 12)

/// kohya, A1111 and ComfyUI read a missing or zero α, or an empty α tensor, as α = rank.
#[test]
fn zero_or_empty_alpha_means_alpha_equals_rank() {
    let dir = tempdir("alpha");
    let r = reference();
    let (tensors, metadata) = read_safetensors_with_metadata(&sd1_tiny().join("lora_a_kohya.safetensors")).unwrap();
    let with_alpha = |f: &dyn Fn(&str, &Tensor) -> Option<Tensor>, name: &str| -> PathBuf {
        let mut out = HashMap::new();
        for (k, t) in &tensors {
            match k.strip_suffix(".alpha") {
                Some(layer) => {
                    if let Some(a) = f(layer, t) {
                        out.insert(k.clone(), a);
                    }
                }
                None => {
                    out.insert(k.clone(), t.clone());
                }
            }
        }
        let path = dir.join(name);
        write_safetensors(&path, &out, Some(metadata.clone())).unwrap();
        path
    };
    let rank_of = |layer: &str| tensors[&format!("{layer}.lora_down.weight")].dims()[0] as f32;
    let files = [
        with_alpha(&|layer, _| Some(Tensor::new(rank_of(layer), &Device::Cpu).unwrap()), "alpha-rank.safetensors"),
        with_alpha(&|_, _| None, "no-alpha.safetensors"),
        with_alpha(&|_, _| Some(Tensor::new(0f32, &Device::Cpu).unwrap()), "alpha-zero.safetensors"),
        with_alpha(&|_, _| Some(Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap()), "alpha-empty.safetensors"),
    ];
    let mut outputs = Vec::new();
    for file in &files {
        let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
        sd.load_adapter("a", file, 0.7).unwrap();
        let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
        outputs.push(sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap());
    }
    let effect = relative_error(&outputs[0], &r["noise_pred"]);
    assert!(effect > 1e-2, "the adapter changes the output ({effect:.2e})");
    for (file, out) in files.iter().zip(&outputs).skip(1) {
        let e = relative_error(out, &outputs[0]);
        assert!(e < 1e-6, "{} differs from α = rank by {e:.2e}", file_name(file));
    }
    let info = studio(&["adapter", "info", p(&files[2])]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("scale 1"), "{}", String::from_utf8_lossy(&info.stdout));
}

// ---------------------------------------------------------------------------------------------
// Options (issue 16, item 13)

#[test]
fn misspelt_options_and_non_finite_numbers_are_refused() {
    let dir = tempdir("options");
    let data = small_dataset(&dir);
    let out = dir.join("style.safetensors");
    for (text, needle) in [
        ("stepz = 3\n", "unknown option `stepz`; did you mean `steps`?"),
        ("learning_rat = 0.1\n", "unknown option `learning_rat`; did you mean `learning_rate`?"),
        ("[dataset]\nresolutoin = 32\n", "unknown option `dataset.resolutoin`; did you mean `dataset.resolution`?"),
        ("learning_rate = nan\n", "learning rate must be a finite number"),
        ("noise_offset = inf\n", "noise offset must be a finite number"),
    ] {
        let toml_file = dir.join("train.toml");
        let paths =
            format!("model = {}\ndata = [{}]\n", toml_quoted(p(&sd1_tiny().join("model"))), toml_quoted(p(&data)));
        std::fs::write(&toml_file, paths + text).unwrap();
        let run = studio(&["train", "--config", p(&toml_file), "--out", p(&out)]);
        assert_one_line_error(&run, &[needle]);
        // export-job reads the same file the same way.
        let export = studio(&["export-job", "--config", p(&toml_file), "--out", p(&dir.join("job"))]);
        assert_one_line_error(&export, &[needle]);
        assert!(!dir.join("job").exists());
        assert_no_output(&out);
    }
    for (flag, value) in [("--lr", "NaN"), ("--alpha", "inf"), ("--noise-offset", "-inf"), ("--min-snr", "nan")] {
        let run = studio(&["train", flag, value, "--data", p(&data), "--out", p(&out)]);
        assert_one_line_error(&run, &[flag, "not a finite number"]);
    }
    let png = dir.join("x.png");
    for value in ["NaN", "inf"] {
        let run = studio(&[
            "generate",
            "--model",
            p(&sd1_tiny().join("model")),
            "--prompt",
            "x",
            "--guidance",
            value,
            "--out",
            p(&png),
        ]);
        assert_one_line_error(&run, &["guidance must be a finite number"]);
        assert_no_output(&png);
    }
}

// ---------------------------------------------------------------------------------------------
// Folders and captions (issue 16, items 7 and 15)

/// A link that leads back up (`a -> .`) is followed once: the scan ends, each image counts once,
/// and the link is reported.
#[test]
fn a_symlink_loop_in_the_dataset_is_scanned_once() {
    let dir = tempdir("symlink-loop");
    let data = small_dataset(&dir);
    std::os::unix::fs::symlink(".", data.join("a")).unwrap();
    std::os::unix::fs::symlink("..", data.join("up")).unwrap();
    let started = std::time::Instant::now();
    let ds = Dataset::scan(std::slice::from_ref(&data), &DatasetOptions::default()).unwrap();
    assert!(started.elapsed().as_secs() < 10, "scanning took {:?}", started.elapsed());
    assert_eq!(ds.images.len(), 3, "{:?}", ds.images.iter().map(|e| &e.path).collect::<Vec<_>>());
    let loop_note = ds.skipped.iter().find(|s| file_name(&s.path) == "a").expect("the loop link is reported");
    assert!(loop_note.reason.contains("already scanned"), "{}", loop_note.reason);
}

/// Captions saved as UTF-16 (Windows' Notepad) are read; a caption file that is there but is not
/// text we can read is named, and never called missing.
#[test]
fn captions_in_utf16_are_read_and_unreadable_ones_are_named() {
    let dir = tempdir("captions");
    let data = small_dataset(&dir);
    let utf16 = |text: &str, le: bool| -> Vec<u8> {
        let mut out = if le { vec![0xFF, 0xFE] } else { vec![0xFE, 0xFF] };
        for u in text.encode_utf16() {
            out.extend(if le { u.to_le_bytes() } else { u.to_be_bytes() });
        }
        out
    };
    std::fs::write(data.join("img0.txt"), utf16("café, watercolour", true)).unwrap();
    std::fs::write(data.join("img1.txt"), utf16("a blue boat", false)).unwrap();
    std::fs::write(data.join("img2.txt"), b"caf\xe9 au lait").unwrap(); // Latin-1
    let ds = Dataset::scan(std::slice::from_ref(&data), &DatasetOptions::default()).unwrap();
    let caption = |name: &str| ds.images.iter().find(|e| file_name(&e.path) == name).map(|e| e.caption.clone());
    assert_eq!(caption("img0.png").as_deref(), Some("café, watercolour"));
    assert_eq!(caption("img1.png").as_deref(), Some("a blue boat"));
    assert_eq!(caption("img2.png"), None, "the image with an unreadable caption is not trained on");
    let skipped = ds.skipped.iter().find(|s| file_name(&s.path) == "img2.png").expect("img2.png is reported");
    assert!(skipped.reason.contains("img2.txt") && skipped.reason.contains("not UTF-8"), "{}", skipped.reason);
    let preflight = ds.preflight(&DatasetOptions::default(), &|c| c.len());
    assert!(
        preflight.without_caption.is_empty(),
        "no image is said to lack a caption: {:?}",
        preflight.without_caption
    );
}

// ---------------------------------------------------------------------------------------------
// Which files make a component (issue 16, item 10)

fn load_error(model: &Path) -> String {
    match ModelWeights::load(model, DType::F32, WeightPrecision::Auto, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", model.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A stray `.safetensors` beside a component's weights (a user's backup) is never read; shards are
/// read from their index; a folder that does not say which file is the model is refused.
#[test]
fn component_weights_come_from_their_own_file_or_index_only() {
    let dir = tempdir("shards");
    let model = model_copy(&dir, "model");
    let unet_file = model.join(UNET_FILE);
    let original = read_safetensors(&unet_file).unwrap();
    let name = original.keys().find(|k| k.starts_with("conv_in.weight")).unwrap().clone();
    let expect = original[&name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let loaded = |model: &Path| -> Vec<f32> {
        let w = ModelWeights::load(model, DType::F32, WeightPrecision::Auto, &Device::Cpu).unwrap();
        w.unet.tensor(&name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };

    // A backup with other values beside the real file: ignored.
    let zeros: HashMap<String, Tensor> = original.iter().map(|(k, t)| (k.clone(), t.zeros_like().unwrap())).collect();
    write_safetensors(&model.join("unet/backup.safetensors"), &zeros, None).unwrap();
    assert_eq!(loaded(&model), expect, "the backup was read");

    // Shards with their index, instead of the one file: read from the index (the backup still ignored).
    let mut names: Vec<&String> = original.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let shard = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let tensors: HashMap<String, Tensor> = part.iter().map(|k| ((*k).clone(), original[*k].clone())).collect();
        write_safetensors(&model.join("unet").join(&shard), &tensors, None).unwrap();
        for k in *part {
            weight_map.insert((*k).clone(), shard.clone().into());
        }
    }
    std::fs::remove_file(&unet_file).unwrap();
    let index = model.join("unet/diffusion_pytorch_model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string()).unwrap();
    assert_eq!(loaded(&model), expect, "the shards were read");

    // A shard the index lists but the folder lacks.
    std::fs::remove_file(model.join("unet/diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let e = load_error(&model);
    assert!(e.contains("diffusion_pytorch_model-00002-of-00002.safetensors is missing"), "{e}");

    // No index and no file of the expected name, several candidates: refused with the list.
    std::fs::remove_file(&index).unwrap();
    let e = load_error(&model);
    assert!(
        e.contains("several weight files") && e.contains("backup.safetensors") && e.contains("00001-of-00002"),
        "{e}"
    );

    // Two files that both hold a tensor (the index points at both): refused, naming both.
    let mut weight_map = serde_json::Map::new();
    weight_map.insert(name.clone(), "backup.safetensors".into());
    weight_map.insert("x".into(), "diffusion_pytorch_model-00001-of-00002.safetensors".into());
    write_safetensors(&model.join("unet/diffusion_pytorch_model-00001-of-00002.safetensors"), &original, None).unwrap();
    std::fs::write(&index, serde_json::json!({ "weight_map": weight_map }).to_string()).unwrap();
    let e = load_error(&model);
    assert!(e.contains("is in both"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Signals (issue 16, item 5)

/// Starts a long `train`, waits until it is stepping, sends `signal` (`count` = 2: a second one as
/// soon as the first is handled), and returns its output and adapter path. Its stderr is read as it
/// comes.
fn train_and_signal(dir: &Path, signal: &str, count: usize) -> (Output, PathBuf) {
    use std::io::Read;
    let data = small_dataset(dir);
    let out = dir.join("long.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args([
            "train",
            "--model",
            p(&sd1_tiny().join("model")),
            "--data",
            p(&data),
            "--out",
            p(&out),
            "--steps",
            "100000",
            "--resolution",
            "32",
            "--no-latent-cache",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    // Wait for a few steps (the progress line shows "5/100000").
    let started = std::time::Instant::now();
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains(" 5/100000") {
        assert!(started.elapsed().as_secs() < 120, "no steps: {}", String::from_utf8_lossy(&seen.lock().unwrap()));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    let mut kill = Command::new("kill");
    kill.arg(format!("-{signal}"));
    kill.arg(&pid).status().unwrap();
    if count > 1 {
        // The second once the first has been handled (signals sent together merge into one),
        // while the run is still finishing its step and saving.
        while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("stopping:") {
            assert!(started.elapsed().as_secs() < 120, "the first signal was not handled");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Command::new("kill").arg(format!("-{signal}")).arg(&pid).status().unwrap();
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let mut stdout = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    let stderr = seen.lock().unwrap().clone();
    (Output { status, stdout, stderr }, out)
}

/// The first SIGINT or SIGTERM stops and saves the run (with the default `--save-every 0` it used
/// to lose everything); the checkpoint resumes where it stopped.
#[test]
fn a_signal_stops_and_saves_the_run() {
    for signal in ["INT", "TERM"] {
        let dir = tempdir(&format!("signal-{signal}"));
        let (run, out) = train_and_signal(&dir, signal, 1);
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(1), "{signal}: {err}");
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(last.contains("stopped at step") && last.contains("--resume"), "{signal}: {err}");
        let ckpt = dir.join("long.checkpoint.safetensors");
        let (_, metadata) = read_safetensors_with_metadata(&ckpt).unwrap();
        let state: serde_json::Value = serde_json::from_str(&metadata["lora_studio_checkpoint"]).unwrap();
        let step = state["step"].as_u64().unwrap();
        assert!(step >= 5, "{signal}: the checkpoint is at step {step}, not where the run stopped");
        assert!(last.contains(&format!("stopped at step {step} of 100000")), "{signal}: {last}");
        read_adapter(&out).unwrap();
    }
}

/// A second signal quits at once, without saving.
#[test]
fn a_second_signal_quits_at_once() {
    let dir = tempdir("signal-twice");
    let (run, _) = train_and_signal(&dir, "INT", 2);
    assert_eq!(run.status.code(), Some(130), "{}", stderr(&run));
    assert!(stderr(&run).contains("quitting without saving"), "{}", stderr(&run));
}

// ---------------------------------------------------------------------------------------------
// Memory (issue 16, item 8)

/// Options past sane bounds are refused; a step that would not fit in memory is refused before any
/// work, with a size that fits — and that size then trains.
#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_with_what_fits() {
    let dir = tempdir("memory");
    let data = small_dataset(&dir);
    let model = sd1_tiny().join("model");
    let out = dir.join("style.safetensors");
    let run = |limit: Option<&str>, extra: &[&str]| -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lora-studio"));
        cmd.args([
            "train",
            "--model",
            p(&model),
            "--data",
            p(&data),
            "--out",
            p(&out),
            "--steps",
            "1",
            "--no-latent-cache",
        ]);
        cmd.args(extra);
        if let Some(limit) = limit {
            cmd.env("LORA_STUDIO_MEMORY_LIMIT", limit);
        }
        cmd.output().unwrap()
    };
    assert_one_line_error(&run(None, &["--resolution", "8192"]), &["resolution 8192 is above the limit of 2048"]);
    assert_one_line_error(&run(None, &["--batch", "100000"]), &["batch size 100000 is above the limit of 256"]);
    // 20 MB for the step: a batch of 256 at 32 px needs far more.
    let limit = Some("20000000");
    let refused = run(limit, &["--resolution", "32", "--batch", "256"]);
    assert_one_line_error(&refused, &["a training step at batch 256 and 32 px needs about", "fits at 32 px"]);
    assert_no_output(&out);
    let err = stderr(&refused);
    let fits: String = err.split("--batch ").nth(1).unwrap().chars().take_while(char::is_ascii_digit).collect();
    assert!(fits.parse::<usize>().unwrap() < 256, "{err}");
    let trained = run(limit, &["--resolution", "32", "--batch", &fits]);
    assert!(trained.status.success(), "the suggested --batch {fits} trains: {}", stderr(&trained));
}

// ---------------------------------------------------------------------------------------------
// The latent cache (issue 16, item 16)

/// A cache entry of the wrong shape, or holding NaN, is encoded again and replaced, not trained on.
#[test]
fn damaged_latent_cache_entries_are_encoded_again() {
    let dir = tempdir("latent-cache");
    let data = small_dataset(&dir);
    let cache = dir.join("cache");
    let model = sd1_tiny().join("model");
    let train = |out: &str| {
        studio(&[
            "train",
            "--model",
            p(&model),
            "--data",
            p(&data),
            "--out",
            p(&dir.join(out)),
            "--steps",
            "2",
            "--resolution",
            "32",
            "--latent-cache",
            p(&cache),
        ])
    };
    let first = train("first.safetensors");
    assert!(first.status.success(), "{}", stderr(&first));
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    assert_eq!(entries.len(), 3, "one entry per image: {entries:?}");
    let good = read_safetensors(&entries[0]).unwrap()["latents"].clone();
    let shape = good.dims().to_vec();
    // One entry of another shape, one full of NaN.
    let wrong = Tensor::zeros((shape[0], shape[1] + 2, shape[2]), DType::F32, &Device::Cpu).unwrap();
    write_safetensors(&entries[0], &HashMap::from([("latents".to_string(), wrong)]), None).unwrap();
    let nan = Tensor::full(f32::NAN, shape.as_slice(), &Device::Cpu).unwrap();
    write_safetensors(&entries[1], &HashMap::from([("latents".to_string(), nan)]), None).unwrap();
    let second = train("second.safetensors");
    assert!(second.status.success(), "{}", stderr(&second));
    for entry in &entries[..2] {
        let t = read_safetensors(entry).unwrap()["latents"].clone();
        assert_eq!(t.dims(), shape.as_slice(), "{} was encoded again", entry.display());
        assert!(
            t.to_vec3::<f32>().unwrap().iter().flatten().flatten().all(|v| v.is_finite()),
            "{} is finite",
            entry.display()
        );
    }
    // The same adapter as from a clean cache: nothing of the bad entries reached training.
    let a = read_safetensors(&dir.join("first.safetensors")).unwrap();
    let b = read_safetensors(&dir.join("second.safetensors")).unwrap();
    for (k, t) in &a {
        assert!(relative_error(&b[k], t) < 1e-5, "{k} differs");
    }
}

// ---------------------------------------------------------------------------------------------
// Messages (issue 16, item 17)

#[test]
fn messages_say_what_is_wrong() {
    let dir = tempdir("messages");
    let data = small_dataset(&dir);
    let tiny = sd1_tiny().join("model");

    // A checkpoint of another model (the built-in one) resumed on sd1-tiny.
    let builtin_run = dir.join("builtin.safetensors");
    let run = studio(&[
        "train",
        "--data",
        p(&data),
        "--out",
        p(&builtin_run),
        "--steps",
        "1",
        "--resolution",
        "32",
        "--no-latent-cache",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    // Encoding shows progress.
    assert!(stderr(&run).contains("encoding images 3/3"), "{}", stderr(&run));
    let ckpt = dir.join("builtin.checkpoint.safetensors");
    let run = studio(&[
        "train",
        "--model",
        p(&tiny),
        "--data",
        p(&data),
        "--out",
        p(&dir.join("other.safetensors")),
        "--resume",
        p(&ckpt),
        "--steps",
        "2",
        "--resolution",
        "32",
        "--no-latent-cache",
    ]);
    assert_last_line_error(&run, &["this checkpoint is for another model"]);

    // A decimal comma in an adapter weight.
    let adapter = format!("{}:0,5", p(&sd1_tiny().join("lora_a_kohya.safetensors")));
    let png = dir.join("x.png");
    let run = studio(&["generate", "--model", p(&tiny), "--adapter", &adapter, "--prompt", "x", "--out", p(&png)]);
    assert_one_line_error(&run, &["`0,5`", "is not a number (use a dot: 0.5)"]);

    // Control characters in a downloaded file's metadata never reach the terminal.
    let (tensors, mut metadata) = read_safetensors_with_metadata(&sd1_tiny().join("lora_a_kohya.safetensors")).unwrap();
    metadata.insert("ss_output_name".into(), "\x1b[2J\x1b[31mred\x07".into());
    let hostile = dir.join("hostile.safetensors");
    write_safetensors(&hostile, &tensors, Some(metadata)).unwrap();
    let info = studio(&["adapter", "info", p(&hostile)]);
    let shown = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "control characters printed: {shown:?}");
    assert!(shown.contains("\\u{1b}[31mred\\u{7}"), "{shown}");

    // An empty dataset says so instead of "training sizes: " and nothing.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let run = studio(&["train", "--model", p(&tiny), "--data", p(&empty), "--out", p(&dir.join("e.safetensors"))]);
    let err = stderr(&run);
    assert!(!err.contains("training sizes: \n"), "{err}");
    assert_last_line_error(&run, &["no usable images"]);
}

/// An adapter the Playground has loaded is never a training output, even with "overwrite", unless
/// it is an earlier run of ours (which the run-exists question covers).
#[test]
fn an_adapter_in_use_is_not_a_training_output() {
    use lora_studio::engine::train::trainer::RunOutputs;
    let dir = tempdir("in-use");
    let data = small_dataset(&dir);
    let theirs = dir.join("downloaded.safetensors");
    std::fs::copy(sd1_tiny().join("lora_a_kohya.safetensors"), &theirs).unwrap();
    let check = |out: &Path, overwrite: bool| {
        RunOutputs {
            out,
            model: &sd1_tiny().join("model"),
            data: std::slice::from_ref(&data),
            in_use: std::slice::from_ref(&theirs),
            resume: None,
            full_finetune: false,
            overwrite,
        }
        .check()
    };
    for overwrite in [false, true] {
        let e = format!("{:#}", check(&theirs, overwrite).unwrap_err());
        assert!(e.contains("downloaded.safetensors") && e.contains("in use in the Playground"), "{e}");
    }
    check(&dir.join("new.safetensors"), false).unwrap();
}

/// A checkpoint whose step adapter was never written (a kill between the two, by an older
/// version, or a run extended past its end) gets it on resume: no `-stepN` is ever missing.
#[test]
fn resume_writes_the_step_adapter_its_checkpoint_is_ahead_of() {
    let dir = tempdir("step-gap");
    let model = sd1_tiny().join("model");
    let data = small_dataset(&dir);
    let out = dir.join("style.safetensors");
    // Two steps: the last save is the run's end, which keeps no `-step` file.
    let first = train_run(&model, &data, &out, &["--save-every", "2"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let step2 = dir.join("style-step00000002.safetensors");
    assert!(!step2.exists());
    // Going on to four steps: step 2 is now a save before the end, so its adapter is written.
    let ckpt = dir.join("style.checkpoint.safetensors");
    let resumed = studio(&[
        "train",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--out",
        p(&out),
        "--steps",
        "4",
        "--resolution",
        "32",
        "--no-latent-cache",
        "--save-every",
        "2",
        "--resume",
        p(&ckpt),
    ]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(step2.exists(), "the step-2 adapter was written on resume");
    read_adapter(&step2).unwrap();
}

/// Matching gives a typed report: a file the model would refuse, or would fit only in part, is
/// known as such from the value, and loading refuses it with the same summary unless a partial
/// load is asked for.
#[test]
fn a_file_that_fits_only_in_part_is_refused_unless_asked() {
    use lora_studio::engine::adapters::formats::match_layers;
    let dir = tempdir("report");
    let mut t = HashMap::new();
    for block in ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"] {
        kohya_layer(&mut t, block, f32s(&[4, 32], 0.01), f32s(&[32, 4], 0.01), Some(4.0));
    }
    kohya_layer(&mut t, TO_K, f32s(&[4, 32], 0.01), f32s(&[32, 4], 0.01), Some(4.0));
    let path = dir.join("mostly-another-model.safetensors");
    write_safetensors(&path, &t, None).unwrap();
    let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let (layers, report) = match_layers(&read_adapter(&path).unwrap(), &sd.module_index()).unwrap();
    assert_eq!((layers.len(), report.matched, report.total), (1, 1, 3));
    assert!(report.partial() && !report.refused(), "{}", report.summary());
    // Part of a file is never applied unasked: the load names what has no home and loads nothing.
    let e = format!("{:#}", sd.load_adapter("a", &path, 1.0).unwrap_err());
    assert!(e.contains("only part of the adapter fits") && e.contains(&report.summary()), "{e}");
    assert!(
        e.contains("lora_unet_double_blocks_0_img_attn_qkv") && e.contains("lora_unet_single_blocks_3_linear1"),
        "{e}"
    );
    let mut touched = 0;
    sd.visit_layers(&mut |_, l| touched += !l.stack_ref().adapters.is_empty() as usize);
    assert_eq!(touched, 0, "nothing was attached");
    // Asked for, it loads the layer that fits.
    let partial = sd.load_adapter_partial("a", &path, 1.0, &Default::default()).unwrap();
    assert_eq!(partial.matched, 1);
    // The command line refuses it the same way and says how to ask; with --allow-partial it runs.
    let (model, inputs, out) =
        (sd1_tiny().join("model"), sd1_tiny().join("inputs.safetensors"), dir.join("o.safetensors"));
    let args = ["forward", "--model", p(&model), "--adapter", p(&path), "--inputs", p(&inputs), "--output", p(&out)];
    assert_one_line_error(&studio(&args), &["only part of the adapter fits", "--allow-partial"]);
    let run = studio(&[&args[..], &["--allow-partial"]].concat());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("partial load as asked"));
    // A file with no layer that fits is refused even when partial loads are allowed.
    let mut t = HashMap::new();
    kohya_layer(&mut t, "lora_unet_double_blocks_0_img_attn_qkv", f32s(&[4, 32], 0.01), f32s(&[32, 4], 0.01), None);
    let none = dir.join("another-model.safetensors");
    write_safetensors(&none, &t, None).unwrap();
    let e = format!("{:#}", sd.load_adapter_partial("b", &none, 1.0, &Default::default()).unwrap_err());
    assert!(e.contains("does not fit this model"), "{e}");
    // The good file's report accepts it.
    let (_, good) =
        match_layers(&read_adapter(&sd1_tiny().join("lora_a_kohya.safetensors")).unwrap(), &sd.module_index()).unwrap();
    assert!(!good.refused() && good.accept(false).is_ok(), "{}", good.summary());
}
