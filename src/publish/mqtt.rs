//! The broker connection: connects (TLS, credentials, last will), announces presence, publishes the
//! outbox's rows within a window of unacknowledged messages, and moves the outbox's checkpoint as the
//! broker acknowledges them (PUBACK for QoS 1, PUBCOMP for QoS 2). Any failure drops the connection
//! state entirely; the next connection starts again from the checkpoint, so nothing acknowledged is
//! sent twice except what a crash caught between an acknowledgement and the checkpoint write, and
//! nothing unacknowledged is skipped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::mpsc;

use super::message::Messages;
use super::outbox::{Outbox, Position};
use super::status::PublishStatus;
use super::window::{Released, Window};
use crate::backoff::{Backoff, jittered};
use crate::config::MqttConfig;
use crate::shutdown::Shutdown;

/// What a connection needs besides the outbox.
pub struct Settings {
    pub mqtt: MqttConfig,
    pub messages: Messages,
    /// For the `online` message.
    pub model: String,
    pub precision: String,
    pub drain: Drain,
}

/// What a clean stop does with rows not yet published before it disconnects; whatever is left stays
/// in the outbox for the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// The service stops: at most this long (systemd is waiting).
    For(Duration),
    /// `run --once`: until every row is acknowledged, as long as acknowledgements keep coming (a
    /// broker silent for this long ends it).
    UntilCaughtUp(Duration),
}
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// A connection that lasted less than this before it was lost counts as a failed attempt: the back-off
/// grows instead of reconnecting at once (a broker that drops labeld right after the CONNACK, another
/// client with the same client id).
const STABLE: Duration = Duration::from_secs(10);
/// A row whose sending ends the connection this many times in a row, each time alone in flight and
/// within a second, is probably one the broker refuses (larger than its packet limit): the log says so.
/// It is not given up (a flaky link looks the same): `[mqtt] max_message_kb` is the operator's lever.
const STRIKES: u32 = 3;
/// A results log that cannot be read (I/O error) is tried again this much later.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Publishes until `stop` is triggered, reconnecting with back-off. Returns the outbox (checkpoint saved).
pub async fn run(mut outbox: Outbox, settings: Settings, status: PublishStatus, stop: Shutdown) -> Outbox {
    let options = match options(&settings) {
        Ok(o) => o,
        Err(why) => {
            // Checked at config load; reaching this means the PEM files changed in between.
            tracing::error!(broker = %settings.mqtt.url, "cannot set up the MQTT connection, nothing is published: {why}");
            status.disconnected(&why);
            stop.wait().await;
            return outbox;
        }
    };
    // Kept alive while publishing: it says when the checkpoint file is removed or replaced.
    let (_checkpoint_watch, mut checkpoint_events) = watch_checkpoint(&outbox.checkpoint_path());
    let changes = &mut checkpoint_events;
    let mut backoff = Backoff::new(FIRST_RETRY, LAST_RETRY);
    let mut attempts_failed = 0u32;
    let mut suspect: Option<(Position, u32)> = None;
    while !stop.is_triggered() {
        note(&outbox, &status);
        let (client, eventloop) = AsyncClient::new(options.clone(), usize::from(settings.mqtt.max_inflight) + 8);
        let (events, connected) = spawn_eventloop(eventloop);
        match wait_connected(connected, &stop, settings.mqtt.keep_alive.max(Duration::from_secs(10))).await {
            Connect::Stopped => break,
            Connect::Failed(why) => {
                attempts_failed += 1;
                status.connect_failed(&why);
                let retry = backoff.failed(Instant::now());
                tracing::warn!(broker = %settings.mqtt.url, retry_in_s = retry.as_secs_f64(), attempt = attempts_failed, "cannot connect to the MQTT broker: {why}; labelling goes on, results wait in the outbox");
                wait_out(jittered(retry), &mut outbox, &status, &stop, changes).await;
                continue;
            }
            Connect::Up => {}
        }
        tracing::info!(broker = %settings.mqtt.url, client_id = %settings.mqtt.client_id, pending_rows = outbox.pending(), "connected to the MQTT broker");
        status.connected();
        attempts_failed = 0;
        outbox.rewind();
        let up_at = Instant::now();
        // While a row is suspected of ending connections, rows go one at a time: the next loss is its.
        let max = if suspect.is_some() { 1 } else { usize::from(settings.mqtt.max_inflight) };
        let mut session = Session {
            client,
            events,
            window: Window::default(),
            qos: qos(settings.mqtt.qos),
            max,
            full: usize::from(settings.mqtt.max_inflight),
            acked_rows: 0,
            presence_acked: false,
        };
        session.announce(&settings, true);
        match session.publish(&mut outbox, &settings, &status, &stop, changes).await {
            End::Stopped => {
                session.finish(&mut outbox, &settings, &status).await;
                break;
            }
            End::Lost(why) => {
                let unacknowledged = session.window.rows_in_flight();
                status.lost(&why, unacknowledged);
                suspect = next_suspect(suspect, &session, &why);
                if let Some((at, strikes)) = suspect
                    && strikes >= STRIKES
                {
                    say_suspect(&mut outbox, at, strikes, &settings, &why);
                }
                if up_at.elapsed() >= STABLE {
                    backoff.succeeded();
                    tracing::warn!(broker = %settings.mqtt.url, unacknowledged, "lost the MQTT broker: {why}; reconnecting, the unacknowledged rows go again");
                    // Not at once: a second client with this client id must not be kicked straight back.
                    wait_out(jittered(FIRST_RETRY), &mut outbox, &status, &stop, changes).await;
                } else {
                    let retry = backoff.failed(Instant::now());
                    tracing::warn!(broker = %settings.mqtt.url, unacknowledged, retry_in_s = retry.as_secs_f64(), lasted_s = up_at.elapsed().as_secs_f64(),
                        "lost the MQTT broker right after connecting: {why}; another client with client_id {:?}, or a message the broker refuses? Retrying with back-off", settings.mqtt.client_id);
                    wait_out(jittered(retry), &mut outbox, &status, &stop, changes).await;
                }
            }
        }
    }
    note(&outbox, &status);
    if let Err(e) = outbox.save(Instant::now()) {
        tracing::error!(checkpoint = %outbox.checkpoint_path().display(), error = %e, "cannot save the MQTT checkpoint; rows after the last saved one will be published again");
    }
    status.stopped();
    outbox
}

