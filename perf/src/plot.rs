//! The latency-percentile chart: one curve per run, percentiles on a "nines" axis (50%, 90%,
//! 99%, ...), as HdrHistogram plots them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use crate::error::{PerfError, Result};
use crate::stats::RunSummary;

/// Deepest percentile drawn: 99.9999% (six nines).
const MAX_NINES: f64 = 6.0;
const WIDTH_PX: u32 = 1024;
const HEIGHT_PX: u32 = 640;
/// Largest JSON result file read back.
pub const MAX_RESULT_FILE_BYTES: u64 = 64 << 20;
/// Environment variable naming a TrueType font to draw text with.
pub const FONT_ENV: &str = "SPATE_PERF_FONT";
const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// With `YScale::Auto`, curves whose largest and smallest latencies differ by more than this
/// factor get a logarithmic latency axis, so a fast run stays visible beside a slow one.
pub const AUTO_LOG_SPREAD: f64 = 100.0;

/// The latency axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum YScale {
    /// Logarithmic when the curves span more than [`AUTO_LOG_SPREAD`], else linear.
    Auto,
    Linear,
    Log,
}

/// Output format, from the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Svg,
    Png,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("svg") => Ok(Format::Svg),
            Some(e) if e.eq_ignore_ascii_case("png") => Ok(Format::Png),
            _ => Err(PerfError::Args(format!(
                "plot file {} must end in .svg or .png",
                path.display()
            ))),
        }
    }
}

/// Percentile (0..100) → position on the nines axis: 90% → 1, 99% → 2, 99.9% → 3.
pub fn nines(percentile: f64) -> f64 {
    let tail = (1.0 - percentile / 100.0).max(10f64.powf(-MAX_NINES));
    (-tail.log10()).clamp(0.0, MAX_NINES)
}

fn nines_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{p:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Registers a system font once; plotters draws no text without one.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os(FONT_ENV)
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no usable font found (tried {FONT_ENV} and {}); install fonts-dejavu-core",
            FONT_PATHS.join(", ")
        ))
    })
    .clone()
    .map_err(|message| PerfError::File {
        path: "font".into(),
        message,
    })
}

