//! The checker: reads a campaign's history and counts violations of its invariants.
//!
//! 1. All `2xx` answers of one key are byte-identical: across instances, retries, faults
//!    and the bodies sent with the key (a key has one answer).
//! 2. No answer names another request's key or body.
//! 3. Effects: a key's handler wrote its (fenced) effect once. A key that ran twice is
//!    allowed only where the history shows the first run's instance stopped, killed or cut
//!    off from its store (a proxy fault, a store crash, its connections killed) between the
//!    two runs: counted and reported apart. In PostgreSQL's atomic mode, no exception:
//!    exactly one committed effect per key that got a `2xx` (the one its answer names), and
//!    none for a key that never did.
//! 4. No request went unanswered past its deadline, but on an instance stopped or killed
//!    meanwhile.
//! 5. After the faults, a retry of every key that ever got a `2xx` gets that same answer;
//!    on a Redis without persistence, an answer whose run began before the store crashed
//!    may be lost with it (reported on its own line, not hidden), even if a caller that
//!    joined the run's flight got it just after the crash.
//! 6. Nothing panicked.
//! 7. Every instance recovers: once the faults healed, each answers a fresh request with a
//!    `2xx` within 20 s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::{History, Mode};

/// One attempt of a client's request.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub request: u64,
    /// `/payments` (`IdempotencyLayer`) or `/clients` (`HttpCoalesceLayer`, body key).
    pub route: &'static str,
    pub key: String,
    pub body: String,
    pub instance: usize,
    pub start: f64,
    pub end: f64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Answer(u16, String),
    Error { timed_out: bool },
}

/// A handler run, as its instance printed it: `run <key> <instance>-<token> <what>`.
#[derive(Debug, Clone)]
pub struct Run {
    pub key: String,
    pub run: String,
    pub instance: usize,
    pub at: f64,
    /// `start`, `wrote` (the effect took), `stale` (a newer token wrote) or `failed`.
    pub what: String,
}

impl Run {
    pub fn parse(line: &str, instance: usize, at: f64) -> Option<Run> {
        let mut parts = line.strip_prefix("run ")?.split(' ');
        let (key, run, what) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Run {
            key: key.to_owned(),
            run: run.to_owned(),
            instance,
            at,
            what: what.to_owned(),
        })
    }
}

/// When a fault was in force, and the instance it hit (`None`: the store itself).
#[derive(Debug, Clone)]
pub struct FaultWindow {
    pub kind: &'static str,
    pub instance: Option<usize>,
    pub start: f64,
    pub end: f64,
}

const INVARIANTS: [&str; 7] = [
    "1 one answer",
    "2 own answer",
    "3 one effect",
    "4 no hang",
    "5 durable",
    "6 no panic",
    "7 recovers",
];

/// One store's result.
#[derive(Debug, Default)]
pub struct Report {
    pub mode: &'static str,
    pub requests: usize,
    pub attempts: usize,
    pub answered_2xx: usize,
    pub refused_422: usize,
    pub faults: BTreeMap<&'static str, usize>,
    pub keys: usize,
    /// Runs whose effect took.
    pub runs: usize,
    /// Keys that ran twice where a fault explains it, by the fault's kind.
    pub twice: BTreeMap<&'static str, usize>,
    /// Keys whose answer was lost with a Redis that keeps nothing on disk.
    pub lost_with_store: usize,
    /// Keys in violation, by invariant.
    pub violations: BTreeMap<&'static str, Vec<String>>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.violations.values().any(|keys| !keys.is_empty())
    }

    pub fn summary(&self) -> String {
        let violations: usize = self.violations.values().map(Vec::len).sum();
        format!(
            "   {}: {} requests ({} attempts), {} faults, {} keys, {} runs, {} keys ran twice \
             (explained), {} violations",
            self.mode,
            self.requests,
            self.attempts,
            self.faults.values().sum::<usize>(),
            self.keys,
            self.runs,
            self.twice.values().sum::<usize>(),
            violations
        )
    }
}

