//! PNG plots of benchmark sweeps (`bench moe --plot`).
//!
//! Drawn with plotters' bitmap backend into memory, then encoded as PNG. Text is rasterised by
//! ab_glyph from a font compiled into the binary (`assets/fonts/DejaVuSans-subset.ttf`, an
//! ASCII subset of DejaVu Sans, license beside it), so no system font library or font file is
//! needed at run time.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::backend::{BitMapBackend, DrawingBackend};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

/// Width and height of the plots, in pixels.
pub const SIZE: (u32, u32) = (1200, 720);

/// One budget of a sweep.
#[derive(Clone, Debug)]
pub struct SweepPoint {
    pub budget_bytes: u64,
    pub decode_tps: f64,
    /// Expert-cache hit rate, 0..=1.
    pub hit_rate: f64,
    /// llama.cpp's decode tok/s measured under the same budget (`--cgroup --llama-bench`).
    pub llama_tps: Option<f64>,
}

/// A sweep and the words around it.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The first title line (model file, policy, routing).
    pub title: String,
    /// The second, smaller line (threads, tokens, where misses come from).
    pub subtitle: String,
    /// What the budget is, for the x axis: "RAM budget".
    pub budget_name: String,
    pub points: Vec<SweepPoint>,
    /// llama.cpp's decode tok/s without a memory limit: drawn as a horizontal reference line.
    pub llama_unlimited: Option<f64>,
}

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-subset.ttf");
const TPS_COLOR: RGBColor = RGBColor(31, 119, 180);
const HIT_COLOR: RGBColor = RGBColor(214, 39, 40);
const LLAMA_COLOR: RGBColor = RGBColor(44, 160, 44);

/// Makes the embedded font plotters' "sans-serif" (once per process).
fn fonts() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if !ok {
        bail!("the embedded plot font could not be loaded");
    }
    Ok(())
}

/// Checks, before a long sweep, that `path` can be a plot: a `.png` name in an existing folder.
pub fn check_png_path(path: &Path) -> Result<()> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!(
            "--plot {}: the plot is a PNG, give a file name ending in .png",
            path.display()
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--plot {}: folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!("--plot {}: is a folder", path.display());
    }
    Ok(())
}

/// Draws `sweep` (decode tok/s on the left axis, hit rate % on the right, against the budget in
/// GiB) and writes it to `path` as a PNG of [`SIZE`].
pub fn write_sweep_png(path: &Path, sweep: &Sweep) -> Result<()> {
    check_png_path(path)?;
    let rgb = render(sweep, SIZE)?;
    let ctx = || format!("writing the plot to {}", path.display());
    // Open the file ourselves first: the encoder's own errors are less readable.
    std::fs::File::create(path).with_context(ctx)?;
    let mut out = BitMapBackend::new(path, SIZE);
    out.blit_bitmap((0, 0), SIZE, &rgb)
        .and_then(|_| out.present())
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(ctx)?;
    Ok(())
}

