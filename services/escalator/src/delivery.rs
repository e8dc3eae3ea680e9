//! Delivering notifications: retries with full-jitter backoff, per-receiver rate limits and
//! circuit breakers, all asynchronous and off the consumer loop.
//!
//! Each receiver has its own worker. A job is delivered by a task of its own, with at most
//! `concurrency` attempts in flight per receiver, so one slow receiver never holds up another
//! and a job waiting out its backoff holds up nobody. Before
//! each attempt the receiver's token bucket (`governor`) must allow it. Attempts run with the
//! receiver's timeout; a retryable failure waits a **full-jitter** backoff (uniform in
//! `[0, min(max_backoff, initial * 2^n)]`, which spreads retries of many jobs after an outage)
//! and tries again until the attempt budget is spent.
//!
//! A **circuit breaker** per receiver opens after `breaker_failures` consecutive failed
//! attempts. While it is open, no request is made. If the receiver has a fallback, jobs fail at
//! once with "circuit breaker open", so the engine hands them to the fallback without waiting out
//! a retry budget against a receiver known to be down. Without a fallback, a refused attempt
//! counts against the job's budget and the job backs off and tries again, so a short outage does
//! not turn pages into dead letters. After `breaker_cooldown` one trial attempt is let through;
//! its success closes the breaker.
//!
//! Every final outcome (and every failed attempt, for the audit log) is reported on a channel to
//! the service loop, which owns the state. A job cut short by shutdown reports nothing: it is
//! still pending in the durable state and is delivered again after the restart.
//!
//! A [`PartitionGate`] stops deliveries of partitions being handed over to another instance: no
//! attempt starts once the partition is closed, and the service loop waits for the attempts
//! already under way, records their outcomes, and only then lets the partition go. The next
//! owner re-drives what is still pending, so a page is never sent by both.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use safeclock_common::time::SharedTime;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::engine::{Job, Outcome};
use crate::metrics::EscalatorMetrics;
use crate::receivers::{Receiver, SendTime};

/// What the delivery layer tells the service loop.
#[derive(Debug)]
pub enum Report {
    /// One attempt failed; another will follow after `retry_in`.
    AttemptFailed {
        job: Box<Job>,
        attempt: u32,
        error: String,
        retry_in: Duration,
    },
    /// The job reached its final outcome.
    Done {
        job: Box<Job>,
        outcome: Outcome,
        latency: Duration,
    },
}

/// The backoff before retry number `retry` (1 for the first retry): uniform in
/// `[0, min(max, initial * 2^(retry-1))]` ("full jitter").
pub fn full_jitter(retry: u32, initial: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let exp = initial
        .checked_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .unwrap_or(max);
    let cap = exp.min(max);
    let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rng.random_range(0..=cap_us))
}

/// A circuit breaker: closed, open until a cooldown passes, then half-open for one trial.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an attempt may be made now.
    pub fn allow(&self, now: Instant) -> bool {
        if self.threshold == 0 {
            return true;
        }
        let mut s = self.lock();
        match s.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if s.trial_in_flight => false,
            Some(_) => {
                s.trial_in_flight = true;
                true
            }
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        self.lock().open_until.is_some_and(|u| now < u)
    }

    pub fn success(&self) {
        let mut s = self.lock();
        *s = BreakerState::default();
    }

    /// Records a failed attempt; returns true when this opened (or re-opened) the breaker.
    pub fn failure(&self, now: Instant) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        let was_trial = std::mem::take(&mut s.trial_in_flight);
        if s.consecutive_failures >= self.threshold || was_trial {
            s.open_until = Some(now + self.cooldown);
            return true;
        }
        false
    }
}

/// Which partitions' notifications may be attempted, and how many attempts are under way per
/// partition. Partitions are open unless closed for a hand-over.
///
/// Each opening starts a new *ownership*: jobs are stamped with the ownership they were
/// submitted in, and a job from an earlier one (queued before the partition was handed over and
/// taken back) is never attempted, since the restored state re-drives it.
#[derive(Debug, Default)]
pub struct PartitionGate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    closed: std::collections::HashSet<i32>,
    ownership: HashMap<i32, u64>,
    in_flight: HashMap<i32, usize>,
}

