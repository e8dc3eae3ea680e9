//! Bearer-token authentication.
//!
//! Each client has a name and a token (`[intake.tokens]`). The token is compared in constant
//! time against every configured token, so neither the comparison nor which token matched leaks
//! through timing (only a token's length can). The client's name, never its token, is what logs,
//! metrics and the produced record's `safeclock.intake.client` header carry.

use safeclock_common::config::Secret;
use subtle::ConstantTimeEq;

/// The configured clients.
#[derive(Debug, Clone)]
pub struct Tokens {
    clients: Vec<(String, Secret)>,
}

impl Tokens {
    pub fn new<'a>(tokens: impl IntoIterator<Item = (&'a String, &'a Secret)>) -> Self {
        Self {
            clients: tokens
                .into_iter()
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The name of the client whose token is in `authorization` (`Bearer <token>`), if any.
    pub fn client(&self, authorization: Option<&[u8]>) -> Option<&str> {
        let header = authorization?;
        let token = strip_bearer(header)?;
        let mut found = None;
        // No early exit: every token is compared whatever matched.
        for (name, secret) in &self.clients {
            if bool::from(secret.expose().as_bytes().ct_eq(token)) {
                found = Some(name.as_str());
            }
        }
        found
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

    #[test]
    fn only_a_configured_token_names_its_client() {
        let mut map = BTreeMap::new();
        map.insert("rms".to_string(), Secret::new("rms-token-0123456789"));
        map.insert("mash".to_string(), Secret::new("mash-token-0123456789"));
        let tokens = Tokens::new(&map);
        assert_eq!(
            tokens.client(Some(b"Bearer rms-token-0123456789")),
            Some("rms")
        );
        assert_eq!(
            tokens.client(Some(b"bearer mash-token-0123456789")),
            Some("mash")
        );
        assert_eq!(tokens.client(Some(b"Bearer rms-token-012345678")), None);
        assert_eq!(tokens.client(Some(b"Basic rms-token-0123456789")), None);
        assert_eq!(tokens.client(Some(b"Bearer ")), None);
        assert_eq!(tokens.client(Some(b"Bear")), None);
        assert_eq!(tokens.client(None), None);
    }
}
