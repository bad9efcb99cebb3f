//! Results of a conformance suite.

use std::fmt;
use std::future::Future;
use std::time::Duration;

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The behaviour held.
    Passed,
    /// The behaviour did not hold; why.
    Failed(String),
    /// Not applicable to this implementation (a capability it declares it lacks), with the
    /// reason. Skips are listed in the report; they are never silent.
    Skipped(String),
}

/// One named check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Name, stating the behaviour (`exec_streams_stdout_and_stderr_separately`).
    pub name: &'static str,
    /// Result.
    pub outcome: Outcome,
}

/// The results of one suite run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteReport {
    /// Suite name and subject (`provider local`).
    pub suite: String,
    /// Every check, in run order.
    pub checks: Vec<CheckResult>,
}

impl SuiteReport {
    pub(crate) fn new(suite: impl Into<String>) -> Self {
        SuiteReport {
            suite: suite.into(),
            checks: Vec::new(),
        }
    }

    /// Runs one check with a time limit, recording its outcome.
    pub(crate) async fn check<F>(&mut self, name: &'static str, limit: Duration, fut: F)
    where
        F: Future<Output = Result<Outcome, String>>,
    {
        let outcome = match tokio::time::timeout(limit, fut).await {
            Ok(Ok(o)) => o,
            Ok(Err(msg)) => Outcome::Failed(msg),
            Err(_) => Outcome::Failed(format!("did not finish within {limit:?}")),
        };
        self.checks.push(CheckResult { name, outcome });
    }

    /// The failed checks.
    pub fn failures(&self) -> Vec<&CheckResult> {
        self.checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .collect()
    }

    /// Number of passed checks.
    pub fn passed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.outcome == Outcome::Passed)
            .count()
    }

    /// Prints the report and panics, listing every failed check, when any failed.
    pub fn assert_passed(&self) {
        println!("{self}");
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{} of {} checks of suite `{}` failed:\n{}",
            failures.len(),
            self.checks.len(),
            self.suite,
            failures
                .iter()
                .map(|c| format!("  {}: {:?}", c.name, c.outcome))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "suite {}:", self.suite)?;
        for c in &self.checks {
            match &c.outcome {
                Outcome::Passed => writeln!(f, "  ok      {}", c.name)?,
                Outcome::Failed(m) => writeln!(f, "  FAILED  {}: {m}", c.name)?,
                Outcome::Skipped(m) => writeln!(f, "  skipped {}: {m}", c.name)?,
            }
        }
        let skipped = self
            .checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Skipped(_)))
            .count();
        write!(
            f,
            "  {} passed, {} failed, {} skipped",
            self.passed(),
            self.failures().len(),
            skipped
        )
    }
}

/// `Err(message)` unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}
pub(crate) use ensure;

/// Converts any `Display` error into the check's failure message, with context.
pub(crate) trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}