/// Waits `retry` (or until stopped), keeping the figures current and the checkpoint's list of log files
/// up to date: rotations during an outage must survive a crash during it. Wakes only when the sink
/// announces something, the checkpoint file changes, a checkpoint write is due, or `retry` is over.
async fn wait_out(retry: Duration, outbox: &mut Outbox, status: &PublishStatus, stop: &Shutdown, changes: &mut CheckpointEvents) {
    let until = Instant::now() + retry;
    let tap = outbox.tap();
    loop {
        let now = Instant::now();
        outbox.save_if_due(now);
        note(outbox, status);
        if now >= until {
            return;
        }
        let wake = outbox.deadline().map_or(until, |d| d.min(until));
        tokio::select! {
            _ = stop.wait() => return,
            _ = tap.changed() => {}
            Some(()) = changes.recv() => outbox.save_or_warn(Instant::now()),
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Events about the checkpoint file: it is written again at once when removed or replaced behind
/// labeld's back.
type CheckpointEvents = mpsc::UnboundedReceiver<()>;

/// Watches the checkpoint's folder for events naming the checkpoint file. Without a watch (inotify
/// refused), a checkpoint removed behind labeld's back is written again when it next moves.
fn watch_checkpoint(path: &Path) -> (Option<RecommendedWatcher>, CheckpointEvents) {
    let (tx, rx) = mpsc::unbounded_channel();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = path.to_path_buf();
    let handler = move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| ev.paths.contains(&name)) {
            let _ = tx.send(());
        }
    };
    let watched = RecommendedWatcher::new(handler, notify::Config::default()).and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    match watched {
        Ok(w) => (Some(w), rx),
        Err(e) => {
            tracing::warn!(checkpoint = %path.display(), error = %e, "cannot watch the MQTT checkpoint's folder: a checkpoint removed while labeld runs is written again only when it next moves");
            (None, rx)
        }
    }
}

fn note(outbox: &Outbox, status: &PublishStatus) {
    status.set_pending(outbox.pending());
    status.set_lost_files(outbox.lost_generations());
}

/// After a lost connection: the row that was alone in flight, sent under a second before the drop, gets
/// one more strike. A drop with several rows in flight makes the next connection send them one at a
/// time (no strike yet); a connection that got rows acknowledged, or lost nothing in flight, clears or
/// keeps the suspicion as it was.
fn next_suspect(suspect: Option<(Position, u32)>, session: &Session, why: &str) -> Option<(Position, u32)> {
    if session.acked_rows > 0 {
        return None;
    }
    if let Some(at) = session.window.lone_row_sent_within(Duration::from_secs(1), Instant::now()) {
        let strikes = match suspect {
            Some((s, n)) if s == at => n + 1,
            _ => 1,
        };
        tracing::debug!(strikes, "the connection dropped ({why}) right after a row was sent alone");
        return Some((at, strikes));
    }
    match session.window.first_row_in_flight() {
        Some(at) => Some(suspect.filter(|(s, _)| *s == at).unwrap_or((at, 0))),
        None => suspect,
    }
}

/// Names the row that keeps ending the connection, with what the operator can do; publishing waits for it.
fn say_suspect(outbox: &mut Outbox, at: Position, strikes: u32, s: &Settings, why: &str) {
    outbox.rewind();
    if let Ok(rows) = outbox.next_rows(1, Instant::now())
        && let Some(row) = rows.first().filter(|r| r.at == at)
    {
        let bytes = s.messages.result(&row.record).payload.len();
        tracing::error!(path = %row.record.path, bytes, strikes, max_message_kb = s.mqtt.max_message_kb,
            "the MQTT broker drops the connection every time this row is sent alone ({why}): a packet size limit on the broker (Mosquitto max_packet_size)? Set [mqtt] max_message_kb below it to give such rows up; until then publishing waits for this row");
    }
    outbox.rewind();
}

enum Connect {
    Up,
    Failed(String),
    Stopped,
}

enum End {
    Stopped,
    Lost(String),
}

/// Runs the event loop in its own task (its `poll` must never be cancelled half-way through a write):
/// events come out on a channel; the first `ConnAck` (or the connect error) on a oneshot.
type Events = mpsc::UnboundedReceiver<Result<Event, String>>;
type Connected = tokio::sync::oneshot::Receiver<Result<(), String>>;

fn spawn_eventloop(mut eventloop: EventLoop) -> (Events, Connected) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut up = Some(up_tx);
        loop {
            let event = eventloop.poll().await;
            match (&event, up.take()) {
                (Ok(Event::Incoming(Packet::ConnAck(_))), Some(u)) => {
                    let _ = u.send(Ok(()));
                    continue;
                }
                (Err(e), Some(u)) => {
                    let _ = u.send(Err(describe(e)));
                    return;
                }
                (_, u) => up = u,
            }
            let failed = event.is_err();
            if tx.send(event.map_err(|e| describe(&e))).is_err() || failed {
                // The session is gone (or the connection is): this event loop's state is dropped with it.
                return;
            }
        }
    });
    (rx, up_rx)
}

