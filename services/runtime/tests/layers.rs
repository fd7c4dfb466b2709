//! The runtime's layers depend one way: a module may use modules of lower layers
//! (and its own), never one beside or above it. Read from the sources, so a `use`
//! that breaks the order fails here rather than in review.

use std::collections::BTreeMap;
use std::path::Path;

/// Each top-level module and its layer; higher numbers sit above lower ones.
const LAYERS: [(&str, u8); 13] = [
    ("error", 0),
    ("ids", 1),
    ("metrics", 1),
    ("validate", 1),
    ("inherit_fd", 1),
    ("spec", 2),
    ("store", 3),
    ("oci", 3),
    ("backends", 3),
    ("namespaces", 3),
    ("lifecycle", 4),
    ("server", 5),
    ("lib", 6),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, layer)| *layer)
}

fn sources(dir: &Path, into: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

#[test]
fn no_module_uses_one_beside_or_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|name| name.trim_end_matches(".rs"))
            .expect("a name");
        if top == "main" {
            continue; // the binary wires every layer together
        }
        let own = layer(top).unwrap_or_else(|| panic!("module {top} has no layer in LAYERS"));
        let text = std::fs::read_to_string(&file).expect("read");
        for (at, _) in text.match_indices("crate::") {
            let used: String = text[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let Some(theirs) = layer(&used) else {
                continue; // a macro path such as `$crate::` or an item of lib.rs
            };
            if used != top && theirs >= own {
                wrong
                    .entry(relative.display().to_string())
                    .or_default()
                    .push(used);
            }
        }
    }
    assert!(wrong.is_empty(), "layer order broken: {wrong:#?}");
}

#[test]
fn no_source_reaches_into_another_crate_by_path() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in ["services", "crates", "tests", "cli", "proto"] {
        let dir = root.join(dir);
        if dir.exists() {
            sources(&dir, &mut files);
        }
    }
    let reaching: Vec<String> = files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "target"))
        .filter(|f| {
            std::fs::read_to_string(f)
                .is_ok_and(|text| text.lines().any(|l| l.trim_start().starts_with("#[path")))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(reaching.is_empty(), "#[path] attributes: {reaching:?}");
}
