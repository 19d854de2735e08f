//! Reading the operator's Prometheus exposition text in assertions, so every test parses it the
//! same way (sample lines only, never the `# HELP`/`# TYPE` lines that repeat the names).

/// A sample's value: the first line of metric `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            });
            if all { value.parse().ok() } else { None }
        })
}

/// Sum of the samples whose line starts with `prefix` (a name, optionally with the opening
/// brace) and contains `label_filter` (`""` for all).
pub fn metric_sum(text: &str, prefix: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix) && l.contains(label_filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
