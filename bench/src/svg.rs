//! Minimal SVG charts for the comparison report: horizontal grouped bars,
//! one group per workload, one bar per series (target or percentile).

use std::fmt::Write;

/// One bar: which series it belongs to, its value, and the label printed
/// after it.
pub struct Bar {
    pub series: usize,
    pub value: f64,
    pub text: String,
}

pub struct Group {
    pub label: String,
    pub bars: Vec<Bar>,
}

/// How bar lengths are scaled.
pub enum Scale {
    /// Each group against its own largest value (groups have different units).
    PerGroup,
    /// One logarithmic axis for all groups, from `min` to `max`.
    Log {
        min: f64,
        max: f64,
        unit: &'static str,
    },
}

pub const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
];

/// Lighter tints of [`PALETTE`] (same order), e.g. for a second
/// percentile of the same target.
pub const PALETTE_LIGHT: &[&str] = &[
    "#a6bcd3", "#f8c695", "#acd0a7", "#f0abac", "#bbdbd8", "#f6e4a3", "#d7bcd0",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the chart as a standalone SVG document.
pub fn grouped_bars(
    title: &str,
    subtitle: &str,
    series: &[(String, String)],
    groups: &[Group],
    scale: &Scale,
) -> String {
    let width = 960.0;
    let label_w = 230.0;
    let text_w = 170.0;
    let bar_area = width - label_w - text_w - 20.0;
    let bar_h = 14.0;
    let bar_gap = 3.0;
    let group_gap = 14.0;
    let top = 78.0;
    let height_of = |g: &Group| g.bars.len().max(1) as f64 * (bar_h + bar_gap) + group_gap;
    let axis_h = if matches!(scale, Scale::Log { .. }) {
        30.0
    } else {
        10.0
    };
    let height = top + groups.iter().map(height_of).sum::<f64>() + axis_h + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0}" viewBox="0 0 {width} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="10" y="22" font-size="16" font-weight="bold">{}</text>"##,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="40" fill="#555">{}</text>"##,
        esc(subtitle)
    );
    // Legend.
    let mut lx = 10.0;
    for (name, color) in series {
        let _ = writeln!(
            s,
            r##"<rect x="{lx}" y="50" width="12" height="12" fill="{color}"/><text x="{:.0}" y="60">{}</text>"##,
            lx + 16.0,
            esc(name)
        );
        lx += 30.0 + 7.5 * name.chars().count() as f64;
    }
    let x0 = label_w;
    let len = |v: f64, gmax: f64| -> f64 {
        match scale {
            Scale::PerGroup => {
                if gmax > 0.0 {
                    (v / gmax).clamp(0.0, 1.0) * bar_area
                } else {
                    0.0
                }
            }
            Scale::Log { min, max, .. } => {
                if v <= 0.0 {
                    return 0.0;
                }
                let f = (v.max(*min).ln() - min.ln()) / (max.ln() - min.ln());
                f.clamp(0.0, 1.0) * bar_area
            }
        }
    };
    let mut y = top;
    for g in groups {
        let gmax = g.bars.iter().map(|b| b.value).fold(0.0, f64::max);
        let gh = height_of(g) - group_gap;
        let _ = writeln!(
            s,
            r##"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            label_w - 8.0,
            y + gh / 2.0 + 4.0,
            esc(&g.label)
        );
        for b in &g.bars {
            let color = series
                .get(b.series)
                .map(|(_, c)| c.as_str())
                .unwrap_or("#999");
            let w = len(b.value, gmax);
            let _ = writeln!(
                s,
                r##"<rect x="{x0}" y="{y:.1}" width="{w:.1}" height="{bar_h}" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="#222">{}</text>"##,
                x0 + w + 4.0,
                y + bar_h - 3.0,
                esc(&b.text)
            );
            y += bar_h + bar_gap;
        }
        if g.bars.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{x0}" y="{:.1}" fill="#999">no data</text>"##,
                y + bar_h - 3.0
            );
            y += bar_h + bar_gap;
        }
        let _ = writeln!(
            s,
            r##"<line x1="10" x2="{:.0}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            width - 10.0,
            y + group_gap / 2.0 - 2.0,
            y + group_gap / 2.0 - 2.0
        );
        y += group_gap;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{x0}" x2="{x0}" y1="{:.0}" y2="{:.0}" stroke="#333"/>"##,
        top - 4.0,
        y
    );
    if let Scale::Log { min, max, unit } = scale {
        let mut t = 10f64.powf(min.log10().ceil());
        while t <= *max * 1.0001 {
            let x = x0 + len(t, 0.0);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{:.0}" y2="{:.0}" stroke="#ccc" stroke-dasharray="2,3"/><text x="{x:.1}" y="{:.0}" text-anchor="middle" fill="#555">{} {unit}</text>"##,
                top - 4.0,
                y,
                y + 16.0,
                fmt_tick(t)
            );
            t *= 10.0;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_well_formed_svg() {
        let series = vec![
            ("etcd".to_string(), PALETTE[0].to_string()),
            ("metastore".to_string(), PALETTE[1].to_string()),
        ];
        let groups = vec![Group {
            label: "put <1000 clients>".into(),
            bars: vec![
                Bar {
                    series: 0,
                    value: 10.0,
                    text: "10".into(),
                },
                Bar {
                    series: 1,
                    value: 30.0,
                    text: "30".into(),
                },
            ],
        }];
        for scale in [
            Scale::PerGroup,
            Scale::Log {
                min: 0.01,
                max: 1000.0,
                unit: "ms",
            },
        ] {
            let svg = grouped_bars("t", "s", &series, &groups, &scale);
            assert!(svg.starts_with("<svg"));
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains("put &lt;1000 clients&gt;"));
            assert_eq!(svg.matches("<rect").count(), 1 + 2 + 2);
        }
    }
}
