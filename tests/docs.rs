//! The user documentation's links resolve.
//!
//! README.md is a front page that links into docs/, and the docs link to
//! each other and to their runbooks. A page renamed, moved or not yet
//! written leaves an operator at a dead end, so every relative link in
//! README.md and docs/**/*.md must name a file that exists, and a link to
//! a heading (`page.md#heading`) must name a heading of that page, as
//! GitHub makes its anchors. Links inside code are not links.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// README.md and every markdown file under docs/, in a stable order.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The lines of a page that are prose: fenced code blocks left out.
fn prose_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut in_fence = false;
    text.lines().enumerate().filter(move |(_, line)| {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            return false;
        }
        !in_fence
    })
}

/// A line with its inline code spans (`...`) removed.
fn without_code_spans(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

/// The targets of the inline links and images on a line: `[text](target)`.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut targets = Vec::new();
    let mut rest = line.as_str();
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        let target = rest[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.to_string());
        rest = &rest[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped (but `-`
/// and `_`), spaces made `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a page has, with GitHub's `-1`, `-2` for repeated headings.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let base = anchor(heading.trim_start_matches('#'));
        let mut name = base.clone();
        let mut n = 0;
        while seen.contains(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        seen.insert(name);
    }
    seen
}

/// What is wrong with each broken link of one page, if anything.
fn broken_links(page: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(page).unwrap();
    let mut broken = Vec::new();
    for (number, line) in prose_lines(&text) {
        for target in link_targets(line) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = match target.split_once('#') {
                Some((file, fragment)) => (file, Some(fragment)),
                None => (target.as_str(), None),
            };
            let at = format!("{}:{}: {target}", page.display(), number + 1);
            let linked = if file.is_empty() {
                page.to_path_buf()
            } else {
                page.parent().unwrap().join(file)
            };
            if !linked.exists() {
                broken.push(format!("{at}: no file {}", linked.display()));
                continue;
            }
            let Some(fragment) = fragment else { continue };
            if linked.extension().is_some_and(|ext| ext == "md") {
                let linked_text = std::fs::read_to_string(&linked).unwrap();
                if !anchors(&linked_text).contains(fragment) {
                    broken.push(format!(
                        "{at}: no heading #{fragment} in {}",
                        linked.display()
                    ));
                }
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_docs_names_an_existing_file_and_heading() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let broken: Vec<String> = markdown_files(root)
        .iter()
        .flat_map(|page| broken_links(page))
        .collect();
    assert!(
        broken.is_empty(),
        "{} broken links; fix the link or write the page:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn a_missing_page_or_heading_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.md");
    std::fs::write(
        &page,
        "# Title\n\n## Two `words`\n\n[ok](#two-words) [ok](page.md#title) [web](https://example.com)\n\
         `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n\
         [gone](gone.md) [bad](#no-such-heading)\n",
    )
    .unwrap();
    let broken = broken_links(&page);
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].contains("no file") && broken[0].contains("gone.md"));
    assert!(broken[1].contains("no heading #no-such-heading"));
}

#[test]
fn anchors_follow_github() {
    assert_eq!(
        anchor(" Exactly once (the default, `--delivery exactly-once`)"),
        "exactly-once-the-default---delivery-exactly-once"
    );
    assert_eq!(anchor("walrelay's own cost"), "walrelays-own-cost");
    assert_eq!(
        anchors("# A\n## A\n```\n# not a heading\n```\n"),
        BTreeSet::from(["a".to_string(), "a-1".to_string()])
    );
}

/// The runbooks written with this page's links: each must let an operator
/// act, so each has the four parts, and commands to run.
const RUNBOOKS: &[&str] = &[
    "relay-down.md",
    "not-scraped.md",
    "standby-lost.md",
    "slot-lag-growing.md",
    "broker-down.md",
    "dead-letters.md",
    "exactly-once-fallback.md",
    "poll-backlog.md",
    "inbox-lag.md",
    "publishing-stalled.md",
    "failover.md",
    "slot-near-invalidation.md",
    "publication-changed.md",
    "slot-dropped.md",
    "slot-lost.md",
    "standby-decoding.md",
];

#[test]
fn every_runbook_has_symptoms_alert_check_and_fix_with_commands() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runbooks");
    let mut problems = Vec::new();
    for name in RUNBOOKS {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let headings: Vec<String> = prose_lines(&text)
            .filter_map(|(_, line)| line.strip_prefix("## "))
            .map(str::to_lowercase)
            .collect();
        for part in ["symptoms", "the alert", "check", "fix"] {
            if !headings.iter().any(|h| h.starts_with(part)) {
                problems.push(format!("{name}: no \"## {part}\" section"));
            }
        }
        if !text.contains("```sh") {
            problems.push(format!("{name}: no commands (a ```sh block)"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Alert names (`WalrelaySomething`) the docs mention, in prose or code.
fn alert_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("Walrelay") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(tail.len());
        if end > "Walrelay".len() {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_alert_the_docs_name_is_a_shipped_rule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join("alerts/walrelay.rules.yml")).unwrap();
    let missing: Vec<String> = markdown_files(root)
        .iter()
        .flat_map(|page| {
            let text = std::fs::read_to_string(page).unwrap();
            alert_names(&text)
                .into_iter()
                .filter(|name| !rules.contains(&format!("alert: {name}\n")))
                .map(|name| format!("{}: {name}", page.display()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the docs name alerts alerts/walrelay.rules.yml does not define:\n{}",
        missing.join("\n")
    );
}
