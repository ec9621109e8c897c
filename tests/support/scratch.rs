//! Scratch folders for tests, shared by the engine tests (`tests/common.rs`) and the window tests
//! (`ui-tests/common.rs`), which are separate test crates and include this file by path.

use std::path::{Path, PathBuf};

/// A fresh, empty folder `<temp>/<prefix><pid>` (per process, so parallel test binaries never
/// meet). Tests leave their folders for a look after a failure; those of test processes that have
/// ended are removed here, so repeated runs do not fill the temp folder (a full run left ~1 GB).
pub fn fresh_dir(prefix: &str) -> PathBuf {
    remove_stale(prefix);
    let d = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn remove_stale(prefix: &str) {
    // Whether a process has ended is read from /proc; without it nothing is removed.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