/// Reads a run saved with `--json`.
pub fn load_summary(path: &Path) -> Result<RunSummary> {
    let err = |message: String| PerfError::File {
        path: path.display().to_string(),
        message,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len();
    if len > MAX_RESULT_FILE_BYTES {
        return Err(err(format!(
            "{len} bytes is more than the {MAX_RESULT_FILE_BYTES}-byte limit"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(format!("not a spate-perf result: {e}")))
}

/// Draws the latency-percentile curves of `runs` into `out`.
pub fn draw(out: &Path, title: &str, runs: &[RunSummary], scale: YScale) -> Result<()> {
    let format = Format::of(out)?;
    ensure_font()?;
    let file_err = |message: String| PerfError::File {
        path: out.display().to_string(),
        message,
    };
    let drawn = || {
        runs.iter()
            .flat_map(|r| r.latency.distribution.iter())
            .filter(|p| nines(p.percentile) <= MAX_NINES)
            .map(|p| p.latency_ms)
    };
    // Microsecond resolution is the floor: a zero latency cannot sit on a log axis.
    const Y_FLOOR_MS: f64 = 0.001;
    let y_max = drawn().fold(0.0f64, f64::max).max(Y_FLOOR_MS) * 1.05;
    let y_min = drawn()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .clamp(Y_FLOOR_MS, y_max)
        / 1.05;
    let log = is_log(scale, y_min, y_max);
    let result = match (format, log) {
        (Format::Svg, false) => {
            let root = SVGBackend::new(out, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
            render(&root, title, runs, 0.0..y_max)
        }
        (Format::Svg, true) => {
            let root = SVGBackend::new(out, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
            render(&root, title, runs, (y_min..y_max).log_scale())
        }
        (Format::Png, false) => {
            let root = BitMapBackend::new(out, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
            render(&root, title, runs, 0.0..y_max)
        }
        (Format::Png, true) => {
            let root = BitMapBackend::new(out, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
            render(&root, title, runs, (y_min..y_max).log_scale())
        }
    };
    result.map_err(file_err)
}

/// Whether the latency axis is logarithmic for curves spanning `y_min..y_max` ms.
fn is_log(scale: YScale, y_min: f64, y_max: f64) -> bool {
    match scale {
        YScale::Log => true,
        YScale::Linear => false,
        YScale::Auto => y_max / y_min > AUTO_LOG_SPREAD,
    }
}

fn render<DB, Y>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    runs: &[RunSummary],
    y_axis: Y,
) -> std::result::Result<(), String>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |x: &dyn std::fmt::Display| x.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..MAX_NINES, y_axis)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(MAX_NINES as usize + 1)
        .x_label_formatter(&nines_label)
        .draw()
        .map_err(|x| e(&x))?;
    for (i, run) in runs.iter().enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        let points: Vec<(f64, f64)> = run
            .latency
            .distribution
            .iter()
            .map(|p| (nines(p.percentile), p.latency_ms))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color))
            .map_err(|x| e(&x))?
            .label(run.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    Palette99::pick(i).stroke_width(2),
                )
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latency;

    #[test]
    fn nines_axis_maps_percentiles() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), MAX_NINES);
        assert_eq!(nines(0.0), 0.0);
        assert_eq!(nines_label(&2.0), "99%");
        assert_eq!(nines_label(&0.0), "0%");
    }

    #[test]
    fn auto_scale_turns_logarithmic_for_widely_spread_curves() {
        assert!(!is_log(YScale::Auto, 0.3, 20.0));
        assert!(is_log(YScale::Auto, 0.3, 2764.0));
        assert!(is_log(YScale::Log, 0.3, 0.4));
        assert!(!is_log(YScale::Linear, 0.3, 2764.0));
    }

    #[test]
    fn extension_picks_the_format() {
        assert_eq!(Format::of(Path::new("a.SVG")).unwrap(), Format::Svg);
        assert_eq!(Format::of(Path::new("a.png")).unwrap(), Format::Png);
        assert!(Format::of(Path::new("a.pdf")).is_err());
        assert!(Format::of(Path::new("a")).is_err());
    }

    #[test]
    fn two_runs_draw_into_one_svg_and_json_round_trips() {
        if ensure_font().is_err() {
            eprintln!("skipped: no system font to draw with");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for (i, ms) in [1u64, 3].iter().enumerate() {
            let mut h = Latency::new();
            for k in 1..=1000u64 {
                h.record_n(ms * 1_000_000 + k * 1000, 1);
            }
            let run = RunSummary {
                label: format!("run{i}"),
                mode: "produce".into(),
                config: serde_json::Value::Null,
                records: 1000,
                bytes: 1000,
                seconds: 1.0,
                records_per_sec: 1000.0,
                mb_per_sec: 0.001,
                latency: h.summary(),
                send_lag: None,
                retries: 0,
                retry_causes: Default::default(),
                failover_time_ms: 0.0,
                failovers: Vec::new(),
            };
            let path = dir.path().join(format!("run{i}.json"));
            std::fs::write(&path, serde_json::to_string(&run).unwrap()).unwrap();
            let back = load_summary(&path).unwrap();
            assert_eq!(back.label, run.label);
            assert_eq!(back.latency.samples, 1000);
            assert_eq!(
                back.latency.distribution.len(),
                run.latency.distribution.len()
            );
            runs.push(back);
        }
        let svg = dir.path().join("chart.svg");
        draw(&svg, "test", &runs, YScale::Auto).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("run0") && text.contains("run1"));
        let png = dir.path().join("chart.png");
        draw(&png, "test", &runs, YScale::Log).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    }

    #[test]
    fn garbage_json_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = load_summary(&path).unwrap_err().to_string();
        assert!(err.contains("not a spate-perf result"), "{err}");
    }
}
