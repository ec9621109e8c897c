//! The in-repository fixtures (`tests/fixtures`) are a copy of part of the shared reference
//! fixtures (`../shared/fixtures`, where they are computed with diffusers & co). When the shared
//! folder is beside the checkout, every copied file must be byte-identical to its original.

use std::path::{Path, PathBuf};

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn the_copied_fixtures_match_the_shared_originals() {
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    // Where the project's shared fixtures are made: beside the checkout, or wherever
    // LORA_STUDIO_SHARED_FIXTURES says.
    let shared = std::env::var_os("LORA_STUDIO_SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let mut files = Vec::new();
    files_under(&ours, &mut files);
    assert!(files.len() > 10, "the fixtures are in the repository: {}", ours.display());
    if !shared.is_dir() {
        eprintln!("note: {} is not here; the copy is not compared", shared.display());
        return;
    }
    let mut differ = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&ours).unwrap();
        if rel == Path::new("README.md") {
            continue; // ours adds a header to the shared README
        }
        if rel.starts_with("unet_names")
            || rel.starts_with("few_step")
            || rel.starts_with("infotext")
            || rel.starts_with("prompts")
            || rel.starts_with("optimisers")
        {
            continue; // made for this repository with diffusers', transformers', torch's, prodigyopt's or Pillow's code (their scripts), not copies
        }
        let original = shared.join(rel);
        match std::fs::read(&original) {
            Ok(bytes) if bytes == std::fs::read(file).unwrap() => {}
            Ok(_) => differ.push(format!("{} differs", rel.display())),
            Err(_) => differ.push(format!("{} is not in {}", rel.display(), shared.display())),
        }
    }
    assert!(differ.is_empty(), "tests/fixtures is out of step with ../shared/fixtures: {}", differ.join("; "));
}
