//! The `[supervisor]` section: how `trellis up` looks after its children.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// A child whose health stays NOT_SERVING this long is restarted; 0 = never.
    /// Services heal what they can by themselves (a record store reopens once the disk
    /// has room again), so this is the last resort for what they cannot.
    pub unhealthy_restart_after_seconds: u64,
    /// Where `trellis up` serves its own metrics (restarts per child and why); empty
    /// for none.
    pub metrics_listen: String,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            unhealthy_restart_after_seconds: 30,
            metrics_listen: String::new(),
        }
    }
}
