//! The one type for secret strings: bearer tokens of intake clients and of the acknowledgement
//! API's operators.
//!
//! Its `Debug` prints `<redacted>` and it has no `Display`, so a secret cannot reach a log line
//! through a settings dump, a `{:?}` in an error or a panic message. Reading it takes an explicit
//! [`Secret::expose`], which is easy to find in review.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string: never printed by `Debug`, and without `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for comparing; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-hunter2-hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&s)), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2-hunter2-hunter2");
    }
}
