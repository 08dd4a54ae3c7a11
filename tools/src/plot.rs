//! A small PNG chart for the soak: throughput and replication lag over time, with the
//! fault periods shaded behind them. Drawn on an RGB canvas with a built-in 3x5 pixel
//! font (digits and the capitals the labels use) and encoded with the `png` crate.

use std::io::BufWriter;
use std::path::Path;

/// An RGB colour.
pub type Rgb = [u8; 3];

const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];

/// 3x5 glyphs, row by row from the top, three bits per row (the high bit left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' | 'O' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' | 'S' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'E' => [7, 4, 6, 4, 7],
        'G' => [7, 4, 5, 5, 7],
        'I' => [7, 2, 2, 2, 7],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [7, 5, 5, 5, 5],
        'P' => [7, 5, 7, 4, 4],
        'R' => [7, 5, 6, 5, 5],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'Y' => [5, 5, 2, 2, 2],
        '/' => [1, 1, 2, 4, 4],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        ',' => [0, 0, 0, 2, 4],
        _ => return None,
    })
}

/// An RGB canvas.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A canvas of `width` x `height` filled with white.
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas { width, height, pixels: vec![255; width * height * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let at = (y as usize * self.width + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&c);
        }
    }

    /// Fills the rectangle from (`x0`, `y0`) to (`x1`, `y1`), both inclusive.
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line two pixels wide (Bresenham).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                return;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// `text` (upper case; unknown characters leave a gap) with its top left at
    /// (`x`, `y`), each font pixel `scale` pixels wide.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Rgb) {
        for (n, ch) in text.chars().enumerate() {
            let Some(rows) = glyph(ch.to_ascii_uppercase()) else { continue };
            let left = x + n as i64 * 4 * scale;
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let (px, py) = (left + col * scale, y + row as i64 * scale);
                        self.rect(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
        }
    }

    /// Width in pixels of `text` at `scale`.
    pub fn text_width(text: &str, scale: i64) -> i64 {
        text.chars().count() as i64 * 4 * scale - scale
    }

    /// Writes the canvas as an 8-bit RGB PNG.
    pub fn write_png(&self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut encoder = png::Encoder::new(BufWriter::new(file), self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        writer.write_image_data(&self.pixels).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    }
}

/// The smallest of 1, 2, 5 x 10^k at or above `v` (1 for nothing to show).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= v).unwrap_or(10.0 * magnitude)
}

/// A shaded period behind the panels.
#[derive(Debug, Clone, Copy)]
pub struct Band {
    /// Start, in seconds.
    pub from_s: f64,
    /// End, in seconds.
    pub to_s: f64,
    /// Colour.
    pub colour: Rgb,
    /// Drawn as a strip along each panel's bottom, over the full-height bands (for
    /// periods that overlap others).
    pub strip: bool,
}

/// One panel: a titled series.
pub struct Panel<'a> {
    /// Title above the panel.
    pub title: &'a str,
    /// (seconds, value) points.
    pub points: &'a [(f64, f64)],
    /// Line colour.
    pub colour: Rgb,
}

