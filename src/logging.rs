//! Log lines on stderr (journald keeps one entry per line). Field values come from files, models,
//! label lists and brokers, none of which labeld controls, so none may split a line or pass for
//! another field: every value that is not a plain word is quoted with `"` and `\` escaped, control
//! characters (newlines, escape sequences) and Unicode line and direction controls are written as
//! `\n`, `\u{1b}`, …, in values and in the message alike.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// Logs go to stderr; `LABELD_LOG` (or `RUST_LOG`) sets the filter, default `info`.
/// `LABELD_LOG_FORMAT=json` writes one JSON object per line, for log collectors (JSON escapes every
/// value itself); the default text format escapes them as the module docs say.
pub fn init() -> Result<(), String> {
    let filter = std::env::var("LABELD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false);
    match std::env::var("LABELD_LOG_FORMAT").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("" | "text") => {
            logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).fmt_fields(SafeFields).init()
        }
        // Fields beside the message at the top level: {"timestamp":…,"level":"WARN","message":…,"path":…}
        Ok("json") => logs.json().flatten_event(true).with_current_span(false).with_span_list(false).init(),
        Ok(other) => return Err(format!("LABELD_LOG_FORMAT: must be text or json, got {other:?}")),
        Err(e) => return Err(format!("LABELD_LOG_FORMAT: {e}")),
    }
    Ok(())
}

/// Formats an event's fields as `message key=value key="quoted value"`, escaped (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeFields;

impl<'w> MakeVisitor<Writer<'w>> for SafeFields {
    type Visitor = SafeVisitor<'w>;

    fn make_visitor(&self, writer: Writer<'w>) -> SafeVisitor<'w> {
        SafeVisitor { writer, first: true, result: Ok(()) }
    }
}

pub struct SafeVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl SafeVisitor<'_> {
    fn field(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) { "" } else { " " };
        let mut out = String::with_capacity(value.len() + 16);
        out.push_str(sep);
        if field.name() == "message" {
            escape_into(value, &mut out, false);
        } else {
            out.push_str(field.name());
            out.push('=');
            if is_word(value) {
                out.push_str(value);
            } else {
                out.push('"');
                escape_into(value, &mut out, true);
                out.push('"');
            }
        }
        self.result = self.writer.write_str(&out);
    }
}

impl Visit for SafeVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, &format!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for SafeVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for SafeVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Printed bare: no white space, quote, backslash, `=` or control character, and not empty.
fn is_word(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| !c.is_whitespace() && !is_control(c) && !matches!(c, '"' | '\\' | '='))
}

/// Control characters, and the Unicode ones that break or reorder a line on a terminal.
fn is_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

fn escape_into(s: &str, out: &mut String, quoted: bool) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '"' | '\\' if quoted => {
                out.push('\\');
                out.push(c);
            }
            c if is_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The lines one event is written as, through the same subscriber set-up as the daemon's.
    fn logged(event: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .fmt_fields(SafeFields)
            .finish();
        tracing::subscriber::with_default(subscriber, event);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn hostile_names_cannot_split_a_line_or_forge_a_field() {
        let path = "/in/a.jpg\nERROR labeld exited status=ok";
        let label = "cat\" status=\"forged";
        let model = "m\u{1b}[31mred\u{202e}gpj.exe";
        let text = logged(|| tracing::warn!(path, label, model = %model, n = 3, "image not labelled: {}", "x\ny"));
        assert_eq!(text.lines().count(), 1, "{text}");
        let line = text.trim_end();
        assert_eq!(
            line,
            r#" WARN image not labelled: x\ny path="/in/a.jpg\nERROR labeld exited status=ok" label="cat\" status=\"forged" model="m\u{1b}[31mred\u{202e}gpj.exe" n=3"#
        );
        assert!(!line.contains('\u{1b}'));
    }

    #[test]
    fn plain_values_stay_bare_and_spaces_are_quoted() {
        let text = logged(|| tracing::info!(folder = "/srv/done", label = "咖啡", empty = "", spaced = "a b", ms = 1.5, "ready"));
        assert_eq!(text.trim_end(), r#" INFO ready folder=/srv/done label=咖啡 empty="" spaced="a b" ms=1.5"#);
    }
}
