//! A synthetic world for pretraining the built-in model offline: procedurally drawn scenes of one
//! to three shapes in named colours on patterned backgrounds, each with a caption that says all of
//! it; three procedural style datasets (for LoRA examples); and a deterministic image analyser that
//! judges whether an image shows what a scene spec asked for (colours, background, shapes).
//!
//! Everything is deterministic from our seeded [`Rng`]; drawing is integer rasterisation without
//! anti-aliasing (pixel centres tested against the shape), so it is simple and fast.

use image::{Rgb, RgbImage};

use lora_studio::engine::rng::Rng;

/// The default image side.
pub const DEFAULT_SIZE: u32 = 64;

/// Named colours, pairwise ≥ 100 apart in RGB so a generated colour maps back unambiguously.
pub const COLOURS: [(&str, [u8; 3]); 11] = [
    ("red", [215, 25, 35]),
    ("orange", [245, 125, 10]),
    ("yellow", [245, 235, 20]),
    ("green", [30, 170, 45]),
    ("cyan", [40, 215, 225]),
    ("blue", [30, 60, 220]),
    ("purple", [145, 40, 200]),
    ("pink", [255, 140, 215]),
    ("brown", [115, 60, 20]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];

/// An index into [`COLOURS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Colour(pub usize);

impl Colour {
    pub fn name(self) -> &'static str {
        COLOURS[self.0].0
    }
    pub fn rgb(self) -> [u8; 3] {
        COLOURS[self.0].1
    }
    pub fn all() -> impl Iterator<Item = Colour> {
        (0..COLOURS.len()).map(Colour)
    }
    pub fn from_name(name: &str) -> Option<Colour> {
        COLOURS.iter().position(|(n, _)| *n == name).map(Colour)
    }
    /// The named colour nearest to `rgb` (squared Euclidean distance), and that distance.
    pub fn nearest(rgb: [f32; 3]) -> (Colour, f32) {
        let mut best = (Colour(0), f32::INFINITY);
        for c in Colour::all() {
            let d = dist2(rgb, to_f32(c.rgb()));
            if d < best.1 {
                best = (c, d);
            }
        }
        (best.0, best.1.sqrt())
    }
    fn luminance(self) -> f32 {
        let [r, g, b] = self.rgb();
        0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
}

impl Shape {
    pub const ALL: [Shape; 5] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star, Shape::Ring];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Ring => "ring",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Size {
    Small,
    Big,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Big => "big",
        }
    }
    /// Radius as a fraction of a grid cell's side.
    fn radius(self) -> f32 {
        match self {
            Size::Small => 0.27,
            Size::Big => 0.45,
        }
    }
}

/// The background's texture; its colour is a [`Colour`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    Solid,
    Gradient,
    Stripes,
    Dots,
    Checker,
    Noise,
}

impl Pattern {
    pub const ALL: [Pattern; 6] =
        [Pattern::Solid, Pattern::Gradient, Pattern::Stripes, Pattern::Dots, Pattern::Checker, Pattern::Noise];
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Solid => "solid",
            Pattern::Gradient => "gradient",
            Pattern::Stripes => "stripes",
            Pattern::Dots => "dots",
            Pattern::Checker => "checker",
            Pattern::Noise => "noise",
        }
    }
    /// The caption's adjective: "a striped yellow background".
    pub fn adjective(self) -> &'static str {
        match self {
            Pattern::Solid => "plain",
            Pattern::Gradient => "gradient",
            Pattern::Stripes => "striped",
            Pattern::Dots => "dotted",
            Pattern::Checker => "checkered",
            Pattern::Noise => "noisy",
        }
    }
}

/// Positions are the cells of a 3×3 grid (0 = top left, 4 = centre, 8 = bottom right); shapes of
/// one scene sit in different cells, so they never overlap.
pub const POSITIONS: [&str; 9] = [
    "in the top left",
    "at the top",
    "in the top right",
    "on the left",
    "in the centre",
    "on the right",
    "in the bottom left",
    "at the bottom",
    "in the bottom right",
];