/// Draws `sweep` into an RGB buffer of `w` × `h` pixels.
pub fn render(sweep: &Sweep, (w, h): (u32, u32)) -> Result<Vec<u8>> {
    let pts: Vec<&SweepPoint> = sweep
        .points
        .iter()
        .filter(|p| p.decode_tps.is_finite() && p.hit_rate.is_finite())
        .collect();
    if sweep.points.is_empty() {
        bail!("nothing to plot: the sweep has no budgets");
    }
    if pts.is_empty() {
        bail!("nothing to plot: no budget of the sweep has a measurement");
    }
    fonts()?;
    let mut buf = vec![0u8; 3 * w as usize * h as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&root, sweep, &pts).map_err(|e| anyhow!("drawing the plot: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("drawing the plot: {e}"))?;
    }
    Ok(buf)
}

/// A series' line: 3 pixels wide.
fn line(c: RGBColor) -> ShapeStyle {
    ShapeStyle::from(c).stroke_width(3)
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    sweep: &Sweep,
    pts: &[&SweepPoint],
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let root = root.margin(8, 8, 12, 12);
    let root = root.titled(&sweep.title, ("sans-serif", 28))?;
    let root = root.titled(
        &sweep.subtitle,
        ("sans-serif", 17).into_font().color(&BLACK.mix(0.7)),
    )?;

    // Budgets in GiB; in MiB or KiB for models too small for that to read.
    let max_bytes = pts.iter().map(|p| p.budget_bytes).max().unwrap_or(0);
    let (unit, shift) = match max_bytes {
        b if b >= 1 << 30 => ("GiB", 30),
        b if b >= 1 << 20 => ("MiB", 20),
        _ => ("KiB", 10),
    };
    let gib = |b: u64| b as f64 / (1u64 << shift) as f64;
    let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(gib(p.budget_bytes)), hi.max(gib(p.budget_bytes)))
    });
    let pad = if hi - lo < 1e-9 {
        (0.1 * hi).max(0.25)
    } else {
        0.06 * (hi - lo)
    };
    let x = (lo - pad).max(0.0)..hi + pad;
    let llama_pts: Vec<(f64, f64)> = pts
        .iter()
        .filter_map(|p| {
            p.llama_tps
                .filter(|t| t.is_finite())
                .map(|t| (gib(p.budget_bytes), t))
        })
        .collect();
    let llama_line = sweep.llama_unlimited.filter(|t| t.is_finite());
    let top = pts
        .iter()
        .map(|p| p.decode_tps)
        .chain(llama_pts.iter().map(|p| p.1))
        .chain(llama_line)
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };

    let mut chart = ChartBuilder::on(&root)
        .margin(10)
        .margin_top(16)
        .x_label_area_size(56)
        .y_label_area_size(76)
        .right_y_label_area_size(76)
        .build_cartesian_2d(x.clone(), 0.0..top)?
        .set_secondary_coord(x.clone(), 0.0..105.0);
    chart
        .configure_mesh()
        .x_desc(format!("{} ({unit})", sweep.budget_name))
        .y_desc("decode tok/s")
        .x_label_formatter(&|v| {
            if x.end - x.start > 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .y_label_formatter(&|v| {
            if top > 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 19))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("expert-cache hit rate (%)")
        .y_label_formatter(&|v| format!("{v:.0}%"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 19))
        .draw()?;

    let tps: Vec<(f64, f64)> = pts
        .iter()
        .map(|p| (gib(p.budget_bytes), p.decode_tps))
        .collect();
    let hits: Vec<(f64, f64)> = pts
        .iter()
        .map(|p| (gib(p.budget_bytes), 100.0 * p.hit_rate))
        .collect();

    if let Some(t) = llama_line {
        chart
            .draw_series(DashedLineSeries::new(
                [(x.start, t), (x.end, t)],
                12,
                8,
                ShapeStyle::from(LLAMA_COLOR).stroke_width(2),
            ))?
            .label(format!("llama.cpp decode, no memory limit ({t:.2} tok/s)"))
            .legend(|(x, y)| {
                PathElement::new(
                    [(x, y), (x + 24, y)],
                    ShapeStyle::from(LLAMA_COLOR).stroke_width(2),
                )
            });
    }
    if !llama_pts.is_empty() {
        chart
            .draw_series(
                llama_pts
                    .iter()
                    .map(|&p| Cross::new(p, 8, ShapeStyle::from(LLAMA_COLOR).stroke_width(3))),
            )?
            .label("llama.cpp decode tok/s, same memory limit")
            .legend(|(x, y)| {
                Cross::new(
                    (x + 12, y),
                    6,
                    ShapeStyle::from(LLAMA_COLOR).stroke_width(3),
                )
            });
    }
    chart
        .draw_secondary_series(LineSeries::new(hits.iter().copied(), line(HIT_COLOR)))?
        .label("expert-cache hit rate, % (right axis)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], line(HIT_COLOR)));
    chart.draw_secondary_series(
        hits.iter()
            .map(|&p| TriangleMarker::new(p, 8, HIT_COLOR.filled())),
    )?;
    chart
        .draw_series(LineSeries::new(tps.iter().copied(), line(TPS_COLOR)))?
        .label("flowgate decode tok/s (left axis)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], line(TPS_COLOR)));
    chart.draw_series(tps.iter().map(|&p| Circle::new(p, 6, TPS_COLOR.filled())))?;
    // The tok/s figure next to each point: the table's numbers, readable off the plot.
    let value_style = ("sans-serif", 16)
        .into_font()
        .color(&TPS_COLOR)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(tps.iter().map(|&p| {
        EmptyElement::at(p) + Text::new(format!("{:.1}", p.1), (0, -10), value_style.clone())
    }))?;

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .margin(16)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(n: usize) -> Sweep {
        Sweep {
            title: "bench moe: moe7b.gguf, policy lfu, routing router".into(),
            subtitle: "CPU, 2 threads".into(),
            budget_name: "RAM budget".into(),
            points: (0..n)
                .map(|i| SweepPoint {
                    budget_bytes: (600 + 1000 * i as u64) << 20,
                    decode_tps: 7.0 + 12.0 * i as f64,
                    hit_rate: (0.3 + 0.25 * i as f64).min(1.0),
                    llama_tps: None,
                })
                .collect(),
            llama_unlimited: Some(51.66),
        }
    }

    /// Pixels that are not the white background, in rows `rows` of an RGB buffer of width `w`.
    fn inked(rgb: &[u8], w: u32, rows: std::ops::Range<u32>) -> usize {
        let row = 3 * w as usize;
        rgb[rows.start as usize * row..rows.end as usize * row]
            .chunks(3)
            .filter(|p| p != &[255, 255, 255])
            .count()
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 33, "{} bytes", bytes.len());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    #[test]
    fn sweep_renders_to_a_png_of_the_expected_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sweep.png");
        write_sweep_png(&p, &sweep(4)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(png_size(&bytes), SIZE);
        // Colour type 2 (RGB), 8 bits.
        assert_eq!((bytes[24], bytes[25]), (8, 2));
    }

    #[test]
    fn rendering_draws_series_and_text() {
        let (w, h) = SIZE;
        for n in [1, 4] {
            let rgb = render(&sweep(n), SIZE).unwrap();
            assert_eq!(rgb.len(), 3 * (w * h) as usize);
            let total = inked(&rgb, w, 0..h);
            assert!(
                total > (w * h / 50) as usize,
                "{n} budgets: {total} inked pixels"
            );
            // The top rows hold only the title: ink there is rendered text.
            let title = inked(&rgb, w, 0..40);
            assert!(title > 500, "{n} budgets: title drew {title} pixels");
            // Both series' colours are there.
            for c in [TPS_COLOR, HIT_COLOR, LLAMA_COLOR] {
                let n_c = rgb.chunks(3).filter(|p| p == &[c.0, c.1, c.2]).count();
                assert!(n_c > 100, "{n} budgets: colour {c:?} drew {n_c} pixels");
            }
        }
    }

    #[test]
    fn llama_points_and_missing_values_are_drawn_without_error() {
        let mut s = sweep(3);
        s.llama_unlimited = None;
        s.points[0].llama_tps = Some(0.29);
        s.points[1].llama_tps = Some(f64::NAN);
        s.points[2].decode_tps = f64::NAN;
        render(&s, SIZE).unwrap();
    }

    #[test]
    fn empty_sweep_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("empty.png");
        let e = write_sweep_png(&p, &sweep(0)).unwrap_err().to_string();
        assert!(e.contains("no budgets"), "{e}");
        assert!(!p.exists());
        let mut s = sweep(1);
        s.points[0].decode_tps = f64::NAN;
        let e = render(&s, SIZE).unwrap_err().to_string();
        assert!(e.contains("nothing to plot"), "{e}");
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("no/such/folder/plot.png");
        let e = format!("{:#}", write_sweep_png(&missing, &sweep(2)).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
        let folder = d.path().join("a.png");
        std::fs::create_dir(&folder).unwrap();
        let e = format!("{:#}", write_sweep_png(&folder, &sweep(2)).unwrap_err());
        assert!(e.contains("is a folder"), "{e}");
        let e = format!(
            "{:#}",
            write_sweep_png(&d.path().join("plot.jpg"), &sweep(2)).unwrap_err()
        );
        assert!(e.contains(".png"), "{e}");
        // A folder that exists but cannot be written (as root, every folder can be: skip).
        let ro = d.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        let mut perm = std::fs::metadata(&ro).unwrap().permissions();
        perm.set_readonly(true);
        std::fs::set_permissions(&ro, perm).unwrap();
        let p = ro.join("plot.png");
        if std::fs::File::create(ro.join("probe")).is_err() {
            let e = format!("{:#}", write_sweep_png(&p, &sweep(2)).unwrap_err());
            assert!(
                e.contains("writing the plot to") && e.contains("ro/plot.png"),
                "{e}"
            );
        }
    }
}
