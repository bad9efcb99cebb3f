//! The one retry policy: attempts, deadline, jittered exponential backoff.
//!
//! Retries [`Error::is_retryable`] failures (408/429/5xx, connection errors, busy stores);
//! timeouts only for idempotent operations; honours the server's `Retry-After`. Creates are made
//! idempotent with deterministic names, not by blind retry.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// Whether an operation may safely run twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Running it twice has the same effect as once (GET, PUT of a whole file, DELETE).
    Idempotent,
    /// Running it twice may do the work twice (exec, a POST without a deterministic key).
    NonIdempotent,
}

/// Retry settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, including the first (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of one backoff (and of an honoured `Retry-After`).
    pub max_backoff: Duration,
    /// No new attempt starts after this much time since the first.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        }
    }

    /// Whether `err` on attempt `attempt` (1-based) should be retried.
    pub fn should_retry(&self, err: &Error, attempt: u32, idempotency: Idempotency) -> bool {
        if attempt >= self.max_attempts || !err.is_retryable() {
            return false;
        }
        !matches!(err, Error::Timeout { .. }) || idempotency == Idempotency::Idempotent
    }

    /// The wait before attempt `attempt + 1`: the server's `Retry-After` when given (capped
    /// by `max_backoff`), else full-jitter exponential backoff.
    pub fn backoff(&self, err: &Error, attempt: u32) -> Duration {
        if let Some(d) = err.retry_after() {
            return d.min(self.max_backoff);
        }
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(self.max_backoff);
        // Full jitter between half and the whole exponential step.
        let half = exp / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }

    /// Runs `op` until it succeeds, fails permanently, or attempts/deadline run out. Returns
    /// the last error.
    pub async fn run<T, F, Fut>(&self, idempotency: Idempotency, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.run_if(idempotency, |_| true, op).await
    }

    /// [`RetryPolicy::run`], retrying only errors that `allowed` also accepts (e.g. only 429
    /// for a request whose 5xx may already have done the work).
    pub async fn run_if<T, F, Fut>(
        &self,
        idempotency: Idempotency,
        allowed: impl Fn(&Error) -> bool,
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if !allowed(&e) || !self.should_retry(&e, attempt, idempotency) {
                        return Err(e);
                    }
                    let wait = self.backoff(&e, attempt);
                    if start.elapsed() + wait > self.deadline {
                        return Err(e);
                    }
                    tracing::debug!(attempt, ?wait, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> Error {
        Error::Transient {
            provider: "p".into(),
            message: "503".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_until_success() {
        let calls = AtomicU32::new(0);
        let v = RetryPolicy::default()
            .run(Idempotency::NonIdempotent, || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(transient())
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!(v, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_and_exhaustion_stop() {
        let calls = AtomicU32::new(0);
        let e = RetryPolicy::default()
            .run(Idempotency::Idempotent, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::invalid("x", "bad"))
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), "x");
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = AtomicU32::new(0);
        RetryPolicy::default()
            .run(Idempotency::Idempotent, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(transient())
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn run_if_retries_only_what_the_caller_allows() {
        let calls = AtomicU32::new(0);
        let only_429 = |e: &Error| matches!(e, Error::RateLimited { .. });
        let e = RetryPolicy::default()
            .run_if(Idempotency::NonIdempotent, only_429, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(transient())
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), "transient");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a 5xx was retried");
        let calls = AtomicU32::new(0);
        RetryPolicy::default()
            .run_if(Idempotency::NonIdempotent, only_429, || async {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(Error::RateLimited {
                        provider: "p".into(),
                        retry_after: None,
                        message: "slow".into(),
                    })
                } else {
                    Ok(())
                }
            })
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_retry_only_when_idempotent() {
        let timeout = || Error::Timeout {
            operation: "get".into(),
            elapsed: Duration::from_secs(1),
        };
        let p = RetryPolicy::default();
        assert!(p.should_retry(&timeout(), 1, Idempotency::Idempotent));
        assert!(!p.should_retry(&timeout(), 1, Idempotency::NonIdempotent));
    }

    #[test]
    fn http_408_429_and_5xx_are_retried_even_when_not_idempotent() {
        let p = RetryPolicy::default();
        for status in [408, 429, 500, 502, 503, 504] {
            let e = Error::from_http_status("p", status, "x", None);
            assert!(
                p.should_retry(&e, 1, Idempotency::NonIdempotent),
                "{status}: {e:?}"
            );
        }
        for status in [400, 401, 403, 404, 409, 413, 422] {
            let e = Error::from_http_status("p", status, "x", None);
            assert!(
                !p.should_retry(&e, 1, Idempotency::Idempotent),
                "{status}: {e:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_after_the_deadline() {
        let p = RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_millis(400),
            max_backoff: Duration::from_secs(60),
            deadline: Duration::from_secs(2),
        };
        let start = Instant::now();
        let calls = AtomicU32::new(0);
        p.run(Idempotency::Idempotent, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(transient())
        })
        .await
        .unwrap_err();
        // Waits of 200-400, 400-800, 800-1600 ms, ...: three or four attempts fit in 2 s.
        let n = calls.load(Ordering::SeqCst);
        assert!((3..=4).contains(&n), "{n} attempts");
        assert!(start.elapsed() <= p.deadline, "{:?}", start.elapsed());
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
        };
        let e = transient();
        for (attempt, step) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            let step = Duration::from_millis(step);
            let waits: Vec<_> = (0..200).map(|_| p.backoff(&e, attempt)).collect();
            assert!(
                waits.iter().all(|w| *w >= step / 2 && *w <= step),
                "attempt {attempt}: {waits:?}"
            );
            assert!(
                waits.iter().any(|w| *w != waits[0]),
                "attempt {attempt}: no jitter"
            );
        }
        let slow = Error::RateLimited {
            provider: "p".into(),
            retry_after: Some(Duration::from_secs(120)),
            message: "slow".into(),
        };
        assert_eq!(p.backoff(&slow, 1), p.max_backoff);
    }

    #[tokio::test(start_paused = true)]
    async fn honours_retry_after() {
        let p = RetryPolicy::default();
        let e = Error::RateLimited {
            provider: "p".into(),
            retry_after: Some(Duration::from_secs(3)),
            message: "slow".into(),
        };
        assert_eq!(p.backoff(&e, 1), Duration::from_secs(3));
        let start = Instant::now();
        let calls = AtomicU32::new(0);
        p.run(Idempotency::NonIdempotent, || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(Error::RateLimited {
                    provider: "p".into(),
                    retry_after: Some(Duration::from_secs(3)),
                    message: "slow".into(),
                })
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
        assert!(start.elapsed() >= Duration::from_secs(3));
    }
}
