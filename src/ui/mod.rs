//! The window: a tab bar with the three areas (Dataset, Training, Playground), the selected
//! area's panel, and a status bar (base model, device, process memory, job state).
//!
//! [`StudioApp::show`] draws everything into a `Ui`; the eframe window ([`run_window`]) and the
//! kittest tests (`ui-tests/ui.rs`) both call it, so the tests exercise exactly what the window
//! shows. Each area's panel is a short free function in its own file.

mod dataset;
mod playground;
mod status;
mod training;

pub use status::{MemorySampler, format_bytes, resident_memory_bytes};

/// What the caller knows when it opens the window.
#[derive(Debug, Clone, Default)]
pub struct WindowOptions {
    /// The base model shown in the status bar: "built-in", a folder or a file path. Empty means
    /// no model is loaded yet.
    pub model_label: String,
}

/// The three areas of the app, in tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Area {
    #[default]
    Dataset,
    Training,
    Playground,
}

impl Area {
    pub const ALL: [Area; 3] = [Area::Dataset, Area::Training, Area::Playground];

    /// The tab's label; tests find tabs by it.
    pub fn label(self) -> &'static str {
        match self {
            Area::Dataset => "Dataset",
            Area::Training => "Training",
            Area::Playground => "Playground",
        }
    }

    fn shortcut_key(self) -> egui::Key {
        match self {
            Area::Dataset => egui::Key::Num1,
            Area::Training => egui::Key::Num2,
            Area::Playground => egui::Key::Num3,
        }
    }
}

/// What the background job layer is doing. Only `Idle` exists until jobs are wired in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobState {
    #[default]
    Idle,
}

impl JobState {
    pub fn label(self) -> &'static str {
        match self {
            JobState::Idle => "idle",
        }
    }
}

/// All state of the window. Plain data; no threads.
#[derive(Debug)]
pub struct StudioApp {
    pub area: Area,
    /// Base model shown in the status bar (see [`WindowOptions::model_label`]).
    pub model_label: String,
    /// Compute device shown in the status bar.
    pub device_label: String,
    pub job: JobState,
    pub memory: MemorySampler,
}

impl StudioApp {
    pub fn new(options: WindowOptions) -> Self {
        Self {
            area: Area::default(),
            model_label: options.model_label,
            device_label: "CPU".to_owned(),
            job: JobState::default(),
            memory: MemorySampler::default(),
        }
    }

    /// Draws the whole window into `ui`: tab bar, status bar, then the selected area.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.handle_shortcuts(ui);

        egui::Panel::top("area_tabs").show(ui, |ui| {
            ui.add_space(4.0);
            self.tab_bar(ui);
            ui.add_space(2.0);
        });
        egui::Panel::bottom("status_bar").show(ui, |ui| {
            let now = ui.input(|i| i.time);
            self.memory.refresh(now);
            // Keep the memory figure fresh while the app is otherwise idle.
            ui.ctx().request_repaint_after(MemorySampler::INTERVAL);
            status::status_bar(ui, &self.model_label, &self.device_label, self.job.label(), &self.memory);
        });
        let margin = egui::Frame::central_panel(ui.style()).inner_margin(egui::Margin::symmetric(20, 12));
        egui::CentralPanel::default().frame(margin).show(ui, |ui| match self.area {
            Area::Dataset => dataset::ui_dataset(ui),
            Area::Training => training::ui_training(ui),
            Area::Playground => playground::ui_playground(ui),
        });
    }

    fn handle_shortcuts(&mut self, ui: &egui::Ui) {
        for area in Area::ALL {
            let shortcut = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, area.shortcut_key());
            if ui.ctx().input_mut(|i| i.consume_shortcut(&shortcut)) {
                self.area = area;
            }
        }
    }

    fn tab_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.add_space(4.0);
            ui.label(egui::RichText::new("LoRA Studio").strong());
            ui.separator();
            for area in Area::ALL {
                let shortcut = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, area.shortcut_key());
                let text = egui::RichText::new(area.label()).size(15.0);
                let response =
                    ui.selectable_label(self.area == area, text).on_hover_text(ui.ctx().format_shortcut(&shortcut));
                if response.clicked() {
                    self.area = area;
                }
            }
        });
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

/// The app icon, decoded from `assets/icon.png` (embedded in the binary).
fn icon() -> Option<egui::IconData> {
    let image = image::load_from_memory(include_bytes!("../../assets/icon.png")).ok()?.into_rgba8();
    let (width, height) = image.dimensions();
    Some(egui::IconData { rgba: image.into_raw(), width, height })
}

/// Opens the native window and blocks until it is closed.
pub fn run_window(options: WindowOptions) -> anyhow::Result<()> {
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("LoRA Studio")
        .with_app_id("lora-studio")
        .with_inner_size([960.0, 640.0])
        .with_min_inner_size([560.0, 360.0]);
    if let Some(icon) = icon() {
        viewport = viewport.with_icon(icon);
    }
    let native_options = eframe::NativeOptions { viewport, renderer: eframe::Renderer::Glow, ..Default::default() };
    eframe::run_native(
        "LoRA Studio",
        native_options,
        Box::new(|cc| {
            // Dark or light, as the desktop says (this is egui's default; stated so it stays so).
            cc.egui_ctx.set_theme(egui::ThemePreference::System);
            Ok(Box::new(StudioApp::new(options)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// The title and one-line purpose at the top of each area.
fn area_heading(ui: &mut egui::Ui, title: &str, purpose: &str) {
    ui.add_space(4.0);
    ui.heading(title);
    ui.label(purpose);
}

/// A plain note that a part is missing, so no placeholder passes for a feature.
fn not_built_yet(ui: &mut egui::Ui, text: &str) {
    ui.label(egui::RichText::new(text).italics().weak());
}
