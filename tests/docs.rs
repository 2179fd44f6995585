//! The docs cannot drift from the code: every config key labeld accepts is documented in
//! docs/configuration.md and appears (set or commented) in config/labeld.toml, and every relative link in
//! README.md and docs/*.md points at a file (and heading) that exists.
//!
//! The keys come from the real binary, not from a list kept by hand: every raw config struct denies
//! unknown fields, and serde's "unknown field `x`, expected one of `a`, `b`, …" names all the fields a
//! section has. A new key or a new section therefore shows up here without anyone listing it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_labeld");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PROBE: &str = "zz_docs_probe";

/// The names serde lists after "expected" when `toml` has an unknown key, as `labeld check-config`
/// reports it. `None` when the config failed for another reason.
fn expected_fields(dir: &Path, toml: &str) -> Option<Vec<String>> {
    let file = dir.join("probe.toml");
    std::fs::write(&file, toml).unwrap();
    let out = Command::new(BIN).arg("check-config").arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown key must be a config error (exit 2): {toml:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let needle = format!("unknown field `{PROBE}`, expected");
    let line = stderr.lines().find(|l| l.starts_with("labeld:") && l.contains(&needle))?;
    let list = &line[line.find(&needle).unwrap() + needle.len()..];
    Some(list.split('`').skip(1).step_by(2).map(str::to_string).collect())
}

/// Section name → its keys, as `[name]` or `[[name]]` (the form the section takes in TOML).
fn keys_in_code() -> BTreeMap<String, (String, Vec<String>)> {
    let dir = tempfile::tempdir().unwrap();
    let sections = expected_fields(dir.path(), &format!("{PROBE} = 1\n")).expect("the top level denies unknown sections");
    assert!(sections.len() >= 7, "fewer sections than labeld had when this test was written: {sections:?}");
    let mut out = BTreeMap::new();
    for s in sections {
        let table = format!("[{s}]");
        let array = format!("[[{s}]]");
        let (header, keys) = expected_fields(dir.path(), &format!("{table}\n{PROBE} = 1\n"))
            .map(|k| (table.clone(), k))
            .or_else(|| expected_fields(dir.path(), &format!("{array}\n{PROBE} = 1\n")).map(|k| (array.clone(), k)))
            .unwrap_or_else(|| panic!("section {s} must deny unknown keys (#[serde(deny_unknown_fields)]) so that this test sees its keys"));
        out.insert(s, (header, keys));
    }
    out
}

/// `## ` headings naming a section (`[model]`, `[[inbox]]`) → the `### ` key headings under each.
fn keys_in_docs(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = None;
    for line in outside_code(text) {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().trim_matches('`').trim_matches(['[', ']']).to_string().into();
            if let Some(s) = &section {
                out.entry(s.clone()).or_default();
            }
        } else if let (Some(h), Some(s)) = (line.strip_prefix("### "), &section) {
            out.entry(s.clone()).or_default().insert(h.trim().trim_matches('`').to_string());
        }
    }
    out
}

/// Section → keys in a TOML file where commented-out lines count: `# [http]`, `# listen = "…"`.
fn keys_in_toml(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for raw in text.lines() {
        let line = raw.trim_start();
        let line = line.strip_prefix('#').unwrap_or(line).trim_start();
        if line.starts_with('[') {
            let name: String = line.trim_start_matches('[').chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && line[..line.find(']').unwrap_or(0)].trim_start_matches('[') == name {
                section = name;
                out.entry(section.clone()).or_default();
            }
            continue;
        }
        let Some((key, _)) = line.split_once('=') else { continue };
        let key = key.trim();
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            out.entry(section.clone()).or_default().insert(key.to_string());
        }
    }
    out
}

