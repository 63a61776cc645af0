//! The outcome of the last rotation run (`rotation-status.json` beside the state), so that
//! `cactl status` can show a scheduled run that failed or is held, and since when.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::Loaded;

const FILE: &str = "rotation-status.json";

/// The last rotation run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastRun {
    /// When it finished.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub at: Option<OffsetDateTime>,
    /// Whether it completed.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What holds the root rotation.
    #[serde(default)]
    pub held: Vec<String>,
    /// Failures in a row.
    #[serde(default)]
    pub failures: u32,
    /// Who ran it (`cactl rotate`, `cactl serve`).
    #[serde(default)]
    pub by: String,
    /// When the next scheduled attempt is due (serve).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub next_attempt: Option<OffsetDateTime>,
}

impl LastRun {
    /// Loads the record (empty when absent or unreadable).
    pub fn load(loaded: &Loaded) -> Self {
        std::fs::read(loaded.state_dir().join(FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Saves atomically (0600).
    pub fn save(&self, loaded: &Loaded) -> std::io::Result<()> {
        let dir = loaded.state_dir();
        crate::fsutil::ensure_dir(&dir, 0o700)?;
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        crate::fsutil::write_atomic(&dir.join(FILE), &bytes, 0o600)
    }

    /// The record after a run: `result` is `Ok(held)` or `Err(message)`.
    pub fn after(
        previous: &Self,
        by: &str,
        at: OffsetDateTime,
        result: Result<Vec<String>, String>,
        next_attempt: Option<OffsetDateTime>,
    ) -> Self {
        match result {
            Ok(held) => Self {
                at: Some(at),
                ok: true,
                error: None,
                held,
                failures: 0,
                by: by.to_owned(),
                next_attempt,
            },
            Err(e) => Self {
                at: Some(at),
                ok: false,
                error: Some(e),
                held: previous.held.clone(),
                failures: previous.failures + 1,
                by: by.to_owned(),
                next_attempt,
            },
        }
    }
}

/// The wait before the next attempt after `failures` failures in a row: 30 s doubling, never
/// longer than the regular `interval`.
pub fn backoff(failures: u32, interval: std::time::Duration) -> std::time::Duration {
    if failures == 0 {
        return interval;
    }
    let secs = 30u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    std::time::Duration::from_secs(secs).min(interval)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_interval() {
        let i = Duration::from_secs(600);
        assert_eq!(backoff(0, i), i);
        assert_eq!(backoff(1, i), Duration::from_secs(30));
        assert_eq!(backoff(2, i), Duration::from_secs(60));
        assert_eq!(backoff(4, i), Duration::from_secs(240));
        assert_eq!(backoff(5, i), Duration::from_secs(480));
        assert_eq!(backoff(6, i), i);
        assert_eq!(backoff(60, i), i);
    }

    #[test]
    fn failures_count_up_and_reset() {
        let t = OffsetDateTime::UNIX_EPOCH;
        let a = LastRun::after(
            &LastRun::default(),
            "serve",
            t,
            Err("vault down".into()),
            None,
        );
        let b = LastRun::after(&a, "serve", t, Err("vault down".into()), None);
        assert_eq!((b.failures, b.ok), (2, false));
        let c = LastRun::after(&b, "serve", t, Ok(vec!["held".into()]), None);
        assert_eq!((c.failures, c.ok, c.held.len()), (0, true, 1));
    }
}
