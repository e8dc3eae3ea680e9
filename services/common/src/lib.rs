//! What every safeclock service shares.
//!
//! The services (clock, escalator, exporter, and later intake) are thin loops over Kafka; what
//! they have in common lives here so each behaves the same way: one event contract
//! ([`schema`]), one way to read and validate input ([`event`]), one configuration model
//! ([`config`]), one consumer discipline with dead letters and offsets stored only after effects
//! are durable ([`kafka`]), one ops endpoint ([`ops`]), one shutdown path ([`shutdown`]), and an
//! injectable notion of "now" ([`time`]) so tests and the demo can run on simulated time.

pub mod auth;
pub mod config;
pub mod dedup;
pub mod erasure;
pub mod event;
mod event_strings;
pub mod ids;
pub mod intake_config;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod rules;
pub mod schema;
pub mod secret;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod state_limits;
pub mod telemetry;
pub mod time;