#[derive(Clone, Debug, PartialEq)]
pub struct ShapeSpec {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// Grid cell 0..9 (see [`POSITIONS`]).
    pub cell: usize,
    /// Centre offset inside the cell, as a fraction of the free slack in [-1, 1].
    pub jitter: (f32, f32),
}

impl ShapeSpec {
    /// Centre and radius in pixels for an image of side `size`.
    pub fn geometry(&self, size: u32) -> (f32, f32, f32) {
        let cell = size as f32 / 3.0;
        let r = self.size.radius() * cell;
        let slack = (cell / 2.0 - r - 1.0).max(0.0);
        let (col, row) = ((self.cell % 3) as f32, (self.cell / 3) as f32);
        let cx = (col + 0.5) * cell + self.jitter.0 * slack;
        let cy = (row + 0.5) * cell + self.jitter.1 * slack;
        (cx, cy, r)
    }

    pub fn phrase(&self) -> String {
        format!("a {} {} {} {}", self.size.name(), self.colour.name(), self.shape.name(), POSITIONS[self.cell])
    }
}

/// Everything a scene shows; fields public so an analyser's verdict can be checked against it.
#[derive(Clone, Debug, PartialEq)]
pub struct SceneSpec {
    pub shapes: Vec<ShapeSpec>,
    pub background: Colour,
    pub pattern: Pattern,
    /// Seed of the background's noise texture.
    pub texture_seed: u64,
}

pub type Scene = SceneSpec;

impl SceneSpec {
    /// A random scene: 1–3 shapes in distinct cells, each in a colour different from the background.
    pub fn sample(rng: &mut Rng) -> Self {
        let background = Colour(rng.below(COLOURS.len()));
        let pattern = Pattern::ALL[rng.below(Pattern::ALL.len())];
        let n = 1 + rng.below(3);
        let mut cells: Vec<usize> = (0..9).collect();
        rng.shuffle(&mut cells);
        let mut shapes = Vec::with_capacity(n);
        for &cell in cells.iter().take(n) {
            let mut colour = Colour(rng.below(COLOURS.len() - 1));
            if colour.0 >= background.0 {
                colour.0 += 1;
            }
            shapes.push(ShapeSpec {
                shape: Shape::ALL[rng.below(Shape::ALL.len())],
                colour,
                size: if rng.below(2) == 0 { Size::Small } else { Size::Big },
                cell,
                jitter: (rng.uniform_f32() * 2.0 - 1.0, rng.uniform_f32() * 2.0 - 1.0),
            });
        }
        // Reading order in the caption: top left to bottom right.
        shapes.sort_by_key(|s| s.cell);
        Self { shapes, background, pattern, texture_seed: rng.next_u64() }
    }

    /// "a small red star in the top left and a big blue circle in the centre on a striped yellow
    /// background".
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self.shapes.iter().map(ShapeSpec::phrase).collect();
        let objects = match parts.len() {
            0 => "nothing".to_string(),
            1 => parts[0].clone(),
            n => format!("{} and {}", parts[..n - 1].join(", "), parts[n - 1]),
        };
        format!("{objects} on a {} {} background", self.pattern.adjective(), self.background.name())
    }

    /// The scene drawn at `size`×`size` pixels.
    pub fn render(&self, size: u32) -> RgbImage {
        let mut img = RgbImage::new(size, size);
        draw_background(&mut img, self.background, self.pattern, self.texture_seed);
        for s in &self.shapes {
            let (cx, cy, r) = s.geometry(size);
            fill_shape(&mut img, s.shape, cx, cy, r, s.colour.rgb());
        }
        img
    }
}

/// How far (per channel) the background's two tones lie either side of its named colour.
const TONE: f32 = 24.0;
/// The dots' offset from the background colour (towards the middle grey).
const DOT_TONE: f32 = 40.0;
/// Pixels further than this from the background estimate count as foreground.
const FOREGROUND_DISTANCE: f32 = 75.0;

fn shade(rgb: [u8; 3], delta: f32) -> Rgb<u8> {
    Rgb(rgb.map(|c| (c as f32 + delta).round().clamp(0.0, 255.0) as u8))
}

