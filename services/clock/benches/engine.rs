//! Engine benchmarks, without Kafka, on one core: `cargo bench -p safeclock-clock --bench engine`.
//!
//! 1. memory: heap bytes per open clock with 1,000,000 open clocks (counted by a global allocator
//!    wrapper, so the figure is exact for the engine's own allocations), and the growth of the
//!    resident set (allocator overhead included);
//! 2. restore: time to rebuild the engine from changelog records (decode + import) for 1,000,000
//!    open clocks;
//! 3. throughput: events/s through the engine core (`apply_event` + `fire_due`: every decision,
//!    as compact transitions) for a realistic mix of referral events under the default rule
//!    pack, then the same stream through `on_event`/`on_tick`, which also builds every SLA event
//!    record the service publishes.
//!
//! Sizes can be reduced for a quick run: `SAFECLOCK_BENCH_CLOCKS=100000`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The counting allocator below is the only unsafe code in the workspace: it wraps the system
// allocator to measure the engine's heap exactly.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use jiff::{SignedDuration, Timestamp};
use safeclock_clock::engine::Engine;
use safeclock_common::policy::{CalendarBook, Policy};
use safeclock_common::rules::RuleSet;
use safeclock_common::schema::from_jiff;
use safeclock_common::schema::v1::{
    referral_event::Kind, AgeBand, Allocated, Category, DeviceExamined, DeviceSeized,
    ReferralClosed, ReferralDecisionMade, ReferralEvent, ReferralReceived, ReferralState,
    RiskAssessed, RiskGrade, VictimContacted,
};

struct Counting;
static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method delegates to the system allocator with the caller's arguments unchanged;
// the counter is only arithmetic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn event(referral: &str, n: u32, at: Timestamp, kind: Kind) -> ReferralEvent {
    ReferralEvent {
        event_id: format!("{referral}-e{n}"),
        referral_id: referral.to_string(),
        force_id: "nottinghamshire".into(),
        occurred_at: Some(from_jiff(at)),
        recorded_at: Some(from_jiff(at)),
        source_system: "bench".into(),
        kind: Some(kind),
    }
}

fn received(referral: &str, at: Timestamp, i: usize) -> ReferralEvent {
    let categories = [
        Category::Grooming,
        Category::Neglect,
        Category::PhysicalAbuse,
        Category::OnlineAbuse,
        Category::ChildSexualAbuse,
    ];
    event(
        referral,
        1,
        at,
        Kind::ReferralReceived(ReferralReceived {
            category: categories[i % categories.len()] as i32,
            risk: [RiskGrade::Low, RiskGrade::Medium, RiskGrade::High][i % 3] as i32,
            child_age_band: AgeBand::Aged13To15 as i32,
            area: "city".into(),
            team: "mash".into(),
            referrer: "school".into(),
        }),
    )
}

/// A realistic stream: each referral is received, decided, allocated, its victim contacted,
/// sometimes re-graded, sometimes a device seized and examined, and finally closed.
fn stream(referrals: usize, start: Timestamp) -> Vec<ReferralEvent> {
    let mut out = Vec::with_capacity(referrals * 7);
    for i in 0..referrals {
        let r = format!("R-B-{i:08}");
        let t = start + SignedDuration::from_secs(i as i64 * 30);
        out.push(received(&r, t, i));
        out.push(event(
            &r,
            2,
            t + SignedDuration::from_hours(3),
            Kind::ReferralDecisionMade(ReferralDecisionMade {
                decision: "section-47".into(),
                referrer_acknowledged: true,
            }),
        ));
        out.push(event(
            &r,
            3,
            t + SignedDuration::from_hours(4),
            Kind::Allocated(Allocated {
                team: "pvp".into(),
                specialist_trained: true,
            }),
        ));
        out.push(event(
            &r,
            4,
            t + SignedDuration::from_hours(6),
            Kind::VictimContacted(VictimContacted {}),
        ));
        if i % 4 == 0 {
            out.push(event(
                &r,
                5,
                t + SignedDuration::from_hours(7),
                Kind::RiskAssessed(RiskAssessed {
                    risk: RiskGrade::High as i32,
                }),
            ));
        }
        if i % 5 == 0 {
            out.push(event(
                &r,
                6,
                t + SignedDuration::from_hours(8),
                Kind::DeviceSeized(DeviceSeized {
                    device_ref: "DEV-1".into(),
                }),
            ));
            out.push(event(
                &r,
                7,
                t + SignedDuration::from_hours(200),
                Kind::DeviceExamined(DeviceExamined {
                    device_ref: "DEV-1".into(),
                }),
            ));
        }
        out.push(event(
            &r,
            8,
            t + SignedDuration::from_hours(300),
            Kind::ReferralClosed(ReferralClosed {
                outcome: "charged".into(),
            }),
        ));
    }
    // Arrival order: by event time, so clocks overlap as in a live stream.
    out.sort_by_key(|e| (e.occurred_at.unwrap().seconds, e.event_id.clone()));
    out
}

/// The process's resident set, from /proc (0 where there is none).
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn policy() -> Policy {
    Policy {
        rules: RuleSet::default_pack().unwrap(),
        calendars: CalendarBook::builtin(),
        limits: safeclock_common::config::ClockLimits::default(),
    }
}

