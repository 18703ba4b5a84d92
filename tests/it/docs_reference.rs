//! The documentation cannot drift from the code: every config key the loader
//! accepts is in the configuration reference, every metric the code registers
//! is in the metrics reference, and every relative link between the pages
//! (and from the README) points at a file and heading that exist.
//!
//! Plain std: the sources and pages are read as text at test time.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every `*.rs` file under `dir`, recursively, in a stable order.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// 1. Config keys
// ---------------------------------------------------------------------------

/// The config files to read: under `src/config/`, every `*.rs` whose name (or
/// a directory below `src/config/` on its path) starts with `raw`, and any
/// other that holds a `#[serde(deny_unknown_fields)]` struct named `Raw*`. So
/// `raw.rs` may become `raw/` or split into several files.
fn raw_config_files() -> Vec<PathBuf> {
    let config = root().join("src/config");
    rust_files(&config)
        .into_iter()
        .filter(|path| {
            let below = path.strip_prefix(&config).expect("under src/config");
            let named_raw = below.components().any(|c| match c {
                Component::Normal(name) => name.to_string_lossy().starts_with("raw"),
                _ => false,
            });
            named_raw || has_deny_unknown_raw_struct(&read(path))
        })
        .collect()
}

fn has_deny_unknown_raw_struct(source: &str) -> bool {
    let mut deny = false;
    for line in source.lines().map(str::trim) {
        if line.starts_with("#[") {
            deny |= line.contains("deny_unknown_fields");
        } else if !(line.starts_with("//") || line.is_empty()) {
            if deny && struct_name(line).is_some_and(|n| n.starts_with("Raw")) {
                return true;
            }
            deny = false;
        }
    }
    false
}

/// `Name` of a line such as `pub struct Name {` or `pub(crate) struct Name<'a> {`.
fn struct_name(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("pub")?;
    let rest = if let Some(r) = rest.strip_prefix('(') {
        &r[r.find(')')? + 1..]
    } else {
        rest
    };
    let rest = rest.trim_start().strip_prefix("struct ")?;
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The value of `rename = "..."` in a `#[serde(...)]` attribute, if any.
fn serde_rename(attr: &str) -> Option<String> {
    if !attr.starts_with("#[serde") {
        return None;
    }
    let at = attr.find("rename")?;
    let rest = &attr[at + "rename".len()..];
    // `rename_all` names no field.
    let rest = rest.trim_start().strip_prefix('=')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// Whether a `#[serde(...)]` attribute means the field is not a key of its
/// own: skipped, or flattened into its parent (whose struct is read anyway).
fn serde_not_a_key(attr: &str) -> bool {
    attr.starts_with("#[serde")
        && ["skip", "skip_deserializing", "flatten"]
            .iter()
            .any(|word| {
                attr.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .any(|w| w == *word)
            })
}

/// (struct, key) for every field of every `pub struct Raw… {` in `source`.
fn raw_struct_keys(source: &str) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    let mut lines = source.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(name) = struct_name(line).filter(|n| n.starts_with("Raw")) else {
            continue;
        };
        if !line.ends_with('{') {
            continue; // a tuple or unit struct has no keys
        }
        let mut depth = 1usize;
        let mut attrs: Vec<&str> = Vec::new();
        for line in lines.by_ref() {
            if depth == 1 {
                if line.starts_with("#[") {
                    attrs.push(line);
                } else if let Some(field) = field_name(line) {
                    let rename = attrs.iter().find_map(|a| serde_rename(a));
                    if !attrs.iter().any(|a| serde_not_a_key(a)) {
                        keys.push((name.to_owned(), rename.unwrap_or(field)));
                    }
                    attrs.clear();
                } else if !line.starts_with("//") && !line.is_empty() {
                    attrs.clear();
                }
            }
            depth += line.matches('{').count();
            depth -= line.matches('}').count().min(depth);
            if depth == 0 {
                break;
            }
        }
    }
    keys
}

