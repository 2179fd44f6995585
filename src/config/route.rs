//! `[[route]]`: where a labelled image goes, by what the model said about it. Routes are tried in
//! order and the first whose every condition holds decides (an image no route takes goes per its
//! inbox's `on_done`, the simplest route). Failed images are not routed (quarantine). On reload:
//! applies from the next result; route folders are pinned anew like the other archive folders.

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::{InboxConfig, absolute};
use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    name: Option<String>,
    labels: Option<Vec<String>>,
    class_ids: Option<Vec<usize>>,
    inboxes: Option<Vec<String>>,
    min_score: Option<f64>,
    max_score: Option<f64>,
    min_margin: Option<f64>,
    max_margin: Option<f64>,
    action: RouteAction,
    to: Option<String>,
    #[serde(default)]
    review: bool,
    max_files: Option<u64>,
    max_mb: Option<u64>,
}

/// What a route does with the image (and its sidecar, which travels with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteAction {
    Move,
    Copy,
    /// A hard link (a copy across file systems).
    Link,
    /// Stays in the inbox, whatever `on_done` says.
    Keep,
}

impl RouteAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteAction::Move => "move",
            RouteAction::Copy => "copy",
            RouteAction::Link => "link",
            RouteAction::Keep => "keep",
        }
    }

    pub fn parse(s: &str) -> Option<RouteAction> {
        [RouteAction::Move, RouteAction::Copy, RouteAction::Link, RouteAction::Keep].into_iter().find(|a| a.as_str() == s)
    }
}

/// The placeholders a route's `to` may hold.
pub const PLACEHOLDERS: [&str; 4] = ["label", "class_id", "inbox", "date"];

/// A route's destination: a folder template. `root` is the fixed part before the first placeholder's
/// folder, the archive folder labeld pins and checks; `rest` the templated folders below it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// As written, made absolute.
    pub template: String,
    pub root: PathBuf,
    /// Folder names below `root`, each literal text and `{placeholder}`s.
    pub rest: Vec<String>,
}

impl Target {
    /// Parses `to` (relative to `base`). Err: the reason.
    pub fn parse(base: &Path, to: &str) -> Result<Target, String> {
        if to.is_empty() {
            return Err("must not be empty".into());
        }
        if to.contains('\0') {
            return Err("must not contain NUL".into());
        }
        let template = if to.starts_with('/') { to.to_string() } else { format!("{}/{to}", base.display()) };
        let fixed_end = template.find('{').map_or(template.len(), |i| template[..i].rfind('/').unwrap_or(0));
        if template[..fixed_end].contains('}') {
            return Err("has a '}' without its '{'".into());
        }
        let root = absolute(Path::new("/"), Path::new(&template[..fixed_end.max(1)]));
        let mut rest = Vec::new();
        for part in template[fixed_end..].split('/').filter(|p| !p.is_empty()) {
            check_part(part)?;
            rest.push(part.to_string());
        }
        Ok(Target { template, root, rest })
    }

    /// The folder for these placeholder values; each value must be one safe folder name already.
    pub fn render(&self, value: impl Fn(&str) -> String) -> PathBuf {
        let mut out = self.root.clone();
        for part in &self.rest {
            let mut name = String::new();
            let mut s = part.as_str();
            while let Some(open) = s.find('{') {
                name.push_str(&s[..open]);
                let close = s[open..].find('}').map_or(s.len(), |c| open + c);
                name.push_str(&value(&s[open + 1..close]));
                s = s.get(close + 1..).unwrap_or("");
            }
            name.push_str(s);
            out.push(name);
        }
        out
    }
}

