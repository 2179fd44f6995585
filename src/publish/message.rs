//! What goes to the broker for one row of the results log: its topic and its JSON payload (the sidecar's
//! fields plus `host`, `inbox` and a stable `id`), and the retained presence messages.

use std::path::Path;

use serde_json::{Value, json};

use crate::config::{InboxConfig, MqttConfig};
use crate::vocab::{Record, Status};

/// Builds messages for one box: its host name, its inboxes (to name the one a row's image came from) and
/// its topic templates.
#[derive(Debug, Clone)]
pub struct Messages {
    host: String,
    topic: String,
    status_topic: String,
    /// (inbox folder, inbox name), longest folder first so nested names resolve to the closest.
    inboxes: Vec<(String, String)>,
}

/// One result, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The name used for `{inbox}` when a row's path lies in no configured inbox (the inbox was removed from
/// the config since the row was written).
pub const UNKNOWN_INBOX: &str = "unknown";

impl Messages {
    pub fn new(mqtt: &MqttConfig, inboxes: &[InboxConfig]) -> Messages {
        let mut inboxes: Vec<(String, String)> =
            inboxes.iter().map(|ib| (ib.path.to_string_lossy().into_owned(), ib.name.clone())).collect();
        inboxes.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Messages { host: mqtt.host.clone(), topic: mqtt.topic.clone(), status_topic: mqtt.status_topic.clone(), inboxes }
    }

    /// The message for one row of the results log.
    pub fn result(&self, record: &Record) -> Message {
        let inbox = self.inbox_of(&record.path);
        let label = match (&record.status, record.top.as_ref().and_then(|t| t.first())) {
            (Status::Ok, Some(top)) => top.label_en.as_deref().unwrap_or(&top.label),
            _ => "none",
        };
        let topic = render(
            &self.topic,
            &[("{host}", &self.host), ("{inbox}", inbox), ("{status}", record.status.as_str()), ("{label}", label)],
        );
        let mut payload = serde_json::to_value(record).unwrap_or_else(|_| json!({}));
        if let Value::Object(map) = &mut payload {
            map.insert("host".into(), json!(self.host));
            map.insert("inbox".into(), json!(inbox));
            map.insert("id".into(), json!(id(&self.host, record)));
        }
        Message { topic, payload: payload.to_string().into_bytes() }
    }

    /// The retained presence topic.
    pub fn status_topic(&self) -> String {
        render(&self.status_topic, &[("{host}", &self.host)])
    }

    /// The retained `online` message sent after each connect.
    pub fn online(&self, model: &str, precision: &str) -> Vec<u8> {
        json!({
            "status": "online",
            "host": self.host,
            "model": model,
            "precision": precision,
            "version": env!("CARGO_PKG_VERSION"),
            "time": now(),
        })
        .to_string()
        .into_bytes()
    }

    /// The retained `offline` message: the last will (the broker sends it when labeld vanishes), and what
    /// a clean stop publishes itself (`reason: "stopped"`).
    pub fn offline(&self, reason: &str) -> Vec<u8> {
        json!({ "status": "offline", "host": self.host, "reason": reason }).to_string().into_bytes()
    }

    fn inbox_of(&self, path: &str) -> &str {
        self.inboxes
            .iter()
            .find(|(folder, _)| Path::new(path).starts_with(folder))
            .map_or(UNKNOWN_INBOX, |(_, name)| name.as_str())
    }
}

/// The same row always gets the same id (on every replay, after every restart), and two boxes with the
/// same paths get different ones: xxh3-128 of host, path and the file version the row describes (its
/// identity; the row's time for a file that was never read).
pub fn id(host: &str, record: &Record) -> String {
    let version = record.file.map(|f| f.to_key()).unwrap_or_else(|| record.time.clone());
    let mut bytes = Vec::with_capacity(host.len() + record.path.len() + version.len() + 2);
    for part in [host, record.path.as_str(), version.as_str()] {
        bytes.extend_from_slice(part.as_bytes());
        bytes.push(0);
    }
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
}