pub fn check(
    mode: Mode,
    history: &History,
    lease_ms: f64,
    out: &Path,
    seed: u64,
) -> Result<Report, crate::Error> {
    let mut report = Report {
        mode: mode_name(mode),
        attempts: history.attempts.len(),
        requests: history
            .attempts
            .iter()
            .map(|a| a.request)
            .collect::<HashSet<_>>()
            .len(),
        ..Report::default()
    };
    for fault in &history.faults {
        *report.faults.entry(fault.kind).or_default() += 1;
    }
    for invariant in INVARIANTS {
        report.violations.insert(invariant, Vec::new());
    }
    let mut by_key: BTreeMap<&str, Vec<&Attempt>> = BTreeMap::new();
    for attempt in &history.attempts {
        by_key.entry(&attempt.key).or_default().push(attempt);
    }
    let mut runs_by_key: HashMap<&str, Vec<&Run>> = HashMap::new();
    for run in &history.runs {
        runs_by_key.entry(&run.key).or_default().push(run);
    }
    report.keys = by_key.len();
    report.runs = history.runs.iter().filter(|r| r.what == "wrote").count();
    let store_restarts: Vec<&FaultWindow> = history
        .faults
        .iter()
        .filter(|f| f.kind == "store-restart")
        .collect();
    let mut bad: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    let mut lost: HashSet<&str> = HashSet::new();
    let mut flag = |report: &mut Report, invariant: &'static str, key: &str| {
        let keys = report.violations.get_mut(invariant).unwrap();
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_owned());
        }
        bad.entry(key.to_owned()).or_default().push(invariant);
    };

    for (key, attempts) in &by_key {
        // (1) and (2), on the workload's answers.
        // The key's first 2xx: its answer, when, and the body it answered.
        let mut first: Option<(&str, f64, &str)> = None;
        for attempt in attempts {
            let Outcome::Answer(status, text) = &attempt.outcome else {
                continue;
            };
            if *status == 422 {
                report.refused_422 += 1;
            }
            if !(200..300).contains(status) {
                continue;
            }
            report.answered_2xx += 1;
            if !names_its_request(text, key, &attempt.body) {
                flag(&mut report, INVARIANTS[1], key);
            }
            match first {
                // Kept between the start of its run (or of the attempt, if the run left no
                // trace) and the answer: a crash after that may have taken it. Not the
                // attempt's start alone: an attempt that began after a crash may still get
                // the answer of a run that began, and kept it, before (it joined the run's
                // flight on its instance).
                None => {
                    let run_started = run_of(text).and_then(|run| {
                        runs_by_key
                            .get(*key)?
                            .iter()
                            .filter(|r| r.run == run && r.what == "start")
                            .map(|r| r.at)
                            .reduce(f64::min)
                    });
                    let kept_from = run_started.map_or(attempt.start, |at| at.min(attempt.start));
                    first = Some((text, kept_from, &attempt.body));
                }
                Some((answer, at, _)) if answer != text => {
                    // A crash after the first was kept, and before the second was given.
                    if lost_with_store(mode, &store_restarts, at, attempt.end) {
                        lost.insert(*key);
                    } else {
                        flag(&mut report, INVARIANTS[0], key);
                    }
                }
                Some(_) => {}
            }
        }
        // (3) effects and runs.
        let wrote: Vec<&&Run> = runs_by_key
            .get(key)
            .map(|runs| runs.iter().filter(|r| r.what == "wrote").collect())
            .unwrap_or_default();
        let (writes, effect_run) = history
            .writes
            .get(*key)
            .map_or((0, None), |(writes, run)| (*writes, Some(run.as_str())));
        if mode == Mode::PostgresAtomic {
            // Atomic mode: exactly one committed effect per key that got a 2xx, the one of
            // its answer, and none for a key that never did. No exceptions.
            let answered_run = first.and_then(|(answer, ..)| run_of(answer));
            let final_run = match history.finals.get(*key) {
                Some(Outcome::Answer(200..=299, text)) => run_of(text),
                _ => None,
            };
            let ok = match (answered_run.or(final_run), effect_run) {
                (Some(answered), Some(effect)) => writes == 1 && answered == effect,
                (None, None) => true,
                _ => false,
            };
            if !ok {
                flag(&mut report, INVARIANTS[2], key);
            }
        } else if wrote.len() > 1 || writes > 1 {
            // Every run that started may have written: one cut off (stopped, killed, its
            // database gone) after its write reached the database never says so.
            let started: Vec<&&Run> = runs_by_key
                .get(key)
                .map(|runs| runs.iter().filter(|r| r.what == "start").collect())
                .unwrap_or_default();
            match explained(mode, &started, &history.faults, lease_ms) {
                Some(kind) => *report.twice.entry(kind).or_default() += 1,
                None => flag(&mut report, INVARIANTS[2], key),
            }
        }
        // (4) no hang.
        for attempt in attempts {
            if let Outcome::Error { timed_out: true } = attempt.outcome {
                let excused = history.faults.iter().any(|f| {
                    matches!(f.kind, "stop" | "kill")
                        && f.instance == Some(attempt.instance)
                        && f.start < attempt.end
                        && f.end > attempt.start
                });
                if !excused {
                    flag(&mut report, INVARIANTS[3], key);
                }
            }
        }
        // (5) durability.
        if let Some((answer, at, body)) = first {
            match history.finals.get(*key) {
                Some(Outcome::Answer(_, text)) if text == answer => {}
                Some(Outcome::Answer(200..=299, text)) if !names_its_request(text, key, body) => {
                    flag(&mut report, INVARIANTS[1], key)
                }
                _ if lost_with_store(mode, &store_restarts, at, f64::MAX) => {
                    lost.insert(*key);
                }
                _ => flag(&mut report, INVARIANTS[4], key),
            }
        }
    }
    report.lost_with_store = lost.len();
    if !history.panics.is_empty() {
        flag(&mut report, INVARIANTS[5], "(instance stderr)");
    }
    for instance in &history.unrecovered {
        flag(
            &mut report,
            INVARIANTS[6],
            &format!("(instance {instance})"),
        );
    }
    if !bad.is_empty() {
        let path = out.join(format!("violations-{}-seed{seed}.txt", mode_name(mode)));
        std::fs::write(
            &path,
            histories(&bad, &by_key, &runs_by_key, history, lease_ms),
        )?;
    }
    Ok(report)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Postgres => "postgres",
        Mode::PostgresAtomic => "postgres-atomic",
        Mode::RedisAof => "redis-aof",
        Mode::Redis => "redis",
        Mode::Cluster => "cluster",
    }
}

