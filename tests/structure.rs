//! The folder tree is the pipeline, and the imports keep its order: read from the `crate::` paths (and
//! `super::` paths that climb to the crate root) in every file under src/, each top-level module's
//! imports are checked against its place.
//!
//! - `vocab` (the words every stage uses) imports nothing of labeld but itself.
//! - The stages, in the order an image goes through them (config → watch → queue → infer → sink →
//!   publish), import no stage that runs after them: data moves forward, no stage reaches forward.
//! - Support modules (errors, shutdown, metrics, health, the file resolver, back-off, the job…) import
//!   one another, `vocab` and `config`, never a later stage.
//! - The modules around the pipeline (app, http, reload, systemd…) may import anything; nothing but
//!   one another imports them.
//! - No circle between top-level modules at all.
//!
//! Every top-level module has to be placed in one of these lists, so a new one is placed on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The stages, in the order an image goes through them.
const PIPELINE: &[&str] = &["config", "watch", "queue", "infer", "sink", "publish"];
/// Used by every part of the pipeline.
const SUPPORT: &[&str] = &["backoff", "beneath", "error", "health", "job", "labelled", "ledger", "logging", "memory", "metrics", "shutdown"];
/// At the bottom: imports nothing of labeld.
const VOCAB: &str = "vocab";
/// Around the pipeline: wiring, commands, and what serves the operator.
const AROUND: &[&str] = &["app", "http", "manual", "probe", "progress", "reload", "retain", "systemd"];

/// Imports of a later stage that stay, each with why.
const EXCEPTIONS: &[(&str, &str, &str)] = &[(
    "watch",
    "queue",
    "the queue is the hand-off between watch and infer: the watch pushes each ready file into the queue's \
     sender (and takes a resubmitted one back), infer pulls from its receiver; both ends name the channel",
)];

/// Who imports whom: module → imported module → the files (relative to src/) that do.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code with comments, strings and char literals blanked out (a `crate::` in a doc comment or an
/// error message is not an import).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r' && (next == Some('"') || next == Some('#')) && !c[..i].last().is_some_and(|p| p.is_alphanumeric() || *p == '_') {
            // A raw string: r"…", r#"…"#, …
            let hashes = c[i + 1..].iter().take_while(|&&h| h == '#').count();
            if c.get(i + 1 + hashes) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            i += 2 + hashes;
            while i < c.len() && !(c[i] == '"' && c[i + 1..].iter().take(hashes).filter(|&&h| h == '#').count() == hashes) {
                i += 1;
            }
            i += 1 + hashes;
            out.push_str("\"\"");
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\''); a lifetime ('a) is left as it is.
            i += if next == Some('\\') { 2 } else { 1 };
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident_at(c: &[char], mut i: usize) -> (String, usize) {
    while i < c.len() && c[i].is_whitespace() {
        i += 1;
    }
    let start = i;
    while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
        i += 1;
    }
    (c[start..i].iter().collect(), i)
}

