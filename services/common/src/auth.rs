//! Bearer-token authentication with a limit on failed attempts per peer, shared by the two
//! listeners that take tokens: intake (`[intake.tokens]`) and the acknowledgement API
//! (`escalator.api.tokens`).
//!
//! **Tokens** are [`Secret`]s, compared in constant time against every configured token, so
//! neither the comparison nor which token matched leaks through timing (only a token's length
//! can). The caller gets the name of the client or operator, never the token.
//!
//! **Failed attempts are rate-limited per peer** with `governor`'s keyed GCRA limiter: a peer
//! may fail `burst` times at once, then `per_minute` more times a minute. A failure past that is
//! answered 429 with `Retry-After`, and **every request from that peer is refused until then,
//! before its token is checked**. Without that last part a peer over its budget could still try
//! a token per request and learn from the answer (429 or 202) whether it was right. A legitimate
//! client behind the same address waits out `Retry-After` too; that is the price of the limit,
//! and it is what the metric of failures by reason is for.
//!
//! The peer is the TCP peer address: an IPv4 address, or the /64 prefix of an IPv6 one (a host
//! usually holds a whole /64 and could otherwise rotate through it). Behind a reverse proxy every
//! request has the proxy's address, so the limit applies to all clients together; forwarded
//! headers are not trusted (anyone can write them).
//!
//! Memory is bounded: the limiter forgets peers whose budget is full again (`retain_recent`,
//! every [`HOUSEKEEPING_EVERY`] failures), and at most [`MAX_BLOCKED`] peers are remembered as
//! refused at once.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// In a token's list of forces: every force.
pub const ALL_FORCES: &str = "*";

/// Whether a token granted `granted` forces may act for `force`.
pub fn force_permitted(granted: &[String], force: &str) -> bool {
    granted.iter().any(|f| f == ALL_FORCES || f == force)
}

/// A token's list of forces is not empty and names only configured forces (or `*`).
///
/// # Errors
/// [`crate::config::ConfigError::Invalid`] for `field`.
pub fn validate_forces(
    field: &str,
    granted: &[String],
    known: &[String],
) -> Result<(), crate::config::ConfigError> {
    let invalid = |message: String| crate::config::ConfigError::Invalid {
        field: field.to_string(),
        message,
    };
    if granted.is_empty() {
        return Err(invalid(
            "is empty: name the forces this token may act for (or \"*\" for every force)".into(),
        ));
    }
    if let Some(i) = granted
        .iter()
        .position(|f| f != ALL_FORCES && !known.contains(f))
    {
        return Err(invalid(format!(
            "entry number {} is not a force listed in `forces`",
            i + 1
        )));
    }
    Ok(())
}

/// Every token (`{tokens}.<name>`) has a grant (`{grants}.<name>`) and every grant a token;
/// `example` shows the grant a missing one should look like.
///
/// # Errors
/// [`crate::config::ConfigError::Invalid`] naming the first unpaired name.
pub fn check_paired<G>(
    tokens: &std::collections::BTreeMap<String, Secret>,
    grants: &std::collections::BTreeMap<String, G>,
    tokens_key: &str,
    grants_key: &str,
    example: &str,
) -> Result<(), crate::config::ConfigError> {
    let invalid =
        |field: String, message: String| crate::config::ConfigError::Invalid { field, message };
    if let Some(name) = tokens.keys().find(|n| !grants.contains_key(*n)) {
        return Err(invalid(
            format!("{grants_key}.{name}"),
            format!("is missing: every token needs a grant, e.g. {example}"),
        ));
    }
    if let Some(name) = grants.keys().find(|n| !tokens.contains_key(*n)) {
        return Err(invalid(
            format!("{grants_key}.{name}"),
            format!("has no token: set {tokens_key}.{name} (or remove the grant)"),
        ));
    }
    Ok(())
}

