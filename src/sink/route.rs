//! Which route an image takes and the folder it goes to, decided from its record alone (so the row
//! that is durable before anything moves is enough for a restart to complete the same route), and
//! every label turned into a folder name that is safe to create.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::config::{Route, RouteAction, Verdict};
use crate::vocab::{Record, Routed, Status};

/// Folder names longer than this are cut (a name may have 255 bytes; room is left for the hash).
const MAX_NAME: usize = 200;

/// `label` as one folder name, and whether it had to be altered: `/` and control characters become
/// `_`, a leading `.` becomes `_` (no `.`, `..` or hidden folder), an empty label is `_`, and a name
/// over 200 bytes is cut at a character boundary.
pub fn sanitize(label: &str) -> (String, bool) {
    let mut name: String = label.chars().map(|c| if c == '/' || c.is_control() { '_' } else { c }).collect();
    if name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    if name.is_empty() {
        name.push('_');
    }
    if name.len() > MAX_NAME {
        let mut cut = MAX_NAME;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    let altered = name != label;
    (name, altered)
}

/// `name~<8 hex of a hash of label>`: tells apart labels that would share a folder.
fn with_hash(name: &str, label: &str) -> String {
    format!("{name}~{:08x}", xxhash_rust::xxh3::xxh3_64(label.as_bytes()) as u32)
}

/// One label's folder name on its own: the hash is added when it was altered or has capitals (it
/// might collide, by case, with a label not known here).
pub fn folder_name(label: &str) -> String {
    let (name, altered) = sanitize(label);
    if altered || name != name.to_lowercase() { with_hash(&name, label) } else { name }
}

/// An inbox name (unique in the config) as one folder name: a hash only when it had to be altered.
fn inbox_folder(inbox: &str) -> String {
    let (name, altered) = sanitize(inbox);
    if altered { with_hash(&name, inbox) } else { name }
}

/// The folder name of every label of a model, fixed for its label list: a label keeps its own name
/// unless it was altered (`sanitize`) or another label's name differs from it only in case (two
/// folders a case-insensitive file system would make one); those get a hash of the label appended.
#[derive(Debug, Clone, Default)]
pub struct FolderNames {
    names: HashMap<String, String>,
}

impl FolderNames {
    pub fn new<'a>(labels: impl IntoIterator<Item = &'a str>) -> FolderNames {
        let mut by_fold: HashMap<String, Vec<(&str, String, bool)>> = HashMap::new();
        for label in labels {
            let (name, altered) = sanitize(label);
            let group = by_fold.entry(name.to_lowercase()).or_default();
            if !group.iter().any(|(l, _, _)| *l == label) {
                group.push((label, name, altered));
            }
        }
        let mut names = HashMap::new();
        for group in by_fold.into_values() {
            let shared = group.len() > 1;
            for (label, name, altered) in group {
                let folder = if altered || shared { with_hash(&name, label) } else { name };
                names.insert(label.to_string(), folder);
            }
        }
        FolderNames { names }
    }

    /// The folder name of `label` (one not in the list gets `folder_name`'s).
    pub fn get(&self, label: &str) -> String {
        self.names.get(label).cloned().unwrap_or_else(|| folder_name(label))
    }
}

/// The label values drift metrics use: each label a route names (its `labels` entries as written, a
/// pattern standing for the labels it matches, and the label of each of its `class_ids`); every other
/// label counts as "other", so the series stay bounded whatever the model's class count.
#[derive(Debug, Clone, Default)]
pub struct DriftLabels {
    names: Vec<String>,
    patterns: Vec<(String, globset::GlobMatcher)>,
}

impl DriftLabels {
    pub fn new(routes: &[Route], label_of: impl Fn(usize) -> String) -> DriftLabels {
        let mut d = DriftLabels::default();
        let named = routes.iter().flat_map(|r| r.labels.iter().cloned().chain(r.class_ids.iter().map(|&c| label_of(c))));
        for name in named {
            if d.names.contains(&name) || d.patterns.iter().any(|(p, _)| *p == name) {
                continue;
            }
            let pattern = name.contains(['*', '?', '[', '{']).then(|| globset::Glob::new(&name).ok()).flatten();
            match pattern {
                Some(g) => d.patterns.push((name, g.compile_matcher())),
                None => d.names.push(name),
            }
        }
        d
    }