/// One templated folder name: placeholders known and closed, not `.` or `..`.
fn check_part(part: &str) -> Result<(), String> {
    if part == "." || part == ".." {
        return Err(format!("\"{part}\" is not a folder name; write the folder itself"));
    }
    let mut s = part;
    while let Some(open) = s.find(['{', '}']) {
        if s.as_bytes()[open] == b'}' {
            return Err(format!("\"{part}\" has a '}}' without its '{{'"));
        }
        let Some(close) = s[open..].find('}').map(|c| open + c) else {
            return Err(format!("\"{part}\" has a '{{' without its '}}'"));
        };
        let name = &s[open + 1..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!("unknown placeholder {{{name}}}; known: {{label}}, {{class_id}}, {{inbox}}, {{date}}"));
        }
        s = &s[close + 1..];
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Route {
    /// `name`, else `#<position>` (1-based), for the log.
    pub name: String,
    /// Label patterns (globs, case-sensitive); empty: any label.
    pub labels: Vec<String>,
    matcher: Option<GlobSet>,
    /// Class ids; empty: any. With `labels` too, either matching is enough.
    pub class_ids: Vec<usize>,
    /// Inbox names; empty: every inbox.
    pub inboxes: Vec<String>,
    /// Top-1 score in `[min_score, max_score)`.
    pub min_score: Option<f64>,
    pub max_score: Option<f64>,
    /// Top-1 score minus top-2 score in `[min_margin, max_margin)`.
    pub min_margin: Option<f64>,
    pub max_margin: Option<f64>,
    pub action: RouteAction,
    /// Required for move, copy and link.
    pub to: Option<Target>,
    /// The route's folder is a review queue: listed on the status page, where labels are confirmed
    /// or corrected.
    pub review: bool,
    /// At most this many images (and bytes of images and sidecars) in the route's folder: the oldest
    /// recorded ones leave first.
    pub cap: Option<Cap>,
}

/// A route folder's size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub max_files: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// Equal when every key is (the compiled matcher follows from `labels`).
impl PartialEq for Route {
    fn eq(&self, o: &Route) -> bool {
        (&self.name, &self.labels, &self.class_ids, &self.inboxes, self.action, &self.to) == (&o.name, &o.labels, &o.class_ids, &o.inboxes, o.action, &o.to)
            && (self.min_score, self.max_score, self.min_margin, self.max_margin) == (o.min_score, o.max_score, o.min_margin, o.max_margin)
            && (self.review, self.cap) == (o.review, o.cap)
    }
}

/// What a route is matched against: the top-1 result of one image.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'a> {
    pub inbox: &'a str,
    pub class_id: usize,
    pub label: &'a str,
    /// The English label when `label` is a translation.
    pub label_en: Option<&'a str>,
    pub score: f64,
    /// Top-1 score minus top-2 score (the top-1 score when there is no second).
    pub margin: f64,
}

impl Route {
    /// Whether every condition of this route holds for `v`.
    pub fn matches(&self, v: &Verdict) -> bool {
        let by_name = |m: &GlobSet| m.is_match(v.label) || v.label_en.is_some_and(|e| m.is_match(e));
        let what = match (&self.matcher, self.class_ids.is_empty()) {
            (None, true) => true,
            (Some(m), true) => by_name(m),
            (None, false) => self.class_ids.contains(&v.class_id),
            (Some(m), false) => by_name(m) || self.class_ids.contains(&v.class_id),
        };
        let within = |x: f64, lo: Option<f64>, hi: Option<f64>| lo.is_none_or(|lo| x >= lo) && hi.is_none_or(|hi| x < hi);
        what && (self.inboxes.is_empty() || self.inboxes.iter().any(|i| i == v.inbox))
            && within(v.score, self.min_score, self.max_score)
            && within(v.margin, self.min_margin, self.max_margin)
    }

