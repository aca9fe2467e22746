//! The code map of docs/ARCHITECTURE.md cannot drift: for every row, the
//! files under its path must not name what its "must not depend on" column
//! lists (`crate::io`, `tokio`, …). The check reads the sources as text:
//! every non-comment line naming `crate::X` or an external crate's `X::`.

use std::fs;
use std::path::{Path, PathBuf};

struct Row {
    paths: Vec<String>,
    forbidden: Vec<String>,
}

/// Backticked items of a table cell.
fn ticks(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn code_map() -> Vec<Row> {
    let doc = fs::read_to_string("docs/ARCHITECTURE.md").expect("docs/ARCHITECTURE.md");
    let start = doc
        .find("| path | what it is | must not depend on |")
        .expect("the code map table");
    doc[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // | path | what | forbidden | → ["", path, what, forbidden, ""]
            let paths: Vec<String> = ticks(cells.get(1)?)
                .into_iter()
                .filter(|p| p.starts_with("src/"))
                .collect();
            let forbidden = ticks(cells.get(cells.len().checked_sub(2)?)?);
            (!paths.is_empty()).then_some(Row { paths, forbidden })
        })
        .collect()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in fs::read_dir(path).unwrap().flatten() {
            rust_files(&e.path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// Whether `line` names `item`: `crate::io` as `crate::io::…`,
/// `crate::io;`, `crate::io::{…}`; an external crate as `tokio::…` or
/// `use tokio`.
fn names(line: &str, item: &str) -> bool {
    let mut rest = line;
    while let Some(at) = rest.find(item) {
        let before = rest[..at].chars().last();
        let after = rest[at + item.len()..].chars().next();
        let starts_word = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'));
        let ends_path = matches!(
            after,
            Some(':') | Some(';') | Some(',') | Some('}') | None | Some(' ')
        );
        if starts_word
            && ends_path
            && (item.contains("::") || after == Some(':') || line.trim_start().starts_with("use "))
        {
            return true;
        }
        rest = &rest[at + item.len()..];
    }
    false
}

#[test]
fn the_code_map_rules_hold() {
    let rows = code_map();
    assert!(
        rows.len() >= 10,
        "the code map table was not found whole: {} rows",
        rows.len()
    );
    let mut broken = Vec::new();
    let mut files_seen = 0;
    for row in &rows {
        for p in &row.paths {
            let path = Path::new(p);
            assert!(
                path.exists(),
                "the code map names {p}, which does not exist"
            );
            let mut files = Vec::new();
            rust_files(path, &mut files);
            files_seen += files.len();
            for f in files {
                let text = fs::read_to_string(&f).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.trim_start();
                    if code.starts_with("//") {
                        continue;
                    }
                    for item in &row.forbidden {
                        if names(code, item) {
                            broken.push(format!(
                                "{}:{}: {item} ({})",
                                f.display(),
                                n + 1,
                                code.trim()
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(files_seen > 50, "only {files_seen} source files checked");
    assert!(
        broken.is_empty(),
        "dependencies the code map forbids:\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_source_folder_is_on_the_map() {
    let rows = code_map();
    let mapped: Vec<&String> = rows.iter().flat_map(|r| r.paths.iter()).collect();
    for e in fs::read_dir("src").unwrap().flatten() {
        let p = format!(
            "src/{}{}",
            e.file_name().to_string_lossy(),
            if e.path().is_dir() { "/" } else { "" }
        );
        if p == "src/lib.rs" {
            continue;
        }
        assert!(
            mapped.iter().any(|m| **m == p),
            "{p} is not in docs/ARCHITECTURE.md's code map"
        );
    }
}

#[test]
fn the_checker_sees_what_it_must() {
    assert!(names("use crate::io::sys::EventFd;", "crate::io"));
    assert!(names("    crate::io::select(x)", "crate::io"));
    assert!(!names("use crate::iox::y;", "crate::io"));
    assert!(names("use tokio::sync::watch;", "tokio"));
    assert!(names(
        "    let rt = tokio::runtime::Builder::new();",
        "tokio"
    ));
    assert!(!names("let my_tokio = 1;", "tokio"));
    assert!(!names("    mytokio::x();", "tokio"));
}