/// An attempt under way for a partition; counted until dropped.
#[derive(Debug)]
pub struct InFlight {
    gate: Arc<PartitionGate>,
    partition: i32,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        if let Some(n) = s.in_flight.get_mut(&self.partition) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.in_flight.remove(&self.partition);
            }
        }
    }
}

impl PartitionGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets attempts for `partition` start (it was assigned to this instance): a new ownership.
    pub fn open(&self, partition: i32) {
        let mut s = self.lock();
        s.closed.remove(&partition);
        *s.ownership.entry(partition).or_default() += 1;
    }

    /// The current ownership of `partition`, to stamp a job with.
    fn ownership(&self, partition: i32) -> u64 {
        self.lock()
            .ownership
            .get(&partition)
            .copied()
            .unwrap_or_default()
    }

    /// Stops new attempts for `partitions` (they are being handed over).
    pub fn close(&self, partitions: &[i32]) {
        self.lock().closed.extend(partitions.iter().copied());
    }

    /// Attempts under way for any of `partitions`.
    pub fn in_flight(&self, partitions: &[i32]) -> usize {
        let s = self.lock();
        partitions.iter().filter_map(|p| s.in_flight.get(p)).sum()
    }

    /// Whether a job of `ownership` may no longer be attempted.
    fn is_closed(&self, partition: i32, ownership: u64) -> bool {
        let s = self.lock();
        s.closed.contains(&partition)
            || s.ownership.get(&partition).copied().unwrap_or_default() != ownership
    }

    /// Starts an attempt for a job of `partition` stamped with `ownership`, unless the partition
    /// is closed or owned anew since.
    fn enter(self: &Arc<Self>, partition: i32, ownership: u64) -> Option<InFlight> {
        let mut s = self.lock();
        if s.closed.contains(&partition)
            || s.ownership.get(&partition).copied().unwrap_or_default() != ownership
        {
            return None;
        }
        *s.in_flight.entry(partition).or_default() += 1;
        Some(InFlight {
            gate: self.clone(),
            partition,
        })
    }
}

/// One receiver with its limits.
struct Lane {
    receiver: Receiver,
    limiter: DefaultDirectRateLimiter,
    breaker: Breaker,
    slots: Arc<Semaphore>,
}