    /// Every value but "other".
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str).chain(self.patterns.iter().map(|(p, _)| p.as_str()))
    }

    /// The value `label` counts under.
    pub fn of(&self, label: &str) -> &str {
        if let Some(n) = self.names.iter().find(|n| *n == label) {
            return n;
        }
        self.patterns.iter().find(|(_, m)| m.is_match(label)).map_or(crate::metrics::OTHER_LABEL, |(p, _)| p.as_str())
    }
}

/// Whether `route` is one for unsure images: it takes low scores or small margins.
pub fn is_for_unsure(route: &Route) -> bool {
    route.max_score.is_some() || route.max_margin.is_some()
}

/// The UTC date of an RFC 3339 time (`2026-12-06T…` → `2026-12-06`).
fn date_of(time: &str) -> String {
    let d = time.get(..10).unwrap_or("");
    let ok = d.len() == 10 && d.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    if ok { d.to_string() } else { "unknown-date".into() }
}

/// The route `record` takes (its index and decision), for an ok record of the inbox named `inbox`;
/// `None`: no route matches (or the image failed) and `on_done` applies. `{date}` is the row's date,
/// so the decision is the same whenever it is made again from the row.
pub fn decide(routes: &[Route], record: &Record, inbox: &str, names: &FolderNames) -> Option<(usize, Routed)> {
    let top = record.top.as_deref().filter(|_| record.status == Status::Ok)?;
    let first = top.first()?;
    let second = top.get(1).map_or(0.0, |t| t.score);
    let verdict = Verdict {
        inbox,
        class_id: first.class_id,
        label: &first.label,
        label_en: first.label_en.as_deref(),
        score: first.score,
        margin: first.score - second,
    };
    let (index, route) = routes.iter().enumerate().find(|(_, r)| r.matches(&verdict))?;
    let to = route.to.as_ref().map(|t| {
        t.render(|placeholder| match placeholder {
            "label" => names.get(&first.label),
            "class_id" => first.class_id.to_string(),
            "inbox" => inbox_folder(inbox),
            _ => date_of(&record.time),
        })
    });
    let to = to.map(|p: PathBuf| p.to_string_lossy().into_owned());
    Some((index, Routed { action: route.action.as_str().to_string(), to, at: None }))
}