fn draw_background(img: &mut RgbImage, colour: Colour, pattern: Pattern, seed: u64) {
    let size = img.width().max(1);
    let base = colour.rgb();
    // Period of stripes, dots and checker cells: 8 px at 64 px.
    let period = (size / 8).max(2);
    let half = period / 2;
    let towards_grey = if colour.luminance() > 128.0 { -1.0 } else { 1.0 };
    let mut rng = Rng::new(seed);
    let block = (size / 16).max(1);
    let blocks = size.div_ceil(block) as usize;
    let noise: Vec<f32> = (0..blocks * blocks).map(|_| (rng.uniform_f32() * 2.0 - 1.0) * TONE * 1.5).collect();
    for y in 0..img.height() {
        for x in 0..img.width() {
            let px = match pattern {
                Pattern::Solid => Rgb(base),
                Pattern::Gradient => {
                    let t = if size > 1 { y as f32 / (size - 1) as f32 } else { 0.5 };
                    shade(base, TONE * 1.5 * (1.0 - 2.0 * t))
                }
                Pattern::Stripes => shade(base, if (y / half).is_multiple_of(2) { TONE } else { -TONE }),
                Pattern::Checker => shade(base, if (x / half + y / half).is_multiple_of(2) { TONE } else { -TONE }),
                Pattern::Dots => {
                    let (dx, dy) = ((x % period) as i32 - half as i32, (y % period) as i32 - half as i32);
                    let r = (period as f32 * 0.2).max(1.0);
                    if ((dx * dx + dy * dy) as f32) <= r * r { shade(base, towards_grey * DOT_TONE) } else { Rgb(base) }
                }
                Pattern::Noise => {
                    let i = (y / block) as usize * blocks + (x / block) as usize;
                    shade(base, noise[i])
                }
            };
            img.put_pixel(x, y, px);
        }
    }
}

/// Whether the pixel centre offset (dx, dy) from a shape's centre lies inside it (radius r).
pub fn inside(shape: Shape, dx: f32, dy: f32, r: f32) -> bool {
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        Shape::Ring => {
            let d2 = dx * dx + dy * dy;
            d2 <= r * r && d2 >= (0.55 * r) * (0.55 * r)
        }
        // Same area as the circle's bounding box would exaggerate squares; 0.9 r keeps sizes alike.
        Shape::Square => dx.abs() <= 0.9 * r && dy.abs() <= 0.9 * r,
        Shape::Triangle => {
            // Apex at the top; base at the bottom, 2r wide.
            dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0
        }
        Shape::Star => {
            let points = star_polygon(r);
            point_in_polygon(dx, dy, &points)
        }
    }
}

fn star_polygon(r: f32) -> [(f32, f32); 10] {
    let mut p = [(0.0, 0.0); 10];
    for (i, q) in p.iter_mut().enumerate() {
        let radius = if i % 2 == 0 { r } else { 0.45 * r };
        let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
        *q = (radius * a.cos(), radius * a.sin());
    }
    p
}

