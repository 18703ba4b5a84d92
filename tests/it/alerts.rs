//! The example alerting rules in deploy/prometheus: valid for Prometheus
//! (`promtool check rules`), behaving as their unit tests say (`promtool
//! test rules`), and reading only metrics the proxy exports, so the rules
//! cannot drift from src/metrics.rs.
//!
//! promtool comes from the Debian package `prometheus`. Without it these
//! tests fail: a missing tool must never look like a pass.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const RULES: &str = "deploy/prometheus/alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/alerts.test.yml";

/// Runs `promtool ARGS` in the crate root and panics with its output unless
/// it succeeds.
fn promtool(args: &[&str]) {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run promtool ({e}): install the Debian package `prometheus` \
             (apt-get install prometheus), which provides /usr/bin/promtool"
        ),
    };
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_valid() {
    promtool(&["check", "rules", RULES]);
}

#[test]
fn alert_rule_unit_tests_pass() {
    promtool(&["test", "rules", RULE_TESTS]);
}

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// Every `token_injector_…` name in `text`, with the character before it
/// and after it (for telling string literals from other mentions).
fn names(text: &str) -> Vec<(Option<char>, String, Option<char>)> {
    const PREFIX: &str = "token_injector_";
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(PREFIX) {
        let start = from + i;
        let before = text[..start].chars().next_back();
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |n| start + n);
        from = end;
        // Part of a longer identifier (`x_token_injector_…`): not a metric.
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        found.push((
            before,
            text[start..end].to_owned(),
            text[end..].chars().next(),
        ));
    }
    found
}

/// The metric families src/metrics.rs registers: the names given as string
/// literals (`"token_injector_…"`), as `Opts::new` and `counter_vec` take them.
fn registered() -> BTreeSet<String> {
    names(&read("src/metrics.rs"))
        .into_iter()
        .filter(|(b, _, a)| *b == Some('"') && *a == Some('"'))
        .map(|(_, n, _)| n)
        .collect()
}

/// Whether `name` is a series of a registered family: the family itself,
/// or a histogram's `_bucket`, `_sum` or `_count`.
fn is_exported(name: &str, families: &BTreeSet<String>) -> bool {
    families.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| families.contains(base))
        })
}

#[test]
fn alerts_use_only_metrics_the_proxy_exports() {
    let families = registered();
    // Guard against a parser that finds nothing and so accepts everything.
    for spec in [
        "token_injector_token_fetch_total",
        "token_injector_token_expiry_timestamp_seconds",
        "token_injector_requests_total",
        "token_injector_config_reloads_total",
    ] {
        assert!(
            families.contains(spec),
            "src/metrics.rs no longer registers {spec}? found: {families:?}"
        );
    }
    for file in [RULES, RULE_TESTS] {
        let used: BTreeSet<String> = names(&read(file)).into_iter().map(|(_, n, _)| n).collect();
        assert!(
            used.len() >= 3,
            "{file}: expected several token_injector_ metrics, found {used:?}"
        );
        let unknown: Vec<&String> = used.iter().filter(|n| !is_exported(n, &families)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics that src/metrics.rs does not register: {unknown:?}\nregistered: {families:?}"
        );
    }
}

#[test]
fn every_alert_has_a_unit_test() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    for want in [
        "TokenInjectorTokenFetchFailing",
        "TokenInjectorTokenExpiringSoon",
        "TokenInjectorUpstreamErrorRate",
    ] {
        assert!(alerts.contains(&want), "{RULES} lacks {want}: {alerts:?}");
    }
    for alert in alerts {
        let evals: Vec<&str> = tests
            .split("- eval_time:")
            .skip(1)
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            evals.iter().any(|c| c.contains("exp_alerts: []")),
            "{RULE_TESTS}: no case where {alert} must not fire"
        );
        assert!(
            evals.iter().any(|c| c.contains("exp_labels:")),
            "{RULE_TESTS}: no case where {alert} fires"
        );
    }
}