/// Failures between two clean-ups of the limiter's memory of peers.
pub const HOUSEKEEPING_EVERY: u64 = 1024;
/// Most peers remembered as refused at once.
pub const MAX_BLOCKED: usize = 100_000;

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer <token>` header: 401.
    Missing,
    /// A token that is not configured: 401.
    Invalid,
    /// The peer failed too often; nothing was checked: 429 with `Retry-After`.
    RateLimited { retry_after: Duration },
}

impl AuthFailure {
    /// The `reason` label of the auth-failure metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
            AuthFailure::RateLimited { .. } => "rate_limited",
        }
    }

    /// Every reason, to pre-create the metric's series.
    pub const REASONS: [&'static str; 3] = ["missing", "invalid", "rate_limited"];

    /// Whole seconds for `Retry-After` (at least 1), when rate-limited.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            AuthFailure::RateLimited { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(secs.max(1))
            }
            _ => None,
        }
    }
}

/// The configured tokens and the failure limiter.
pub struct BearerAuth {
    clients: Vec<(String, Secret)>,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Peers refused until the given instant (they exhausted their failure budget).
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    failures_seen: AtomicU64,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

impl BearerAuth {
    /// `tokens`: name -> token. A peer may fail `burst` times at once and `per_minute` times a
    /// minute after that (both at least 1; validated with the configuration).
    pub fn new<'a>(
        tokens: impl IntoIterator<Item = (&'a String, &'a Secret)>,
        burst: u32,
        per_minute: u32,
    ) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            clients: tokens
                .into_iter()
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            failures: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            blocked: Mutex::new(HashMap::new()),
            failures_seen: AtomicU64::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// The name of the client whose token is in `authorization` (`Bearer <token>`), unless the
    /// peer is refused for failing too often.
    ///
    /// # Errors
    /// [`AuthFailure`] saying why; a failure counts against `peer`'s budget.
    pub fn check(
        &self,
        peer: Option<SocketAddr>,
        authorization: Option<&[u8]>,
    ) -> Result<&str, AuthFailure> {
        let key = peer.map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |p| {
            peer_key(p.ip())
        });
        let now = Instant::now();
        if let Some(until) = self.lock_blocked().get(&key).copied() {
            if until > now {
                return Err(AuthFailure::RateLimited {
                    retry_after: until - now,
                });
            }
        }
        let failure = match authorization.and_then(strip_bearer) {
            None => AuthFailure::Missing,
            Some(token) => match self.client(token) {
                Some(name) => return Ok(name),
                None => AuthFailure::Invalid,
            },
        };
        self.housekeeping();
        match self.failures.check_key(&key) {
            Ok(()) => Err(failure),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let mut blocked = self.lock_blocked();
                if blocked.len() >= MAX_BLOCKED {
                    blocked.retain(|_, until| *until > now);
                }
                if blocked.len() < MAX_BLOCKED {
                    blocked.insert(key, now + wait);
                }
                Err(AuthFailure::RateLimited { retry_after: wait })
            }
        }
    }

    /// The configured name of `token`, comparing every token whatever matched.
    fn client(&self, token: &[u8]) -> Option<&str> {
        let mut found = None;
        for (name, secret) in &self.clients {
            if bool::from(secret.expose().as_bytes().ct_eq(token)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    fn lock_blocked(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        self.blocked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn housekeeping(&self) {
        let seen = self.failures_seen.fetch_add(1, Ordering::Relaxed);
        if seen.is_multiple_of(HOUSEKEEPING_EVERY) {
            self.failures.retain_recent();
            self.failures.shrink_to_fit();
            let now = Instant::now();
            self.lock_blocked().retain(|_, until| *until > now);
        }
    }
}

/// The rate-limit key of a peer: its IPv4 address, or the /64 of its IPv6 address.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The token of a `Bearer` authorization header (scheme case-insensitive, RFC 6750).
fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn auth(burst: u32) -> BearerAuth {
        let mut map = BTreeMap::new();
        map.insert("rms".to_string(), Secret::new("rms-token-0123456789"));
        map.insert("mash".to_string(), Secret::new("mash-token-0123456789"));
        BearerAuth::new(&map, burst, 1)
    }

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().unwrap(), 40000))
    }

    #[test]
    fn only_a_configured_token_names_its_client() {
        let a = auth(100);
        let p = peer("10.0.0.1");
        assert_eq!(a.check(p, Some(b"Bearer rms-token-0123456789")), Ok("rms"));
        assert_eq!(
            a.check(p, Some(b"bearer mash-token-0123456789")),
            Ok("mash")
        );
        assert_eq!(
            a.check(p, Some(b"Bearer rms-token-012345678")),
            Err(AuthFailure::Invalid)
        );
        assert_eq!(
            a.check(p, Some(b"Basic rms-token-0123456789")),
            Err(AuthFailure::Missing)
        );
        assert_eq!(a.check(p, Some(b"Bearer ")), Err(AuthFailure::Missing));
        assert_eq!(a.check(p, Some(b"Bear")), Err(AuthFailure::Missing));
        assert_eq!(a.check(p, None), Err(AuthFailure::Missing));
    }

    #[test]
    fn past_its_burst_a_peer_is_refused_even_with_a_good_token_and_others_are_not() {
        let a = auth(3);
        let bad = Some(&b"Bearer wrong-token-0123456789"[..]);
        let good = Some(&b"Bearer rms-token-0123456789"[..]);
        let attacker = peer("192.0.2.7");
        for _ in 0..3 {
            assert_eq!(a.check(attacker, bad), Err(AuthFailure::Invalid));
        }
        let refused = a.check(attacker, bad).unwrap_err();
        assert_eq!(refused.reason(), "rate_limited");
        let secs = refused.retry_after_secs().unwrap();
        assert!((1..=60).contains(&secs), "{secs}");
        // The right token from the same peer is not even checked now.
        assert_eq!(
            a.check(attacker, good).unwrap_err().reason(),
            "rate_limited"
        );
        // Another peer is unaffected; so is the next /64 over, but not the same /64.
        assert_eq!(a.check(peer("192.0.2.8"), good), Ok("rms"));
        let v6 = peer("2001:db8:1:2::1");
        for _ in 0..4 {
            let _ = a.check(v6, bad);
        }
        assert_eq!(
            a.check(peer("2001:db8:1:2:ffff::9"), good)
                .unwrap_err()
                .reason(),
            "rate_limited"
        );
        assert_eq!(a.check(peer("2001:db8:1:3::1"), good), Ok("rms"));
        // An IPv4-mapped IPv6 peer is its IPv4 address.
        assert_eq!(
            a.check(peer("::ffff:192.0.2.7"), good)
                .unwrap_err()
                .reason(),
            "rate_limited"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let f = AuthFailure::RateLimited {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(f.retry_after_secs(), Some(2));
        let f = AuthFailure::RateLimited {
            retry_after: Duration::ZERO,
        };
        assert_eq!(f.retry_after_secs(), Some(1));
        assert_eq!(AuthFailure::Invalid.retry_after_secs(), None);
    }
}
