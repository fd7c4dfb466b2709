//! The layer store: one directory per distinct layer content (diff id), records per
//! chain id.
//!
//! A layer is unpacked into `tmp-…`, verified (blob digest and size, diff id), then
//! renamed into place and only then recorded; a crash at any point leaves either a
//! `tmp-` directory or an unrecorded directory, both removed at the next start.

use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use sha2::{Digest, Sha256};
use trellis_common::reference::chain_id;
use trellis_common::store::{Store, Table};
use trellis_proto::storage::v1::LayerHeader;

use crate::error::StorageError;
use crate::extract;

const TABLE: &str = "layers";
const TEMP_PREFIX: &str = "tmp-";

#[derive(Clone, PartialEq, prost::Message)]
pub struct LayerRecord {
    #[prost(string, tag = "1")]
    pub chain_id: String,
    #[prost(string, tag = "2")]
    pub diff_id: String,
    #[prost(string, tag = "3")]
    pub parent_chain_id: String,
    #[prost(string, tag = "4")]
    pub blob_digest: String,
    #[prost(uint64, tag = "5")]
    pub unpacked_bytes: u64,
}

pub struct LayerStore {
    root: PathBuf,
    table: Arc<dyn Table>,
}

/// `sha256:<hex>` and nothing else.
pub fn valid_digest(value: &str) -> bool {
    value.strip_prefix("sha256:").is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

impl LayerStore {
    pub fn open(root: PathBuf, store: &dyn Store) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&root).map_err(|source| StorageError::io(format!("cannot create the layer store {}", root.display()), source))?;
        let layers = Self { root, table: store.table(TABLE)? };
        layers.remove_unrecorded()?;
        Ok(layers)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding a layer's content.
    pub fn dir_of(&self, diff_id: &str) -> PathBuf {
        self.root.join(diff_id.trim_start_matches("sha256:"))
    }

    pub fn get(&self, chain_id: &str) -> Result<Option<LayerRecord>, StorageError> {
        self.table.get(chain_id.as_bytes())?.map(|raw| LayerRecord::decode(raw.as_slice()).map_err(StorageError::from)).transpose()
    }

    /// Directories of a chain of layers, top layer first (overlay's lowerdir order).
    pub fn lower_dirs(&self, chain_ids: &[String]) -> Result<Vec<PathBuf>, StorageError> {
        chain_ids
            .iter()
            .rev()
            .map(|chain| {
                let record = self.get(chain)?.ok_or_else(|| StorageError::NotFound(format!("layer {chain} is not in the store")))?;
                Ok(self.dir_of(&record.diff_id))
            })
            .collect()
    }

    fn check_header(header: &LayerHeader) -> Result<(), StorageError> {
        for (what, value) in [("blob digest", &header.digest), ("diff id", &header.diff_id), ("chain id", &header.chain_id)] {
            if !valid_digest(value) {
                return Err(StorageError::InvalidArgument(format!("layer {what} `{value}` is not sha256:<64 hex>")));
            }
        }
        let parent = (!header.parent_chain_id.is_empty()).then_some(header.parent_chain_id.as_str());
        if chain_id(parent, &header.diff_id) != header.chain_id {
            return Err(StorageError::InvalidArgument(format!("chain id {} does not follow from its parent and diff id {}", header.chain_id, header.diff_id)));
        }
        if header.size < 0 {
            return Err(StorageError::InvalidArgument(format!("layer {} has a negative size", header.digest)));
        }
        Ok(())
    }

    /// Unpacks and records one layer whose compressed bytes `reader` yields. Blocking.
    pub fn import(&self, header: &LayerHeader, reader: impl Read) -> Result<LayerRecord, StorageError> {
        Self::check_header(header)?;
        let final_dir = self.dir_of(&header.diff_id);
        let unpacked_bytes = if final_dir.is_dir() {
            // Same content under another chain: nothing to unpack again.
            self.table_record_for_diff(&header.diff_id)?.map_or(0, |r| r.unpacked_bytes)
        } else {
            let temp = self.root.join(format!("{TEMP_PREFIX}{}-{}", &header.chain_id[7..19], std::process::id()));
            let _ = std::fs::remove_dir_all(&temp);
            std::fs::create_dir(&temp).map_err(|source| StorageError::io(format!("cannot create {}", temp.display()), source))?;
            let result = unpack_verified(header, reader, &temp);
            let bytes = match result {
                Ok(bytes) => bytes,
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&temp);
                    return Err(error);
                }
            };
            if let Err(source) = std::fs::rename(&temp, &final_dir) {
                let _ = std::fs::remove_dir_all(&temp);
                if !final_dir.is_dir() {
                    return Err(StorageError::io(format!("cannot move layer into {}", final_dir.display()), source));
                }
            }
            bytes
        };
        let record = LayerRecord {
            chain_id: header.chain_id.clone(),
            diff_id: header.diff_id.clone(),
            parent_chain_id: header.parent_chain_id.clone(),
            blob_digest: header.digest.clone(),
            unpacked_bytes,
        };
        self.table.put(record.chain_id.as_bytes(), &record.encode_to_vec())?;
        Ok(record)
    }

    /// Every recorded chain id.
    pub fn chain_ids(&self) -> Result<Vec<String>, StorageError> {
        Ok(self.records()?.into_iter().map(|r| r.chain_id).collect())
    }

    fn records(&self) -> Result<Vec<LayerRecord>, StorageError> {
        self.table.scan()?.into_iter().map(|(_, raw)| LayerRecord::decode(raw.as_slice()).map_err(StorageError::from)).collect()
    }

    fn table_record_for_diff(&self, diff_id: &str) -> Result<Option<LayerRecord>, StorageError> {
        Ok(self.records()?.into_iter().find(|r| r.diff_id == diff_id))
    }

    /// Forgets the given chains, and removes the content no remaining chain uses.
    pub fn remove_chains(&self, chain_ids: &[String]) -> Result<(), StorageError> {
        for chain in chain_ids {
            self.table.delete(chain.as_bytes())?;
        }
        self.remove_unrecorded()
    }

    /// Removes `tmp-` leftovers and layer directories no record points at.
    fn remove_unrecorded(&self) -> Result<(), StorageError> {
        let recorded: std::collections::HashSet<PathBuf> = self.records()?.iter().map(|r| self.dir_of(&r.diff_id)).collect();
        let entries = std::fs::read_dir(&self.root).map_err(|source| StorageError::io(format!("cannot list {}", self.root.display()), source))?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if !recorded.contains(&path) {
                tracing::info!(path = %path.display(), "removing layer content no record uses (a pull cut short, or a removed image)");
                std::fs::remove_dir_all(&path).map_err(|source| StorageError::io(format!("cannot remove {}", path.display()), source))?;
            }
        }
        Ok(())
    }
}