/// The top-level modules a path starting at `i` (just after `crate::` or the `super::`s that reach the
/// crate root) names: one identifier, or the first identifier of each item of a `{…}` group.
fn first_segments(c: &[char], i: usize) -> Vec<String> {
    let mut j = i;
    while j < c.len() && c[j].is_whitespace() {
        j += 1;
    }
    if c.get(j) != Some(&'{') {
        let (name, _) = ident_at(c, j);
        return vec![name];
    }
    let mut names = Vec::new();
    let (mut depth, mut item_start) = (0usize, true);
    while j < c.len() {
        match c[j] {
            '{' => {
                depth += 1;
                if depth == 1 {
                    item_start = true;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => item_start = true,
            ch if depth == 1 && item_start && (ch.is_alphanumeric() || ch == '_') => {
                let (name, end) = ident_at(c, j);
                names.push(name);
                item_start = false;
                j = end;
                continue;
            }
            _ => {}
        }
        j += 1;
    }
    names
}

/// The top-level modules `code` (a file `levels` modules below its top-level one) refers to.
fn imports(code: &str, levels: usize) -> BTreeSet<String> {
    let c: Vec<char> = code.chars().collect();
    let word_before = |i: usize| i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_' || c[i - 1] == '$');
    let starts = |i: usize, s: &str| s.chars().enumerate().all(|(k, ch)| c.get(i + k) == Some(&ch));
    let mut found = BTreeSet::new();
    // Brace depths at which an inline `mod name {` opened: each is one more level `super::` climbs.
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if inline_mods.last() == Some(&depth) {
                    inline_mods.pop();
                }
            }
            _ => {}
        }
        if starts(i, "mod") && !word_before(i) && c.get(i + 3).is_some_and(|ch| ch.is_whitespace()) {
            let (name, end) = ident_at(&c, i + 3);
            let mut k = end;
            while k < c.len() && c[k].is_whitespace() {
                k += 1;
            }
            if !name.is_empty() && end > i + 3 && c.get(k) == Some(&'{') {
                inline_mods.push(depth);
            }
        }
        if starts(i, "crate::") && !word_before(i) {
            found.extend(first_segments(&c, i + "crate::".len()));
            i += "crate::".len();
            continue;
        }
        if starts(i, "super::") && !word_before(i) {
            let mut climbs = 0;
            let mut j = i;
            while starts(j, "super::") {
                climbs += 1;
                j += "super::".len();
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
            }
            if climbs > levels + inline_mods.len() {
                found.extend(first_segments(&c, j));
            }
            i = j;
            continue;
        }
        i += 1;
    }
    found.remove("self");
    found.remove("");
    found
}

/// Each top-level module's imports of other top-level modules, from every file under src/ (main.rs, the
/// binary, and lib.rs, which only declares the modules, aside).
fn graph() -> Graph {
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut g = Graph::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts == ["main.rs"] || parts == ["lib.rs"] {
            continue;
        }
        let module = parts[0].trim_end_matches(".rs").to_string();
        // src/x.rs and src/x/mod.rs are x itself; src/x/y.rs is one level below, src/x/y/z.rs two.
        let levels = parts.len() - 1 - usize::from(parts.last().is_some_and(|l| l == "mod.rs"));
        let code = code_only(&std::fs::read_to_string(&f).unwrap());
        let entry = g.entry(module.clone()).or_default();
        for m in imports(&code, levels) {
            if m != module {
                entry.entry(m).or_default().insert(rel.display().to_string());
            }
        }
    }
    g
}

fn show(g: &Graph) -> String {
    let mut s = String::from("the module graph (module -> imported: files):\n");
    for (m, to) in g {
        for (t, files) in to {
            s += &format!("  {m} -> {t}: {}\n", files.iter().cloned().collect::<Vec<_>>().join(", "));
        }
    }
    s
}

/// Tarjan's strongly connected components with more than one module: each is a circle of imports.
fn circles(g: &Graph) -> Vec<Vec<String>> {
    struct Walk<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.g.get(v).into_iter().flat_map(|to| to.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on_stack: BTreeSet::new(), found: Vec::new() };
    for v in g.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

/// The shortest circle through each module of `component`, as paths (each circle once).
fn circles_in(g: &Graph, component: &[String]) -> Vec<String> {
    let mut said = BTreeSet::new();
    for start in component {
        // Breadth-first from `start`, inside the component, back to `start`.
        let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
        let mut frontier = std::collections::VecDeque::from([start.as_str()]);
        let mut last = None;
        while let Some(v) = frontier.pop_front() {
            for w in g.get(v).into_iter().flat_map(|to| to.keys()).filter(|w| component.contains(w)) {
                if w == start {
                    last = Some(v);
                    break;
                }
                if !came_from.contains_key(w.as_str()) {
                    came_from.insert(w, v);
                    frontier.push_back(w);
                }
            }
            if last.is_some() {
                break;
            }
        }
        let Some(mut v) = last else { continue };
        let mut path = vec![v.to_string()];
        while v != start {
            v = came_from[v];
            path.push(v.to_string());
        }
        path.reverse();
        // The same circle found from another of its modules: said once, starting at its smallest.
        let at = path.iter().enumerate().min_by_key(|(_, m)| *m).map_or(0, |(i, _)| i);
        path.rotate_left(at);
        path.push(path[0].clone());
        said.insert(path.join(" -> "));
    }
    said.into_iter().collect()
}

/// Why `from` may not import `to`, or `None` when it may.
fn forbidden(from: &str, to: &str) -> Option<String> {
    let rank = |m: &str| PIPELINE.iter().position(|s| *s == m);
    if from == VOCAB {
        return Some("vocab imports nothing of labeld".into());
    }
    if to == VOCAB || SUPPORT.contains(&to) {
        return None;
    }
    if AROUND.contains(&to) && !AROUND.contains(&from) {
        return Some(format!("{to} is around the pipeline: only app and its kind import it"));
    }
    if SUPPORT.contains(&from) && to != "config" {
        return Some(format!("support modules import only support modules, vocab and config, not {to}"));
    }
    match (rank(from), rank(to)) {
        (Some(f), Some(t)) if t > f && !EXCEPTIONS.iter().any(|(a, b, _)| *a == from && *b == to) => {
            Some(format!("{to} runs after {from} in the pipeline (config → watch → queue → infer → sink → publish)"))
        }
        _ => None,
    }
}

#[test]
fn every_top_level_module_has_a_place() {
    let src = Path::new(ROOT).join("src");
    let mut unplaced = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let module = name.trim_end_matches(".rs");
        let is_module = name.ends_with(".rs") || src.join(&name).join("mod.rs").exists();
        let placed = [VOCAB, "main", "lib"].contains(&module) || PIPELINE.contains(&module) || SUPPORT.contains(&module) || AROUND.contains(&module);
        if is_module && !placed {
            unplaced.push(module.to_string());
        }
    }
    assert!(unplaced.is_empty(), "place these modules in PIPELINE, SUPPORT or AROUND (tests/structure.rs): {unplaced:?}");
}