/// The run named in a `2xx` answer.
fn run_of(text: &str) -> Option<String> {
    let answer = serde_json::from_str::<serde_json::Value>(text).ok()?;
    answer["run"].as_str().map(str::to_owned)
}

/// Whether a `2xx` answer is the answer to this key and body.
fn names_its_request(text: &str, key: &str, body: &str) -> bool {
    let Ok(answer) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    answer["key"] == key && answer["body"] == body
}

/// A Redis without persistence crashed between the two answers: the first was lost with it.
fn lost_with_store(mode: Mode, restarts: &[&FaultWindow], from: f64, to: f64) -> bool {
    !mode.durable() && restarts.iter().any(|r| r.start > from && r.start < to)
}

/// The fault that explains a key's second run: one that hit the instance of an earlier
/// run (stopped, killed, its store connection cut or slowed) or the store itself, between
/// a lease before that run and the later run. `started`: the key's runs that started.
fn explained(
    mode: Mode,
    started: &[&&Run],
    faults: &[FaultWindow],
    lease_ms: f64,
) -> Option<&'static str> {
    let mut sorted: Vec<&Run> = started.iter().map(|r| **r).collect();
    sorted.sort_by(|a, b| a.at.total_cmp(&b.at));
    if sorted.len() < 2 {
        // Two effects from one run: the effects table and the runs disagree.
        return None;
    }
    // The most telling fault when several overlap: the instance's own, then the store's.
    const BY_WEIGHT: [&str; 7] = [
        "stop",
        "kill",
        "blackhole",
        "reset",
        "store-restart",
        "latency",
        "kill-conns",
    ];
    let mut kind = None;
    for pair in sorted.windows(2) {
        let (earlier, later) = (pair[0], pair[1]);
        // A store that keeps nothing on disk forgot every answer when it crashed: that
        // explains a later run whatever else happened.
        let forgotten = faults.iter().find(|f| {
            !mode.durable()
                && f.kind == "store-restart"
                && f.start > earlier.at
                && f.start < later.at
        });
        if let Some(crash) = forgotten {
            kind = Some(crash.kind);
            continue;
        }
        let hit = faults
            .iter()
            .filter(|f| {
                (f.instance.is_none() || f.instance == Some(earlier.instance))
                    && f.start < later.at
                    && f.end > earlier.at - lease_ms
            })
            .min_by_key(|f| BY_WEIGHT.iter().position(|k| *k == f.kind))?;
        kind = Some(hit.kind);
    }
    kind
}

/// The history of each key in violation, for a person to read.
fn histories(
    bad: &BTreeMap<String, Vec<&'static str>>,
    by_key: &BTreeMap<&str, Vec<&Attempt>>,
    runs: &HashMap<&str, Vec<&Run>>,
    history: &History,
    lease_ms: f64,
) -> String {
    let mut out = String::new();
    for (key, invariants) in bad {
        let _ = writeln!(out, "== {key}: {invariants:?}");
        let mut from = f64::MAX;
        let mut to = 0.0f64;
        for attempt in by_key.get(key.as_str()).into_iter().flatten() {
            from = from.min(attempt.start);
            to = to.max(attempt.end);
            let _ = writeln!(
                out,
                "  {:>9.1}..{:>9.1} req {:x} i{} body {} -> {:?}",
                attempt.start,
                attempt.end,
                attempt.request,
                attempt.instance,
                attempt.body,
                attempt.outcome
            );
        }
        for run in runs.get(key.as_str()).into_iter().flatten() {
            let _ = writeln!(out, "  {:>9.1} run {} {}", run.at, run.run, run.what);
        }
        if let Some(outcome) = history.finals.get(key) {
            let _ = writeln!(out, "  final: {outcome:?}");
        }
        for fault in &history.faults {
            if fault.end > from - lease_ms && fault.start < to {
                let _ = writeln!(
                    out,
                    "  {:>9.1}..{:>9.1} fault {} on {:?}",
                    fault.start, fault.end, fault.kind, fault.instance
                );
            }
        }
    }
    for panic in &history.panics {
        let _ = writeln!(out, "panic: {panic}");
    }
    out
}