/// The lines of a Markdown text that are not inside fenced code blocks.
fn outside_code(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn every_config_key_is_documented_and_in_the_commented_default_config() {
    let code = keys_in_code();
    let docs = keys_in_docs(&read("docs/configuration.md"));
    let shipped = keys_in_toml(&read("config/labeld.toml"));
    let mut missing = Vec::new();
    for (section, (header, keys)) in &code {
        for key in keys {
            if !docs.get(section).is_some_and(|k| k.contains(key)) {
                missing.push(format!("docs/configuration.md: no `### `{key}`` under `## `{header}``"));
            }
            if !shipped.get(section).is_some_and(|k| k.contains(key)) {
                missing.push(format!("config/labeld.toml: no `{key} = …` (commented is fine) under {header}"));
            }
        }
        // Documented keys the code no longer has are drift too.
        for key in docs.get(section).into_iter().flatten() {
            if !keys.contains(key) {
                missing.push(format!("docs/configuration.md documents {header} {key}, which labeld does not accept"));
            }
        }
    }
    let total: usize = code.values().map(|(_, k)| k.len()).sum();
    eprintln!("{} sections, {total} keys checked: {:?}", code.len(), code.keys().collect::<Vec<_>>());
    assert!(missing.is_empty(), "config keys out of step with the docs:\n{}", missing.join("\n"));
}

#[test]
fn the_key_readers_see_what_they_should() {
    let docs = keys_in_docs("## `[[inbox]]`\n### `path`\n```toml\n### `not_a_key`\n```\n## `[http]`\n### `listen`\n");
    assert_eq!(docs["inbox"], BTreeSet::from(["path".to_string()]));
    assert_eq!(docs["http"], BTreeSet::from(["listen".to_string()]));
    let toml = keys_in_toml("[model]\npath = \"x\"   # a = b\n# name = \"y\"\n#   # CPUs = the quota\n# [http]\n# listen = \"z\"\n");
    assert_eq!(toml["model"], BTreeSet::from(["path".to_string(), "name".to_string()]));
    assert_eq!(toml["http"], BTreeSet::from(["listen".to_string()]));
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens; repeats get -1, -2.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in outside_code(text) {
        let Some(h) = line.strip_prefix('#') else { continue };
        let h = h.trim_start_matches('#');
        if !h.starts_with(' ') {
            continue;
        }
        let slug: String = h
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 { slug.clone() } else { format!("{slug}-{n}") });
        *n += 1;
    }
    out
}

/// Targets of `[text](target)` links outside code blocks and inline code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in outside_code(text) {
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_points_at_an_existing_file_and_heading() {
    let root = PathBuf::from(ROOT);
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> =
        std::fs::read_dir(root.join("docs")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "md")).collect();
    docs.sort();
    pages.extend(docs);
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = target.split_once('#').map_or((target.as_str(), None), |(f, a)| (f, Some(a)));
            let dest = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            let shown = page.strip_prefix(&root).unwrap().display();
            if !dest.exists() {
                broken.push(format!("{shown}: ({target}): no file {}", dest.display()));
                continue;
            }
            if let Some(a) = anchor.filter(|_| dest.extension().is_some_and(|e| e == "md")) {
                if !anchors(&std::fs::read_to_string(&dest).unwrap()).contains(a) {
                    broken.push(format!("{shown}: ({target}): no heading with anchor #{a} in {}", dest.display()));
                }
            }
        }
    }
    eprintln!("{} pages, {checked} relative links checked", pages.len());
    assert!(checked > 20, "the link finder found almost nothing ({checked}): is it broken?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_stays_a_front_door() {
    let size = std::fs::metadata(Path::new(ROOT).join("README.md")).unwrap().len();
    assert!(size <= 8 * 1024, "README.md is {size} bytes; the front door stays under 8 KB (details go to docs/)");
    let anchors = anchors("## `[model]`\n### `path`\n### `path`\n## Reload or restart\n### Set-up, piece by piece\n");
    for a in ["model", "path", "path-1", "reload-or-restart", "set-up-piece-by-piece"] {
        assert!(anchors.contains(a), "{a} not in {anchors:?}");
    }
}

/// `I<n>` numbers cited next to "docs/design.md" in a line of Rust source.
fn cited_invariants(line: &str) -> Vec<u32> {
    if !line.contains("docs/design.md") {
        return Vec::new();
    }
    let mut out = Vec::new();
    for word in line.split(|c: char| !c.is_ascii_alphanumeric()) {
        if let Some(n) = word.strip_prefix('I').and_then(|d| d.parse().ok()) {
            out.push(n);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_invariant_is_cited_by_the_code_that_keeps_it_and_every_citation_exists() {
    let design = read("docs/design.md");
    let listed: BTreeSet<u32> = outside_code(&design)
        .iter()
        .filter_map(|l| l.trim_start().split_once(". **I").and_then(|(_, rest)| rest.split('.').next()?.parse().ok()))
        .collect();
    assert!(listed.len() >= 10, "docs/design.md lists the invariants as `N. **IN. …**`: found {listed:?}");
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    let mut cited: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            for n in cited_invariants(line) {
                cited.entry(n).or_default().insert(f.strip_prefix(ROOT).unwrap().display().to_string());
            }
        }
    }
    let unknown: Vec<_> = cited.keys().filter(|n| !listed.contains(n)).collect();
    assert!(unknown.is_empty(), "the code cites invariants docs/design.md does not list: {unknown:?} ({cited:?})");
    let uncited: Vec<_> = listed.iter().filter(|n| !cited.contains_key(n)).collect();
    assert!(uncited.is_empty(), "invariants no code comment cites: {uncited:?}");
    eprintln!("invariants cited: {cited:?}");
}
