//! The live loss plot: raw per-step loss, its exponential moving average, and the validation
//! loss at each checkpoint; optionally on a log scale.

use egui_plot::{Line, MarkerShape, Plot, Points};

/// Weight of the newest step in the moving average (about a 20-step window).
const EMA_WEIGHT: f64 = 0.1;

#[derive(Debug, Default, Clone)]
pub struct LossHistory {
    /// (step, loss) for every step.
    pub raw: Vec<[f64; 2]>,
    /// (step, moving average).
    pub ema: Vec<[f64; 2]>,
    /// (step, validation loss) at checkpoints.
    pub validation: Vec<[f64; 2]>,
}

impl LossHistory {
    pub fn push(&mut self, step: usize, loss: f32) {
        let loss = loss as f64;
        if !loss.is_finite() {
            return;
        }
        let ema = self.ema.last().map_or(loss, |&[_, prev]| prev + EMA_WEIGHT * (loss - prev));
        self.raw.push([step as f64, loss]);
        self.ema.push([step as f64, ema]);
    }

    pub fn push_validation(&mut self, step: usize, loss: f32) {
        if loss.is_finite() {
            self.validation.retain(|p| p[0] != step as f64);
            self.validation.push([step as f64, loss as f64]);
        }
    }

    /// The latest moving average.
    pub fn smoothed(&self) -> Option<f64> {
        self.ema.last().map(|p| p[1])
    }

    /// The step with the lowest validation loss.
    pub fn best_validation(&self) -> Option<[f64; 2]> {
        self.validation.iter().copied().min_by(|a, b| a[1].total_cmp(&b[1]))
    }
}

fn scaled(points: &[[f64; 2]], log: bool) -> Vec<[f64; 2]> {
    if log { points.iter().filter(|p| p[1] > 0.0).map(|&[x, y]| [x, y.log10()]).collect() } else { points.to_vec() }
}

const VALIDATION_COLOR: egui::Color32 = egui::Color32::from_rgb(230, 140, 40);

/// The key to the plot's colours, as words on one line (a legend inside the plot hides data).
pub fn plot_key(ui: &mut egui::Ui) {
    ui.colored_label(ui.visuals().weak_text_color(), "loss");
    ui.colored_label(ui.visuals().selection.stroke.color, "moving average");
    ui.colored_label(VALIDATION_COLOR, "validation");
}

pub fn loss_plot(ui: &mut egui::Ui, history: &LossHistory, log: bool, height: f32) {
    let raw_color = ui.visuals().weak_text_color();
    let ema_color = ui.visuals().selection.stroke.color;
    let val_color = VALIDATION_COLOR;
    let mut plot = Plot::new("loss_plot")
        .height(height)
        .x_axis_label("step")
        .y_axis_label(if log { "loss (log scale)" } else { "loss" })
        .allow_scroll(false)
        .include_x(0.0);
    // The y axis follows the data (a diffusion loss is noisy around a small value; an axis
    // from 0 would flatten it).
    if log {
        plot = plot.y_axis_formatter(|mark, _| format!("{:.3}", 10f64.powf(mark.value)));
    }
    plot.show(ui, |p| {
        p.line(Line::new("loss", scaled(&history.raw, log)).color(raw_color).width(1.0));
        p.line(Line::new("moving average", scaled(&history.ema, log)).color(ema_color).width(2.0));
        if !history.validation.is_empty() {
            p.points(
                Points::new("validation", scaled(&history.validation, log))
                    .color(val_color)
                    .shape(MarkerShape::Diamond)
                    .radius(5.0)
                    .filled(true),
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_follows_the_loss() {
        let mut h = LossHistory::default();
        h.push(1, 1.0);
        assert_eq!(h.smoothed(), Some(1.0));
        h.push(2, 0.0);
        assert!((h.smoothed().unwrap() - 0.9).abs() < 1e-12);
        h.push(3, f32::NAN);
        assert_eq!(h.raw.len(), 2, "non-finite losses are not plotted");
    }

    #[test]
    fn best_validation_is_the_lowest() {
        let mut h = LossHistory::default();
        h.push_validation(10, 0.5);
        h.push_validation(20, 0.3);
        h.push_validation(30, 0.4);
        assert_eq!(h.best_validation(), Some([20.0, 0.3f32 as f64]));
    }
}
