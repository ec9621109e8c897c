//! One line of text drawn into an `RgbImage`: egui's bundled Ubuntu-Light outlines (via skrifa)
//! filled with antialiasing by coverage (vello_cpu), so a saved grid PNG carries its own labels.
//! No shaping or kerning: a label is a name and a number, and plain advances set those well.

use image::{Rgb, RgbImage};
use skrifa::instance::{LocationRef, Size};
use skrifa::outline::{DrawSettings, OutlinePen};
use skrifa::{FontRef, MetadataProvider};
use vello_cpu::kurbo::{Affine, BezPath, Shape};

/// The font every label is set in (the window's own proportional font).
const FONT: &[u8] = epaint_default_fonts::UBUNTU_LIGHT;

/// A line of text laid out at a pixel size: its outline, with the box it is measured in
/// starting at (0, 0) and holding every inked pixel.
pub struct TextLine {
    path: BezPath,
    pub width: u32,
    pub height: u32,
}

impl TextLine {
    /// Lays `text` out at `px` pixels to the em; characters the font lacks are skipped.
    pub fn new(text: &str, px: f32) -> TextLine {
        let font = FontRef::new(FONT).expect("the bundled font parses");
        let size = Size::new(px);
        let location = LocationRef::default();
        let metrics = font.metrics(size, location);
        let advances = font.glyph_metrics(size, location);
        let (charmap, outlines) = (font.charmap(), font.outline_glyphs());
        let mut path = BezPath::new();
        let mut pen_x = 0.0f64;
        for ch in text.chars() {
            let Some(glyph) = charmap.map(ch) else { continue };
            if let Some(outline) = outlines.get(glyph) {
                let mut pen = PathPen { path: &mut path, x: pen_x, baseline: metrics.ascent as f64 };
                // A glyph that fails to draw is left out rather than failing the whole label.
                let _ = outline.draw(DrawSettings::unhinted(size, location), &mut pen);
            }
            pen_x += advances.advance_width(glyph).unwrap_or(0.0) as f64;
        }
        // The box is the line's advance by its ascent-to-descent height, widened where an outline
        // reaches past it (a `j`'s tail, an overhang), so nothing is drawn outside it.
        let ink = path.bounding_box();
        let (left, top) = if path.is_empty() { (0.0, 0.0) } else { (ink.x0.min(0.0), ink.y0.min(0.0)) };
        let line_height = (metrics.ascent - metrics.descent) as f64;
        let right = if path.is_empty() { pen_x } else { pen_x.max(ink.x1) };
        let bottom = if path.is_empty() { line_height } else { line_height.max(ink.y1) };
        path.apply_affine(Affine::translate((-left, -top)));
        TextLine { path, width: (right - left).ceil() as u32, height: (bottom - top).ceil() as u32 }
    }

    /// Draws the line with its box's top-left corner at (`x`, `y`); what falls outside the
    /// image is clipped. Each pixel moves towards `colour` by the outline's coverage of it.
    pub fn draw(&self, image: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
        if self.width == 0 || self.height == 0 {
            return;
        }
        let (w, h) = (self.width.min(u16::MAX as u32) as u16, self.height.min(u16::MAX as u32) as u16);
        let mut ctx = vello_cpu::RenderContext::new(w, h);
        ctx.set_paint(vello_cpu::color::OpaqueColor::<vello_cpu::color::Srgb>::WHITE);
        ctx.fill_path(&self.path);
        let mut coverage = vello_cpu::Pixmap::new(w, h);
        ctx.render(&mut coverage, &mut vello_cpu::Resources::new());
        // Premultiplied white: the alpha byte is the coverage.
        for (i, px) in coverage.data_as_u8_slice().chunks_exact(4).enumerate() {
            let alpha = px[3] as u32;
            let (ix, iy) = (x + (i % w as usize) as i64, y + (i / w as usize) as i64);
            if alpha == 0 || ix < 0 || iy < 0 || ix >= image.width() as i64 || iy >= image.height() as i64 {
                continue;
            }
            let under = image.get_pixel_mut(ix as u32, iy as u32);
            for (c, ink) in under.0.iter_mut().zip(colour.0) {
                *c = ((*c as u32 * (255 - alpha) + ink as u32 * alpha + 127) / 255) as u8;
            }
        }
    }
}

