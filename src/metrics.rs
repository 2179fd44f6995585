//! What labeld has done and where the time goes: counters every stage adds to, exported in the
//! Prometheus text format at /metrics and summarised when a run ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Publishing counters as `/metrics` exports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MqttFigures {
    pub connected: bool,
    pub published: u64,
    pub failed: u64,
    pub connect_failures: u64,
    pub pending: u64,
    pub lost_files: u64,
    pub refused: u64,
}

/// How publishing goes (`[mqtt]` on), read when asked for. The publisher's status implements it, so
/// the counters every stage adds to know nothing of the stage that runs last.
pub trait PublishReport: Send + Sync {
    fn figures(&self) -> MqttFigures;
    /// "mqtt: connected, lag 3" or "mqtt: disconnected since 2026-11-29T06:00:00Z (why), lag 120".
    fn summary(&self) -> String;
    /// For the status page.
    fn json(&self) -> serde_json::Value;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Read,
    Decode,
    Resize,
    Inference,
    Write,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::Read, Stage::Decode, Stage::Resize, Stage::Inference, Stage::Write];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Decode => "decode",
            Stage::Resize => "resize",
            Stage::Inference => "inference",
            Stage::Write => "write",
        }
    }
}

/// Total time spent in each stage; cheap to clone and share.
#[derive(Clone, Default, Debug)]
pub struct StageTimes(Arc<[AtomicU64; 5]>);