/// Hands jobs to per-receiver workers.
#[derive(Clone)]
pub struct Dispatcher {
    lanes: HashMap<String, mpsc::UnboundedSender<(Job, u64)>>,
    reports: mpsc::UnboundedSender<Report>,
    gate: Arc<PartitionGate>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("receivers", &self.lanes.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dispatcher {
    /// Starts a worker per receiver; they stop when `shutdown` is cancelled.
    pub fn start(
        receivers: Vec<Receiver>,
        metrics: EscalatorMetrics,
        time: SharedTime,
        reports: mpsc::UnboundedSender<Report>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut lanes = HashMap::new();
        let gate = Arc::new(PartitionGate::default());
        for receiver in receivers {
            let s = &receiver.settings;
            let rate = NonZeroU32::new(s.rate_per_sec).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(s.burst).unwrap_or(NonZeroU32::MIN);
            let lane = Arc::new(Lane {
                limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
                breaker: Breaker::new(
                    s.breaker_failures,
                    Duration::from_millis(s.breaker_cooldown_ms),
                ),
                slots: Arc::new(Semaphore::new(s.concurrency.max(1))),
                receiver,
            });
            let (tx, rx) = mpsc::unbounded_channel();
            lanes.insert(lane.receiver.name().to_string(), tx);
            tokio::spawn(worker(
                lane,
                rx,
                Worker {
                    metrics: metrics.clone(),
                    time: time.clone(),
                    reports: reports.clone(),
                    gate: gate.clone(),
                },
                shutdown.clone(),
            ));
        }
        Self {
            lanes,
            reports,
            gate,
        }
    }

    /// The gate that closes partitions for a hand-over.
    pub fn gate(&self) -> &Arc<PartitionGate> {
        &self.gate
    }

    /// Queues `job` for its receiver.
    pub fn submit(&self, job: Job) {
        match self.lanes.get(&job.pending.receiver) {
            Some(lane) => {
                let ownership = self.gate.ownership(job.partition);
                if let Err(e) = lane.send((job, ownership)) {
                    // The worker stopped (shutdown): the job stays pending in the state.
                    tracing::debug!(receiver = %e.0 .0.pending.receiver, "delivery worker stopped; job left pending");
                }
            }
            None => {
                let error = format!(
                    "receiver {:?} is not configured (any more)",
                    job.pending.receiver
                );
                let _ = self.reports.send(Report::Done {
                    job: Box::new(job),
                    outcome: Outcome::Failed { attempts: 0, error },
                    latency: Duration::ZERO,
                });
            }
        }
    }
}

/// What every delivery task of a worker shares.
#[derive(Clone)]
struct Worker {
    metrics: EscalatorMetrics,
    time: SharedTime,
    reports: mpsc::UnboundedSender<Report>,
    gate: Arc<PartitionGate>,
}

async fn worker(
    lane: Arc<Lane>,
    mut jobs: mpsc::UnboundedReceiver<(Job, u64)>,
    shared: Worker,
    shutdown: CancellationToken,
) {
    loop {
        let (job, ownership) = tokio::select! {
            _ = shutdown.cancelled() => return,
            job = jobs.recv() => match job { Some(j) => j, None => return },
        };
        let (lane, shared, shutdown) = (lane.clone(), shared.clone(), shutdown.clone());
        // One task per job (jobs are bounded by the pending notifications in the state); the
        // receiver's `concurrency` bounds the attempts in flight, not the jobs, so a job waiting
        // out its backoff does not hold up the others.
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                () = deliver(&lane, job, ownership, &shared) => {}
            }
        });
    }
}

