//! The status bar along the bottom of the window: base model, device, process memory, job state.

use std::time::Duration;

/// The process's resident memory, re-read at most once per [`MemorySampler::INTERVAL`].
#[derive(Debug, Default, Clone)]
pub struct MemorySampler {
    /// egui time (seconds) of the last read; `None` before the first.
    last_read: Option<f64>,
    bytes: Option<u64>,
}

impl MemorySampler {
    pub const INTERVAL: Duration = Duration::from_secs(1);
    /// How often an idle window redraws to refresh the figure.
    pub const IDLE_INTERVAL: Duration = Duration::from_secs(5);

    /// Re-reads the figure if `now` (egui's `input.time`, seconds) is an interval past the last read.
    pub fn refresh(&mut self, now: f64) {
        let due = self.last_read.is_none_or(|last| now - last >= Self::INTERVAL.as_secs_f64() || now < last);
        if due {
            self.bytes = resident_memory_bytes();
            self.last_read = Some(now);
        }
    }

    /// The last figure read, `None` where the platform does not tell us.
    pub fn bytes(&self) -> Option<u64> {
        self.bytes
    }
}

/// Resident set size of this process, from `/proc/self/status` (`VmRSS`). That is the same figure
/// as `/proc/self/statm`'s second field, but in KiB rather than pages, so no page size is needed.
/// `None` off Linux or if the file cannot be read.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `1536 MiB` → "1.5 GiB"; below a GiB whole MiB ("312 MiB").
pub fn format_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = bytes as f64 / MIB;
    if mib >= 1024.0 { format!("{:.1} GiB", mib / 1024.0) } else { format!("{mib:.0} MiB") }
}

/// Shortens a long model path from the front, keeping the file or folder name readable:
/// "/home/me/models/sd15/v1-5-pruned.safetensors" → "…/sd15/v1-5-pruned.safetensors".
fn elide_front(text: &str, max_chars: usize) -> String {
    let count = text.chars().count();
    if count <= max_chars {
        return text.to_owned();
    }
    let tail: String = text.chars().skip(count - (max_chars - 1)).collect();
    format!("…{tail}")
}

/// One "Key: value" item; a single label so that screen readers and tests read it as one text.
fn item(ui: &mut egui::Ui, key: &str, value: &str) -> egui::Response {
    let style = ui.style();
    let mut job = egui::text::LayoutJob::default();
    let font = egui::TextStyle::Body.resolve(style);
    let weak = style.visuals.weak_text_color();
    let strong = style.visuals.text_color();
    job.append(&format!("{key}: "), 0.0, egui::TextFormat::simple(font.clone(), weak));
    job.append(value, 0.0, egui::TextFormat::simple(font, strong));
    ui.label(job)
}

pub(super) fn status_bar(ui: &mut egui::Ui, model: &str, device: &str, job: &str, memory: &MemorySampler) {
    ui.horizontal(|ui| {
        let model_shown = if model.is_empty() { "none loaded".to_owned() } else { elide_front(model, 48) };
        let response = item(ui, "Model", &model_shown);
        if model.chars().count() > 48 {
            response.on_hover_text(model);
        }
        ui.separator();
        item(ui, "Device", device);
        ui.separator();
        let memory_shown = memory.bytes().map_or_else(|| "unknown".to_owned(), format_bytes);
        item(ui, "Memory", &memory_shown).on_hover_text("Resident memory of this process, updated every second");
        ui.separator();
        item(ui, "Job", job);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes() {
        assert_eq!(format_bytes(312 * 1024 * 1024), "312 MiB");
        assert_eq!(format_bytes(1536 * 1024 * 1024), "1.5 GiB");
    }

    #[test]
    fn elides_long_paths_from_the_front() {
        assert_eq!(elide_front("short", 10), "short");
        let e = elide_front("/home/me/models/sd15/v1-5-pruned.safetensors", 20);
        assert_eq!(e.chars().count(), 20);
        assert!(e.starts_with('…') && e.ends_with("pruned.safetensors"));
    }

    #[test]
    fn samples_at_most_once_per_interval() {
        let mut m = MemorySampler::default();
        m.refresh(10.0);
        assert_eq!(m.last_read, Some(10.0));
        m.refresh(10.5);
        assert_eq!(m.last_read, Some(10.0));
        m.refresh(11.0);
        assert_eq!(m.last_read, Some(11.0));
        if cfg!(target_os = "linux") {
            assert!(m.bytes().is_some_and(|b| b > 1024 * 1024));
        }
    }
}
