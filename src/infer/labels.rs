//! Class names, indexed by the model's output position.

use crate::config::{LabelSource, LabelsLang};
use crate::error::Fatal;

const IMAGENET: &str = include_str!("imagenet_classes.txt");
const IMAGENET_ZH: &str = include_str!("imagenet_classes_zh.txt");

#[derive(Debug, Clone)]
pub struct Labels {
    names: Vec<String>,
    /// The English names, when `names` are a translation.
    english: Option<Vec<String>>,
}

impl Labels {
    pub fn load(source: &LabelSource, lang: LabelsLang) -> Result<Labels, Fatal> {
        match (source, lang) {
            (LabelSource::ImageNet, LabelsLang::En) => Ok(Labels { names: lines(IMAGENET), english: None }),
            (LabelSource::ImageNet, LabelsLang::Zh) => {
                Ok(Labels { names: lines(IMAGENET_ZH), english: Some(lines(IMAGENET)) })
            }
            (LabelSource::File(p), _) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| Fatal::io(format!("cannot read label file {}", p.display()), e))?;
                let names = lines(&text);
                if names.is_empty() {
                    return Err(Fatal::Other(format!("label file {} has no labels", p.display())));
                }
                Ok(Labels { names, english: None })
            }
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, class: usize) -> &str {
        self.names.get(class).map(String::as_str).unwrap_or("")
    }

    /// The English name of `class` when the labels are a translation, else `None`.
    pub fn english(&self, class: usize) -> Option<&str> {
        self.english.as_ref().map(|e| e.get(class).map(String::as_str).unwrap_or(""))
    }

    pub fn is_translated(&self) -> bool {
        self.english.is_some()
    }
}

/// One label per line; a trailing blank line is common, but blank lines inside the file would shift
/// every class after them, so they are kept as (empty) labels.
fn lines(text: &str) -> Vec<String> {
    let names: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
    match names.iter().rposition(|n| !n.trim().is_empty()) {
        Some(last) => names[..=last].to_vec(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_imagenet_names_are_the_1000_classes_in_order() {
        let l = Labels::load(&LabelSource::ImageNet, LabelsLang::En).unwrap();
        assert_eq!(l.len(), 1000);
        assert_eq!(l.name(0), "tench");
        assert_eq!(l.name(281), "tabby");
        assert_eq!(l.name(967), "espresso");
        assert_eq!(l.name(999), "toilet tissue");
        assert_eq!(l.english(281), None);
    }

    #[test]
    fn chinese_names_are_1000_lines_in_the_same_order_with_english_beside() {
        let l = Labels::load(&LabelSource::ImageNet, LabelsLang::Zh).unwrap();
        assert_eq!(l.len(), 1000);
        assert!(l.is_translated());
        for (i, en) in [(0, "tench"), (281, "tabby"), (285, "Egyptian cat"), (967, "espresso"), (999, "toilet tissue")] {
            assert_eq!(l.english(i), Some(en));
        }
        assert_eq!(l.name(0), "丁鲷");
        assert_eq!(l.name(281), "虎斑猫");
        assert_eq!(l.name(285), "埃及猫");
        assert_eq!(l.name(967), "意式浓缩咖啡");
        assert_eq!(l.name(999), "卫生纸");
        for i in 0..1000 {
            let n = l.name(i);
            assert!(!n.trim().is_empty() && n.trim() == n, "class {i}: {n:?}");
            assert!(n.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)), "class {i} has no Chinese: {n:?}");
        }
    }

    #[test]
    fn a_label_file_keeps_line_positions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.txt");
        std::fs::write(&p, "ok\r\nscratch\n\ndent\n\n").unwrap();
        let l = Labels::load(&LabelSource::File(p), LabelsLang::En).unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l.name(1), "scratch");
        assert_eq!(l.name(3), "dent");
    }
}