async fn deliver(lane: &Lane, job: Job, ownership: u64, shared: &Worker) {
    let Worker {
        metrics,
        time,
        reports,
        gate,
    } = shared;
    let started = Instant::now();
    let s = &lane.receiver.settings;
    let name = s.name.as_str();
    let mut attempts = 0u32;
    // Held from the start of an attempt until its outcome is reported, so a hand-over waits for
    // it; released while backing off.
    let mut in_flight: Option<InFlight> = None;
    let handed_over = || {
        // The partition is being handed over: the job stays pending in the state, and the next
        // owner delivers it.
        tracing::debug!(receiver = name, escalation_id = %job.escalation_id, partition = job.partition, "partition handed over; delivery left to its next owner");
    };
    let outcome = loop {
        if gate.is_closed(job.partition, ownership) {
            return handed_over();
        }
        if !lane.breaker.allow(Instant::now()) {
            metrics
                .attempts
                .with_label_values(&[name, "breaker_open"])
                .inc();
            let error = "circuit breaker open: the receiver failed repeatedly".to_string();
            // With a fallback, hand over at once. Without one, the notification keeps its retry
            // budget: it waits out the backoff (no request is made) and tries again, so a short
            // outage does not turn pages into dead letters.
            attempts += 1;
            if s.fallback.is_some() || attempts >= s.max_attempts {
                break Outcome::Failed { attempts, error };
            }
            let wait = full_jitter(
                attempts,
                Duration::from_millis(s.initial_backoff_ms),
                Duration::from_millis(s.max_backoff_ms),
                &mut rand::rng(),
            );
            let _ = reports.send(Report::AttemptFailed {
                job: Box::new(job.clone()),
                attempt: attempts,
                error,
                retry_in: wait,
            });
            tokio::time::sleep(wait).await;
            continue;
        }
        let Ok(_slot) = lane.slots.acquire().await else {
            return;
        };
        lane.limiter.until_ready().await;
        in_flight = gate.enter(job.partition, ownership);
        if in_flight.is_none() {
            return handed_over();
        }
        attempts += 1;
        let limit = Duration::from_millis(s.timeout_ms) + Duration::from_secs(1);
        let result = match tokio::time::timeout(
            limit,
            lane.receiver.attempt(&job, SendTime::now(time.as_ref())),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(crate::receivers::AttemptError {
                retryable: true,
                message: format!("no answer within {} ms", s.timeout_ms),
            }),
        };
        match result {
            Ok(()) => {
                lane.breaker.success();
                metrics.attempts.with_label_values(&[name, "ok"]).inc();
                metrics.breaker_open.with_label_values(&[name]).set(0);
                break Outcome::Delivered { attempts };
            }
            Err(e) => {
                if lane.breaker.failure(Instant::now()) {
                    metrics.breaker_open.with_label_values(&[name]).set(1);
                    tracing::warn!(receiver = name, "circuit breaker opened");
                }
                let kind = if e.retryable {
                    "retryable"
                } else {
                    "permanent"
                };
                metrics.attempts.with_label_values(&[name, kind]).inc();
                if !e.retryable || attempts >= s.max_attempts {
                    break Outcome::Failed {
                        attempts,
                        error: e.message,
                    };
                }
                let wait = full_jitter(
                    attempts,
                    Duration::from_millis(s.initial_backoff_ms),
                    Duration::from_millis(s.max_backoff_ms),
                    &mut rand::rng(),
                );
                tracing::info!(receiver = name, escalation_id = %job.escalation_id, attempt = attempts, error.message = %e.message, retry_in_ms = wait.as_millis() as u64, "delivery attempt failed; retrying");
                let _ = reports.send(Report::AttemptFailed {
                    job: Box::new(job.clone()),
                    attempt: attempts,
                    error: e.message,
                    retry_in: wait,
                });
                drop(in_flight.take());
                tokio::time::sleep(wait).await;
            }
        }
    };
    let latency = started.elapsed();
    let label = match &outcome {
        Outcome::Delivered { .. } => "delivered",
        Outcome::Failed { .. } => "failed",
    };
    metrics
        .notifications
        .with_label_values(&[name, label])
        .inc();
    metrics
        .delivery_seconds
        .with_label_values(&[name])
        .observe(latency.as_secs_f64());
    if let Outcome::Failed { error, attempts } = &outcome {
        tracing::warn!(receiver = name, escalation_id = %job.escalation_id, attempts, error.message = %error, "delivery failed for good");
    }
    let _ = reports.send(Report::Done {
        job: Box::new(job),
        outcome,
        latency,
    });
    drop(in_flight);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_within_the_capped_exponential() {
        let mut rng = rand::rng();
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for retry in 1..12 {
            let cap = (initial * 2u32.pow(retry - 1)).min(max);
            for _ in 0..200 {
                assert!(full_jitter(retry, initial, max, &mut rng) <= cap);
            }
        }
        // Spread, not a fixed delay: 200 draws are not all alike.
        let draws: std::collections::HashSet<_> = (0..200)
            .map(|_| full_jitter(5, initial, max, &mut rng))
            .collect();
        assert!(draws.len() > 100);
        // Huge retry numbers do not overflow.
        assert!(full_jitter(u32::MAX, initial, max, &mut rng) <= max);
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_lets_one_trial_through() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(b.allow(t0));
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        b.success(); // resets the count
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert!(b.failure(t0), "third consecutive failure opens it");
        assert!(!b.allow(t0 + Duration::from_secs(5)));
        let later = t0 + Duration::from_secs(11);
        assert!(b.allow(later), "one trial after the cooldown");
        assert!(!b.allow(later), "only one");
        assert!(b.failure(later), "a failed trial re-opens it");
        assert!(!b.allow(later + Duration::from_secs(1)));
        let much_later = later + Duration::from_secs(11);
        assert!(b.allow(much_later));
        b.success();
        assert!(b.allow(much_later) && b.allow(much_later), "closed again");
    }
}