    pub fn describe(&self) -> String {
        let list = |v: &[String]| v.iter().map(|s| toml::Value::String(s.clone()).to_string()).collect::<Vec<_>>().join(", ");
        let mut s = format!("[[route]]\nname = {}\n", toml::Value::String(self.name.clone()));
        if !self.labels.is_empty() {
            s += &format!("labels = [{}]\n", list(&self.labels));
        }
        if !self.class_ids.is_empty() {
            s += &format!("class_ids = [{}]\n", self.class_ids.iter().map(usize::to_string).collect::<Vec<_>>().join(", "));
        }
        if !self.inboxes.is_empty() {
            s += &format!("inboxes = [{}]\n", list(&self.inboxes));
        }
        for (k, v) in [("min_score", self.min_score), ("max_score", self.max_score), ("min_margin", self.min_margin), ("max_margin", self.max_margin)] {
            if let Some(v) = v {
                s += &format!("{k} = {v}\n");
            }
        }
        s += &format!("action = \"{}\"\n", self.action.as_str());
        if let Some(t) = &self.to {
            s += &format!("to = {}\n", toml::Value::String(t.template.clone()));
        }
        if self.review {
            s += "review = true\n";
        }
        if let Some(n) = self.cap.and_then(|c| c.max_files) {
            s += &format!("max_files = {n}\n");
        }
        if let Some(b) = self.cap.and_then(|c| c.max_bytes) {
            s += &format!("max_mb = {}\n", b >> 20);
        }
        s
    }
}

/// Every `[[route]]`, checked against the inboxes (names it refers to). The folders' roles are
/// checked with the other archive folders (`folders.rs`).
pub(super) fn from_raw(file: &Path, base: &Path, raw: Vec<RawRoute>, inboxes: &[InboxConfig]) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let err = |k: &str, reason: String| ConfigError::new(file, format!("[[route]] #{} {k}", i + 1), reason);
        let name = r.name.unwrap_or_else(|| format!("#{}", i + 1));
        if name.is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        let labels = r.labels.unwrap_or_default();
        let matcher = if labels.is_empty() {
            None
        } else {
            let mut set = GlobSetBuilder::new();
            for l in &labels {
                set.add(GlobBuilder::new(l).literal_separator(false).build().map_err(|e| err("labels", format!("bad pattern \"{l}\": {e}")))?);
            }
            Some(set.build().map_err(|e| err("labels", e.to_string()))?)
        };
        let class_ids = r.class_ids.unwrap_or_default();
        let names = r.inboxes.unwrap_or_default();
        if let Some(unknown) = names.iter().find(|n| !inboxes.iter().any(|ib| &ib.name == *n)) {
            let known: Vec<&str> = inboxes.iter().map(|ib| ib.name.as_str()).collect();
            return Err(err("inboxes", format!("no inbox is named \"{unknown}\"; inbox names: {}", known.join(", "))));
        }
        for (key, lo, hi) in [("score", r.min_score, r.max_score), ("margin", r.min_margin, r.max_margin)] {
            for (k, v) in [(format!("min_{key}"), lo), (format!("max_{key}"), hi)] {
                if let Some(v) = v.filter(|v| !(0.0..=1.0).contains(v)) {
                    return Err(err(&k, format!("must be 0..=1, got {v}")));
                }
            }
            if let (Some(lo), Some(hi)) = (lo, hi) {
                if lo >= hi {
                    return Err(err(&format!("max_{key}"), format!("must be above min_{key} ({lo}), got {hi}")));
                }
            }
        }
        let to = match (r.action, r.to) {
            (RouteAction::Keep, Some(_)) => return Err(err("to", "is not used with action = \"keep\" (the image stays in its inbox)".into())),
            (RouteAction::Keep, None) => None,
            (a, None) => return Err(err("to", format!("action = \"{}\" needs to, the folder the image goes to, e.g. \"/srv/sorted/{{label}}\"", a.as_str()))),
            (_, Some(t)) => Some(Target::parse(base, &t).map_err(|reason| err("to", format!("\"{t}\": {reason}")))?),
        };
        if r.max_files == Some(0) {
            return Err(err("max_files", "must be at least 1".into()));
        }
        if let Some(mb) = r.max_mb.filter(|mb| !(1..=100_000_000).contains(mb)) {
            return Err(err("max_mb", format!("must be 1..=100000000, got {mb}")));
        }
        let cap = (r.max_files.is_some() || r.max_mb.is_some()).then_some(Cap { max_files: r.max_files, max_bytes: r.max_mb.map(|mb| mb << 20) });
        if (r.review || cap.is_some()) && to.as_ref().is_none_or(|t| t.template.contains('{')) {
            let key = if r.review { "review" } else if r.max_files.is_some() { "max_files" } else { "max_mb" };
            return Err(err(key, "needs a route with a fixed folder of its own (to without placeholders, action move, copy or link)".into()));
        }
        routes.push(Route {
            name,
            labels,
            matcher,
            class_ids,
            inboxes: names,
            min_score: r.min_score,
            max_score: r.max_score,
            min_margin: r.min_margin,
            max_margin: r.max_margin,
            action: r.action,
            to,
            review: r.review,
            cap,
        });
    }
    share_folders(&mut routes);
    // A review queue or a capped folder is counted and listed as a whole: nothing else may share it.
    for (i, r) in routes.iter().enumerate() {
        let Some(t) = r.to.as_ref().filter(|_| r.review || r.cap.is_some()) else { continue };
        let own = t.root.join(t.rest.join("/"));
        let shared = routes.iter().enumerate().any(|(j, o)| j != i && o.to.as_ref().is_some_and(|ot| ot.root == t.root))
            || inboxes.iter().any(|ib| ib.quarantine.as_ref() == Some(&t.root) || ib.on_done == super::OnDone::Move(t.root.clone()));
        if shared || own != t.root {
            let key = if r.review { "review" } else { "max_files" };
            return Err(ConfigError::new(file, format!("[[route]] #{} {key}", i + 1), format!(
                "{} is shared with another route, done_dir or quarantine; a review queue or a capped folder needs a folder of its own beside the others",
                own.display()
            )));
        }
    }
    Ok(routes)
}

