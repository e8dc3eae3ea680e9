//! An injectable notion of "now".
//!
//! Deadlines come from event time, but breaches fire on the wall clock so a quiet topic still
//! breaches. Every service asks a [`TimeSource`] for the wall clock instead of calling
//! `Timestamp::now()`, so unit tests drive a [`ManualTime`] and the demo runs on
//! [`AcceleratedTime`] where a 24-hour deadline passes in seconds.
//!
//! [`OffsetTime`] is the real clock shifted by a fixed amount (`[time] offset_secs`). Every
//! process given the same offset agrees on "now", so a drill, or a test of real processes, can
//! run the whole system as if it were a Friday evening or the eve of a bank holiday without
//! waiting for one. Production leaves the offset at 0.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// Where a service reads the current time from.
pub trait TimeSource: Send + Sync + std::fmt::Debug {
    /// The current (possibly simulated) wall-clock time.
    fn now(&self) -> Timestamp;

    /// How many simulated seconds pass per real second (1 for the real clock).
    fn speed(&self) -> f64 {
        1.0
    }
}

/// A shared time source.
pub type SharedTime = Arc<dyn TimeSource>;

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemTime;

impl TimeSource for SystemTime {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The real wall clock shifted by a fixed offset: time passes at the real rate, from another
/// instant.
#[derive(Debug, Clone, Copy)]
pub struct OffsetTime {
    offset: SignedDuration,
}

impl OffsetTime {
    /// The real clock shifted by `offset`.
    pub fn new(offset: SignedDuration) -> Self {
        Self { offset }
    }

    /// The real clock shifted by a whole number of seconds so that it reads `now` (to the
    /// second) at this moment.
    pub fn reading(now: Timestamp) -> Self {
        Self::new(SignedDuration::from_secs(
            now.as_second() - Timestamp::now().as_second(),
        ))
    }

    /// The offset from the real clock.
    pub fn offset(&self) -> SignedDuration {
        self.offset
    }

    /// The clock the test suites run on: the real clock, or, when `SAFECLOCK_TEST_NOW` holds an
    /// RFC 3339 instant, the real clock shifted to read that instant when first asked (the same
    /// offset for every later call in the process). `scripts/time-matrix.sh` runs the
    /// time-sensitive suites this way at chosen weekdays and hours, so no test depends on when
    /// it happens to run.
    ///
    /// # Panics
    /// When `SAFECLOCK_TEST_NOW` is set but is not an RFC 3339 instant (a test setup error).
    pub fn for_tests() -> Self {
        static OFFSET: std::sync::OnceLock<SignedDuration> = std::sync::OnceLock::new();
        let offset = *OFFSET.get_or_init(|| match std::env::var("SAFECLOCK_TEST_NOW") {
            Ok(v) if !v.trim().is_empty() => {
                let at: Timestamp = v.trim().parse().unwrap_or_else(|e| {
                    panic!("SAFECLOCK_TEST_NOW={v:?} is not an RFC 3339 instant: {e}")
                });
                Self::reading(at).offset
            }
            _ => SignedDuration::ZERO,
        });
        Self::new(offset)
    }
}

impl TimeSource for OffsetTime {
    fn now(&self) -> Timestamp {
        let real = Timestamp::now();
        real.saturating_add(self.offset).unwrap_or(real)
    }
}

/// `[time]`: where a process reads the wall clock from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSettings {
    /// Seconds added to the real clock (negative: earlier). 0 in production. For drills and for
    /// tests that run the system at a chosen weekday and hour; every process of one system must
    /// be given the same value.
    pub offset_secs: i64,
}

/// The largest offset accepted: a drill years away from today is a mistake.
const MAX_OFFSET_SECS: i64 = 10 * 366 * 86_400;

impl TimeSettings {
    /// The time source these settings describe: the system clock, or the shifted clock.
    pub fn source(&self) -> SharedTime {
        if self.offset_secs == 0 {
            Arc::new(SystemTime)
        } else {
            Arc::new(OffsetTime::new(SignedDuration::from_secs(self.offset_secs)))
        }
    }

    /// # Errors
    /// When the offset is more than ten years either way.
    pub fn validate(&self) -> Result<(), String> {
        if self.offset_secs.unsigned_abs() > MAX_OFFSET_SECS.unsigned_abs() {
            return Err(format!(
                "must be within ten years ({MAX_OFFSET_SECS} seconds) either way"
            ));
        }
        Ok(())
    }
}

/// Simulated time that starts at a chosen instant and runs `speed` times faster than real time.
#[derive(Debug, Clone)]
pub struct AcceleratedTime {
    origin_real: Instant,
    origin_sim: Timestamp,
    speed: f64,
}

impl AcceleratedTime {
    /// Starts simulated time at `origin` running `speed` times faster than real time.
    pub fn new(origin: Timestamp, speed: f64) -> Self {
        Self {
            origin_real: Instant::now(),
            origin_sim: origin,
            speed,
        }
    }
}

impl TimeSource for AcceleratedTime {
    fn now(&self) -> Timestamp {
        let real = self.origin_real.elapsed().as_secs_f64();
        let sim = SignedDuration::from_secs_f64(real * self.speed);
        self.origin_sim
            .saturating_add(sim)
            .unwrap_or(self.origin_sim)
    }

    fn speed(&self) -> f64 {
        self.speed
    }
}

/// Time that moves only when a test moves it.
#[derive(Debug, Clone)]
pub struct ManualTime {
    now: Arc<Mutex<Timestamp>>,
}

impl ManualTime {
    /// A manual clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: SignedDuration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now = now.saturating_add(by).unwrap_or(*now);
    }

    /// Sets time to `to`.
    pub fn set(&self, to: Timestamp) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }
}

impl TimeSource for ManualTime {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerated_time_runs_faster() {
        let origin: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        let t = AcceleratedTime::new(origin, 3600.0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // 20 ms real at 3600x is at least 72 s simulated.
        assert!(t.now().duration_since(origin) >= SignedDuration::from_secs(72));
    }

    #[test]
    fn offset_time_reads_the_chosen_instant_and_runs_at_the_real_rate() {
        let friday_evening: Timestamp = "2026-12-04T18:30:00Z".parse().unwrap();
        let t = OffsetTime::reading(friday_evening);
        let first = t.now();
        assert!(first.duration_since(friday_evening).abs() < SignedDuration::from_secs(2));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let passed = t.now().duration_since(first);
        assert!(passed >= SignedDuration::from_millis(20) && passed < SignedDuration::from_secs(5));
    }

    #[test]
    fn time_settings_choose_the_source_and_refuse_absurd_offsets() {
        assert_eq!(TimeSettings::default().source().speed(), 1.0);
        let shifted = TimeSettings {
            offset_secs: -86_400,
        }
        .source();
        let behind = Timestamp::now().duration_since(shifted.now());
        assert!(behind >= SignedDuration::from_secs(86_399));
        assert!(TimeSettings {
            offset_secs: 400 * 86_400
        }
        .validate()
        .is_ok());
        assert!(TimeSettings {
            offset_secs: 11 * 366 * 86_400
        }
        .validate()
        .is_err());
    }

    #[test]
    fn manual_time_moves_only_when_told() {
        let origin: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        let t = ManualTime::new(origin);
        assert_eq!(t.now(), origin);
        t.advance(SignedDuration::from_hours(25));
        assert_eq!(t.now(), "2026-11-30T11:00:00Z".parse().unwrap());
    }
}
