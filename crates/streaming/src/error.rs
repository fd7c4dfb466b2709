//! The one error type of the crate: what the peer got wrong, or what the connection
//! under it did. It names no caller's types, so each caller maps it to its own
//! errors (the runtime to `RuntimeError`, the tests' client to a panic).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The peer broke the SPDY framing rules (or we were asked to send what SPDY
    /// cannot carry).
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
    /// A header block could not be (de)compressed, or is too large once inflated.
    #[error("SPDY header compression: {0}")]
    Compression(String),
    /// The connection is gone: nothing more can be sent on it.
    #[error("the client connection is closed")]
    Closed,
    /// The client did not open a session as the subprotocol asks (streams missing,
    /// doubled, or too slow to come).
    #[error("{0}")]
    Session(String),
    /// Reading or writing what a stream carries failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}