/// Fills the placeholders of `template` in one pass (a value holding `{inbox}` stays as it is), each
/// value as one topic level: characters that would add levels or wildcards become `_`.
fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        rest = &rest[open..];
        match values.iter().find(|(name, _)| rest.starts_with(name)) {
            Some((name, value)) => {
                out.push_str(&value.replace(['/', '+', '#', '\0'], "_"));
                rest = &rest[name.len()..];
            }
            None => {
                out.push('{');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    // Topics starting with $ are the broker's own ($SYS): one a placeholder's value made is not labeld's.
    if out.starts_with('$') {
        out.replace_range(0..1, "_");
    }
    out
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Identity;
    use crate::vocab::Top;

    fn messages(topic: &str) -> Messages {
        Messages {
            host: "cam-01".into(),
            topic: topic.into(),
            status_topic: "labeld/{host}/status".into(),
            inboxes: vec![("/srv/in/line2".into(), "line2".into()), ("/srv/in".into(), "all".into())],
        }
    }

    fn record(path: &str) -> Record {
        Record {
            path: path.into(),
            time: "2026-11-29T06:00:00.000Z".into(),
            model: "resnet18".into(),
            engine: None,
            status: Status::Ok,
            top: Some(vec![Top { rank: 1, class_id: 285, label: "Egyptian cat/kitty+".into(), label_en: None, score: 0.75 }]),
            confident: None,
            latency_ms: 12.5,
            error: None,
            file: Some(Identity { dev: 1, inode: 2, size: 3, mtime_ns: 4, ctime_ns: 5, xxh3: None }),
            route: None,
        }
    }

    #[test]
    fn topic_fills_placeholders_one_level_each() {
        let m = messages("plant/{host}/{inbox}/{status}/{label}");
        assert_eq!(m.result(&record("/srv/in/line2/a.jpg")).topic, "plant/cam-01/line2/ok/Egyptian cat_kitty_");
        assert_eq!(m.result(&record("/srv/in/other/a.jpg")).topic, "plant/cam-01/all/ok/Egyptian cat_kitty_");
        assert_eq!(m.result(&record("/elsewhere/a.jpg")).topic, "plant/cam-01/unknown/ok/Egyptian cat_kitty_");
        let mut failed = record("/srv/in/b.png");
        failed.status = Status::Error;
        failed.top = None;
        assert_eq!(m.result(&failed).topic, "plant/cam-01/all/error/none");
    }

    #[test]
    fn a_value_that_looks_like_a_placeholder_is_not_filled_again() {
        let mut m = messages("labeld/{host}/{inbox}/result");
        m.host = "{inbox}".into();
        m.inboxes = vec![("/srv/in".into(), "{label}".into())];
        assert_eq!(m.result(&record("/srv/in/a.jpg")).topic, "labeld/{inbox}/{label}/result");
        assert_eq!(m.status_topic(), "labeld/{inbox}/status");
        let mut dollar = messages("{host}/x");
        dollar.host = "$SYS".into();
        assert_eq!(dollar.result(&record("/srv/in/a.jpg")).topic, "_SYS/x");
    }

    #[test]
    fn a_routed_row_says_where_the_image_went() {
        let m = messages("labeld/{host}/{inbox}/result");
        let mut r = record("/srv/in/line2/a.jpg");
        r.route = Some(crate::vocab::Routed { action: "move".into(), to: Some("/srv/sorted/Egyptian cat".into()), at: None });
        let payload: Value = serde_json::from_slice(&m.result(&r).payload).unwrap();
        assert_eq!(payload["route"], serde_json::json!({"action": "move", "to": "/srv/sorted/Egyptian cat"}));
        let unrouted: Value = serde_json::from_slice(&m.result(&record("/srv/in/b.jpg")).payload).unwrap();
        assert!(unrouted.get("route").is_none());
    }

    #[test]
    fn payload_is_the_sidecar_plus_host_inbox_and_id() {
        let m = messages("labeld/{host}/{inbox}/result");
        let r = record("/srv/in/line2/a.jpg");
        let payload: Value = serde_json::from_slice(&m.result(&r).payload).unwrap();
        let sidecar = serde_json::to_value(&r).unwrap();
        for (k, v) in sidecar.as_object().unwrap() {
            assert_eq!(&payload[k], v, "{k}");
        }
        assert_eq!(payload["host"], "cam-01");
        assert_eq!(payload["inbox"], "line2");
        assert_eq!(payload["id"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn id_is_stable_per_row_and_differs_per_file_version_and_host() {
        let r = record("/srv/in/a.jpg");
        assert_eq!(id("cam-01", &r), id("cam-01", &r.clone()));
        assert_ne!(id("cam-01", &r), id("cam-02", &r));
        let mut newer = r.clone();
        newer.file = Some(Identity { dev: 1, inode: 2, size: 3, mtime_ns: 9, ctime_ns: 9, xxh3: None });
        assert_ne!(id("cam-01", &r), id("cam-01", &newer));
        // A relabelling of the same file version (new time, new latency) is the same image: same id.
        let mut again = r.clone();
        again.time = "2026-11-30T00:00:00.000Z".into();
        again.latency_ms = 99.0;
        assert_eq!(id("cam-01", &r), id("cam-01", &again));
    }
}