fn main() {
    let clocks_target: usize = std::env::var("SAFECLOCK_BENCH_CLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let policy = policy();
    let start: Timestamp = "2026-01-05T09:00:00Z".parse().unwrap();

    // 1. Memory per open clock (first, so the resident set is not yet warm): only referral_received, nothing stops.
    let before = ALLOCATED.load(Ordering::Relaxed);
    let rss_before = resident_bytes();
    let mut engine = Engine::new(policy.rules.clone(), policy.calendars.clone());
    let mut i = 0usize;
    while engine.stats().open_clocks < clocks_target {
        for _ in 0..10_000 {
            let r = format!("R-M-{i:08}");
            let at = start + SignedDuration::from_secs(i as i64);
            let e = received(&r, at, i);
            engine.on_event(&e, at).unwrap();
            i += 1;
        }
        engine.take_dirty();
    }
    let stats = engine.stats();
    let bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    let rss = resident_bytes().saturating_sub(rss_before);
    println!(
        "memory: {} open clocks ({} referrals, {} timers) hold {:.1} MiB of heap = {:.0} bytes per open clock (resident set grew {:.0} bytes per open clock, allocator overhead included)",
        stats.open_clocks,
        stats.referrals,
        stats.pending_timers,
        bytes as f64 / 1048576.0,
        bytes as f64 / stats.open_clocks as f64,
        rss as f64 / stats.open_clocks as f64
    );

    // The periodic scans the service's loop runs over every clock (gauges each second, census
    // every few seconds): a breach due meanwhile waits for them.
    let t = Instant::now();
    let scans = 5;
    for _ in 0..scans {
        std::hint::black_box(engine.stats());
    }
    let stats_ms = t.elapsed().as_secs_f64() * 1000.0 / scans as f64;
    let t = Instant::now();
    for _ in 0..scans {
        std::hint::black_box(engine.census());
    }
    let census_ms = t.elapsed().as_secs_f64() * 1000.0 / scans as f64;
    println!(
        "scans over {} open clocks: gauges (stats) {stats_ms:.1} ms, census {census_ms:.1} ms",
        stats.open_clocks
    );

    // 2. Restore: the changelog records of those referrals, decoded and imported.
    let ids: Vec<String> = (0..i).map(|k| format!("R-M-{k:08}")).collect();
    let records: Vec<Vec<u8>> = ids
        .iter()
        .filter_map(|id| engine.export(id))
        .map(|s| prost::Message::encode_to_vec(&s))
        .collect();
    drop(engine);
    let t = Instant::now();
    let mut restored = Engine::new(policy.rules.clone(), policy.calendars.clone());
    for bytes in &records {
        let state: ReferralState = prost::Message::decode(bytes.as_slice()).unwrap();
        restored.import(state);
    }
    let secs = t.elapsed().as_secs_f64();
    let stats = restored.stats();
    println!(
        "restore: {} changelog records ({} open clocks) decoded and imported in {:.2} s ({:.0} clocks/s)",
        records.len(),
        stats.open_clocks,
        secs,
        stats.open_clocks as f64 / secs
    );
    // 3. Throughput: the core (decisions as compact transitions), then the same stream with
    //    every transition materialized as the SlaEvent the service publishes.
    let referrals = (clocks_target / 5).max(1000);
    let events = stream(referrals, start);
    let times: Vec<Timestamp> = events
        .iter()
        .map(|e| safeclock_common::schema::to_jiff(e.occurred_at.as_ref().unwrap()).unwrap())
        .collect();
    let mut engine = Engine::new(policy.rules.clone(), policy.calendars.clone());
    let mut transitions = Vec::new();
    let mut emitted = 0usize;
    let t = Instant::now();
    for (i, (e, &now)) in events.iter().zip(&times).enumerate() {
        if i % 64 == 0 {
            engine.fire_due(now, &mut transitions);
        }
        engine.apply_event(e, now, &mut transitions).unwrap();
        emitted += transitions.len();
        transitions.clear();
        if i % 1024 == 0 {
            engine.take_dirty();
        }
    }
    let core_secs = t.elapsed().as_secs_f64();
    drop(engine);
    let mut engine = Engine::new(policy.rules.clone(), policy.calendars.clone());
    let mut records = 0usize;
    let t = Instant::now();
    for (i, (e, &now)) in events.iter().zip(&times).enumerate() {
        if i % 64 == 0 {
            records += engine.on_tick(now).len();
        }
        records += engine.on_event(e, now).unwrap().len();
        if i % 1024 == 0 {
            engine.take_dirty();
        }
    }
    let full_secs = t.elapsed().as_secs_f64();
    // For profiling the core: SAFECLOCK_BENCH_ONLY=core runs it five more times.
    let only_core = std::env::var("SAFECLOCK_BENCH_ONLY").is_ok_and(|v| v == "core");
    assert_eq!(
        emitted, records,
        "the core and the full path decide the same"
    );
    println!(
        "throughput (core): {} events ({} referrals, default pack of {} rules) in {:.3} s = {:.0} events/s on one core; {} transitions",
        events.len(),
        referrals,
        policy.rules.rules.len(),
        core_secs,
        events.len() as f64 / core_secs,
        emitted
    );
    println!(
        "throughput (core + SlaEvent records): {:.3} s = {:.0} events/s on one core; {} SLA events",
        full_secs,
        events.len() as f64 / full_secs,
        records
    );
    drop(engine);
    if only_core {
        for _ in 0..5 {
            let mut engine = Engine::new(policy.rules.clone(), policy.calendars.clone());
            for (e, &now) in events.iter().zip(&times) {
                engine.fire_due(now, &mut transitions);
                engine.apply_event(e, now, &mut transitions).unwrap();
                transitions.clear();
            }
        }
    }
}