/// The table of every store's result.
pub fn print_table(reports: &[Report]) {
    println!(
        "| store | requests (attempts) | 2xx / 422 | faults | keys | runs | ran twice, explained | lost w/o persistence | {} |",
        INVARIANTS.join(" | ")
    );
    println!("|{}", "---|".repeat(8 + INVARIANTS.len()));
    for r in reports {
        let faults: Vec<String> = r.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let twice: Vec<String> = r.twice.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let violations: Vec<String> = INVARIANTS
            .iter()
            .map(|i| r.violations.get(i).map_or(0, Vec::len).to_string())
            .collect();
        println!(
            "| {} | {} ({}) | {} / {} | {} ({}) | {} | {} | {} | {} | {} |",
            r.mode,
            r.requests,
            r.attempts,
            r.answered_2xx,
            r.refused_422,
            r.faults.values().sum::<usize>(),
            faults.join(", "),
            r.keys,
            r.runs,
            if twice.is_empty() {
                "0".to_owned()
            } else {
                twice.join(", ")
            },
            r.lost_with_store,
            violations.join(" | ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CI run's history (seed 1, the Redis without persistence): a run began and kept its
    /// answer before the store crashed; callers on its instance that arrived just after
    /// the crash began joined its flight and got that answer; the store forgot it, and the
    /// key ran again. That is an answer lost with the store, not two answers of one key:
    /// the first answer is dated by its run's start, not by the first attempt seen.
    #[test]
    fn an_answer_kept_before_a_crash_and_given_just_after_it_is_lost_with_the_store() {
        let (key, body) = ("redis-1-k830", r#"{"amount":2770}"#);
        let text =
            |run: &str| serde_json::json!({ "body": body, "key": key, "run": run }).to_string();
        let attempt = |request, start, end, run: &str| Attempt {
            request,
            route: "/payments",
            key: key.to_owned(),
            body: body.to_owned(),
            instance: 0,
            start,
            end,
            outcome: Outcome::Answer(201, text(run)),
        };
        let run = |run: &str, at, what: &str| Run {
            key: key.to_owned(),
            run: run.to_owned(),
            instance: 0,
            at,
            what: what.to_owned(),
        };
        let history = crate::History {
            attempts: vec![
                attempt(1, 20050.7, 20052.4, "i0-1"),
                attempt(2, 19983.4, 20053.4, "i0-1"),
                attempt(3, 20570.1, 20762.7, "i0-2"),
            ],
            runs: vec![
                run("i0-1", 19989.9, "start"),
                run("i0-1", 20041.5, "wrote"),
                run("i0-2", 20673.3, "start"),
                run("i0-2", 20756.2, "wrote"),
            ],
            faults: vec![FaultWindow {
                kind: "store-restart",
                instance: None,
                start: 20049.0,
                end: 20571.4,
            }],
            finals: HashMap::from([(key.to_owned(), Outcome::Answer(201, text("i0-2")))]),
            writes: HashMap::from([(key.to_owned(), (2, "i0-2".to_owned()))]),
            panics: Vec::new(),
            unrecovered: Vec::new(),
        };
        let out = std::env::temp_dir();
        let report = check(Mode::Redis, &history, 2000.0, &out, 1).unwrap();
        assert!(
            report.violations.values().all(Vec::is_empty),
            "{:?}",
            report.violations
        );
        assert_eq!(report.lost_with_store, 1);
        // On a store that keeps its answers, the same history is two answers of one key.
        let report = check(Mode::RedisAof, &history, 2000.0, &out, 1).unwrap();
        assert_eq!(report.violations["1 one answer"], [key]);
    }

    /// An instance that answered no fresh request after the healing is a violation of its
    /// own, whatever its keys' answers were.
    #[test]
    fn an_instance_that_never_served_again_is_a_violation() {
        let history = crate::History {
            unrecovered: vec![1],
            ..crate::History::default()
        };
        let out = std::env::temp_dir();
        let report = check(Mode::Cluster, &history, 2000.0, &out, 1).unwrap();
        assert!(report.failed());
        assert_eq!(report.violations["7 recovers"], ["(instance 1)"]);
        let others: usize = report.violations.values().map(Vec::len).sum();
        assert_eq!(others, 1);
    }
}
