//! trellis-runtime as a library: pod sandboxes and containers, in one-way layers.
//!
//! ```text
//! server      the CRI RuntimeService handlers (one file per group) and streaming
//!   └─ lifecycle   sandbox and container managers: the only writer of the records
//!        ├─ spec       pure functions from CRI configs to the OCI spec
//!        ├─ oci        the OCI runtime behind a trait (conmon+runc, and a fake)
//!        ├─ store      typed records and states, indexed in memory
//!        ├─ backends   storage, image and network services behind traits
//!        └─ namespaces the pod's own namespaces on the host, behind a trait
//! error, validate, metrics   shared by all
//! ```
//! A module imports only modules below it; `docs/architecture.md` tells the whole.
#![deny(unsafe_code)]
// Only `inherit_fd` may use unsafe (a pre_exec hook); it says why.

pub mod backends;
pub mod error;
pub mod ids;
mod inherit_fd;
pub mod lifecycle;
pub mod metrics;
pub mod namespaces;
pub mod oci;
pub mod server;
pub mod spec;
pub mod store;
pub mod validate;