fn point_in_polygon(x: f32, y: f32, poly: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let ((xi, yi), (xj, yj)) = (poly[i], poly[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

fn fill_shape(img: &mut RgbImage, shape: Shape, cx: f32, cy: f32, r: f32, rgb: [u8; 3]) {
    for_each_inside(img.width(), img.height(), shape, cx, cy, r, |x, y| img.put_pixel(x, y, Rgb(rgb)));
}

fn for_each_inside(w: u32, h: u32, shape: Shape, cx: f32, cy: f32, r: f32, mut f: impl FnMut(u32, u32)) {
    let (x0, x1) = (((cx - r - 1.0).floor().max(0.0)) as u32, ((cx + r + 1.0).ceil().max(0.0) as u32).min(w));
    let (y0, y1) = (((cy - r - 1.0).floor().max(0.0)) as u32, ((cy + r + 1.0).ceil().max(0.0) as u32).min(h));
    for y in y0..y1 {
        for x in x0..x1 {
            if inside(shape, x as f32 + 0.5 - cx, y as f32 + 0.5 - cy, r) {
                f(x, y);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Style datasets (for LoRA examples)

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Style {
    /// Pastel palette, soft offset washes on white paper. (White, not cream: the built-in model's
    /// VAE decodes a cream like (250, 242, 225) as (239, 239, 240), so no adapter could draw it.)
    Watercolour,
    /// Bright outlines with a dim glow on black.
    Neon,
    /// The scene as square tiles with dark grout and per-tile colour jitter.
    Mosaic,
}

impl Style {
    pub const ALL: [Style; 3] = [Style::Watercolour, Style::Neon, Style::Mosaic];
    pub fn name(self) -> &'static str {
        match self {
            Style::Watercolour => "watercolour",
            Style::Neon => "neon",
            Style::Mosaic => "mosaic",
        }
    }
    pub fn from_name(name: &str) -> Option<Style> {
        Style::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// One image of `style` at the default size, with its caption.
pub fn style_scene(style: Style, rng: &mut Rng) -> (RgbImage, String) {
    style_scene_sized(style, rng, DEFAULT_SIZE)
}

fn mix(a: [u8; 3], b: [u8; 3], t: f32) -> [u8; 3] {
    [0, 1, 2].map(|i| (a[i] as f32 * (1.0 - t) + b[i] as f32 * t).round() as u8)
}

pub fn style_scene_sized(style: Style, rng: &mut Rng, size: u32) -> (RgbImage, String) {
    let mut spec = SceneSpec::sample(rng);
    let objects: Vec<String> =
        spec.shapes.iter().map(|s| format!("a {} {}", s.colour.name(), s.shape.name())).collect();
    let objects = objects.join(" and ");
    match style {
        Style::Watercolour => {
            let paper = [255, 254, 250];
            let mut img = RgbImage::from_pixel(size, size, Rgb(paper));
            // Paper grain.
            for p in img.pixels_mut() {
                let g = (rng.uniform_f32() * 10.0) as u8;
                *p = Rgb(p.0.map(|c| c.saturating_sub(g)));
            }
            for s in &spec.shapes {
                let (cx, cy, r) = s.geometry(size);
                let pastel = mix(s.colour.rgb(), [255, 255, 255], 0.55);
                // Three translucent washes, slightly offset and resized: darker where they overlap.
                for _ in 0..3 {
                    let (ox, oy) = ((rng.uniform_f32() - 0.5) * 0.3 * r, (rng.uniform_f32() - 0.5) * 0.3 * r);
                    let rr = r * (0.85 + 0.3 * rng.uniform_f32());
                    let (w, h) = (img.width(), img.height());
                    let mut hits = Vec::new();
                    for_each_inside(w, h, s.shape, cx + ox, cy + oy, rr, |x, y| hits.push((x, y)));
                    for (x, y) in hits {
                        let p = img.get_pixel(x, y).0;
                        let q = [0, 1, 2].map(|i| ((p[i] as u32 * pastel[i] as u32) / 255) as u8);
                        img.put_pixel(x, y, Rgb(mix(p, q, 0.5)));
                    }
                }
            }
            (img, format!("a pastel watercolour painting of {objects} on paper"))
        }
        Style::Neon => {
            let mut img = RgbImage::new(size, size);
            for s in &spec.shapes {
                let (cx, cy, r) = s.geometry(size);
                let neon = mix(s.colour.rgb(), [255, 255, 255], 0.15);
                let (w, h) = (size as i32, size as i32);
                let mut mask = vec![false; (w * h) as usize];
                for_each_inside(size, size, s.shape, cx, cy, r, |x, y| mask[(y as i32 * w + x as i32) as usize] = true);
                let at = |x: i32, y: i32| x >= 0 && y >= 0 && x < w && y < h && mask[(y * w + x) as usize];
                for y in 0..h {
                    for x in 0..w {
                        // Distance (in the 8-neighbourhood) to the shape's edge: 0 on the outline.
                        let near = |d: i32| (-d..=d).any(|j| (-d..=d).any(|i| at(x + i, y + j) != at(x, y)));
                        let px = if at(x, y) && near(1) {
                            Some(neon)
                        } else if near(2) {
                            Some(mix([0, 0, 0], neon, 0.35))
                        } else {
                            None
                        };
                        if let Some(c) = px {
                            let old = img.get_pixel(x as u32, y as u32).0;
                            img.put_pixel(x as u32, y as u32, Rgb([0, 1, 2].map(|i| old[i].max(c[i]))));
                        }
                    }
                }
            }
            (img, format!("neon outlines of {objects} glowing on black"))
        }
        Style::Mosaic => {
            spec.pattern = Pattern::Solid;
            let plain = spec.render(size);
            let tile = (size / 10).max(2);
            let mut img = RgbImage::new(size, size);
            for ty in (0..size).step_by(tile as usize) {
                for tx in (0..size).step_by(tile as usize) {
                    let c = plain.get_pixel((tx + tile / 2).min(size - 1), (ty + tile / 2).min(size - 1)).0;
                    let j = (rng.uniform_f32() - 0.5) * 40.0;
                    let c = shade(c, j).0;
                    for y in ty..(ty + tile).min(size) {
                        for x in tx..(tx + tile).min(size) {
                            let grout = x == tx || y == ty;
                            img.put_pixel(x, y, if grout { Rgb([60, 55, 50]) } else { Rgb(c) });
                        }
                    }
                }
            }
            (img, format!("a mosaic of {objects} on a {} background", spec.background.name()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The analyser

/// What the analyser saw where a spec put one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeVerdict {
    /// Dominant named colour of the foreground pixels in the shape's cell (none: no foreground).
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
    /// Foreground pixels / bounding-box area.
    pub fill_ratio: f32,
    pub foreground_pixels: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    pub background: Colour,
    /// The background estimate's distance to the named colour (large: not really that colour).
    pub background_distance: f32,
    pub pattern: Pattern,
    pub shapes: Vec<ShapeVerdict>,
}

/// Right/wrong per property, for accuracy figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Judgement {
    /// Every shape's colour as asked.
    pub foreground_colour: bool,
    /// Fraction of shapes in the asked colour.
    pub foreground_colour_fraction: f32,
    pub background_colour: bool,
    pub pattern: bool,
    /// Fraction of shapes recognised as the asked shape.
    pub shape_fraction: f32,
}

fn to_f32(c: [u8; 3]) -> [f32; 3] {
    c.map(|v| v as f32)
}

fn dist2(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum()
}

/// The background's colour: the named colour most pixels of a border ring are nearest to, and the
/// mean of those pixels (a pattern's two tones both lie near its named colour; shapes reaching the
/// border vote for other colours).
fn background_estimate(img: &RgbImage) -> [f32; 3] {
    let (w, h) = img.dimensions();
    let ring = (w.min(h) / 32).max(1);
    let border: Vec<([f32; 3], Colour)> = img
        .enumerate_pixels()
        .filter(|(x, y, _)| *x < ring || *y < ring || *x >= w - ring || *y >= h - ring)
        .map(|(_, _, p)| (to_f32(p.0), Colour::nearest(to_f32(p.0)).0))
        .collect();
    let mut votes = vec![0usize; COLOURS.len()];
    for (_, c) in &border {
        votes[c.0] += 1;
    }
    let winner = (0..votes.len()).max_by_key(|&i| votes[i]).unwrap_or(0);
    let mut est = [0f32; 3];
    let n = votes[winner].max(1) as f32;
    for (p, c) in &border {
        if c.0 == winner {
            for i in 0..3 {
                est[i] += p[i] / n;
            }
        }
    }
    est
}

fn pearson(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (ma, mb) = (a[..n].iter().sum::<f32>() / n as f32, b[..n].iter().sum::<f32>() / n as f32);
    let (mut sab, mut saa, mut sbb) = (0f32, 0f32, 0f32);
    for i in 0..n {
        let (da, db) = (a[i] - ma, b[i] - mb);
        sab += da * db;
        saa += da * da;
        sbb += db * db;
    }
    if saa <= 1e-6 || sbb <= 1e-6 { 0.0 } else { sab / (saa * sbb).sqrt() }
}

/// Pattern statistics of the background (luminance; foreground pixels are left out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PatternStats {
    pub std: f32,
    /// Share of the variance explained by row means (patterns that vary with y only).
    pub row_share: f32,
    /// Correlation of row means with y (monotonic: a gradient).
    pub row_trend: f32,
    /// Autocorrelation at half and one pattern period (x and y averaged).
    pub ac_half: f32,
    pub ac_period: f32,
}

pub fn pattern_stats(img: &RgbImage, is_background: &dyn Fn(u32, u32) -> bool) -> PatternStats {
    let (w, h) = img.dimensions();
    let lum = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32
    };
    let mut all = Vec::new();
    let mut row_means = Vec::new();
    let mut row_ys = Vec::new();
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for y in 0..h {
        let row: Vec<f32> = (0..w).filter(|&x| is_background(x, y)).map(|x| lum(x, y)).collect();
        if row.len() >= (w as usize) / 4 {
            row_means.push(row.iter().sum::<f32>() / row.len() as f32);
            row_ys.push(y as f32);
        }
        all.extend_from_slice(&row);
        rows.push(row);
    }
    if all.len() < 16 {
        return PatternStats::default();
    }
    let mean = all.iter().sum::<f32>() / all.len() as f32;
    let var = all.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / all.len() as f32;
    // Within-row variance: what the row means do not explain.
    let mut within = 0f32;
    let mut count = 0usize;
    for row in &rows {
        if row.len() >= (w as usize) / 4 {
            let m = row.iter().sum::<f32>() / row.len() as f32;
            within += row.iter().map(|v| (v - m).powi(2)).sum::<f32>();
            count += row.len();
        }
    }
    let within = if count > 0 { within / count as f32 } else { var };
    let row_share = if var > 1e-6 { (1.0 - within / var).clamp(0.0, 1.0) } else { 0.0 };
    let period = (w / 8).max(2);
    let autocorr = |lag: u32| {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for y in 0..h {
            for x in 0..w {
                if x + lag < w && is_background(x, y) && is_background(x + lag, y) {
                    a.push(lum(x, y));
                    b.push(lum(x + lag, y));
                }
                if y + lag < h && is_background(x, y) && is_background(x, y + lag) {
                    a.push(lum(x, y));
                    b.push(lum(x, y + lag));
                }
            }
        }
        pearson(&a, &b)
    };
    PatternStats {
        std: var.sqrt(),
        row_share,
        row_trend: pearson(&row_means, &row_ys),
        ac_half: autocorr(period / 2),
        ac_period: autocorr(period),
    }
}

/// The pattern the statistics point to.
pub fn classify_pattern(s: &PatternStats) -> Pattern {
    if s.std < 6.0 {
        Pattern::Solid
    } else if s.row_share > 0.75 {
        if s.row_trend.abs() > 0.85 { Pattern::Gradient } else { Pattern::Stripes }
    } else if s.ac_half < -0.4 {
        Pattern::Checker
    } else if s.ac_period > 0.35 {
        Pattern::Dots
    } else {
        Pattern::Noise
    }
}

/// Shape from a blob's mask inside its bounding box: fill ratio (circle ≈ 0.785, square ≈ 1,
/// triangle ≈ 0.5, star ≈ 0.4, ring ≈ 0.55 with a hole), top/bottom balance and the centre hole.
pub fn classify_shape(mask: &[bool], w: usize, h: usize) -> (Option<Shape>, f32) {
    let (mut x0, mut x1, mut y0, mut y1, mut n) = (usize::MAX, 0, usize::MAX, 0, 0usize);
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
                n += 1;
            }
        }
    }
    if n < 4 {
        return (None, 0.0);
    }
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let fill = n as f32 / (bw * bh) as f32;
    let count = |ya: usize, yb: usize| (ya..yb).map(|y| (x0..=x1).filter(|&x| mask[y * w + x]).count()).sum::<usize>();
    let mid = y0 + bh / 2;
    let (top, bottom) = (count(y0, mid), count(mid + bh % 2, y1 + 1));
    let balance = top as f32 / bottom.max(1) as f32;
    let (cx, cy) = ((x0 + x1) / 2, (y0 + y1) / 2);
    // Both middle pixels of an even side must be empty too.
    let hole = (cy..=(cy + 1 - bh % 2).min(y1)).all(|y| (cx..=(cx + 1 - bw % 2).min(x1)).all(|x| !mask[y * w + x]));
    let shape = if hole && fill > 0.3 {
        Shape::Ring
    } else if fill > 0.9 {
        Shape::Square
    } else if balance < 0.6 {
        Shape::Triangle
    } else if fill > 0.62 {
        Shape::Circle
    } else {
        Shape::Star
    };
    (Some(shape), fill)
}

/// Judges `img` (any size; scenes are laid out on the same 3×3 grid) against what `spec` asked.
pub fn analyse(img: &RgbImage, spec: &SceneSpec) -> Analysis {
    let (w, h) = img.dimensions();
    let bg = background_estimate(img);
    let (background, background_distance) = Colour::nearest(bg);
    let is_fg = |x: u32, y: u32| dist2(to_f32(img.get_pixel(x, y).0), bg) >= FOREGROUND_DISTANCE.powi(2);
    let pattern = classify_pattern(&pattern_stats(img, &|x, y| !is_fg(x, y)));
    let cell_w = w as f32 / 3.0;
    let cell_h = h as f32 / 3.0;
    let shapes = spec
        .shapes
        .iter()
        .map(|s| {
            let (col, row) = ((s.cell % 3) as f32, (s.cell / 3) as f32);
            let (x0, x1) = ((col * cell_w).floor() as u32, (((col + 1.0) * cell_w).ceil() as u32).min(w));
            let (y0, y1) = ((row * cell_h).floor() as u32, (((row + 1.0) * cell_h).ceil() as u32).min(h));
            let (cw, ch) = ((x1 - x0) as usize, (y1 - y0) as usize);
            let mut mask = vec![false; cw * ch];
            let mut votes = vec![0usize; COLOURS.len()];
            for y in y0..y1 {
                for x in x0..x1 {
                    if is_fg(x, y) {
                        mask[(y - y0) as usize * cw + (x - x0) as usize] = true;
                        votes[Colour::nearest(to_f32(img.get_pixel(x, y).0)).0.0] += 1;
                    }
                }
            }
            let pixels: usize = votes.iter().sum();
            // A few stray pixels are not a shape.
            let min_pixels = (cw * ch / 40).max(3);
            if pixels < min_pixels {
                return ShapeVerdict { colour: None, shape: None, fill_ratio: 0.0, foreground_pixels: pixels };
            }
            let best = (0..votes.len()).max_by_key(|&i| votes[i]).map(Colour);
            let (shape, fill_ratio) = classify_shape(&mask, cw, ch);
            ShapeVerdict { colour: best, shape, fill_ratio, foreground_pixels: pixels }
        })
        .collect();
    Analysis { background, background_distance, pattern, shapes }
}

/// `analyse`, scored against the spec.
pub fn judge(img: &RgbImage, spec: &SceneSpec) -> Judgement {
    let a = analyse(img, spec);
    let n = spec.shapes.len().max(1) as f32;
    let colour_hits = spec.shapes.iter().zip(&a.shapes).filter(|(s, v)| v.colour == Some(s.colour)).count();
    let shape_hits = spec.shapes.iter().zip(&a.shapes).filter(|(s, v)| v.shape == Some(s.shape)).count();
    Judgement {
        foreground_colour: colour_hits == spec.shapes.len(),
        foreground_colour_fraction: colour_hits as f32 / n,
        background_colour: a.background == spec.background,
        pattern: a.pattern == spec.pattern,
        shape_fraction: shape_hits as f32 / n,
    }
}

/// Mean accuracies over many judgements.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Accuracy {
    pub count: usize,
    /// Scenes with every shape in the asked colour.
    pub foreground_colour: f64,
    /// Shapes in the asked colour.
    pub shape_colour: f64,
    pub background_colour: f64,
    pub pattern: f64,
    pub shape: f64,
}

impl Accuracy {
    pub fn from_judgements(js: &[Judgement]) -> Self {
        let n = js.len().max(1) as f64;
        let frac = |f: &dyn Fn(&Judgement) -> f64| js.iter().map(f).sum::<f64>() / n;
        Self {
            count: js.len(),
            foreground_colour: frac(&|j| j.foreground_colour as u8 as f64),
            shape_colour: frac(&|j| j.foreground_colour_fraction as f64),
            background_colour: frac(&|j| j.background_colour as u8 as f64),
            pattern: frac(&|j| j.pattern as u8 as f64),
            shape: frac(&|j| j.shape_fraction as f64),
        }
    }
}

/// An endless, seeded stream of scenes.
pub struct SceneStream {
    rng: Rng,
}

impl SceneStream {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed) }
    }
}

impl Iterator for SceneStream {
    type Item = SceneSpec;
    fn next(&mut self) -> Option<SceneSpec> {
        Some(SceneSpec::sample(&mut self.rng))
    }
}

/// `(B, 3, size, size)` in [-1, 1] from images (what the VAE takes).
pub fn images_to_tensor(
    images: &[RgbImage],
    device: &candle_core::Device,
) -> lora_studio::engine::Result<candle_core::Tensor> {
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for img in images {
        anyhow::ensure!(img.dimensions() == (w, h), "images of one batch must have one size");
        for c in 0..3 {
            data.extend(img.pixels().map(|p| p.0[c] as f32 / 127.5 - 1.0));
        }
    }
    Ok(candle_core::Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)?)
}

/// Peak signal-to-noise ratio in dB between two images of one size.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len().max(1) as f64;
    let mse = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / n;
    if mse == 0.0 { 99.0 } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_is_well_separated() {
        for a in Colour::all() {
            for b in Colour::all().filter(|b| b.0 > a.0) {
                let d = dist2(to_f32(a.rgb()), to_f32(b.rgb())).sqrt();
                assert!(d >= 100.0, "{} and {} are only {d:.0} apart", a.name(), b.name());
            }
        }
    }

    #[test]
    fn same_seed_same_scene_and_pixels() {
        let a = SceneSpec::sample(&mut Rng::new(9));
        let b = SceneSpec::sample(&mut Rng::new(9));
        assert_eq!(a, b);
        assert_eq!(a.render(64), b.render(64));
        assert_ne!(a, SceneSpec::sample(&mut Rng::new(10)));
    }

    #[test]
    fn caption_names_everything() {
        let mut rng = Rng::new(1);
        for _ in 0..50 {
            let s = SceneSpec::sample(&mut rng);
            let c = s.caption();
            assert!(c.contains(s.background.name()) && c.contains(s.pattern.adjective()), "{c}");
            for sh in &s.shapes {
                assert!(c.contains(&sh.phrase()), "{c}");
                assert_ne!(sh.colour, s.background);
            }
        }
    }

    #[test]
    fn shapes_have_the_expected_fill_ratios() {
        for (shape, lo, hi) in [
            (Shape::Circle, 0.7, 0.85),
            (Shape::Square, 0.95, 1.01),
            (Shape::Triangle, 0.45, 0.6),
            (Shape::Star, 0.3, 0.5),
            (Shape::Ring, 0.45, 0.65),
        ] {
            let n = 41;
            let r = 18.0;
            let mask: Vec<bool> = (0..n * n)
                .map(|i| inside(shape, (i % n) as f32 + 0.5 - 20.5, (i / n) as f32 + 0.5 - 20.5, r))
                .collect();
            let (guess, fill) = classify_shape(&mask, n, n);
            assert!((lo..hi).contains(&fill), "{shape:?}: fill {fill}");
            assert_eq!(guess, Some(shape), "fill {fill}");
        }
    }

    #[test]
    fn styles_render_with_captions() {
        let mut rng = Rng::new(3);
        for style in Style::ALL {
            let (img, caption) = style_scene(style, &mut rng);
            assert_eq!(img.dimensions(), (64, 64));
            assert!(!caption.is_empty());
        }
    }
}
