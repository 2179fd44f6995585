//! Label counts and the mean top-1 score per hour over the last days, for the status page's drift
//! chart. Filled from the whole results log at start (so the chart survives restarts) and from each
//! row written after; labels are the drift metrics' values (the routes' labels and "other"), so the
//! memory and the chart stay bounded whatever the model's class count.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::vocab::{Record, Status};

/// Hours the chart covers.
pub const HOURS: u64 = 72;

#[derive(Debug, Default, Clone, PartialEq)]
struct Bucket {
    counts: BTreeMap<String, u64>,
    score_sum: f64,
    n: u64,
}

/// Per hour (hours since the epoch, UTC): images by label and their top-1 scores.
#[derive(Debug, Default, Clone)]
pub struct Hourly {
    buckets: BTreeMap<u64, Bucket>,
}

/// The hour of an RFC 3339 time, as hours since the epoch.
fn hour_of(time: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(time).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs() / 3600)
}

pub fn hour_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 3600)
}

impl Hourly {
    /// Counts an ok record under `label` (a drift value); records older than the chart are dropped.
    pub fn add(&mut self, record: &Record, label: &str) {
        let Some(top) = record.top.as_ref().and_then(|t| t.first()).filter(|_| record.status == Status::Ok) else { return };
        let Some(hour) = hour_of(&record.time) else { return };
        let newest = self.buckets.keys().next_back().copied().unwrap_or(hour).max(hour);
        if hour + HOURS <= newest {
            return;
        }
        let b = self.buckets.entry(hour).or_default();
        *b.counts.entry(label.to_string()).or_default() += 1;
        b.score_sum += top.score;
        b.n += 1;
        while self.buckets.keys().next().is_some_and(|&h| h + HOURS <= newest) {
            self.buckets.pop_first();
        }
    }

