//! Code every Trellis process shares: configuration, telemetry, the event bus,
//! socket transport, the record store, keyed locks, metrics, and the service runner.
#![deny(unsafe_code)]

pub mod activation;
pub mod authority;
pub mod bus;
pub mod clock;
pub mod config;
pub mod detach;
pub mod dirs;
pub mod error;
pub mod failpoint;
pub mod grpc;
pub mod locks;
pub mod metrics;
pub mod mounts;
pub mod notify;
pub mod reference;
pub mod service;
pub mod space;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod transport;
pub mod upstream;

pub use config::{Config, ConfigSource, ServiceKind};
pub use error::CommonError;
