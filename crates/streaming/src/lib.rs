//! The protocols behind the CRI streaming URLs: SPDY/3.1 framing and sessions
//! ([`frame`], [`spdy`]), the Kubernetes remotecommand subprotocol of exec and attach
//! ([`remotecommand`]) and the stream pairing of port-forward ([`portforward`]).
//!
//! A crate of its own because none of it is about containers: it parses bytes from
//! whoever holds a streaming URL, so it is kept small, free of Trellis types (its own
//! [`StreamingError`], no records, no configuration) and tested on its own, without
//! root or a node. The runtime only glues it to runc, conmon and network namespaces,
//! and the integration tests' client uses the same codec as an ordinary dependency:
//! one implementation of the wire format, exercised from both ends.

pub mod error;
pub mod frame;
pub mod portforward;
pub mod remotecommand;
pub mod spdy;
#[cfg(test)]
mod testing;

pub use error::StreamingError;
