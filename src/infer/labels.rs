//! Class names, indexed by the model's output position.

use crate::config::LabelSource;
use crate::error::Fatal;

const IMAGENET: &str = include_str!("imagenet_classes.txt");

#[derive(Debug, Clone)]
pub struct Labels {
    names: Vec<String>,
}

impl Labels {
    pub fn load(source: &LabelSource) -> Result<Labels, Fatal> {
        let text = match source {
            LabelSource::ImageNet => IMAGENET.to_string(),
            LabelSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| Fatal::io(format!("cannot read label file {}", p.display()), e))?,
        };
        let names: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
        // A trailing blank line is common; blank lines inside the file would shift every class after them.
        let names = match names.iter().rposition(|n| !n.trim().is_empty()) {
            Some(last) => names[..=last].to_vec(),
            None => Vec::new(),
        };
        if names.is_empty() {
            return Err(Fatal::Other(format!("label file {source:?} has no labels")));
        }
        Ok(Labels { names })
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_imagenet_names_are_the_1000_classes_in_order() {
        let l = Labels::load(&LabelSource::ImageNet).unwrap();
        assert_eq!(l.len(), 1000);
        assert_eq!(l.name(0), "tench");
        assert_eq!(l.name(281), "tabby");
        assert_eq!(l.name(967), "espresso");
        assert_eq!(l.name(999), "toilet tissue");
    }

    #[test]
    fn a_label_file_keeps_line_positions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.txt");
        std::fs::write(&p, "ok\r\nscratch\n\ndent\n\n").unwrap();
        let l = Labels::load(&LabelSource::File(p)).unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l.name(1), "scratch");
        assert_eq!(l.name(3), "dent");
    }
}
