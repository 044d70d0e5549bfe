//! The Grafana dashboard shipped in `dashboards/grafana.json` queries only series the crate
//! exports (`Metrics::EXPORTED`, with the `_sum` and `_count` of its one summary), and only
//! `role` values the layers send; and it shows every exported series.
#![cfg(feature = "metrics")]

use std::collections::BTreeSet;

use tower_coalesce::http::Metrics;

/// The `role` values the layers send (`Metrics`' table).
const ROLES: [&str; 8] = [
    "leader",
    "follower",
    "bypass",
    "rejected",
    "timed_out",
    "replayed",
    "hit",
    "stale",
];

fn exprs() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/grafana.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().expect("targets").iter())
        .map(|target| target["expr"].as_str().expect("an expr").to_owned())
        .collect()
}

/// The words of a PromQL expression that name a series of the crate (`coalesce_...`).
fn series(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("coalesce_"))
        .collect()
}

#[test]
fn the_dashboard_queries_only_what_the_crate_exports_and_all_of_it() {
    let exported: BTreeSet<&str> = Metrics::EXPORTED.into_iter().collect();
    let mut shown = BTreeSet::new();
    let exprs = exprs();
    for expr in &exprs {
        for name in series(expr) {
            let base = ["_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| *base == "coalesce_wait_duration_seconds")
                .unwrap_or(name);
            assert!(exported.contains(base), "{name} is not exported: {expr}");
            shown.insert(base);
        }
        // `role="x"` and `role=~"x|y"`: values the layers send.
        for (_, rest) in expr
            .match_indices("role=")
            .map(|(i, _)| expr.split_at(i + 5))
        {
            let quoted = rest.trim_start_matches('~').trim_start_matches('"');
            let values = quoted.split('"').next().unwrap();
            for value in values.split('|') {
                assert!(
                    ROLES.contains(&value),
                    "role {value:?} is never sent: {expr}"
                );
            }
        }
    }
    let missing: Vec<_> = exported.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "exported but not on the dashboard: {missing:?}"
    );
}

#[test]
fn series_are_read_out_of_promql() {
    assert_eq!(
        series(r#"sum(rate(coalesce_requests_total{role="leader"}[5m])) / coalesce_x"#),
        ["coalesce_requests_total", "coalesce_x"]
    );
}
