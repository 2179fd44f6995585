//! A headless Chromium driven over the DevTools protocol on `--remote-debugging-pipe` (commands on
//! the child's fd 3, replies and events on its fd 4, each a JSON message ending in NUL): real key
//! presses, a real file chooser, real uploads, no WebSocket client needed.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::wait::{Shown, eventually};

/// How every test runs Chromium: headless, as root in a container, nothing fetched in the background.
pub const HEADLESS: [&str; 6] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
];

pub struct Chromium {
    child: Child,
    commands: std::io::PipeWriter,
    messages: Receiver<Value>,
    /// Events that arrived while waiting for a reply, oldest first.
    events: VecDeque<Value>,
    next_id: u64,
    /// The page's flattened session, once `open` attached to it.
    session: Option<String>,
    timeout: Duration,
}

impl Chromium {
    /// Starts Chromium with its profile in `profile`; every wait below gives up after `timeout`.
    pub fn start(profile: &Path, timeout: Duration) -> Chromium {
        let (child_reads, commands) = std::io::pipe().expect("pipe for DevTools commands");
        let (replies, child_writes) = std::io::pipe().expect("pipe for DevTools replies");
        let (r, w) = (child_reads.as_raw_fd(), child_writes.as_raw_fd());
        let mut cmd = Command::new("chromium");
        cmd.args(HEADLESS)
        .arg("--remote-debugging-pipe")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(profile.with_extension("log")).expect("chromium log file"));
        // SAFETY: only async-signal-safe calls between fork and exec. Both ends are copied above 9
        // first, so dup2 onto 3 and 4 cannot clobber one with the other.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 10);
                let w = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("run chromium (Debian package `chromium`, installed by scripts/setup-system.sh test)");
        // Our copies of the child's ends must close, or the reader never sees Chromium exit.
        drop((child_reads, child_writes));
        let (tx, messages) = channel();
        std::thread::spawn(move || {
            let mut from = BufReader::new(replies);
            let mut buf = Vec::new();
            while from.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                let Ok(msg) = serde_json::from_slice::<Value>(&buf) else { break };
                if tx.send(msg).is_err() {
                    break;
                }
                buf.clear();
            }
        });
        Chromium { child, commands, messages, events: VecDeque::new(), next_id: 0, session: None, timeout }
    }

    /// Opens `url` in a new page and attaches to it; later commands go to that page.
    pub fn open(&mut self, url: &str) {
        let target = self.browser_call("Target.createTarget", json!({ "url": url }));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self.browser_call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true }));
        self.session = Some(attached["sessionId"].as_str().expect("sessionId").to_string());
        self.call("Page.enable", json!({}));
        self.call("Runtime.enable", json!({}));
    }

    /// A command to the browser itself (no page session).
    pub fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A command to the open page; panics with Chromium's error if it fails.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, session)
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap_or_else(|e| panic!("{method}: chromium is gone ({e})"));
        let reply = self.next_message(|m| m["id"].as_u64() == Some(id), method);
        if let Some(err) = reply.get("error") {
            panic!("{method} failed: {err}");
        }
        reply["result"].clone()
    }

    /// Waits for the page event `method` (one that already arrived counts) and returns its params.
    pub fn event(&mut self, method: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(i).unwrap()["params"].clone();
        }
        self.next_message(|m| m["method"] == method, method)["params"].clone()
    }

    fn next_message(&mut self, wanted: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(m) if wanted(&m) => return m,
                Ok(m) if m.get("method").is_some() => self.events.push_back(m),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no answer to {what} from chromium after {:?}", self.timeout),
                Err(RecvTimeoutError::Disconnected) => panic!("chromium exited while waiting for {what}"),
            }
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression).unwrap_or_else(|e| panic!("{expression} threw: {e}"))
    }

    fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let r = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }));
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Evaluates `expression` until it is truthy; returns its value. Until then it may also throw
    /// (the page is still loading).
    pub fn wait_for(&mut self, expression: &str) -> Value {
        let timeout = self.timeout;
        eventually(format_args!("{expression} true"), timeout, || match self.try_eval(expression) {
            Ok(v) if !(v.is_null() || v == false || v == "" || v == 0) => Ok(v),
            other => Err(Shown(other)),
        })
    }

    /// Presses and releases a key (`"Tab"`, `"Enter"`, `" "`) as a keyboard user would.
    pub fn press(&mut self, key: &str) {
        let (code, vk, text) = match key {
            "Tab" => ("Tab", 9, ""),
            "Enter" => ("Enter", 13, "\r"),
            " " => ("Space", 32, " "),
            other => panic!("no key code for {other:?}"),
        };
        let mut down = json!({ "type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk });
        if !text.is_empty() {
            down["text"] = Value::String(text.into());
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call("Input.dispatchKeyEvent", json!({ "type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk }));
    }

    /// A PNG of the page as it is now, `width` CSS pixels wide and as tall as its content.
    pub fn screenshot(&mut self, width: u32) -> Vec<u8> {
        let height = self.eval("Math.ceil(document.documentElement.scrollHeight)").as_u64().unwrap_or(800);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|q| {
            let n = q.iter().enumerate().fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(q.len() - 1)
        })
        .collect()
}
