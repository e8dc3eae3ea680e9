//! The `safeclock` command as a library: composing services into one process (`run`), and the
//! embedded demo. The binary in `main.rs` only parses arguments and calls in here, so the
//! integration tests can start exactly what an operator starts.

pub mod app;
pub mod demo;
pub mod dlq;
pub mod erase;
pub mod outcomes;