    /// The chart for the `HOURS` hours up to `now_hour`: stacked bars of images per label per hour
    /// and a line of the mean top-1 score, as one inline SVG (no external assets).
    pub fn svg(&self, now_hour: u64) -> String {
        const W: u64 = 10;
        const H: f64 = 160.0;
        let (left, top) = (40.0, 10.0);
        let first = (now_hour + 1).saturating_sub(HOURS);
        let labels: Vec<&String> = {
            let mut all: BTreeMap<&String, u64> = BTreeMap::new();
            for b in self.buckets.values() {
                for (l, c) in &b.counts {
                    *all.entry(l).or_default() += c;
                }
            }
            let mut v: Vec<(&String, u64)> = all.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            v.into_iter().map(|(l, _)| l).collect()
        };
        let max = self.buckets.range(first..=now_hour).map(|(_, b)| b.n).max().unwrap_or(0).max(1);
        let width = left + (HOURS * W) as f64 + 40.0;
        let legend_y = top + H + 36.0;
        let height = legend_y + 18.0 * labels.len().div_ceil(4).max(1) as f64;
        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" class="drift" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="10" role="img"><title>Images per hour by label, and the mean top-1 score, over the last {HOURS} hours (UTC)</title>"##
        );
        let _ = write!(s, r##"<rect x="{left}" y="{top}" width="{}" height="{H}" fill="#fafafa" stroke="#ccc"/>"##, HOURS * W);
        let _ = write!(s, r##"<text x="{}" y="{}" text-anchor="end">{max}</text><text x="{}" y="{}" text-anchor="end">0</text>"##, left - 4.0, top + 8.0, left - 4.0, top + H);
        let right = left + (HOURS * W) as f64;
        let _ = write!(s, r##"<text x="{}" y="{}">1.0</text><text x="{}" y="{}">0.0</text>"##, right + 4.0, top + 8.0, right + 4.0, top + H);
        let mut line = Vec::new();
        for (slot, hour) in (first..=now_hour).enumerate() {
            let x = left + (slot as u64 * W) as f64;
            if hour % 24 == 0 {
                let day = humantime::format_rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(hour * 3600)).to_string();
                let _ = write!(s, r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#bbb" stroke-dasharray="2,2"/><text x="{x}" y="{}">{}</text>"##, top + H, top + H + 14.0, &day[..10]);
            }
            let Some(b) = self.buckets.get(&hour) else { continue };
            let mut y = top + H;
            for (i, l) in labels.iter().enumerate() {
                let c = b.counts.get(*l).copied().unwrap_or(0);
                if c == 0 {
                    continue;
                }
                let h = H * c as f64 / max as f64;
                y -= h;
                let _ = write!(
                    s,
                    r##"<rect class="bar" x="{x}" y="{y:.1}" width="{}" height="{h:.1}" fill="{}"><title>{} {}: {c}</title></rect>"##,
                    W - 1,
                    colour(i),
                    &humantime::format_rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(hour * 3600)).to_string()[..13],
                    escape(l)
                );
            }
            let mean = b.score_sum / b.n.max(1) as f64;
            line.push(format!("{:.1},{:.1}", x + W as f64 / 2.0, top + H * (1.0 - mean.clamp(0.0, 1.0))));
        }
        if !line.is_empty() {
            let _ = write!(s, r##"<polyline class="mean" points="{}" fill="none" stroke="#222" stroke-width="1.5"/>"##, line.join(" "));
        }
        let _ = write!(s, r##"<text x="{left}" y="{}">— mean top-1 score (right axis)</text>"##, legend_y - 8.0);
        for (i, l) in labels.iter().enumerate() {
            let (x, y) = (left + 180.0 * (i % 4) as f64, legend_y + 18.0 * (i / 4) as f64);
            let _ = write!(s, r##"<rect x="{x}" y="{y}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"##, colour(i), x + 14.0, y + 9.0, escape(l));
        }
        s.push_str("</svg>");
        s
    }
}

fn colour(i: usize) -> &'static str {
    const PALETTE: [&str; 10] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
    PALETTE[i % PALETTE.len()]
}

/// Text for SVG/XML: labels come from a label file and may hold anything.
fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c if c.is_control() => "\u{fffd}".to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Top;

    fn rec(time: &str, score: f64) -> Record {
        let mut r = Record::example();
        r.time = time.into();
        r.top = Some(vec![Top { rank: 1, class_id: 0, label: "x".into(), label_en: None, score }]);
        r
    }

    #[test]
    fn hours_count_labels_and_mean_scores_and_old_hours_leave() {
        let mut h = Hourly::default();
        h.add(&rec("2026-12-01T10:05:00.000Z", 0.9), "espresso");
        h.add(&rec("2026-12-01T10:55:00.000Z", 0.5), "other");
        h.add(&rec("2026-12-01T11:00:00.000Z", 0.8), "espresso");
        let mut failed = rec("2026-12-01T11:00:00.000Z", 0.8);
        failed.status = Status::Error;
        h.add(&failed, "espresso");
        let ten = hour_of("2026-12-01T10:00:00Z").unwrap();
        assert_eq!(h.buckets[&ten].n, 2);
        assert!((h.buckets[&ten].score_sum - 1.4).abs() < 1e-9);
        assert_eq!(h.buckets[&(ten + 1)].counts["espresso"], 1, "the failed one is not counted");
        // Three days later the first hours leave.
        h.add(&rec("2026-12-04T10:30:00.000Z", 0.7), "other");
        assert!(!h.buckets.contains_key(&ten) && h.buckets.contains_key(&(ten + 1)));
        h.add(&rec("2026-11-01T10:30:00.000Z", 0.7), "other");
        assert_eq!(h.buckets.len(), 2, "a row older than the chart is not kept");
    }

    #[test]
    fn the_chart_is_one_inline_svg_with_a_bar_per_label_and_hour_and_a_mean_line() {
        let mut h = Hourly::default();
        h.add(&rec("2026-12-01T10:05:00.000Z", 0.9), "espresso");
        h.add(&rec("2026-12-01T10:06:00.000Z", 0.3), "<script>&");
        h.add(&rec("2026-12-01T12:00:00.000Z", 0.8), "espresso");
        let svg = h.svg(hour_of("2026-12-01T12:00:00Z").unwrap());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\"") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("class=\"bar\"").count(), 3);
        assert!(svg.contains("<polyline class=\"mean\" points=\""), "{svg}");
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;&amp;"), "labels are escaped");
        assert!(!svg.contains("href") && !svg.contains("url("), "no external assets");
        assert!(svg.contains(">2026-12-01<"), "midnight UTC is marked with its date");
    }
}