/// Routes whose fixed folders nest share the outermost one, pinned once with one ledger:
/// `/srv/sorted/review` and `/srv/sorted/{label}` are both placed beneath `/srv/sorted`.
fn share_folders(routes: &mut [Route]) {
    let roots: Vec<PathBuf> = routes.iter().filter_map(|r| Some(r.to.as_ref()?.root.clone())).collect();
    for t in routes.iter_mut().filter_map(|r| r.to.as_mut()) {
        let outer = roots.iter().filter(|o| t.root.starts_with(o) && **o != t.root).min_by_key(|o| o.as_os_str().len());
        if let Some(outer) = outer {
            let inner = t.root.strip_prefix(outer).unwrap_or(Path::new("")).components().map(|c| c.as_os_str().to_string_lossy().into_owned());
            t.rest.splice(0..0, inner);
            t.root = outer.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, setup};
    use super::super::*;
    use super::*;

    fn verdict(label: &str, class_id: usize, score: f64, margin: f64) -> Verdict<'_> {
        Verdict { inbox: "inbox", class_id, label, label_en: None, score, margin }
    }

    #[test]
    fn templates_split_at_the_folder_of_the_first_placeholder() {
        let t = Target::parse(Path::new("/etc/labeld"), "/srv/sorted/{label}/{date}/").unwrap();
        assert_eq!(t.root, PathBuf::from("/srv/sorted"));
        assert_eq!(t.rest, vec!["{label}", "{date}"]);
        let t = Target::parse(Path::new("/cfg"), "sorted/x-{class_id}-{inbox}").unwrap();
        assert_eq!(t.root, PathBuf::from("/cfg/sorted"));
        assert_eq!(t.render(|p| format!("<{p}>")), PathBuf::from("/cfg/sorted/x-<class_id>-<inbox>"));
        let t = Target::parse(Path::new("/cfg"), "../review").unwrap();
        assert_eq!((t.root, t.rest), (PathBuf::from("/review"), vec![]));
        for bad in ["/srv/{labl}", "/srv/{label", "/srv/label}", "/srv/{label}/..", "/srv/{label}/./x", ""] {
            assert!(Target::parse(Path::new("/cfg"), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_condition_must_hold_and_labels_or_class_ids_either() {
        let (_dir, file) = setup();
        let text = format!(
            "{MINIMAL}[[route]]\nlabels = [\"esp*\", \"cup\"]\nclass_ids = [404]\nmin_score = 0.5\nmax_margin = 0.9\naction = \"move\"\nto = \"sorted/{{label}}\"\n"
        );
        let c = Config::parse(&file, &text).unwrap();
        let r = &c.routes[0];
        assert!(r.matches(&verdict("espresso", 967, 0.95, 0.5)));
        assert!(r.matches(&verdict("airliner", 404, 0.5, 0.5)), "by class id");
        assert!(!r.matches(&verdict("espresso", 967, 0.49, 0.2)), "below min_score");
        assert!(!r.matches(&verdict("espresso", 967, 0.95, 0.9)), "max_margin is exclusive");
        assert!(!r.matches(&verdict("Espresso", 967, 0.95, 0.5)), "labels are case-sensitive");
        assert!(!r.matches(&verdict("teapot", 849, 0.95, 0.5)));
        let any = Config::parse(&file, &format!("{MINIMAL}[[route]]\nmax_score = 0.3\naction = \"keep\"\n")).unwrap();
        assert!(any.routes[0].matches(&verdict("anything", 1, 0.29, 0.0)));
        assert!(!any.routes[0].matches(&verdict("anything", 1, 0.3, 0.0)));
    }

    #[test]
    fn bad_routes_are_refused_naming_the_key() {
        let (_dir, file) = setup();
        let refused = |route: &str| Config::parse(&file, &format!("{MINIMAL}[[route]]\n{route}\n")).unwrap_err();
        assert_eq!(refused("action = \"move\"").key, "[[route]] #1 to");
        assert_eq!(refused("action = \"keep\"\nto = \"x\"").key, "[[route]] #1 to");
        assert_eq!(refused("action = \"shred\"\nto = \"x\"").key, "\"shred\"");
        assert_eq!(refused("action = \"move\"\nto = \"x/{lable}\"").key, "[[route]] #1 to");
        assert_eq!(refused("action = \"move\"\nto = \"x\"\nmin_score = 1.5").key, "[[route]] #1 min_score");
        assert_eq!(refused("action = \"move\"\nto = \"x\"\nmin_margin = 0.5\nmax_margin = 0.2").key, "[[route]] #1 max_margin");
        assert_eq!(refused("action = \"move\"\nto = \"x\"\ninboxes = [\"line9\"]").key, "[[route]] #1 inboxes");
        assert_eq!(refused("action = \"move\"\nto = \"x\"\nlabels = [\"[\"]").key, "[[route]] #1 labels");
        assert_eq!(refused("action = \"move\"\nto = \"x\"\ncolour = 1").key, "colour");
    }

    #[test]
    fn a_route_folder_that_would_feed_an_inbox_is_refused_naming_both() {
        let (dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}[[route]]\naction = \"copy\"\nto = \"inbox/sorted/{{label}}\"\n")).unwrap_err();
        assert_eq!(e.key, "[[route]] #1 to");
        let inbox = dir.path().join("inbox");
        assert!(e.reason.contains(&inbox.join("sorted").display().to_string()) && e.reason.contains("inside the inbox"), "{e}");
        assert!(e.reason.contains(&format!("({})", inbox.display())), "names the inbox too: {e}");
        // Through a link to the inbox.
        std::fs::create_dir_all(&inbox).unwrap();
        std::os::unix::fs::symlink(&inbox, dir.path().join("via")).unwrap();
        let e = Config::parse(&file, &format!("{MINIMAL}[[route]]\naction = \"move\"\nto = \"via/x/{{label}}\"\n")).unwrap_err();
        assert!(e.reason.contains("inside the inbox"), "{e}");
        // A route folder above a done_dir, and one shared with it.
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"out/done\"\n[[route]]\naction = \"move\"\nto = \"out/{{label}}\"\n")).unwrap_err();
        assert!(e.reason.contains("one inside the other"), "{e}");
        Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"out\"\n[[route]]\naction = \"move\"\nto = \"out/{{label}}\"\n")).unwrap();
        Config::parse(&file, &format!("{MINIMAL}[[route]]\naction = \"move\"\nto = \"inbox/.sorted/{{label}}\"\n")).unwrap();
    }

    #[test]
    fn routes_whose_folders_nest_share_the_outer_one() {
        let (dir, file) = setup();
        let text = format!("{MINIMAL}[[route]]\nmax_margin = 0.1\naction = \"move\"\nto = \"sorted/review\"\n[[route]]\naction = \"move\"\nto = \"sorted/{{label}}\"\n");
        let c = Config::parse(&file, &text).unwrap();
        let review = c.routes[0].to.as_ref().unwrap();
        assert_eq!((&review.root, &review.rest), (&dir.path().join("sorted"), &vec!["review".to_string()]));
        assert_eq!(review.render(|_| unreachable!()), dir.path().join("sorted/review"));
        assert_eq!(c.routes[1].to.as_ref().unwrap().root, dir.path().join("sorted"), "one folder to pin for both");
    }

    #[test]
    fn a_review_queue_or_a_cap_needs_a_fixed_folder_of_its_own() {
        let (_dir, file) = setup();
        let refused = |route: &str| Config::parse(&file, &format!("{MINIMAL}[[route]]\n{route}\n")).unwrap_err();
        assert_eq!(refused("review = true\naction = \"move\"\nto = \"r/{label}\"").key, "[[route]] #1 review");
        assert_eq!(refused("review = true\naction = \"keep\"").key, "[[route]] #1 review");
        assert_eq!(refused("max_files = 0\naction = \"move\"\nto = \"r\"").key, "[[route]] #1 max_files");
        assert_eq!(refused("max_mb = 0\naction = \"move\"\nto = \"r\"").key, "[[route]] #1 max_mb");
        let shared = format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"r\"\n[[route]]\nmax_files = 3\naction = \"move\"\nto = \"r\"\n");
        assert!(Config::parse(&file, &shared).unwrap_err().reason.contains("a folder of its own"));
        let c = Config::parse(&file, &format!("{MINIMAL}[[route]]\nreview = true\nmax_files = 100\nmax_mb = 50\naction = \"copy\"\nto = \"r\"\n")).unwrap();
        assert_eq!(c.routes[0].cap, Some(Cap { max_files: Some(100), max_bytes: Some(50 << 20) }));
        assert!(c.describe().contains("review = true\nmax_files = 100\nmax_mb = 50\n"), "{}", c.describe());
    }

    #[test]
    fn a_changed_route_is_a_changed_config() {
        let (_dir, file) = setup();
        let a = Config::parse(&file, &format!("{MINIMAL}[[route]]\nlabels = [\"cup\"]\naction = \"move\"\nto = \"s/{{label}}\"\n")).unwrap();
        let b = Config::parse(&file, &format!("{MINIMAL}[[route]]\nlabels = [\"cup\"]\naction = \"copy\"\nto = \"s/{{label}}\"\n")).unwrap();
        assert_eq!(a.routes, a.clone().routes);
        assert_ne!(a.routes, b.routes);
        assert!(a.describe().contains("[[route]]\nname = \"#1\"\nlabels = [\"cup\"]\naction = \"move\""), "{}", a.describe());
    }
}
