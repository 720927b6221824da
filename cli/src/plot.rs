//! `spur plot RUN [RUN ...]`: learning curves from `metrics.jsonl` as one PNG, with
//! several runs overlaid for comparison, or with `--band` one curve per variant (runs
//! named `<variant>-seed<N>`): the mean over its seeds and a band from the lowest to the
//! highest seed. The font is embedded (DejaVu Sans), so plotting needs nothing from
//! the system.

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
    /// One curve per variant: runs whose names differ only in a `-seed<N>` suffix are
    /// drawn as their mean with a band from the lowest to the highest seed.
    #[arg(long)]
    band: bool,
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
    write_plot(&args.runs, &out, args.band)?;
    println!("plot:        {}", out.display());
    Ok(())
}

/// Draws the learning curves of `runs` into the PNG `out`, one per run or (`band`)
/// one per variant with its seeds' spread.
pub fn write_plot(runs: &[PathBuf], out: &Path, band: bool) -> anyhow::Result<()> {
    let runs: Vec<Run> = runs
        .iter()
        .map(|p| Run::load(p))
        .collect::<anyhow::Result<_>>()?;
    register_font()?;
    draw(&runs, band, out).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", out.display()))
}

/// (env steps, value) points of a curve.
type Series = Vec<(f64, f64)>;
/// (env steps, lowest, highest) of a band.
type Band = Vec<(f64, f64, f64)>;

/// One drawn curve: a run's series, or a variant's mean with its band.
struct Curve {
    name: String,
    line: Series,
    band: Band,
}

/// The variant a run belongs to: its name without a `-seed<N>` suffix.
fn variant(name: &str) -> &str {
    match name.rsplit_once("-seed") {
        Some((v, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => v,
        _ => name,
    }
}

/// Points on the common x grid: where every run of a variant has a value.
const BAND_POINTS: usize = 100;

/// The value of `series` (sorted by x) at `x`, interpolated linearly; None outside it.
fn at(series: &[(f64, f64)], x: f64) -> Option<f64> {
    let i = series.partition_point(|p| p.0 < x);
    let (x1, y1) = *series.get(i)?;
    if x1 == x || i == 0 {
        return (x1 == x).then_some(y1);
    }
    let (x0, y0) = series[i - 1];
    Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
}

/// Mean and spread of several runs' series over the x range they share.
fn band_of(series: &[Series]) -> (Series, Band) {
    let lo = series
        .iter()
        .map(|s| s[0].0)
        .fold(f64::NEG_INFINITY, f64::max);
    let hi = series
        .iter()
        .map(|s| s[s.len() - 1].0)
        .fold(f64::INFINITY, f64::min);
    let (mut line, mut band) = (Vec::new(), Vec::new());
    if hi < lo {
        return (line, band);
    }
    for k in 0..=BAND_POINTS {
        let x = lo + (hi - lo) * k as f64 / BAND_POINTS as f64;
        let ys: Vec<f64> = series.iter().filter_map(|s| at(s, x)).collect();
        if ys.len() < series.len() {
            continue;
        }
        let mean = ys.iter().sum::<f64>() / ys.len() as f64;
        let (min, max) = ys
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
                (a.min(y), b.max(y))
            });
        line.push((x, mean));
        band.push((x, min, max));
    }
    (line, band)
}

