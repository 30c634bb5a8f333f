//! The Prometheus text exposition as the tests read it.
//!
//! Owns: [`Metrics`], a small parser of a `/metrics` scrape, its sums over
//! label subsets, the values a label takes, and the series names its
//! `# TYPE` lines declare. Must not touch: scraping (see
//! [`super::server::TestServer::metrics`]) or the engine's own registry.

use std::collections::{BTreeMap, BTreeSet};

/// A parsed Prometheus text exposition.
pub struct Metrics {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            let (name, labels) = match key.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap_or(rest);
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .filter_map(|p| p.split_once('='))
                        .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
                        .collect();
                    (name.to_string(), labels)
                }
                None => (key.to_string(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// Sum of every sample of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v)))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The values `label` takes on the samples of `name` whose labels
    /// include `labels`.
    pub fn label_values(&self, name: &str, label: &str, labels: &[(&str, &str)]) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v)))
            .filter_map(|(_, l, _)| l.get(label).cloned())
            .collect()
    }

    /// Every series name the scrape declares (`# TYPE` lines), histograms
    /// expanded to their `_bucket`, `_sum` and `_count` series.
    pub fn series_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for line in self.text.lines() {
            let mut words = line.strip_prefix("# TYPE ").unwrap_or_default().split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            if kind == "histogram" {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            } else {
                names.insert(name.to_string());
            }
        }
        names
    }

    /// Whether a sample of `name` exists at all.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// `(status, count)` of `tokitai_http_requests_total` for `route`.
    pub fn requests_by_status(&self, route: &str) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for (n, l, v) in &self.samples {
            if n == "tokitai_http_requests_total" && l.get("route").is_some_and(|r| r == route) {
                let status: u16 = l["status"].parse().unwrap();
                *out.entry(status).or_default() += *v as u64;
            }
        }
        out
    }
}