/// Draws `panels` stacked over a shared time axis of `duration_s` seconds, `bands`
/// shaded behind each, a legend of `legend` below; writes the PNG to `path`.
pub fn chart(
    path: &Path,
    duration_s: f64,
    panels: &[Panel<'_>],
    bands: &[Band],
    legend: &[(&str, Rgb)],
) -> std::io::Result<()> {
    const WIDTH: i64 = 1200;
    const PANEL: i64 = 230;
    const LEFT: i64 = 80;
    const RIGHT: i64 = 20;
    const TOP: i64 = 30;
    const GAP: i64 = 50;
    const STRIP: i64 = 16;
    let height = TOP + panels.len() as i64 * (PANEL + GAP) + 60;
    let mut c = Canvas::new(WIDTH as usize, height as usize);
    let duration_s = duration_s.max(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x_of = |t: f64| LEFT + ((t / duration_s).clamp(0.0, 1.0) * plot_w as f64) as i64;
    let x_step = [10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0]
        .into_iter()
        .find(|s| duration_s / s <= 12.0)
        .unwrap_or(7200.0);
    for (n, panel) in panels.iter().enumerate() {
        let top = TOP + n as i64 * (PANEL + GAP);
        let bottom = top + PANEL;
        // Full-height bands first, then strips along the bottom (they overlap them).
        for b in bands.iter().filter(|b| !b.strip) {
            c.rect(x_of(b.from_s), top, x_of(b.to_s), bottom, b.colour);
        }
        for b in bands.iter().filter(|b| b.strip) {
            c.rect(x_of(b.from_s), bottom - STRIP, x_of(b.to_s), bottom, b.colour);
        }
        let max = nice_ceiling(panel.points.iter().map(|p| p.1).fold(0.0, f64::max));
        let y_of = |v: f64| bottom - ((v / max).clamp(0.0, 1.0) * PANEL as f64) as i64;
        for q in 0..=4 {
            let v = max * f64::from(q) / 4.0;
            let y = y_of(v);
            for x in (LEFT..WIDTH - RIGHT).step_by(4) {
                c.set(x, y, GRID);
            }
            let label = if max >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") };
            c.text(LEFT - 8 - Canvas::text_width(&label, 2), y - 5, &label, 2, BLACK);
        }
        let mut t = 0.0;
        while t <= duration_s {
            let x = x_of(t);
            for y in (top..bottom).step_by(4) {
                c.set(x, y, GRID);
            }
            let label = format!("{t:.0}");
            c.text(x - Canvas::text_width(&label, 2) / 2, bottom + 8, &label, 2, BLACK);
            t += x_step;
        }
        c.text(LEFT, top - 22, panel.title, 3, BLACK);
        // Frame.
        c.rect(LEFT, top, WIDTH - RIGHT, top, BLACK);
        c.rect(LEFT, bottom, WIDTH - RIGHT, bottom, BLACK);
        c.rect(LEFT, top, LEFT, bottom, BLACK);
        c.rect(WIDTH - RIGHT, top, WIDTH - RIGHT, bottom, BLACK);
        for w in panel.points.windows(2) {
            c.line((x_of(w[0].0), y_of(w[0].1)), (x_of(w[1].0), y_of(w[1].1)), panel.colour);
        }
    }
    let mut x = LEFT;
    let y = height - 30;
    c.text(x, y, "T S", 2, BLACK);
    x += 60;
    for (label, colour) in legend {
        c.rect(x, y - 2, x + 20, y + 12, *colour);
        c.text(x + 28, y, label, 2, BLACK);
        x += 48 + Canvas::text_width(label, 2);
    }
    c.write_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
        assert_eq!(nice_ceiling(50.0), 50.0);
    }

    #[test]
    fn a_chart_is_a_png_with_its_bands_and_lines() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("chart.png");
        let points: Vec<(f64, f64)> = (0..=60).map(|t| (f64::from(t), f64::from(t * 10))).collect();
        let red = [200, 0, 0];
        let band = Band { from_s: 20.0, to_s: 30.0, colour: [255, 200, 200], strip: false };
        let strip = Band { from_s: 40.0, to_s: 50.0, colour: [210, 210, 210], strip: true };
        chart(
            &path,
            60.0,
            &[Panel { title: "OPS/S", points: &points, colour: red }],
            &[band, strip],
            &[("KILL", band.colour), ("LOSSY", strip.colour)],
        )
        .expect("chart");
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).expect("open")));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        assert_eq!((info.width, info.color_type), (1200, png::ColorType::Rgb));
        let at = |x: usize, y: usize| {
            let i = (y * info.width as usize + x) * 3;
            [buf[i], buf[i + 1], buf[i + 2]]
        };
        // The band is shaded at 25 s, away from its lines; the series is drawn red
        // somewhere in the panel; white outside.
        let x25 = 80 + (25.0 / 60.0 * 1100.0) as usize;
        assert_eq!(at(x25 + 2, 60), [255, 200, 200]);
        // The strip shades only the panel's bottom (it spans 30 to 260).
        let x45 = 80 + (45.0 / 60.0 * 1100.0) as usize;
        assert_eq!(at(x45 + 2, 255), [210, 210, 210]);
        assert_ne!(at(x45 + 2, 60), [210, 210, 210]);
        let red_pixels = (0..buf.len() / 3).filter(|p| buf[p * 3..p * 3 + 3] == red).count();
        assert!(red_pixels > 500, "{red_pixels} red pixels");
        assert_eq!(at(5, 5), [255, 255, 255]);
    }
}
