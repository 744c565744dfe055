//! Pass lines, and the two files a run writes: `results.json` and `summary.md`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Map, Value};

/// One figure with its goal and whether it met it.
#[derive(Clone, Debug)]
pub struct Check {
    pub scenario: String,
    pub figure: String,
    pub value: f64,
    pub goal: String,
    pub pass: bool,
}

#[derive(Default)]
pub struct Checks(pub Vec<Check>);

impl Checks {
    pub fn add(&mut self, scenario: &str, figure: &str, value: f64, goal: &str, pass: bool) {
        let status = if pass { "pass" } else { "FAIL" };
        println!("[{status}] {scenario}: {figure} = {} (goal {goal})", show(value));
        self.0.push(Check {
            scenario: scenario.into(),
            figure: figure.into(),
            value,
            goal: goal.into(),
            pass,
        });
    }

    pub fn all_pass(&self) -> bool {
        self.0.iter().all(|c| c.pass)
    }
}

fn show(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

/// Least-squares slope of `[x, y]` points (0 for fewer than two).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + (x - mx) * (y - my), b + (x - mx) * (x - mx)));
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Writes `results.json` (top-level figures, samples, one object per scenario, the checks)
/// and `summary.md` into `out`.
pub fn write(
    out: &Path,
    top: Map<String, Value>,
    scenarios: Vec<(&str, Value)>,
    checks: &Checks,
) -> std::io::Result<()> {
    let mut all = top;
    for (name, value) in &scenarios {
        all.insert((*name).to_string(), value.clone());
    }
    let list: Vec<Value> = checks
        .0
        .iter()
        .map(|c| json!({"scenario": c.scenario, "figure": c.figure, "value": c.value, "goal": c.goal, "pass": c.pass}))
        .collect();
    all.insert("checks".into(), Value::Array(list));
    all.insert("pass".into(), Value::Bool(checks.all_pass()));
    let text =
        serde_json::to_string_pretty(&Value::Object(all.clone())).map_err(std::io::Error::other)?;
    std::fs::write(out.join("results.json"), text + "\n")?;

    let mut md = String::new();
    let verdict =
        if checks.all_pass() { "every figure met its goal" } else { "SOME FIGURES FAILED" };
    let _ = writeln!(md, "# tether chaos run: {verdict}\n");
    for key in ["command", "seed", "seconds", "machine"] {
        if let Some(v) = all.get(key) {
            let _ = writeln!(md, "- {key}: `{}`", v.to_string().trim_matches('"'));
        }
    }
    let _ = writeln!(md, "\n| scenario | figure | value | goal | |\n|---|---|---|---|---|");
    for c in &checks.0 {
        let mark = if c.pass { "pass" } else { "**FAIL**" };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {mark} |",
            c.scenario,
            c.figure,
            show(c.value),
            c.goal
        );
    }
    for (name, value) in &scenarios {
        let _ = writeln!(md, "\n## {name}\n");
        if let Value::Object(map) = value {
            for (k, v) in map {
                let text = v.to_string();
                let text = if text.len() > 200 { format!("{}...", &text[..200]) } else { text };
                let _ = writeln!(md, "- {k}: `{text}`");
            }
        }
    }
    std::fs::write(out.join("summary.md"), md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> =
            (0..10).map(|i| (f64::from(i), 3.0 * f64::from(i) + 1.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        let flat: Vec<(f64, f64)> =
            (0..10).map(|i| (f64::from(i), if i % 2 == 0 { 5.0 } else { 7.0 })).collect();
        assert!(slope(&flat).abs() < 0.3);
        assert_eq!(slope(&[(1.0, 2.0)]), 0.0);
    }

    #[test]
    fn a_failed_check_fails_the_run() {
        let mut c = Checks::default();
        c.add("s", "f", 0.0, "0", true);
        assert!(c.all_pass());
        c.add("s", "g", 1.0, "0", false);
        assert!(!c.all_pass());
    }
}
