//! The `[storage]` section: where layers are kept, and the limits every layer is held to.

use serde::{Deserialize, Serialize};

use super::SocketMode;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub socket: String,
    pub socket_mode: SocketMode,
    pub metrics_listen: String,
    /// A layer whose uncompressed tar stream is larger is refused (ResourceExhausted);
    /// 0 = no limit.
    pub max_layer_bytes: u64,
    /// A layer that grows more than this many times its compressed size is refused as a
    /// decompression bomb, once past `COMPRESSION_RATIO_GRACE_BYTES`; 0 = no limit.
    pub max_compression_ratio: u64,
}

/// Uncompressed bytes any layer may reach before `storage.max_compression_ratio`
/// applies: small layers of zeros or text compress far beyond any sane ratio.
pub const COMPRESSION_RATIO_GRACE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: SocketMode::PRIVATE,
            metrics_listen: String::new(),
            // Larger than any layer seen in practice (CUDA images stay under 10 GiB).
            max_layer_bytes: 32 * 1024 * 1024 * 1024,
            // gzip of real file trees stays under 10:1; zeros reach 1000:1.
            max_compression_ratio: 100,
        }
    }
}
