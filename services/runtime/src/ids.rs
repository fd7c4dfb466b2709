//! Ids and times for records, sessions and files: the bottom of the crate, used by
//! every layer.

use crate::error::RuntimeError;

pub use trellis_common::clock::now_nanos;

/// 64 hex characters from the kernel's random source.
pub fn new_id() -> Result<String, RuntimeError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|source| RuntimeError::io("cannot read /dev/urandom for an id", source))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