async fn wait_connected(connected: Connected, stop: &Shutdown, limit: Duration) -> Connect {
    tokio::select! {
        _ = stop.wait() => Connect::Stopped,
        r = tokio::time::timeout(limit, connected) => match r {
            Ok(Ok(Ok(()))) => Connect::Up,
            Ok(Ok(Err(why))) => Connect::Failed(why),
            Ok(Err(_)) => Connect::Failed("the connection ended before the broker answered".into()),
            Err(_) => Connect::Failed(format!("no answer from the broker within {} s", limit.as_secs())),
        },
    }
}

struct Session {
    client: AsyncClient,
    events: Events,
    window: Window,
    qos: QoS,
    /// Messages in flight at most now: 1 while a row is suspected of ending connections, else `full`.
    max: usize,
    full: usize,
    /// Rows the broker acknowledged in this connection.
    acked_rows: u64,
    /// The broker acknowledged the `online` message: it accepts this client's publishes at all.
    presence_acked: bool,
}

impl Session {
    /// The retained presence message: `online` after connect, `offline` at a clean stop.
    fn announce(&mut self, s: &Settings, online: bool) {
        let payload = if online { s.messages.online(&s.model, &s.precision) } else { s.messages.offline("stopped") };
        if self.client.try_publish(s.messages.status_topic(), QoS::AtLeastOnce, true, payload).is_ok() {
            self.window.push(None, QoS::AtLeastOnce);
        }
    }