/// `NAME` of a `pub NAME:` (or `pub(crate) NAME:`) field line.
fn field_name(line: &str) -> Option<String> {
    let rest = line.strip_prefix("pub")?;
    let rest = if let Some(r) = rest.strip_prefix('(') {
        &r[r.find(')')? + 1..]
    } else {
        rest
    };
    let rest = rest.strip_prefix(' ')?.trim_start();
    let (name, _) = rest.split_once(':')?;
    let name = name.trim().trim_start_matches("r#");
    (!name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_'))
        .then(|| name.to_owned())
}

#[test]
fn every_config_key_is_in_the_configuration_reference() {
    let files = raw_config_files();
    let mut keys = BTreeSet::new();
    for file in &files {
        keys.extend(raw_struct_keys(&read(file)));
    }
    assert!(
        !keys.is_empty(),
        "found no `pub struct Raw… {{` fields in src/config/ (read: {files:?}); \
         has the config mirror moved?"
    );
    let page = read(&root().join("docs/src/configuration.md"));
    let missing: Vec<String> = keys
        .iter()
        .filter(|(_, key)| !page.contains(&format!("`{key}`")))
        .map(|(strukt, key)| format!("  `{key}` (field of {strukt})"))
        .collect();
    assert!(
        missing.is_empty(),
        "{} config key(s) the loader accepts are not documented as `key` in \
         docs/src/configuration.md:\n{}",
        missing.len(),
        missing.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 2. Metrics
// ---------------------------------------------------------------------------

/// The contents of the string literals in Rust source: normal, byte and raw
/// strings. Comments and char literals are skipped, so a quote in them does
/// not start a string.
fn string_literals(source: &str) -> Vec<String> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == 'r'
            && (i == 0 || !ident(chars[i - 1]) || chars[i - 1] == 'b')
            && matches!(next, Some('"' | '#'))
        {
            // r"…", r#"…"#, br"…"
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                i += 1;
                continue;
            }
            let start = j + 1;
            let mut k = start;
            loop {
                if k >= chars.len() {
                    break;
                }
                if chars[k] == '"' && (1..=hashes).all(|h| chars.get(k + h) == Some(&'#')) {
                    break;
                }
                k += 1;
            }
            out.push(chars[start..k.min(chars.len())].iter().collect());
            i = k + 1 + hashes;
        } else if c == '"' {
            let mut s = String::new();
            let mut k = i + 1;
            while k < chars.len() && chars[k] != '"' {
                if chars[k] == '\\' {
                    s.push(chars[k]);
                    k += 1;
                }
                if k < chars.len() {
                    s.push(chars[k]);
                }
                k += 1;
            }
            out.push(s);
            i = k + 1;
        } else if c == '\'' {
            // A char literal ('"', '\'', '\u{…}') or a lifetime ('a).
            if next == Some('\\') {
                let mut k = i + 2;
                while k < chars.len() && chars[k] != '\'' {
                    k += 1;
                }
                i = k + 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The metric names the code registers: each string literal that begins with
/// `token_injector_[a-z0-9_]+` gives that name (a literal such as
/// `"token_injector_requests_total{route=…"` in a unit test gives the name
/// too), except histogram series suffixes.
fn registered_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in rust_files(&root().join("src")) {
        for literal in string_literals(&read(&file)) {
            let Some(rest) = literal.strip_prefix("token_injector_") else {
                continue;
            };
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                continue;
            }
            let name = format!("token_injector_{}", &rest[..end]);
            if ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.ends_with(suffix))
            {
                continue;
            }
            names.insert(name);
        }
    }
    names
}

#[test]
fn every_registered_metric_is_in_the_metrics_reference() {
    let names = registered_metrics();
    assert!(
        names.len() >= 5,
        "found only {names:?} as token_injector_* string literals in src/; has registration changed shape?"
    );
    let page = read(&root().join("docs/src/metrics.md"));
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !page.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} metric(s) the code registers are not in docs/src/metrics.md:\n  {}",
        missing.len(),
        missing
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// 3. Links
// ---------------------------------------------------------------------------

/// A heading's anchor as mdBook makes it: the heading's text, lower case,
/// whitespace to `-`, every character other than alphanumerics, `-` and `_`
/// dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '_' || c == '-' {
                Some(c)
            } else if c.is_whitespace() {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// The text of a heading line as rendered: `[text](url)` becomes `text`,
/// and code and emphasis markers go.
fn heading_text(raw: &str) -> String {
    let mut text = String::new();
    let mut rest = raw;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find("](").and_then(|close| {
            after[close + 2..]
                .find(')')
                .map(|end| (close, close + 2 + end + 1))
        }) {
            Some((close, end)) => {
                text.push_str(&rest[..open]);
                text.push_str(&after[..close]);
                rest = &after[end..];
            }
            None => {
                text.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    text.replace(['`', '*'], "")
}

/// Markdown lines outside fenced code blocks.
fn prose_lines(page: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<&str> = None;
    let mut out = Vec::new();
    for (n, line) in page.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(open), Some(m)) if open == m => fence = None,
            (None, None) => out.push((n + 1, line)),
            _ => {}
        }
    }
    out
}

/// Every anchor of a page's headings (ATX `#` headings), with mdBook's `-1`,
/// `-2` … suffixes for repeats.
fn anchors(page: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(page) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let text = line[hashes..].trim().trim_end_matches('#').trim();
        let id = anchor(&heading_text(text));
        let count = seen.entry(id.clone()).or_default();
        out.insert(if *count == 0 {
            id.clone()
        } else {
            format!("{id}-{count}")
        });
        *count += 1;
    }
    out
}

