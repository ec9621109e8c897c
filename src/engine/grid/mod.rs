//! The XY grid's picture, as A1111's X/Y/Z plot lays it out: one cell per (column, row), a white
//! top margin naming each column's value and a left margin naming each row's, in black text, so
//! a saved grid explains itself. The cells themselves are rendered elsewhere and placed here.

pub mod text;

use image::{Rgb, RgbImage};

use text::TextLine;

const WHITE: Rgb<u8> = Rgb([255; 3]);
const BLACK: Rgb<u8> = Rgb([0; 3]);
/// The white space between cells, in pixels.
const GAP: u32 = 4;
/// The smallest text size, in pixels to the em: tiny test cells still get legible labels.
const MIN_PX: f32 = 10.0;

/// "name: weight" for each weight, the weight as the user typed it (`0.5`, not `0.5000000001`:
/// Rust prints the shortest text that reads back as the same number).
pub fn axis_labels(name: &str, values: &[f64]) -> Vec<String> {
    values.iter().map(|v| format!("{name}: {v}")).collect()
}

/// Where everything goes in a grid of `columns` × `rows` cells of one size, with the labels
/// laid out to fit their margins.
pub struct GridLayout {
    pub cell_width: u32,
    pub cell_height: u32,
    /// The top margin's height (column labels) and the left margin's width (row labels).
    pub top: u32,
    pub left: u32,
    column_labels: Vec<Vec<TextLine>>,
    row_labels: Vec<Vec<TextLine>>,
}

impl GridLayout {
    /// Text scales with the cell (about 1/12 of its shorter side, as A1111's 1/25 of the sum),
    /// never below `MIN_PX`; a label too wide for its space is shrunk, then broken after the ": ".
    pub fn new(cell_width: u32, cell_height: u32, columns: &[String], rows: &[String]) -> GridLayout {
        let px = (cell_width.min(cell_height) as f32 / 12.0).max(MIN_PX + 2.0);
        let pad = (px / 3.0).ceil() as u32;
        let column_labels: Vec<_> = columns.iter().map(|t| fit(t, cell_width.saturating_sub(2 * pad), px)).collect();
        let top = column_labels.iter().map(|l| lines_height(l)).max().unwrap_or(0) + 2 * pad;
        // The left margin is as wide as the widest row label on one line, up to the larger of
        // a cell's width and eight ems; a longer label is fitted to that.
        let widest = rows.iter().map(|t| TextLine::new(t, px).width).max().unwrap_or(0);
        let left = widest.min(cell_width.max(8 * px as u32)) + 2 * pad;
        let row_labels = rows.iter().map(|t| fit(t, left - 2 * pad, px)).collect();
        GridLayout { cell_width, cell_height, top, left, column_labels, row_labels }
    }

    /// The whole picture's width and height.
    pub fn size(&self) -> (u32, u32) {
        let span = |n: usize, side: u32| (n as u32 * (side + GAP)).saturating_sub(GAP);
        (
            self.left + span(self.column_labels.len(), self.cell_width),
            self.top + span(self.row_labels.len(), self.cell_height),
        )
    }

    /// The top-left pixel of the cell at (`column`, `row`).
    pub fn cell_origin(&self, column: usize, row: usize) -> (u32, u32) {
        (self.left + column as u32 * (self.cell_width + GAP), self.top + row as u32 * (self.cell_height + GAP))
    }

    /// A white picture of the grid's size with every label drawn, the cells still empty.
    pub fn canvas(&self) -> RgbImage {
        let (width, height) = self.size();
        let mut canvas = RgbImage::from_pixel(width, height, WHITE);
        // Each label is drawn on its own tile the size of its band, so it cannot spill into a
        // neighbour's even when it had to be drawn wider than the band.
        for (c, label) in self.column_labels.iter().enumerate() {
            let tile = label_tile(label, self.cell_width, self.top);
            image::imageops::replace(&mut canvas, &tile, self.cell_origin(c, 0).0 as i64, 0);
        }
        for (r, label) in self.row_labels.iter().enumerate() {
            let tile = label_tile(label, self.left, self.cell_height);
            image::imageops::replace(&mut canvas, &tile, 0, self.cell_origin(0, r).1 as i64);
        }
        canvas
    }

    /// Puts a rendered cell in its place (a cell of another size is cut or leaves white).
    pub fn place(&self, canvas: &mut RgbImage, column: usize, row: usize, cell: &RgbImage) {
        let cell = image::imageops::crop_imm(cell, 0, 0, self.cell_width, self.cell_height).to_image();
        let (x, y) = self.cell_origin(column, row);
        image::imageops::replace(canvas, &cell, x as i64, y as i64);
    }
}

/// `text` as one line or two (broken after ": "), at the largest size from `px` down to
/// `MIN_PX` at which every line fits `width`; at `MIN_PX`, two lines, whatever their width.
fn fit(text: &str, width: u32, px: f32) -> Vec<TextLine> {
    let broken: Vec<&str> = match text.split_once(": ") {
        Some((name, value)) => vec![name, value],
        None => vec![text],
    };
    for lines in [vec![text], broken.clone()] {
        let mut size = px;
        loop {
            let laid: Vec<TextLine> = lines.iter().map(|l| TextLine::new(l, size)).collect();
            if laid.iter().all(|l| l.width <= width) {
                return laid;
            }
            if size <= MIN_PX {
                break;
            }
            size = (size * 0.9).max(MIN_PX);
        }
    }
    broken.iter().map(|l| TextLine::new(l, MIN_PX)).collect()
}