/// Collects a glyph's outline into the line's path at the pen's position, y pointing down.
struct PathPen<'a> {
    path: &'a mut BezPath,
    x: f64,
    baseline: f64,
}

impl PathPen<'_> {
    fn at(&self, x: f32, y: f32) -> (f64, f64) {
        (self.x + x as f64, self.baseline - y as f64)
    }
}

impl OutlinePen for PathPen<'_> {
    fn move_to(&mut self, x: f32, y: f32) {
        let p = self.at(x, y);
        self.path.move_to(p);
    }

    fn line_to(&mut self, x: f32, y: f32) {
        let p = self.at(x, y);
        self.path.line_to(p);
    }

    fn quad_to(&mut self, cx0: f32, cy0: f32, x: f32, y: f32) {
        let (c, p) = (self.at(cx0, cy0), self.at(x, y));
        self.path.quad_to(c, p);
    }

    fn curve_to(&mut self, cx0: f32, cy0: f32, cx1: f32, cy1: f32, x: f32, y: f32) {
        let (c0, c1, p) = (self.at(cx0, cy0), self.at(cx1, cy1), self.at(x, y));
        self.path.curve_to(c0, c1, p);
    }

    fn close(&mut self) {
        self.path.close_path();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pixels darker than the white page, as (x, y).
    fn inked(image: &RgbImage) -> Vec<(u32, u32)> {
        image.enumerate_pixels().filter(|(_, _, p)| p.0.iter().any(|&c| c < 255)).map(|(x, y, _)| (x, y)).collect()
    }

    #[test]
    fn text_is_drawn_inside_its_measured_box_and_nowhere_else() {
        for (text, px) in [("neon: 0.5", 12.0), ("jagged Wq: -1.25", 31.0)] {
            let line = TextLine::new(text, px);
            assert!(line.height as f32 >= px && line.width as f32 > px * 2.0, "{text}: {}×{}", line.width, line.height);
            let (x, y) = (17u32, 9u32);
            let mut page = RgbImage::from_pixel(line.width + 40, line.height + 30, Rgb([255; 3]));
            line.draw(&mut page, x as i64, y as i64, Rgb([0; 3]));
            let ink = inked(&page);
            let inside =
                |&(px, py): &(u32, u32)| (x..x + line.width).contains(&px) && (y..y + line.height).contains(&py);
            assert!(ink.iter().all(inside), "{text}: ink outside its box: {:?}", ink.iter().find(|p| !inside(p)));
            // Real glyphs: plenty of ink, some of it fully black, some of it antialiased grey.
            let dark = ink.iter().filter(|&&(px, py)| page.get_pixel(px, py).0[0] < 96).count();
            assert!(dark as u32 > line.width, "{text}: {dark} dark pixels");
            assert!(ink.iter().any(|&(px, py)| (64..192).contains(&page.get_pixel(px, py).0[0])), "antialiased");
            // Both ends of the box are used: the first and last glyphs are there.
            let (min_x, max_x) = (ink.iter().map(|p| p.0).min().unwrap(), ink.iter().map(|p| p.0).max().unwrap());
            assert!(min_x < x + px as u32 / 2 && max_x + px as u32 / 2 >= x + line.width, "{text}: {min_x}..{max_x}");
        }
    }

    #[test]
    fn text_past_the_image_edge_is_clipped() {
        let line = TextLine::new("0.5", 20.0);
        let mut page = RgbImage::from_pixel(10, 10, Rgb([255; 3]));
        line.draw(&mut page, -5, -5, Rgb([0; 3]));
        line.draw(&mut page, 8, 8, Rgb([0; 3]));
    }
}