/// The targets of inline links `[text](target)` on a line, without inline
/// code spans (a link inside backticks is not a link).
fn link_targets(line: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            prose.push(' ');
        } else if !in_code {
            prose.push(c);
        } else {
            prose.push(' ');
        }
    }
    let mut out = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after.find(')').unwrap_or(after.len());
        let target = after[..end].split_whitespace().next().unwrap_or("");
        out.push(target.trim_matches(['<', '>']).to_owned());
        rest = &after[end..];
    }
    out
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_relative_link_to_a_page_and_heading_exists() {
    let root = root();
    let docs = root.join("docs/src");
    let mut pages: Vec<PathBuf> = fs::read_dir(&docs)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", docs.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|x| x == "md"))
        .collect();
    pages.sort();
    assert!(
        pages.iter().any(|p| p.ends_with("SUMMARY.md")),
        "docs/src/SUMMARY.md is missing"
    );
    pages.push(root.join("README.md"));

    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = read(page);
        let shown = page
            .strip_prefix(&root)
            .unwrap_or(page)
            .display()
            .to_string();
        for (line_no, line) in prose_lines(&text) {
            for target in link_targets(line) {
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (file, fragment) = match target.split_once('#') {
                    Some((file, fragment)) => (file, Some(fragment)),
                    None => (target.as_str(), None),
                };
                // Only links to pages: `x.md`, `x.md#a`, or `#a` within a page.
                let target_path = if file.is_empty() {
                    page.clone()
                } else if file.ends_with(".md") {
                    normalize(&page.parent().expect("a page's directory").join(file))
                } else {
                    continue;
                };
                checked += 1;
                let Ok(target_text) = fs::read_to_string(&target_path) else {
                    broken.push(format!(
                        "{shown}:{line_no}: ({target}): no file {}",
                        target_path
                            .strip_prefix(&root)
                            .unwrap_or(&target_path)
                            .display()
                    ));
                    continue;
                };
                let Some(fragment) = fragment else {
                    continue;
                };
                if !anchors(&target_text).contains(fragment) {
                    broken.push(format!(
                        "{shown}:{line_no}: ({target}): no heading with anchor #{fragment} in {}",
                        target_path
                            .strip_prefix(&root)
                            .unwrap_or(&target_path)
                            .display()
                    ));
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no relative links found in docs/src/*.md and README.md"
    );
    assert!(
        broken.is_empty(),
        "{} broken link(s):\n  {}",
        broken.len(),
        broken.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// The helpers themselves
// ---------------------------------------------------------------------------

#[test]
fn helpers_read_sources_and_pages_as_expected() {
    let source = r##"
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThing {
    pub plain: Option<String>,
    #[serde(rename = "renamed-key")]
    pub inner_name: Option<u64>,
    #[serde(default)]
    pub nested: BTreeMap<String, RawOther>,
    #[serde(skip)]
    pub skipped: (),
    // pub commented: Option<String>,
}
pub struct NotRaw {
    pub not_a_key: u8,
}
"##;
    let keys: Vec<String> = raw_struct_keys(source)
        .into_iter()
        .map(|(_, k)| k)
        .collect();
    assert_eq!(keys, ["plain", "renamed-key", "nested"]);
    assert!(has_deny_unknown_raw_struct(source));

    let code = r##"let a = '"'; // "token_injector_in_comment"
        reg("token_injector_a_total", "help with \"quotes\"");
        let b = r#"token_injector_raw "x""#; let c = 'x'; fn f<'a>() {}
        let d = "  grep token_injector_token\n";"##;
    let literals = string_literals(code);
    assert!(literals.contains(&"token_injector_a_total".to_owned()));
    assert!(literals.contains(&r#"help with \"quotes\""#.to_owned()));
    assert!(literals.contains(&r#"token_injector_raw "x""#.to_owned()));
    assert!(!literals.iter().any(|l| l.contains("in_comment")));

    assert_eq!(anchor(&heading_text("`[profiles.NAME]`")), "profilesname");
    assert_eq!(anchor(&heading_text("`[[routes]]`")), "routes");
    assert_eq!(
        anchor(&heading_text(
            "Protocols: HTTP/2, gRPC, mutual TLS, CONNECT, WebSockets"
        )),
        "protocols-http2-grpc-mutual-tls-connect-websockets"
    );
    assert_eq!(
        anchor(&heading_text("Static credentials (`grant = \"static\"`)")),
        "static-credentials-grant--static"
    );
    let page = "# A\n```toml\n# not a heading\n```\n## A\n[x](b.md#c) `[y](z.md)`\n";
    assert_eq!(anchors(page).into_iter().collect::<Vec<_>>(), ["a", "a-1"]);
    assert_eq!(link_targets("[x](b.md#c) `[y](z.md)`"), ["b.md#c"]);
}