    /// Sends rows while there is room, and otherwise blocks on what can change that: stop, the
    /// broker's events (acknowledgements make room), the sink's announcements (rows made durable),
    /// the checkpoint file changing, and the outbox's own deadline.
    async fn publish(&mut self, outbox: &mut Outbox, s: &Settings, status: &PublishStatus, stop: &Shutdown, changes: &mut CheckpointEvents) -> End {
        let tap = outbox.tap();
        let mut read_retry: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let room = self.max.saturating_sub(self.window.len());
            // Rows only once the broker has taken the presence message: the connection works, and a
            // drop after that is about what was sent.
            let reading = room > 0 && self.presence_acked && read_retry.is_none_or(|t| now >= t);
            if reading {
                match self.send_rows(outbox, s, status, room, now) {
                    Ok(true) => read_retry = None,
                    Ok(false) => read_retry = Some(now + READ_RETRY),
                    Err(why) => return End::Lost(why),
                }
            }
            outbox.save_if_due(now);
            note(outbox, status);
            let deadline = [outbox.deadline(), reading.then(|| outbox.read_deadline()).flatten(), read_retry].into_iter().flatten().min();
            tokio::select! {
                biased;
                _ = stop.wait() => return End::Stopped,
                event = self.events.recv() => match event {
                    Some(Ok(event)) => self.handle(event, outbox, status),
                    Some(Err(why)) => return End::Lost(why),
                    None => return End::Lost("the connection ended".into()),
                },
                // The sink made rows durable or moved to another file: the wake-up for new rows.
                _ = tap.changed() => {}
                Some(()) = changes.recv() => outbox.save_or_warn(Instant::now()),
                _ = tokio::time::sleep_until(deadline.unwrap_or(now).into()), if deadline.is_some() => {}
            }
        }
    }

    /// Hands up to `room` rows to the client. `Ok(false)`: the log could not be read now (I/O error;
    /// tried again [`READ_RETRY`] later).
    fn send_rows(&mut self, outbox: &mut Outbox, s: &Settings, status: &PublishStatus, room: usize, now: Instant) -> Result<bool, String> {
        let rows = match outbox.next_rows(room, now) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the results log to publish it; retrying");
                return Ok(false);
            }
        };
        for row in rows {
            let m = s.messages.result(&row.record);
            let bytes = m.topic.len() + m.payload.len();
            if bytes > s.mqtt.max_message_kb * 1024 {
                tracing::error!(path = %row.record.path, bytes, max_message_kb = s.mqtt.max_message_kb,
                    "a result is larger than [mqtt] max_message_kb: it is not published (its sidecar and CSV row stay)");
                self.window.push_given_up(row.at);
                continue;
            }
            self.client.try_publish(m.topic, self.qos, false, m.payload).map_err(|e| format!("cannot queue a message: {e}"))?;
            self.window.push(Some(row.at), self.qos);
        }
        let released = self.window.release();
        self.apply(released, outbox, status);
        Ok(true)
    }

    fn handle(&mut self, event: Event, outbox: &mut Outbox, status: &PublishStatus) {
        let released = match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => self.window.sent(pkid, Instant::now()),
            // PUBACK ends a QoS 1 message (rows at QoS 1, presence always), PUBCOMP a QoS 2 one.
            Event::Incoming(Packet::PubAck(ack)) => self.window.acknowledged(ack.pkid),
            Event::Incoming(Packet::PubComp(comp)) => self.window.acknowledged(comp.pkid),
            _ => Released::default(),
        };
        self.apply(released, outbox, status);
    }

    /// Moves the checkpoint over what the window released and counts it.
    fn apply(&mut self, released: Released, outbox: &mut Outbox, status: &PublishStatus) {
        if released.refused > 0 {
            status.refused(released.refused);
        }
        if let Some(at) = released.last {
            outbox.acknowledged(at);
        }
        if released.rows > 0 {
            self.acked_rows += released.rows;
            status.published(released.rows);
            // A row got through: whatever ended the last connection, this one carries rows; full window.
            self.max = self.full;
        }
        self.presence_acked |= released.presence;
    }

    /// Clean stop: give in-flight messages (and rows the last batches wrote) a moment to be
    /// acknowledged, say offline, disconnect.
    async fn finish(&mut self, outbox: &mut Outbox, s: &Settings, status: &PublishStatus) {
        let now = tokio::time::Instant::now;
        let (mut deadline, quiet) = match s.drain {
            Drain::For(d) => (now() + d, None),
            Drain::UntilCaughtUp(quiet) => (now() + quiet, Some(quiet)),
        };
        loop {
            let room = self.max.saturating_sub(self.window.len());
            if room > 0 && self.send_rows(outbox, s, status, room, Instant::now()).is_err() {
                break;
            }
            if self.window.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(event))) => {
                    let before = self.window.len();
                    self.handle(event, outbox, status);
                    if let (Some(q), true) = (quiet, self.window.len() < before) {
                        deadline = now() + q;
                    }
                }
                _ => break,
            }
        }
        note(outbox, status);
        self.announce(s, false);
        let _ = self.client.try_disconnect();
        // Let the event loop write the offline message and the DISCONNECT before it is dropped.
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(Ok(event))) = tokio::time::timeout_at(until, self.events.recv()).await {
            if event == Event::Outgoing(Outgoing::Disconnect) {
                break;
            }
            self.handle(event, outbox, status);
        }
    }
}


fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn options(s: &Settings) -> Result<MqttOptions, String> {
    let m = &s.mqtt;
    let mut o = MqttOptions::new(m.client_id.clone(), m.broker_host.clone(), m.port);
    o.set_keep_alive(m.keep_alive);
    // The outbox, not the broker session, is what survives: every connection starts clean.
    o.set_clean_session(true);
    o.set_inflight(m.max_inflight);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_last_will(LastWill::new(s.messages.status_topic(), s.messages.offline("connection lost"), QoS::AtLeastOnce, true));
    if let (Some(user), Some(password)) = (&m.username, &m.password) {
        o.set_credentials(user.clone(), password.0.clone());
    } else if let Some(user) = &m.username {
        o.set_credentials(user.clone(), String::new());
    }
    if m.tls {
        o.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(m)?))));
    }
    Ok(o)
}

/// rustls with the ring provider: trusts `ca_file` if set, else the system's certificates.
pub fn tls_config(m: &MqttConfig) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &m.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("ca_file: {e}"))?;
                roots.add(cert).map_err(|e| format!("ca_file: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to check the broker's certificate against (set ca_file)".into());
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match &m.client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().map_err(|e| format!("cert_file: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.0.as_bytes()).map_err(|e| format!("key_file: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("cert_file/key_file: {e}"))
        }
    }
}

/// A connection error in an operator's words.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            "the broker refused the credentials: bad user name or password ([mqtt] username, password_file)".into()
        }
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
            "the broker refused the connection: not authorized ([mqtt] username, password_file, client certificate)".into()
        }
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId) => "the broker refused the client id ([mqtt] client_id)".into(),
        ConnectionError::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        other => other.to_string(),
    }
}