impl StageTimes {
    pub fn add(&self, stage: Stage, d: Duration) {
        self.0[stage as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn total(&self, stage: Stage) -> Duration {
        Duration::from_nanos(self.0[stage as usize].load(Ordering::Relaxed))
    }

    /// "read=0.1 decode=3.2 ..." in milliseconds per image.
    pub fn per_image(&self, images: u64) -> String {
        Stage::ALL
            .iter()
            .map(|s| format!("{}={:.2}", s.name(), self.total(*s).as_secs_f64() * 1e3 / images.max(1) as f64))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Why the HTTP endpoint turned a client away (`labeld_http_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `[http] max_uploads` uploads were already in progress: 503 before the body was read.
    Busy,
    /// The declared body was over `[http] max_body_mb`: 413 before the body was read.
    TooLarge,
    /// The body did not arrive within `[http] body_timeout_s`: 408.
    BodyTimeout,
    /// The request headers did not arrive within `[http] header_timeout_s`: connection closed.
    HeaderTimeout,
    /// Every `[http] max_connections` slot was taken and this connection, outside any request for
    /// the longest, was closed to let a new one in.
    Idle,
}

impl Refused {
    pub const ALL: [Refused; 5] = [Refused::Busy, Refused::TooLarge, Refused::BodyTimeout, Refused::HeaderTimeout, Refused::Idle];

    pub fn name(self) -> &'static str {
        match self {
            Refused::Busy => "busy",
            Refused::TooLarge => "too_large",
            Refused::BodyTimeout => "body_timeout",
            Refused::HeaderTimeout => "header_timeout",
            Refused::Idle => "idle",
        }
    }
}

type LabelSet = Vec<(String, String)>;

/// Every counter labeld exports. Clones share the same counters.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub times: StageTimes,
    images: Family<LabelSet, Counter>,
    pub batches: Counter,
    pub batch_size: Histogram,
    pub latency: Histogram,
    pub csv_write_errors: Counter,
    pub sidecar_write_errors: Counter,
    pub read_faults: Counter,
    reloads: Family<LabelSet, Counter>,
    model_info: Family<LabelSet, Gauge>,
    http_refused: Family<LabelSet, Counter>,
    retention: Retention,
    remote_requests: Family<LabelSet, Counter>,
    remote_up: Family<LabelSet, Gauge>,
    drift: Drift,
    /// Queue depth, images in flight and the recent rate, read at scrape time.
    live: Arc<LiveGauges>,
}

/// What `[retention]` removed from done and quarantine folders.
#[derive(Clone, Default)]
struct Retention {
    files: Counter,
    bytes: Counter,
    sweeps: Counter,
    free_bytes: Family<LabelSet, Gauge>,
    foreign: Family<LabelSet, Gauge>,
}

/// What the model says over time, by the labels the routes name (and "other" for every other label,
/// so a 1000-class model adds at most the routes' labels + 1 series).
#[derive(Clone)]
struct Drift {
    labels: Family<LabelSet, Counter>,
    scores: Family<LabelSet, Histogram, fn() -> Histogram>,
    /// The last `UNSURE_WINDOW` ok results: whether a route for unsure images took each.
    unsure: Arc<Mutex<VecDeque<bool>>>,
    unsure_share: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// How many of the latest ok results `labeld_unsure_share` is taken over.
pub const UNSURE_WINDOW: usize = 1000;

/// The value `labeld_label_images_total{label}` gives a label no route names.
pub const OTHER_LABEL: &str = "other";

fn score_histogram() -> Histogram {
    Histogram::new([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
}

/// Values that are read when asked for rather than counted.
#[derive(Default)]
struct LiveGauges {
    queue_depth: Mutex<Option<Box<dyn Fn() -> usize + Send + Sync>>>,
    in_flight: Mutex<Option<Box<dyn Fn() -> usize + Send + Sync>>>,
    recent: Mutex<VecDeque<Instant>>,
    /// With `[mqtt]`: how publishing goes.
    mqtt: Mutex<Option<Arc<dyn PublishReport>>>,
}

impl std::fmt::Debug for LiveGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveGauges")
    }
}

/// The window `images_per_second` averages over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("labeld");
        let images = Family::<LabelSet, Counter>::default();
        registry.register("images", "Images labelled, by result status", images.clone());
        let batches = Counter::default();
        registry.register("batches", "Forward passes run", batches.clone());
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        registry.register("batch_size", "Images per forward pass", batch_size.clone());
        let latency = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register_with_unit(
            "latency",
            "From a file being complete to its result being written",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        let csv_write_errors = Counter::default();
        registry.register("csv_write_errors", "Failed writes to the CSV results log (retried)", csv_write_errors.clone());
        let sidecar_write_errors = Counter::default();
        registry.register("sidecar_write_errors", "Failed sidecar writes (retried)", sidecar_write_errors.clone());
        let read_faults = Counter::default();
        registry.register("read_faults", "Images that could not be read for a passing reason (permissions, I/O, still changing); retried, not recorded", read_faults.clone());
        let reloads = Family::<LabelSet, Counter>::default();
        registry.register("config_reloads", "SIGHUP config reloads, by result", reloads.clone());
        let model_info = Family::<LabelSet, Gauge>::default();
        registry.register("model", "The model in use (value 1)", model_info.clone());
        let http_refused = Family::<LabelSet, Counter>::default();
        registry.register("http_refused", "HTTP requests turned away, by reason", http_refused.clone());
        let retention = Retention::default();
        registry.register("retention_removed_files", "Images (with their sidecars) removed by [retention]", retention.files.clone());
        registry.register("retention_removed_bytes", "Bytes of images and sidecars removed by [retention]", retention.bytes.clone());
        registry.register("retention_sweeps", "[retention] sweeps done", retention.sweeps.clone());
        registry.register("retention_free_bytes", "Free bytes on the file system of each swept folder, at the last sweep", retention.free_bytes.clone());
        registry.register(
            "retention_foreign_files",
            "Files of each swept folder due for removal by age or space that labeld did not archive there (left alone), at the last sweep",
            retention.foreign.clone(),
        );
        let remote_requests = Family::<LabelSet, Counter>::default();
        registry.register(
            "remote_requests",
            "Calls to [remote] model servers, by server and result (ok, invalid: the batch was refused, unavailable, refused: credentials, mismatch: the model does not fit)",
            remote_requests.clone(),
        );
        let remote_up = Family::<LabelSet, Gauge>::default();
        registry.register("remote_up", "Whether each [remote] model server answers (1) or is in back-off (0)", remote_up.clone());
        let drift = Drift {
            labels: Family::default(),
            scores: Family::new_with_constructor(score_histogram as fn() -> Histogram),
            unsure: Arc::default(),
            unsure_share: Gauge::default(),
        };
        registry.register("label_images", "Ok images by top-1 label: the labels routes name, the rest as \"other\"", drift.labels.clone());
        registry.register("top1_score", "Top-1 scores by top-1 label (the labels routes name, the rest as \"other\")", drift.scores.clone());
        registry.register(
            "unsure_share",
            "Share of the latest 1000 ok images that a route for unsure images (max_score or max_margin) took",
            drift.unsure_share.clone(),
        );
        // Every label value is there from the start, at 0, so rates and alerts work before the first event.
        for status in ["ok", "error"] {
            let _ = images.get_or_create(&vec![("status".into(), status.into())]);
        }
        for result in ["applied", "rejected"] {
            let _ = reloads.get_or_create(&vec![("result".into(), result.into())]);
        }
        for reason in Refused::ALL {
            let _ = http_refused.get_or_create(&vec![("reason".into(), reason.name().into())]);
        }
        let times = StageTimes::default();
        let live = Arc::new(LiveGauges::default());
        registry.register_collector(Box::new(Collected { times: times.clone(), live: live.clone() }));
        Metrics {
            registry: Arc::new(registry),
            times,
            images,
            batches,
            batch_size,
            latency,
            csv_write_errors,
            sidecar_write_errors,
            read_faults,
            reloads,
            model_info,
            http_refused,
            retention,
            remote_requests,
            remote_up,
            drift,
            live,
        }
    }

    /// The label values drift metrics use (besides "other"): each starts at 0.
    pub fn track_labels<'a>(&self, labels: impl IntoIterator<Item = &'a str>) {
        for l in labels.into_iter().chain([OTHER_LABEL]) {
            let key = vec![("label".to_string(), l.to_string())];
            let _ = self.drift.labels.get_or_create(&key);
            let _ = self.drift.scores.get_or_create(&key);
        }
    }

    /// An ok image whose top-1 label counts as `label` (one of `track_labels`, or `OTHER_LABEL`),
    /// with its top-1 `score`; `unsure`: a route for unsure images took it.
    pub fn top1(&self, label: &str, score: f64, unsure: bool) {
        let key = vec![("label".to_string(), label.to_string())];
        self.drift.labels.get_or_create(&key).inc();
        self.drift.scores.get_or_create(&key).observe(score);
        let mut window = self.drift.unsure.lock().unwrap_or_else(|e| e.into_inner());
        window.push_back(unsure);
        if window.len() > UNSURE_WINDOW {
            window.pop_front();
        }
        let share = window.iter().filter(|u| **u).count() as f64 / window.len() as f64;
        self.drift.unsure_share.set(share);
    }

    /// Where queue depth and in-flight counts are read from at scrape time.
    pub fn observe_queue(
        &self,
        depth: impl Fn() -> usize + Send + Sync + 'static,
        in_flight: impl Fn() -> usize + Send + Sync + 'static,
    ) {
        *self.live.queue_depth.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(depth));
        *self.live.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(in_flight));
    }

    /// Where publishing figures are read from at scrape time (`[mqtt]` on).
    pub fn observe_mqtt(&self, status: Arc<dyn PublishReport>) {
        *self.live.mqtt.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    /// How publishing goes, when `[mqtt]` is on.
    pub fn mqtt(&self) -> Option<Arc<dyn PublishReport>> {
        self.live.mqtt.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One image's result was written (or returned to an HTTP client).
    pub fn image_done(&self, status: &str, latency: Duration) {
        self.images.get_or_create(&vec![("status".into(), status.into())]).inc();
        self.latency.observe(latency.as_secs_f64());
        let now = Instant::now();
        let mut recent = self.live.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back(now);
        while recent.front().is_some_and(|t| now.duration_since(*t) > RATE_WINDOW) {
            recent.pop_front();
        }
    }

    pub fn images(&self, status: &str) -> u64 {
        self.images.get_or_create(&vec![("status".into(), status.into())]).get()
    }

    pub fn batch(&self, size: usize) {
        self.batches.inc();
        self.batch_size.observe(size as f64);
    }

    /// Images per second over the last ten seconds.
    pub fn images_per_second(&self) -> f64 {
        let now = Instant::now();
        let recent = self.live.recent.lock().unwrap_or_else(|e| e.into_inner());
        let n = recent.iter().filter(|t| now.duration_since(**t) <= RATE_WINDOW).count();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }

    pub fn queue_depth(&self) -> usize {
        self.live.queue_depth.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |f| f())
    }

    pub fn in_flight(&self) -> usize {
        self.live.in_flight.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |f| f())
    }

    pub fn reload(&self, result: &str) {
        self.reloads.get_or_create(&vec![("result".into(), result.into())]).inc();
    }

    pub fn http_refused(&self, reason: Refused) {
        self.http_refused.get_or_create(&vec![("reason".into(), reason.name().into())]).inc();
    }

    /// A retention sweep removed `files` images (with sidecars) of `bytes` in all from one folder.
    pub fn retention_removed(&self, files: u64, bytes: u64) {
        self.retention.files.inc_by(files);
        self.retention.bytes.inc_by(bytes);
    }

    pub fn retention_sweep(&self) {
        self.retention.sweeps.inc();
    }

    /// Free bytes on the file system holding `folder`, after the latest sweep.
    pub fn retention_free(&self, folder: &std::path::Path, free: u64) {
        let labels = vec![("folder".into(), folder.display().to_string())];
        self.retention.free_bytes.get_or_create(&labels).set(i64::try_from(free).unwrap_or(i64::MAX));
    }

    pub fn retention_foreign(&self, folder: &std::path::Path, files: u64) {
        let labels = vec![("folder".into(), folder.display().to_string())];
        self.retention.foreign.get_or_create(&labels).set(i64::try_from(files).unwrap_or(i64::MAX));
    }

    /// A call to the model server `server` ended with `result`.
    pub fn remote_request(&self, server: &str, result: &str) {
        self.remote_requests.get_or_create(&vec![("server".into(), server.into()), ("result".into(), result.into())]).inc();
    }

    pub fn remote_up(&self, server: &str, up: bool) {
        self.remote_up.get_or_create(&vec![("server".into(), server.into())]).set(i64::from(up));
    }

    pub fn set_model(&self, name: &str, precision: &str) {
        self.model_info.clear();
        self.model_info.get_or_create(&vec![("name".into(), name.into()), ("precision".into(), precision.into())]).set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[derive(Debug)]
struct Collected {
    times: StageTimes,
    live: Arc<LiveGauges>,
}

impl prometheus_client::collector::Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        {
            let mut family = encoder.encode_descriptor(
                "stage_seconds",
                "Time spent per pipeline stage (summed over threads)",
                None,
                MetricType::Counter,
            )?;
            for s in Stage::ALL {
                let labels = [("stage", s.name())];
                ConstCounter::new(self.times.total(s).as_secs_f64()).encode(family.encode_family(&labels)?)?;
            }
        }
        let read = |f: &Mutex<Option<Box<dyn Fn() -> usize + Send + Sync>>>| {
            f.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |f| f()) as i64
        };
        let depth = ConstGauge::new(read(&self.live.queue_depth));
        depth.encode(encoder.encode_descriptor("queue_depth", "Ready images waiting for a worker", None, MetricType::Gauge)?)?;
        let in_flight = ConstGauge::new(read(&self.live.in_flight));
        in_flight.encode(encoder.encode_descriptor(
            "in_flight",
            "Images queued or being labelled, not yet written",
            None,
            MetricType::Gauge,
        )?)?;
        let mqtt = self.live.mqtt.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| s.figures());
        if let Some(f) = mqtt {
            let counters: [(&str, &str, u64); 5] = [
                ("mqtt_refused_rows", "Rows given up because the broker dropped the connection each time they were sent", f.refused),
                ("mqtt_published", "Results the MQTT broker acknowledged", f.published),
                ("mqtt_failed", "Results sent but not acknowledged before the connection dropped (sent again)", f.failed),
                ("mqtt_connect_failures", "Failed attempts to connect to the MQTT broker", f.connect_failures),
                ("mqtt_lost_log_files", "Rotated results logs that vanished before all their rows were published", f.lost_files),
            ];
            for (name, help, value) in counters {
                ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
            }
            let pending = ConstGauge::new(f.pending as i64);
            pending.encode(encoder.encode_descriptor("mqtt_pending_rows", "Rows of the results log not yet acknowledged by the broker", None, MetricType::Gauge)?)?;
            let connected = ConstGauge::new(i64::from(f.connected));
            connected.encode(encoder.encode_descriptor("mqtt_connected", "1 while connected to the MQTT broker", None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_series_stay_bounded_by_the_labels_routes_name() {
        let m = Metrics::new();
        m.track_labels(["espresso", "cup"]);
        let text = m.encode();
        assert!(text.contains("labeld_label_images_total{label=\"espresso\"} 0"), "{text}");
        assert!(text.contains("labeld_label_images_total{label=\"other\"} 0"), "{text}");
        m.top1("espresso", 0.95, false);
        for _ in 0..999 {
            m.top1(OTHER_LABEL, 0.05, true);
        }
        m.top1("espresso", 0.35, false);
        let text = m.encode();
        assert_eq!(text.matches("labeld_label_images_total{").count(), 3, "{text}");
        assert!(text.contains("labeld_label_images_total{label=\"espresso\"} 2"), "{text}");
        assert!(text.contains("labeld_top1_score_bucket{le=\"0.4\",label=\"espresso\"} 1"), "{text}");
        assert!(text.contains("labeld_top1_score_count{label=\"other\"} 999"), "{text}");
        assert!(text.contains("labeld_unsure_share 0.999"), "over the latest 1000: {text}");
    }

    #[test]
    fn counters_start_at_zero_for_every_label_value() {
        let text = Metrics::new().encode();
        for want in [
            "labeld_images_total{status=\"ok\"} 0",
            "labeld_images_total{status=\"error\"} 0",
            "labeld_config_reloads_total{result=\"rejected\"} 0",
            "labeld_batches_total 0",
            "labeld_http_refused_total{reason=\"busy\"} 0",
            "labeld_http_refused_total{reason=\"header_timeout\"} 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn exposition_has_every_family_with_its_values() {
        let m = Metrics::new();
        m.observe_queue(|| 3, || 5);
        m.image_done("ok", Duration::from_millis(40));
        m.image_done("error", Duration::from_millis(10));
        m.batch(2);
        m.times.add(Stage::Decode, Duration::from_millis(1500));
        m.set_model("efficientnet_lite0", "fp32");
        let text = m.encode();
        for want in [
            "labeld_images_total{status=\"ok\"} 1",
            "labeld_images_total{status=\"error\"} 1",
            "labeld_batches_total 1",
            "labeld_batch_size_bucket{le=\"2.0\"} 1",
            "labeld_latency_seconds_count 2",
            "labeld_stage_seconds_total{stage=\"decode\"} 1.5",
            "labeld_queue_depth 3",
            "labeld_in_flight 5",
            "labeld_model{name=\"efficientnet_lite0\",precision=\"fp32\"} 1",
            "labeld_csv_write_errors_total 0",
            "labeld_read_faults_total 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert!((m.images_per_second() - 0.2).abs() < 1e-9);
    }
}
