//! What a service is handed when it starts.

use std::sync::Arc;

use prometheus::Registry;

use crate::config::Settings;
use crate::ops::Readiness;
use crate::time::SharedTime;

/// Everything a service needs from the process that runs it. Passing these in (rather than
/// reading globals) lets one process run every service (`safeclock run all`, the demo) and lets
/// tests run a service against their own registry, time source and topics.
#[derive(Clone)]
pub struct ServiceDeps {
    /// Validated configuration.
    pub settings: Arc<Settings>,
    /// Where the service registers its metrics (served by the ops endpoint).
    pub registry: Registry,
    /// Where the service declares its readiness.
    pub readiness: Readiness,
    /// The wall clock (real, accelerated, or manual).
    pub time: SharedTime,
}
