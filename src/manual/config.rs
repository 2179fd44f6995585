//! `labeld.toml(5)`, rendered from the annotated example config: its `[section]` headers become
//! subsections, each `key = value  # comment` (commented out or not) a tagged paragraph, comment
//! lines between them prose. A key added to config/labeld.toml is in the man page at the next build.

use clap_mangen::roff::{Roff, bold, roman};

use super::{VERSION, body};

/// One line of the example, classified.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    Blank,
    /// `[model]`, `[[inbox]]`, or commented out: `# [http]` (a section that is off until written).
    Section { name: &'a str, optional: bool, comment: &'a str },
    /// `key = value  # comment`, or commented out: `# key = value  # comment`.
    Key { key: &'a str, value: &'a str, optional: bool, comment: &'a str },
    /// A comment line indented under a key's comment: more of it.
    More(&'a str),
    /// A comment on a line of its own.
    Prose(&'a str),
}

fn classify(line: &str) -> Line<'_> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Line::Blank;
    }
    if line.starts_with(char::is_whitespace) && trimmed.starts_with('#') {
        return Line::More(trimmed.trim_start_matches('#').trim());
    }
    let (optional, rest) = match trimmed.strip_prefix('#') {
        Some(rest) => (true, rest.strip_prefix(' ').unwrap_or(rest)),
        None => (false, trimmed),
    };
    if optional && rest.starts_with(char::is_whitespace) {
        // `#      # more`: the comment column of a commented-out key continues.
        return Line::More(rest.trim().trim_start_matches('#').trim());
    }
    let (code, comment) = split_comment(rest);
    if code.starts_with('[') && code.ends_with(']') {
        return Line::Section { name: code, optional, comment };
    }
    if let Some((key, value)) = code.split_once('=') {
        let key = key.trim();
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Line::Key { key, value: value.trim(), optional, comment };
        }
    }
    if optional { Line::Prose(rest.trim()) } else { Line::Prose(trimmed) }
}

/// `code  # comment` split at the first `#` outside a string.
fn split_comment(text: &str) -> (&str, &str) {
    let mut in_string = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '#' if !in_string => return (text[..i].trim(), text[i + 1..].trim()),
            _ => {}
        }
    }
    (text.trim(), "")
}

pub fn labeld_toml_5(example: &str) -> String {
    let mut r = Roff::new();
    r.control("TH", ["LABELD.TOML", "5", "", &format!("labeld {VERSION}"), "File Formats Manual"]);
    r.control("SH", ["NAME"]).text([roman("labeld.toml - configuration of labeld(8)")]);
    r.control("SH", ["SYNOPSIS"]).text([bold("/etc/labeld/labeld.toml")]);
    r.control("SH", ["DESCRIPTION"]);
    let mut lines = example.lines().map(classify).peekable();
    let mut prose = Vec::new();
    // The file's opening comment is the description.
    while let Some(Line::Prose(p)) = lines.peek() {
        prose.push(*p);
        lines.next();
    }
    paragraph(&mut r, &mut prose);
    r.control("PP", []).text([roman(
        "The file is TOML. Below, every section and key as in the annotated example \
         /usr/share/doc/labeld/labeld.toml.example, with its example value. A key or section marked \
         optional is commented out there: leave it out for the default or the behaviour described.",
    )]);
    r.control("SH", ["SECTIONS AND KEYS"]);
    let mut in_key = false;
    for line in lines {
        match line {
            Line::Blank => {
                paragraph(&mut r, &mut prose);
                in_key = false;
            }
            Line::Prose(p) => {
                prose.push(p);
                in_key = false;
            }
            Line::More(more) if in_key => {
                r.text([roman(more.to_string())]);
            }
            Line::More(more) => prose.push(more),
            Line::Section { name, optional, comment } => {
                r.control("SS", [name]);
                let mut intro = Vec::new();
                if optional {
                    intro.push("Optional:");
                }
                if !comment.is_empty() {
                    intro.push(comment);
                }
                intro.append(&mut prose);
                paragraph(&mut r, &mut intro);
                in_key = false;
            }
            Line::Key { key, value, optional, comment } => {
                paragraph(&mut r, &mut prose);
                r.control("TP", []).text([bold(key.to_string()), roman(format!(" = {value}"))]);
                let text = match (optional, comment.is_empty()) {
                    (true, true) => "Optional.".to_string(),
                    (true, false) => format!("Optional: {comment}"),
                    (false, _) => comment.to_string(),
                };
                r.text([roman(text)]);
                in_key = true;
            }
        }
    }
    paragraph(&mut r, &mut prose);
    r.control("SH", ["CHECKING AND APPLYING"]);
    r.text([bold("labeld check-config --config"), roman(" FILE prints the file resolved or names the wrong key (exit 2). "), roman(
        "A running labeld re-reads its file on SIGHUP (systemctl reload labeld) and keeps the running config if the new one is wrong.",
    )]);
    r.control("SH", ["SEE ALSO"]);
    r.text([bold("labeld"), roman("(8), /usr/share/doc/labeld/")]);
    Roff::new().render() + &body(&r)
}

/// Emits the collected comment lines as one paragraph and empties them.
fn paragraph(r: &mut Roff, prose: &mut Vec<&str>) {
    if prose.is_empty() {
        return;
    }
    r.control("PP", []).text([roman(prose.join(" "))]);
    prose.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_the_example_are_told_apart() {
        assert_eq!(classify("[model]"), Line::Section { name: "[model]", optional: false, comment: "" });
        assert_eq!(
            classify("[[inbox]]                     # one or more"),
            Line::Section { name: "[[inbox]]", optional: false, comment: "one or more" }
        );
        assert_eq!(classify("# [http]   # off when absent"), Line::Section { name: "[http]", optional: true, comment: "off when absent" });
        assert_eq!(
            classify("top_k = 3                     # labels written per image"),
            Line::Key { key: "top_k", value: "3", optional: false, comment: "labels written per image" }
        );
        assert_eq!(
            classify("# topic = \"a/{host}#x\" # placeholders"),
            Line::Key { key: "topic", value: "\"a/{host}#x\"", optional: true, comment: "placeholders" }
        );
        assert_eq!(classify("                              # at once)"), Line::More("at once)"));
        assert_eq!(classify("#                             # CPUs = the quota"), Line::More("CPUs = the quota"));
        assert_eq!(classify("# Check a file with:  labeld check-config"), Line::Prose("Check a file with:  labeld check-config"));
        assert_eq!(classify("   "), Line::Blank);
    }

    #[test]
    fn every_key_of_the_shipped_example_is_in_the_page() {
        let page = labeld_toml_5(super::super::EXAMPLE_CONFIG);
        let keys: Vec<&str> = super::super::EXAMPLE_CONFIG
            .lines()
            .filter_map(|l| match classify(l) {
                Line::Key { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        assert!(keys.len() > 40 && keys.contains(&"max_body_mb") && keys.contains(&"password_file"), "{keys:?}");
        for key in keys {
            // roff escapes `-` and `\` only; keys have neither.
            assert!(page.contains(&format!("\\fB{key}\\fR")), "{key} is not in labeld.toml(5)");
        }
        for section in ["[model]", "[[inbox]]", "[workers]", "[http]", "[mqtt]"] {
            assert!(page.contains(&format!(".SS {section}\n")), "{section}");
        }
        assert!(page.starts_with(".ie") && page.contains(".TH LABELD.TOML 5"), "{}", &page[..200]);
    }
}
