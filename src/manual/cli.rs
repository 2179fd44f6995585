//! `labeld(8)`: NAME, SYNOPSIS, DESCRIPTION and OPTIONS from clap_mangen, then every subcommand with
//! its own arguments (clap_mangen would only list their names), then what the CLI does not say.

use clap::{Arg, Command};
use clap_mangen::roff::{Roff, bold, italic, roman};

use super::{VERSION, body};

pub fn labeld_8(cmd: Command) -> String {
    let cmd = cmd.version(VERSION);
    let man = clap_mangen::Man::new(cmd.clone()).section("8").manual("System Manager's Manual").source(format!("labeld {VERSION}"));
    let mut page = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = man.render_title(&mut page);
    for part in [
        clap_mangen::Man::render_name_section,
        clap_mangen::Man::render_synopsis_section,
        clap_mangen::Man::render_description_section,
        clap_mangen::Man::render_options_section,
    ] {
        let mut text = Vec::new();
        let _ = part(&man, &mut text);
        let text = String::from_utf8_lossy(&text).into_owned();
        page.extend(text.strip_prefix(&Roff::new().render()).unwrap_or(&text).as_bytes());
    }
    let mut rest = Roff::new();
    rest.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        subcommand(&mut rest, sub);
    }
    sections(&mut rest);
    String::from_utf8_lossy(&page).into_owned() + &body(&rest)
}

fn subcommand(r: &mut Roff, sub: &Command) {
    let name = format!("labeld {}", sub.get_name());
    let mut synopsis = vec![bold(name.clone())];
    for arg in visible_args(sub) {
        synopsis.push(roman(" "));
        synopsis.extend(usage(arg));
    }
    r.control("SS", [name.as_str()]);
    r.text(synopsis);
    if let Some(about) = sub.get_long_about().or(sub.get_about()) {
        r.control("PP", []).text([roman(sentence(&about.to_string()))]);
    }
    for arg in visible_args(sub) {
        r.control("TP", []).text(flags(arg));
        let mut help = arg.get_long_help().or(arg.get_help()).map(|h| sentence(&h.to_string())).unwrap_or_default();
        if let Some(default) = arg.get_default_values().first() {
            help += &format!(" Default: {}.", default.to_string_lossy());
        }
        if let Some(env) = arg.get_env() {
            help += &format!(" Environment: {}.", env.to_string_lossy());
        }
        r.text([roman(help.trim().to_string())]);
    }
}

/// Clap drops a help text's final period; the page puts it back before adding more.
fn sentence(text: &str) -> String {
    let text = text.trim();
    if text.ends_with(['.', '!', '?', ')']) && !text.ends_with("...)") { text.to_string() } else { format!("{text}.") }
}

fn visible_args(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
}

fn value_name(arg: &Arg) -> Option<String> {
    if !arg.get_action().takes_values() {
        return None;
    }
    let name = arg.get_value_names().and_then(|v| v.first()).map(|n| n.to_string()).unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
    let many = arg.get_num_args().is_some_and(|n| n.max_values() > 1);
    Some(if many { format!("{name}...") } else { name })
}

/// `[-c CONFIG]`, `[--once]`, `PATHS...` for the synopsis.
fn usage(arg: &Arg) -> Vec<clap_mangen::roff::Inline> {
    let mut out = Vec::new();
    if arg.is_positional() {
        out.push(italic(value_name(arg).unwrap_or_default()));
        return out;
    }
    let flag = match (arg.get_short(), arg.get_long()) {
        (Some(s), _) => format!("-{s}"),
        (None, Some(l)) => format!("--{l}"),
        (None, None) => return out,
    };
    out.push(roman(if arg.is_required_set() { "" } else { "[" }));
    out.push(bold(flag));
    if let Some(v) = value_name(arg) {
        out.push(roman(" "));
        out.push(italic(v));
    }
    out.push(roman(if arg.is_required_set() { "" } else { "]" }));
    out
}

/// `-c, --config CONFIG` for an option's tagged paragraph.
fn flags(arg: &Arg) -> Vec<clap_mangen::roff::Inline> {
    let mut out = Vec::new();
    if let Some(s) = arg.get_short() {
        out.push(bold(format!("-{s}")));
    }
    if let Some(l) = arg.get_long() {
        if !out.is_empty() {
            out.push(roman(", "));
        }
        out.push(bold(format!("--{l}")));
    }
    if let Some(v) = value_name(arg) {
        if !out.is_empty() {
            out.push(roman(" "));
        }
        out.push(italic(v));
    }
    out
}

/// What an operator needs beside the options: environment, signals, exit codes, files.
fn sections(r: &mut Roff) {
    let tagged = |r: &mut Roff, tag: &str, text: &str| {
        r.control("TP", []).text([bold(tag.to_string())]).text([roman(text.to_string())]);
    };
    r.control("SH", ["ENVIRONMENT"]);
    tagged(r, "LABELD_CONFIG", "The config file when --config is not given.");
    tagged(r, "LABELD_LOG", "Log filter for stderr (e.g. info, debug, labeld=debug); RUST_LOG is read when it is unset. Default: info.");
    tagged(r, "LABELD_LOG_FORMAT", "text (the default) or json: one JSON object per line with timestamp, level, message and the fields, for log collectors.");
    r.control("SH", ["SIGNALS"]);
    tagged(r, "SIGHUP", "Reopen the results log (after logrotate moved it), then re-read the config file and apply it; a file with errors is rejected and the running config stays.");
    tagged(r, "SIGTERM, SIGINT", "Stop taking new images, finish the batch in flight, flush the results log and exit 0; images still queued are labelled at the next start. A second signal exits at once with 128 + the signal (143 or 130); the batch in flight is labelled after the restart.");
    r.control("SH", ["EXIT STATUS"]);
    tagged(r, "0", "Stopped cleanly; for classify, every image was labelled.");
    tagged(r, "1", "A fault: the model cannot be loaded, a long-lived thread died (systemd restarts the service), run --once was stopped before every image had a result, or classify could not label some image.");
    tagged(r, "2", "The config file is invalid; the message names the key. Restarting will not help (the systemd unit does not).");
    r.control("SH", ["FILES"]);
    tagged(r, "/etc/labeld/labeld.toml", "The service's config, see labeld.toml(5).");
    tagged(r, "/usr/share/labeld/models/default.pt", "The packaged TorchScript ImageNet classifier.");
    tagged(r, "/usr/share/doc/labeld/", "README.md, the guides (docs/*.md) and labeld.toml.example, every key annotated.");
    tagged(r, "/lib/systemd/system/labeld.service", "The systemd unit: systemctl reload labeld sends SIGHUP.");
    r.control("SH", ["SEE ALSO"]);
    r.text([bold("labeld.toml"), roman("(5), "), bold("systemctl"), roman("(1), "), bold("journalctl"), roman("(1)")]);
}