/// Counts and hashes what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0 }
    }

    fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Blob → (gzip | zstd | plain) → tar, verifying the blob digest and size and the
/// diff id over the whole streams, including what tar leaves unread at the end.
fn unpack_verified(header: &LayerHeader, reader: impl Read, dest: &Path) -> Result<u64, StorageError> {
    let mut blob = BufReader::with_capacity(256 * 1024, Hashing::new(reader));
    let magic = blob.fill_buf().map_err(|source| StorageError::io(format!("cannot read layer {}", header.digest), source))?.to_vec();
    let decompressed: Box<dyn Read + '_> = if magic.starts_with(&GZIP_MAGIC) {
        Box::new(flate2::read::MultiGzDecoder::new(&mut blob))
    } else if magic.starts_with(&ZSTD_MAGIC) {
        Box::new(ruzstd::decoding::StreamingDecoder::new(&mut blob).map_err(|e| StorageError::Corrupt(format!("layer {} is not valid zstd: {e}", header.digest)))?)
    } else {
        Box::new(&mut blob)
    };
    let mut tar_stream = Hashing::new(decompressed);
    let written = extract::unpack(&mut tar_stream, dest);
    // Read what is left even when unpacking failed, so a digest mismatch (the likelier
    // cause of garbage) is what gets reported.
    let drained = io::copy(&mut tar_stream, &mut io::sink());
    let diff_id = tar_stream.digest();
    drop(tar_stream);
    io::copy(&mut blob, &mut io::sink()).map_err(|source| StorageError::io(format!("cannot read layer {}", header.digest), source))?;
    let blob = blob.into_inner();
    if blob.digest() != header.digest {
        return Err(StorageError::DigestMismatch { image: header.image.clone(), digest: header.digest.clone(), actual: blob.digest() });
    }
    if blob.bytes != header.size as u64 {
        return Err(StorageError::SizeMismatch { image: header.image.clone(), digest: header.digest.clone(), expected: header.size as u64, actual: blob.bytes });
    }
    let written = written?;
    drained.map_err(|source| StorageError::io(format!("cannot decompress layer {}", header.digest), source))?;
    if diff_id != header.diff_id {
        return Err(StorageError::DiffIdMismatch { image: header.image.clone(), digest: header.digest.clone(), expected: header.diff_id.clone(), actual: diff_id });
    }
    Ok(written)
}
