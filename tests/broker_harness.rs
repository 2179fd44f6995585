//! The MQTT tests' own Mosquitto (tests/common/broker.rs) does what they rely on: a persistent QoS 1
//! subscriber keeps its session across a broker kill -9 and reconnects by itself; TLS with the test's
//! CA and a password file work and refuse what they should.

use std::collections::HashSet;
use std::io::Read;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::broker::*;
use crate::common::eventually;

const WAIT: Duration = Duration::from_secs(20);
/// Mosquitto's log line for the subscriber's acknowledgement of a delivery.
const ACKED: &str = "Received PUBACK from recorder ";

fn payloads(m: &[(String, String)]) -> Vec<&str> {
    m.iter().map(|(_, p)| p.as_str()).collect()
}

#[test]
fn a_persistent_subscriber_survives_a_broker_kill9_and_gets_what_was_queued_for_it() {
    let mut b = Broker::start(BrokerOptions::default());
    assert!(b.url().starts_with("mqtt://127.0.0.1:") && b.port() != 1883, "{}", b.url());
    let mut sub = Subscriber::start(&b, "box/+/result", "recorder");
    b.publish("box/a/result", r#"{"n":1}"#, false);
    b.publish("box/other/ignored/result", r#"{"n":0}"#, false);
    b.publish("box/b/result", r#"{"n":2}"#, false);
    let m = sub.wait_for(2, WAIT);
    assert_eq!(m, vec![("box/a/result".into(), r#"{"n":1}"#.into()), ("box/b/result".into(), r#"{"n":2}"#.into())]);

    // Killed while the subscriber is connected (both deliveries acknowledged and saved): it reconnects
    // by itself, and a message published before it is back is kept for its session.
    b.wait_for_log_count(ACKED, 2, WAIT);
    eventually("both deliveries acknowledged in the persistence file", WAIT, || !b.persists(r#"{"n":1}"#) && !b.persists(r#"{"n":2}"#));
    b.kill9();
    b.restart();
    b.publish("box/a/result", r#"{"n":3}"#, false);
    let m = sub.wait_for(3, WAIT);
    assert_eq!(payloads(&m)[2], r#"{"n":3}"#);
    assert!(sub.is_running(), "mosquitto_sub gave up: {}", sub.stderr());
    assert!(b.count_in_log("as recorder (") >= 2, "the subscriber reconnected:\n{}", b.log_tail(30));

    // Queued while the subscriber is away, then a kill -9 of the broker: persistence keeps it.
    b.wait_for_log_count(ACKED, 3, WAIT);
    eventually("the third delivery acknowledged in the persistence file", WAIT, || !b.persists(r#"{"n":3}"#));
    drop(sub);
    b.publish("box/a/result", r#"{"n":4}"#, false);
    // Mosquitto acknowledges before it saves (autosave on every change): wait for the save.
    eventually("the queued message in the persistence file", WAIT, || b.persists(r#"{"n":4}"#));
    b.kill9();
    b.restart();
    let sub = Subscriber::start(&b, "box/+/result", "recorder");
    let m = sub.wait_for(4, WAIT);
    assert_eq!(payloads(&m), vec![r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#]);
    std::thread::sleep(Duration::from_millis(500)); // a window in which a duplicate would arrive
    assert_eq!(sub.messages().len(), 4, "nothing twice: {:?}", sub.messages());
}

#[test]
fn a_broker_that_is_down_at_first_starts_later_on_its_reserved_port() {
    let mut b = Broker::down(BrokerOptions::default());
    assert!(!b.is_running());
    assert!(std::net::TcpStream::connect(("127.0.0.1", b.port())).is_err(), "nothing listens yet");
    assert_eq!(b.retained("labeld/box/status"), None);
    b.restart();
    b.publish("labeld/box/status", r#"{"status":"online"}"#, true);
    assert_eq!(b.retained("labeld/box/status").as_deref(), Some(r#"{"status":"online"}"#));
    assert_eq!(b.retained("labeld/other/status"), None);
    b.publish("labeld/box/status", r#"{"status":"offline"}"#, true);
    let m = b.wait_retained("labeld/box/status", WAIT, |m| m.contains("offline"));
    assert_eq!(m, r#"{"status":"offline"}"#);
    // A clean stop saves retained messages too.
    b.stop();
    b.restart();
    assert_eq!(b.retained("labeld/box/status").as_deref(), Some(r#"{"status":"offline"}"#));
}

#[test]
fn tls_with_the_tests_ca_and_a_password_file() {
    let b = Broker::start(BrokerOptions::tls().with_user("camera-line", "s3cret pass"));
    assert!(b.url().starts_with("mqtts://localhost:"), "{}", b.url());
    let ca = b.ca_file().expect("a TLS broker has a CA").to_path_buf();
    // The chain verifies strictly, for the name and the address labeld may be given.
    let server = b.dir.path().join("server.crt");
    let out = Command::new("openssl").args(["verify", "-x509_strict", "-CAfile"]).arg(&ca).arg(&server).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for (host, check) in [("localhost", "-verify_hostname"), ("127.0.0.1", "-verify_ip")] {
        let out = Command::new("openssl").args(["verify", "-CAfile"]).arg(&ca).args([check, host]).arg(&server).output().unwrap();
        assert!(out.status.success(), "{host}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let sub = Subscriber::start(&b, "labeld/#", "tls-recorder");
    // A topic level may hold spaces (`{label}`): the recorder keeps topic and payload apart.
    b.publish("labeld/box/great white shark/result", r#"{"id": "x"}"#, false);
    assert_eq!(sub.wait_for(1, WAIT), vec![("labeld/box/great white shark/result".into(), r#"{"id": "x"}"#.into())]);

    let pub_with = |message: &str, extra: &[&str]| {
        Command::new("mosquitto_pub")
            .args(["-p", &b.port().to_string(), "-q", "1", "-t", "labeld/box/line1/result", "-m", message])
            .args(extra)
            .output()
            .unwrap()
    };
    let cafile = ca.to_str().unwrap();
    let wrong = pub_with("refused", &["-h", "localhost", "--cafile", cafile, "-u", "camera-line", "-P", "wrong"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not authorised"), "{}", String::from_utf8_lossy(&wrong.stderr));
    let anonymous = pub_with("refused", &["-h", "localhost", "--cafile", cafile]);
    assert!(!anonymous.status.success(), "anonymous clients are refused");
    let plain = pub_with("refused", &["-h", "127.0.0.1", "-u", "camera-line", "-P", "s3cret pass"]);
    assert!(!plain.status.success(), "plain MQTT is refused on the TLS listener");
    let by_ip = pub_with("by-ip", &["-h", "127.0.0.1", "--cafile", cafile, "-u", "camera-line", "-P", "s3cret pass"]);
    assert!(by_ip.status.success(), "{}", String::from_utf8_lossy(&by_ip.stderr));
    let m = sub.wait_for(2, WAIT);
    assert_eq!(payloads(&m), vec![r#"{"id": "x"}"#, "by-ip"], "only the authorised messages arrived");
}

/// What the stream test needs: a message the broker acknowledged (QoS 1) reaches the persistent
/// subscriber even when the broker is killed -9 right after, mid-stream.
#[test]
fn every_acknowledged_message_reaches_the_subscriber_across_a_broker_kill9() {
    let mut b = Broker::start(BrokerOptions::default());
    let sub = Subscriber::start(&b, "load/#", "load-recorder");
    let args = b.client_args();
    // Publishers that found the broker down at least once, or had nothing left to publish.
    let refused = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let (args, refused) = (args.clone(), refused.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut was_refused = false;
                for i in 0..150 {
                    let payload = format!(r#"{{"p":{p},"i":{i}}}"#);
                    // Retried until the broker acknowledges it (it is down for a while).
                    eventually(format_args!("{payload} acknowledged"), Duration::from_secs(120), || {
                        let out = Command::new("mosquitto_pub")
                            .args(&args)
                            .args(["-q", "1", "-t", &format!("load/{p}"), "-m", &payload])
                            .output()
                            .unwrap();
                        if !out.status.success() && !std::mem::replace(&mut was_refused, true) {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        out.status.success()
                    });
                    acked.push(payload);
                }
                if !was_refused {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                acked
            })
        })
        .collect();
    sub.wait_for(100, WAIT);
    b.kill9();
    // Down until every publisher has been refused: they and the subscriber retry meanwhile.
    eventually("every publisher refused by the killed broker", WAIT, || refused.load(Ordering::Relaxed) == 4);
    b.restart();
    let acked: Vec<String> = publishers.into_iter().flat_map(|p| p.join().unwrap()).collect();
    assert_eq!(acked.len(), 600);
    let missing = |m: &[(String, String)]| {
        let got: HashSet<&str> = payloads(m).into_iter().collect();
        acked.iter().filter(|a| !got.contains(a.as_str())).cloned().collect::<Vec<_>>()
    };
    sub.wait_until(WAIT, |m| missing(m).is_empty());
    let m = sub.wait_quiet(Duration::from_millis(500), WAIT);
    let got: HashSet<&str> = payloads(&m).into_iter().collect();
    assert_eq!(got.len(), 600, "only the acknowledged messages: {:?}", missing(&m));
    eprintln!("{} messages for 600 acknowledged ones ({} duplicates)", m.len(), m.len() - got.len());
}

/// The link the network-cut test puts between labeld and the broker: it forwards, then holds its
/// connections open while passing nothing, then lets new connections through.
#[test]
fn a_cut_link_passes_nothing_and_closes_nothing_until_it_heals() {
    let b = Broker::start(BrokerOptions::default());
    let link = Link::start(&b);
    assert!(link.url().ends_with(&format!(":{}", link.port())));
    let sub = Subscriber::start(&b, "cut/#", "cut-recorder");
    let through_link = |payload: &str| {
        Command::new("timeout")
            .args(["3", "mosquitto_pub", "-h", "127.0.0.1", "-p", &link.port().to_string(), "-q", "1", "-t", "cut/x", "-m", payload])
            .status()
            .unwrap()
            .success()
    };
    assert!(through_link("before"));
    sub.wait_for(1, WAIT);

    let mut held = std::net::TcpStream::connect(("127.0.0.1", link.port())).unwrap();
    link.cut();
    assert!(!through_link("during"), "nothing gets through a cut link");
    held.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 16];
    let err = held.read(&mut buf).expect_err("no FIN and no bytes while cut");
    assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err}");

    link.heal();
    assert!(through_link("after"));
    let m = sub.wait_for(2, WAIT);
    assert_eq!(payloads(&m), vec!["before", "after"]);
    // The connection that lived through the cut is closed at the heal.
    held.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(held.read(&mut buf).unwrap_or(0), 0);
}