fn lines_height(lines: &[TextLine]) -> u32 {
    lines.iter().map(|l| l.height).sum()
}

/// A white `width` × `height` tile with the lines centred on it, black.
fn label_tile(lines: &[TextLine], width: u32, height: u32) -> RgbImage {
    let mut tile = RgbImage::from_pixel(width, height, WHITE);
    let mut y = (height as i64 - lines_height(lines) as i64) / 2;
    for line in lines {
        // Too wide to centre: start at the left edge so the label's beginning shows.
        let x = ((width as i64 - line.width as i64) / 2).max(0);
        line.draw(&mut tile, x, y, BLACK);
        y += line.height as i64;
    }
    tile
}

#[cfg(test)]
mod tests {
    use super::*;

    const CELL: (u32, u32) = (40, 30);

    /// Cell (c, r) is one flat colour, neither white, black nor grey.
    fn cell_colour(c: usize, r: usize) -> Rgb<u8> {
        Rgb([60 + 50 * c as u8, 200 - 60 * r as u8, 120])
    }

    fn dark(p: &Rgb<u8>) -> bool {
        p.0.iter().all(|&v| v < 100)
    }

    #[test]
    fn weights_are_labelled_as_typed() {
        let typed = "0.5, 1, -0.25, 0.1, 0.5000000001";
        let values: Vec<f64> = typed.split(", ").map(|t| t.parse().unwrap()).collect();
        let labels = axis_labels("neon", &values);
        assert_eq!(labels, ["neon: 0.5", "neon: 1", "neon: -0.25", "neon: 0.1", "neon: 0.5000000001"]);
    }

    #[test]
    fn cells_sit_unchanged_beside_margins_with_each_label_in_its_own_band() {
        let columns = axis_labels("neon", &[0.0, 0.5, 1.0]);
        let rows = axis_labels("watercolour", &[-1.0, 2.0]);
        let layout = GridLayout::new(CELL.0, CELL.1, &columns, &rows);
        let mut grid = layout.canvas();
        for r in 0..2 {
            for c in 0..3 {
                layout.place(&mut grid, c, r, &RgbImage::from_pixel(CELL.0, CELL.1, cell_colour(c, r)));
            }
        }
        // Margins big enough for one line of minimum-size text, small enough not to swamp tiny cells.
        let (top, left) = (layout.top, layout.left);
        assert!((MIN_PX as u32 + 4..=4 * MIN_PX as u32).contains(&top), "top margin {top}");
        assert!((2 * CELL.0..=12 * MIN_PX as u32).contains(&left), "left margin {left}");
        assert_eq!(grid.dimensions(), (left + 3 * CELL.0 + 2 * GAP, top + 2 * CELL.1 + GAP));

        // Every cell at its offset, every pixel as rendered.
        for r in 0..2u32 {
            for c in 0..3u32 {
                let (x0, y0) = (left + c * (CELL.0 + GAP), top + r * (CELL.1 + GAP));
                assert_eq!(layout.cell_origin(c as usize, r as usize), (x0, y0));
                for (x, y) in (0..CELL.0).flat_map(|x| (0..CELL.1).map(move |y| (x, y))) {
                    let got = grid.get_pixel(x0 + x, y0 + y);
                    assert_eq!(*got, cell_colour(c as usize, r as usize), "cell ({c}, {r}) at ({x}, {y})");
                }
            }
        }

        // Dark text in each column's band of the top margin, none outside the bands (nor above
        // the row labels); likewise each row's band of the left margin.
        let column_of =
            |x: u32| (0..3).find(|&c| (left + c * (CELL.0 + GAP)..left + c * (CELL.0 + GAP) + CELL.0).contains(&x));
        let row_of =
            |y: u32| (0..2).find(|&r| (top + r * (CELL.1 + GAP)..top + r * (CELL.1 + GAP) + CELL.1).contains(&y));
        let mut column_ink = [0; 3];
        let mut row_ink = [0; 2];
        for (x, y, p) in grid.enumerate_pixels() {
            if x >= left && y >= top || !dark(p) {
                continue;
            }
            if y < top {
                let c = column_of(x).unwrap_or_else(|| panic!("text at ({x}, {y}) outside every column's band"));
                column_ink[c as usize] += 1;
            } else {
                let r = row_of(y).unwrap_or_else(|| panic!("text at ({x}, {y}) outside every row's band"));
                row_ink[r as usize] += 1;
            }
        }
        assert!(column_ink.iter().all(|&n| n > 20), "column labels' dark pixels {column_ink:?}");
        assert!(row_ink.iter().all(|&n| n > 20), "row labels' dark pixels {row_ink:?}");
        // The labels differ where their values do: "neon: 0.5" has more ink than "neon: 0".
        assert!(column_ink[1] > column_ink[0], "{column_ink:?}");

        if let Ok(path) = std::env::var("LORA_STUDIO_GRID_PNG") {
            grid.save(path).unwrap();
        }
    }

    #[test]
    fn text_grows_with_the_cells() {
        let labels = |n: &str| axis_labels(n, &[0.5, 1.0]);
        let small = GridLayout::new(64, 64, &labels("neon"), &labels("ink"));
        let large = GridLayout::new(512, 512, &labels("neon"), &labels("ink"));
        assert!(large.top >= 3 * small.top, "top margins {} and {}", small.top, large.top);
        assert!(large.left >= 3 * small.left, "left margins {} and {}", small.left, large.left);
        assert!(large.top < 512 / 4, "the header stays a header: {}", large.top);
    }
}
