//! Which backend does each client get, and does it keep getting it? (`tether-bench clients`)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};

use crate::client::ask_name;

/// The answers of a [`survey()`]: for each source, the backend name (or the error) per round.
#[derive(Clone, Debug)]
pub struct Survey {
    pub sources: Vec<IpAddr>,
    /// `answers[source][round]`: the backend's name, or the error text.
    pub answers: Vec<Vec<Result<String, String>>>,
}

/// One backend's share of a [`Survey`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    pub name: String,
    /// Sources that reached this backend in at least one round.
    pub sources: usize,
    /// Every one of those sources reached this backend in every round.
    pub kept_all: bool,
}

/// Asks for a name from every source through `to`, `rounds` times over (all sources in round
/// 1, then all in round 2, ...).
pub fn survey(to: SocketAddr, sources: &[IpAddr], rounds: usize) -> Survey {
    let mut answers = vec![Vec::with_capacity(rounds); sources.len()];
    for _ in 0..rounds {
        for (source, answers) in sources.iter().zip(&mut answers) {
            answers.push(ask_name(*source, to).map_err(|e| e.to_string()));
        }
    }
    Survey { sources: sources.to_vec(), answers }
}

impl Survey {
    /// Connections that failed.
    pub fn failures(&self) -> usize {
        self.answers.iter().flatten().filter(|answer| answer.is_err()).count()
    }

    /// Sources that got more than one backend name.
    pub fn moved(&self) -> usize {
        self.answers.iter().filter(|answers| names(answers).len() > 1).count()
    }

    /// Per backend, by name.
    pub fn tallies(&self) -> Vec<Tally> {
        let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
        for answers in &self.answers {
            let names = names(answers);
            let kept = names.len() == 1 && answers.iter().all(Result::is_ok);
            for name in names {
                let tally = tallies.entry(name).or_insert_with(|| Tally {
                    name: name.to_owned(),
                    sources: 0,
                    kept_all: true,
                });
                tally.sources += 1;
                tally.kept_all &= kept;
            }
        }
        tallies.into_values().collect()
    }

    /// Writes one row per source (source, then the name per round; `!` for a failure), the
    /// failures, one line per backend and a total line.
    pub fn write_table(&self, out: &mut impl Write) -> io::Result<()> {
        let rounds = self.answers.first().map_or(0, Vec::len);
        let width = self.answers.iter().flatten().map(|a| a.as_ref().map_or(1, String::len));
        let width = width.max().unwrap_or(0).max("round 99".len());
        let mut header = format!("{:<17}", "source");
        for round in 1..=rounds {
            header += &format!(" {:<width$}", format!("round {round}"));
        }
        writeln!(out, "{}", header.trim_end())?;
        for (source, answers) in self.sources.iter().zip(&self.answers) {
            let mut row = format!("{:<17}", source.to_string());
            for answer in answers {
                row += &format!(" {:<width$}", answer.as_deref().unwrap_or("!"));
            }
            writeln!(out, "{}", row.trim_end())?;
        }
        for (source, answers) in self.sources.iter().zip(&self.answers) {
            for (round, answer) in answers.iter().enumerate() {
                if let Err(e) = answer {
                    writeln!(out, "failed {source} round {}: {e}", round + 1)?;
                }
            }
        }
        for tally in self.tallies() {
            let kept = if tally.kept_all { "yes" } else { "no" };
            writeln!(out, "backend {} sources {} kept {kept}", tally.name, tally.sources)?;
        }
        writeln!(
            out,
            "sources {} rounds {rounds} failures {} moved {}",
            self.sources.len(),
            self.failures(),
            self.moved()
        )
    }
}

/// The distinct backend names among one source's answers.
fn names(answers: &[Result<String, String>]) -> BTreeSet<&str> {
    answers.iter().filter_map(|answer| answer.as_deref().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::client::client_ip;

    #[test]
    fn survey_of_one_backend_keeps_every_source() {
        let backend = Backend::start("solo", "127.0.0.1:0".parse().unwrap()).unwrap();
        let sources: Vec<IpAddr> = (0..5).map(client_ip).collect();
        let survey = survey(backend.addr(), &sources, 2);
        assert_eq!(survey.failures(), 0);
        assert_eq!(survey.moved(), 0);
        assert_eq!(
            survey.tallies(),
            vec![Tally { name: "solo".into(), sources: 5, kept_all: true }]
        );
        let mut table = Vec::new();
        survey.write_table(&mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("backend solo sources 5 kept yes"), "{table}");
        assert!(table.ends_with("sources 5 rounds 2 failures 0 moved 0\n"), "{table}");
    }

    #[test]
    fn tallies_count_moves_and_failures() {
        let ok = |name: &str| Ok(name.to_owned());
        let survey = Survey {
            sources: (0..3).map(client_ip).collect(),
            answers: vec![
                vec![ok("a"), ok("a")],
                vec![ok("a"), ok("b")],
                vec![ok("b"), Err("refused".into())],
            ],
        };
        assert_eq!(survey.failures(), 1);
        assert_eq!(survey.moved(), 1);
        assert_eq!(
            survey.tallies(),
            vec![
                Tally { name: "a".into(), sources: 2, kept_all: false },
                Tally { name: "b".into(), sources: 2, kept_all: false },
            ]
        );
    }
}