#[test]
fn no_module_imports_one_that_runs_after_it_and_vocab_imports_nothing() {
    let g = graph();
    assert!(g.len() >= 20 && g["sink"].contains_key("vocab"), "the imports were not read:\n{}", show(&g));
    let mut wrong = Vec::new();
    for (from, to) in &g {
        for (t, files) in to {
            if let Some(why) = forbidden(from, t) {
                wrong.push(format!("{from} -> {t} ({}): {why}", files.iter().cloned().collect::<Vec<_>>().join(", ")));
            }
        }
    }
    for (from, to, _) in EXCEPTIONS {
        assert!(g.get(*from).is_some_and(|m| m.contains_key(*to)), "the exception {from} -> {to} is no longer needed: remove it");
    }
    assert!(wrong.is_empty(), "imports against the pipeline's order:\n  {}\n{}", wrong.join("\n  "), show(&g));
}

#[test]
fn no_circle_of_imports_between_top_level_modules() {
    let g = graph();
    let found = circles(&g);
    let said: Vec<String> = found.iter().map(|c| format!("{{{}}}: {}", c.join(", "), circles_in(&g, c).join("; "))).collect();
    assert!(found.is_empty(), "import circles:\n  {}\n{}", said.join("\n  "), show(&g));
}

#[test]
fn the_reader_sees_what_the_code_imports() {
    let code = code_only(
        r#"use crate::a::X; use crate::{b::{Y, Z}, c, self as me};
        // use crate::commented;
        let s = "crate::quoted"; let q = '"'; fn f<'a>(x: &'a str) { crate::d::g(); }
        mod tests { use super::super::super::e; use super::super::h; }
        fn k() { match mode { _ => super::super::i::j() } super::l(); }"#,
    );
    // One level below its top-level module (src/x/y.rs): two `super::` reach the crate root, three
    // from inside `mod tests`.
    let want: BTreeSet<String> = ["a", "b", "c", "d", "e", "i"].map(String::from).into();
    assert_eq!(imports(&code, 1), want);
    let g: Graph = [("x", "y"), ("y", "z"), ("z", "x"), ("z", "w")]
        .iter()
        .fold(Graph::new(), |mut g, (a, b)| {
            g.entry(a.to_string()).or_default().entry(b.to_string()).or_default();
            g
        });
    assert_eq!(circles(&g), vec![vec!["x".to_string(), "y".into(), "z".into()]]);
    assert_eq!(circles_in(&g, &circles(&g)[0]), ["x -> y -> z -> x"]);
    assert!(forbidden("sink", "publish").is_some() && forbidden("publish", "sink").is_none());
    assert!(forbidden("vocab", "beneath").is_some() && forbidden("metrics", "publish").is_some());
}
