//! `spur plot RUN [RUN ...]`: learning curves from `metrics.jsonl` as one PNG, with
//! several runs overlaid for comparison. The font is embedded (DejaVu Sans), so
//! plotting needs nothing from the system.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{bail, Context};
use clap::Args;
use plotters::prelude::*;

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (or their metrics.jsonl files).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where to write the PNG (default: <run>/curves.png for one run, curves.png
    /// here for several).
    #[arg(long, short)]
    out: Option<PathBuf>,
}

/// The panels: a metrics.jsonl column and its title.
const PANELS: [(&str, &str); 6] = [
    ("episode_return_mean", "mean return (last 100 episodes)"),
    ("success_rate", "success rate (last 100 episodes)"),
    ("steps_per_sec", "env steps per second"),
    ("intrinsic_reward_mean", "mean intrinsic reward per step"),
    ("judge_llm_calls", "judge calls (total)"),
    ("entropy", "policy entropy"),
];

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// One run's curves: its name and the rows of metrics.jsonl.
struct Run {
    name: String,
    rows: Vec<serde_json::Value>,
}

impl Run {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let file = if path.is_dir() {
            path.join("metrics.jsonl")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        // A run killed mid-write may leave a partial last line: skip what does not parse.
        let rows: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if rows.is_empty() {
            bail!("{} holds no metrics rows yet", file.display());
        }
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(path)
        };
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        Ok(Self { name, rows })
    }

    /// (env steps, value) for a column, where both are numbers.
    fn series(&self, column: &str) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| Some((r["env_steps"].as_f64()?, r[column].as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    }
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| match args.runs.as_slice() {
            [one] if one.is_dir() => one.join("curves.png"),
            _ => PathBuf::from("curves.png"),
        });
    write_plot(&args.runs, &out)?;
    println!("plot:        {}", out.display());
    Ok(())
}

/// Draws the learning curves of `runs` into the PNG `out`.
pub fn write_plot(runs: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let runs: Vec<Run> = runs
        .iter()
        .map(|p| Run::load(p))
        .collect::<anyhow::Result<_>>()?;
    register_font()?;
    draw(&runs, out).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", out.display()))
}

fn register_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .map_err(|_| anyhow::anyhow!("the embedded font does not load"));
    });
    result
}

fn draw(runs: &[Run], out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(out, (1500, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = match runs {
        [one] => one.name.clone(),
        _ => format!("{} runs", runs.len()),
    };
    let root = root.titled(&title, ("sans-serif", 24))?;
    for (area, (column, caption)) in root.split_evenly((2, 3)).iter().zip(PANELS) {
        let series: Vec<(usize, Vec<(f64, f64)>)> = runs
            .iter()
            .map(|r| r.series(column))
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        let points = series.iter().flat_map(|(_, s)| s.iter());
        let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in points {
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
        if series.is_empty() {
            (y_min, y_max) = (0.0, 1.0);
        }
        if y_max - y_min < 1e-9 {
            (y_min, y_max) = (y_min - 0.5, y_max + 0.5);
        }
        let pad = (y_max - y_min) * 0.05;
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))?;
        chart
            .configure_mesh()
            .x_desc("env steps")
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|x| short_number(*x))
            .y_label_formatter(&|y| short_number(*y))
            .draw()?;
        if series.is_empty() {
            area.draw(&Text::new(
                "not recorded in these runs",
                (120, 120),
                ("sans-serif", 16).into_font().color(&BLACK.mix(0.6)),
            ))?;
            continue;
        }
        for (i, s) in series {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(s, color.stroke_width(2)))?
                .label(runs[i].name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if runs.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font(("sans-serif", 13))
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// 1234567 -> "1.2M", 0.25 -> "0.25".
fn short_number(v: f64) -> String {
    let a = v.abs();
    if a < 1e-9 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        // Two significant digits, so ticks of small values stay apart (0.0015, 0.002).
        let digits = (1.0 - a.log10().floor()).max(0.0) as usize;
        format!("{v:.digits$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_overlaid_runs_and_tolerates_gaps() {
        let dir = std::env::temp_dir().join(format!("spur-plot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut runs = Vec::new();
        for (k, name) in ["a", "b"].iter().enumerate() {
            let run = dir.join(name);
            std::fs::create_dir_all(&run).unwrap();
            let mut text = String::new();
            for i in 0..50 {
                let row = serde_json::json!({
                    "env_steps": i * 4096,
                    "episode_return_mean": i as f64 * 0.1 + k as f64,
                    "success_rate": i as f64 / 50.0,
                    "steps_per_sec": 40000.0,
                    "entropy": 1.0,
                });
                text.push_str(&format!("{row}\n"));
            }
            text.push_str("{\"env_steps\": 9"); // a torn last line
            std::fs::write(run.join("metrics.jsonl"), text).unwrap();
            runs.push(run);
        }
        let out = dir.join("curves.png");
        write_plot(&runs, &out).unwrap();
        let png = std::fs::read(&out).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 10_000, "a real picture, not an empty one");

        let err = write_plot(&[dir.join("missing")], &out).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_number(1_250_000.0), "1.2M");
        assert_eq!(short_number(40_000.0), "40k");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(-1e-12), "0");
        assert_eq!(short_number(0.0125), "0.013");
        assert_eq!(short_number(0.0015), "0.0015");
    }
}
