//! The design's rules about module dependencies, checked on the source tree:
//! only the command line knows clap, and no two modules import each other,
//! directly or through others (docs/design.md, "Request path by module").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/grpc/compute.rs` -> `grpc`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// Code without `//` comments (doc comments mention modules in prose).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a file's code names through `crate::`, including
/// grouped imports such as `use crate::{admin, grpc};`.
fn crate_refs(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|n| n.trim().split("::").next().unwrap_or("").trim())
                .collect()
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            vec![&rest[..end]]
        };
        for n in names {
            if modules.contains(n) {
                refs.insert(n.to_string());
            }
        }
    }
    refs
}

fn source_tree() -> (PathBuf, Vec<PathBuf>) {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    (src, files)
}

#[test]
fn only_the_command_line_knows_clap() {
    let (src, files) = source_tree();
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !matches!(module_of(&src, f).as_str(), "cli" | "main"))
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("readable source")
                .contains("clap")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "clap is mentioned outside the command-line module: {offenders:?}"
    );
}

#[test]
fn module_dependencies_have_no_cycle() {
    let (src, files) = source_tree();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| !matches!(m.as_str(), "lib" | "main"))
        .collect();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let module = module_of(&src, f);
        if matches!(module.as_str(), "lib" | "main") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(f).expect("readable source"));
        let refs = crate_refs(&code, &modules);
        deps.entry(module.clone())
            .or_default()
            .extend(refs.into_iter().filter(|r| *r != module));
    }
    // The components below the command line never import it.
    for m in ["engine", "model", "training", "plan", "telemetry"] {
        assert!(
            !deps.get(m).is_some_and(|d| d.contains("cli")),
            "{m} imports the command-line module"
        );
    }
    // Depth-first search for a cycle; report the path.
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| s == m) {
            panic!("import cycle: {} -> {m}", stack[i..].join(" -> "));
        }
        stack.push(m.to_string());
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, stack, done);
        }
        stack.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        visit(m, &deps, &mut Vec::new(), &mut done);
    }
    // The check sees the imports it should: the server starts the engine.
    assert!(deps["server"].contains("engine"), "{deps:?}");
}