/// The curves of one panel's column: per run, or per variant with `band`.
fn curves(runs: &[Run], column: &str, band: bool) -> Vec<Curve> {
    if !band {
        return runs
            .iter()
            .map(|r| Curve {
                name: r.name.clone(),
                line: r.series(column),
                band: Vec::new(),
            })
            .collect();
    }
    let mut variants: Vec<(&str, Vec<Series>)> = Vec::new();
    for r in runs {
        let v = variant(&r.name);
        let mut s = r.series(column);
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let i = match variants.iter().position(|(name, _)| *name == v) {
            Some(i) => i,
            None => {
                variants.push((v, Vec::new()));
                variants.len() - 1
            }
        };
        if !s.is_empty() {
            variants[i].1.push(s);
        }
    }
    variants
        .into_iter()
        .map(|(name, series)| {
            let (line, band) = if series.is_empty() {
                Default::default()
            } else {
                band_of(&series)
            };
            Curve {
                name: match series.len() {
                    1 => format!("{name} (1 seed)"),
                    n => format!("{name} ({n} seeds)"),
                },
                line,
                band,
            }
        })
        .collect()
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

fn draw(runs: &[Run], band: bool, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(out, (1500, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = match runs {
        [one] => one.name.clone(),
        _ => format!("{} runs", runs.len()),
    };
    let root = root.titled(&title, ("sans-serif", 24))?;
    for (area, (column, caption)) in root.split_evenly((2, 3)).iter().zip(PANELS) {
        let all = curves(runs, column, band);
        let legend = all.len() > 1;
        let series: Vec<(usize, Curve)> = all
            .into_iter()
            .enumerate()
            .filter(|(_, c)| !c.line.is_empty())
            .collect();
        let points = series.iter().flat_map(|(_, c)| {
            c.line
                .iter()
                .copied()
                .chain(c.band.iter().flat_map(|&(x, a, b)| [(x, a), (x, b)]))
        });
        let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for (x, y) in points {
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
        for (i, c) in series {
            let color = COLORS[i % COLORS.len()];
            if !c.band.is_empty() {
                let outline: Vec<(f64, f64)> = c
                    .band
                    .iter()
                    .map(|&(x, lo, _)| (x, lo))
                    .chain(c.band.iter().rev().map(|&(x, _, hi)| (x, hi)))
                    .collect();
                chart.draw_series(std::iter::once(Polygon::new(outline, color.mix(0.2))))?;
            }
            chart
                .draw_series(LineSeries::new(c.line, color.stroke_width(2)))?
                .label(c.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if legend {
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
        write_plot(&runs, &out, false).unwrap();
        let png = std::fs::read(&out).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 10_000, "a real picture, not an empty one");

        let err = write_plot(&[dir.join("missing")], &out, false).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn run(name: &str, points: &[(f64, f64)]) -> Run {
        Run {
            name: name.into(),
            rows: points
                .iter()
                .map(|&(x, y)| serde_json::json!({"env_steps": x, "success_rate": y}))
                .collect(),
        }
    }

    #[test]
    fn seeds_of_a_variant_become_a_mean_with_their_spread() {
        assert_eq!(variant("variant2-seed13"), "variant2");
        assert_eq!(variant("ranking-seed"), "ranking-seed");
        assert_eq!(variant("plain"), "plain");
        let runs = [
            run("a-seed1", &[(0.0, 0.0), (100.0, 1.0)]),
            run("a-seed2", &[(0.0, 0.2), (50.0, 0.2), (80.0, 0.8)]),
            run("b-seed1", &[(0.0, 0.5), (100.0, 0.5)]),
        ];
        let c = curves(&runs, "success_rate", true);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "a (2 seeds)");
        // The x range both seeds cover: 0 to 80.
        assert_eq!(c[0].line.first().unwrap().0, 0.0);
        assert_eq!(c[0].line.last().unwrap().0, 80.0);
        // At x = 40: seed 1 reads 0.4, seed 2 reads 0.2.
        let k = c[0].band.iter().position(|b| b.0 == 40.0).unwrap();
        assert!((c[0].line[k].1 - 0.3).abs() < 1e-9);
        assert!((c[0].band[k].1 - 0.2).abs() < 1e-9 && (c[0].band[k].2 - 0.4).abs() < 1e-9);
        assert!(c[1].band.iter().all(|&(_, lo, hi)| lo == 0.5 && hi == 0.5));
        // Without --band every run is a curve of its own.
        assert_eq!(curves(&runs, "success_rate", false).len(), 3);
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
