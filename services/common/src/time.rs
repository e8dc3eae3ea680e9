//! An injectable notion of "now".
//!
//! Deadlines come from event time, but breaches fire on the wall clock so a quiet topic still
//! breaches. Every service asks a [`TimeSource`] for the wall clock instead of calling
//! `Timestamp::now()`, so unit tests drive a [`ManualTime`] and the demo runs on
//! [`AcceleratedTime`] where a 24-hour deadline passes in seconds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use jiff::{SignedDuration, Timestamp};

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
    fn manual_time_moves_only_when_told() {
        let origin: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        let t = ManualTime::new(origin);
        assert_eq!(t.now(), origin);
        t.advance(SignedDuration::from_hours(25));
        assert_eq!(t.now(), "2026-11-30T11:00:00Z".parse().unwrap());
    }
}