/// The action a record's route names (`None` for one this labeld does not know).
pub fn action_of(routed: &Routed) -> Option<RouteAction> {
    RouteAction::parse(&routed.action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Top;

    #[test]
    fn hostile_labels_become_one_safe_folder_name_each() {
        assert_eq!(sanitize("espresso"), ("espresso".into(), false));
        assert_eq!(sanitize("a/b"), ("a_b".into(), true));
        assert_eq!(sanitize(".."), ("_.".into(), true));
        assert_eq!(sanitize("."), ("_".into(), true));
        assert_eq!(sanitize(".hidden"), ("_hidden".into(), true));
        assert_eq!(sanitize(""), ("_".into(), true));
        assert_eq!(sanitize("tab\there\nnul\0"), ("tab_here_nul_".into(), true));
        assert_eq!(sanitize("x\u{7f}"), ("x_".into(), true));
        let long = "é".repeat(200);
        let (cut, altered) = sanitize(&long);
        assert!(altered && cut.len() <= MAX_NAME && cut.chars().all(|c| c == 'é'), "cut at a character boundary");
        for hostile in ["a/b", "..", ".", "", "\n", &long, "../../etc"] {
            let name = folder_name(hostile);
            assert!(!name.contains('/') && !name.starts_with('.') && !name.is_empty() && name.len() <= 255, "{hostile:?} → {name:?}");
            assert!(name.chars().all(|c| !c.is_control()));
        }
        assert_ne!(folder_name("a/b"), folder_name("a_b"), "an altered name cannot take another label's folder");
        assert_ne!(folder_name(""), folder_name("_"));
    }

    #[test]
    fn labels_that_differ_only_in_case_get_folders_that_differ_otherwise_too() {
        let names = FolderNames::new(["Crack", "crack", "porosity", "Egyptian cat", "a/b", "a_b"]);
        let (upper, lower) = (names.get("Crack"), names.get("crack"));
        assert_ne!(upper.to_lowercase(), lower.to_lowercase());
        assert!(upper.starts_with("Crack~") && lower.starts_with("crack~"), "{upper} {lower}");
        assert_eq!(names.get("porosity"), "porosity");
        assert_eq!(names.get("Egyptian cat"), "Egyptian cat", "capitals alone change nothing when no other label collides");
        assert_eq!(names.get("a_b"), names.get("a_b"));
        assert_ne!(names.get("a/b"), names.get("a_b"));
        assert_eq!(FolderNames::new(["crack", "Crack"]).get("crack"), lower, "the same for any order of the list");
        assert_eq!(names.get("unknown Label"), folder_name("unknown Label"));
    }

    fn record(label: &str, class_id: usize, s1: f64, s2: f64) -> Record {
        let mut r = Record::example();
        r.time = "2026-12-06T03:20:00.000Z".into();
        r.top = Some(vec![
            Top { rank: 1, class_id, label: label.into(), label_en: None, score: s1 },
            Top { rank: 2, class_id: 1, label: "other".into(), label_en: None, score: s2 },
        ]);
        r
    }

    #[test]
    fn drift_labels_are_the_routes_labels_and_other() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("labeld.toml");
        std::fs::create_dir(dir.path().join("models")).unwrap();
        std::fs::write(dir.path().join("models/m.pt"), b"x").unwrap();
        let text = "[model]\npath = \"models/m.pt\"\n[[inbox]]\npath = \"in\"\n\
            [[route]]\nlabels = [\"espresso\", \"*cat\"]\naction = \"move\"\nto = \"s\"\n\
            [[route]]\nclass_ids = [657]\nmax_score = 0.5\naction = \"move\"\nto = \"s\"\n";
        let c = crate::config::Config::parse(&file, text).unwrap();
        let d = DriftLabels::new(&c.routes, |i| if i == 657 { "missile".into() } else { format!("c{i}") });
        assert_eq!(d.values().collect::<Vec<_>>(), vec!["espresso", "missile", "*cat"]);
        assert_eq!(d.of("espresso"), "espresso");
        assert_eq!(d.of("tiger cat"), "*cat");
        assert_eq!(d.of("missile"), "missile");
        assert!((0..1000).all(|i| d.of(&format!("c{i}")) == "other"), "every label no route names is other");
        assert!(!is_for_unsure(&c.routes[0]) && is_for_unsure(&c.routes[1]));
    }

    #[test]
    fn the_first_matching_route_decides_and_its_folder_is_resolved_from_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("labeld.toml");
        std::fs::create_dir(dir.path().join("models")).unwrap();
        std::fs::write(dir.path().join("models/m.pt"), b"x").unwrap();
        let text = "[model]\npath = \"models/m.pt\"\n[[inbox]]\npath = \"in\"\nname = \"..\"\n\
            [[route]]\nmax_margin = 0.1\naction = \"move\"\nto = \"review\"\n\
            [[route]]\nlabels = [\"espresso\", \"cup\"]\nmin_score = 0.5\naction = \"move\"\nto = \"sorted/{label}/{date}\"\n\
            [[route]]\nclass_ids = [657]\naction = \"link\"\nto = \"sorted/{class_id}-{inbox}\"\n\
            [[route]]\nlabels = [\"*\"]\nmax_score = 0.2\naction = \"keep\"\n";
        let c = crate::config::Config::parse(&file, text).unwrap();
        let names = FolderNames::new(["espresso", "cup", "missile"]);
        let sorted = dir.path().join("sorted");
        let go = |r: &Record| decide(&c.routes, r, "..", &names).map(|(i, d)| (i, d.action, d.to));
        assert_eq!(go(&record("espresso", 967, 0.9, 0.05)), Some((1, "move".into(), Some(sorted.join("espresso/2026-12-06").display().to_string()))));
        assert_eq!(go(&record("espresso", 967, 0.45, 0.4)).map(|d| d.0), Some(0), "unsure first");
        assert_eq!(go(&record("espresso", 967, 0.45, 0.1)), None, "below min_score, nothing else matches");
        assert_eq!(go(&record("missile", 657, 0.6, 0.1)).and_then(|d| d.2), Some(sorted.join(format!("657-{}", inbox_folder(".."))).display().to_string()));
        assert_eq!(go(&record("tench", 0, 0.15, 0.0)), Some((3, "keep".into(), None)));
        let mut failed = record("espresso", 967, 0.9, 0.05);
        failed.status = Status::Error;
        assert_eq!(go(&failed), None, "failed images are not routed");
        assert_eq!(date_of("garbage"), "unknown-date");
    }
}
