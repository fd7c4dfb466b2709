//! The layer store: one directory per distinct layer content (diff id), records per
//! chain id.
//!
//! A layer is unpacked into `tmp-…`, verified (blob digest and size, diff id), then
//! renamed into place and only then recorded; a crash at any point leaves either a
//! `tmp-` directory or an unrecorded directory, both removed at the next start.

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use trellis_common::config::{COMPRESSION_RATIO_GRACE_BYTES, StorageConfig};
use trellis_common::reference::chain_id;
use trellis_common::space::SpaceWatch;
use trellis_common::store::{Records, Store};
use trellis_common::text::excerpt;
use trellis_proto::storage::v1::LayerHeader;

use crate::error::StorageError;
use crate::{extract, links};

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
    table: Records<LayerRecord, StorageError>,
    limits: Limits,
    /// Makes every temporary directory's name unique: an import cut short by its
    /// client may still be cleaning up when the next import of that layer begins.
    imports: AtomicU64,
    /// Told when an unpack runs out of space, so health says so until space is back.
    space: Option<SpaceWatch>,
}

/// How large a layer may grow when unpacked (`storage.max_layer_bytes`,
/// `storage.max_compression_ratio`); 0 is no limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_ratio: u64,
}

impl From<&StorageConfig> for Limits {
    fn from(config: &StorageConfig) -> Self {
        Self {
            max_bytes: config.max_layer_bytes,
            max_ratio: config.max_compression_ratio,
        }
    }
}

/// The step of a layer's unpack in the current call's trace (nothing when spans are
/// not exported); its unpacked size is recorded when known.
pub fn unpack_step(header: &LayerHeader) -> tracing::Span {
    trellis_common::step_span!(
        "layer.unpack",
        layer.digest = %header.digest,
        layer.size = header.size,
        layer.unpacked_bytes = tracing::field::Empty
    )
}

/// `sha256:<hex>` and nothing else.
pub fn valid_digest(value: &str) -> bool {
    value.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

impl LayerStore {
    pub fn open(root: PathBuf, store: &dyn Store, limits: Limits) -> Result<Self, StorageError> {
        // Layers hold setuid binaries and device nodes: no host user may walk in.
        trellis_common::dirs::ensure_private_dir(&root).map_err(|source| {
            StorageError::io(
                format!(
                    "cannot make the layer store {} private (0700)",
                    root.display()
                ),
                source,
            )
        })?;
        let layers = Self {
            root,
            table: Records::open(store, TABLE)?,
            limits,
            imports: AtomicU64::new(0),
            space: None,
        };
        layers.remove_unrecorded()?;
        // Nodes from before short links: each recorded layer gets its own.
        for record in layers.records()? {
            let hex = record.diff_id.trim_start_matches("sha256:");
            links::ensure(&layers.root, hex).map_err(|source| {
                StorageError::io(
                    format!("cannot make the short link of layer {}", record.diff_id),
                    source,
                )
            })?;
        }
        Ok(layers)
    }

    /// Reports running out of space to `space` (whose probe is in the service's health).
    pub fn watch_space(&mut self, space: SpaceWatch) {
        self.space = Some(space);
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding a layer's content.
    pub fn dir_of(&self, diff_id: &str) -> PathBuf {
        self.root.join(diff_id.trim_start_matches("sha256:"))
    }

    pub fn get(&self, chain_id: &str) -> Result<Option<LayerRecord>, StorageError> {
        self.table.get(chain_id)
    }

    /// Directories of a chain of layers, top layer first (overlay's lowerdir order).
    pub fn lower_dirs(&self, chain_ids: &[String]) -> Result<Vec<PathBuf>, StorageError> {
        chain_ids
            .iter()
            .rev()
            .map(|chain| {
                let record = self.get(chain)?.ok_or_else(|| {
                    StorageError::NotFound(format!("layer {} is not in the store", excerpt(chain)))
                })?;
                Ok(self.dir_of(&record.diff_id))
            })
            .collect()
    }

    fn check_header(header: &LayerHeader) -> Result<(), StorageError> {
        for (what, value) in [
            ("blob digest", &header.digest),
            ("diff id", &header.diff_id),
            ("chain id", &header.chain_id),
        ] {
            if !valid_digest(value) {
                return Err(StorageError::InvalidArgument(format!(
                    "layer {what} `{}` is not sha256:<64 hex>",
                    excerpt(value)
                )));
            }
        }
        let parent =
            (!header.parent_chain_id.is_empty()).then_some(header.parent_chain_id.as_str());
        if chain_id(parent, &header.diff_id) != header.chain_id {
            return Err(StorageError::InvalidArgument(format!(
                "chain id {} does not follow from its parent and diff id {}",
                header.chain_id, header.diff_id
            )));
        }
        if header.size < 0 {
            return Err(StorageError::InvalidArgument(format!(
                "layer {} has a negative size",
                header.digest
            )));
        }
        Ok(())
    }

    /// Unpacks and records one layer whose compressed bytes `reader` yields. Blocking.
    /// `unpack` is the trace's step for the unpack ([`unpack_step`]), made by the
    /// caller when it handed the work to a thread, so that the wait for one counts;
    /// it ends once the layer's files are in place, before the record is written.
    pub fn import(
        &self,
        header: &LayerHeader,
        reader: impl Read,
        unpack: tracing::Span,
    ) -> Result<LayerRecord, StorageError> {
        let unpack = unpack.entered();
        Self::check_header(header)?;
        let final_dir = self.dir_of(&header.diff_id);
        let unpacked_bytes = if final_dir.is_dir() {
            // Same content under another chain: nothing to unpack again.
            unpack.record("layer.unpacked_bytes", 0);
            self.table_record_for_diff(&header.diff_id)?
                .map_or(0, |r| r.unpacked_bytes)
        } else {
            let attempt = self.imports.fetch_add(1, Ordering::Relaxed);
            let temp = self.root.join(format!(
                "{TEMP_PREFIX}{}-{}-{attempt}",
                &header.chain_id[7..19],
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&temp);
            std::fs::create_dir(&temp).map_err(|source| {
                StorageError::io(format!("cannot create {}", temp.display()), source)
            })?;
            let result = unpack_verified(header, reader, &temp, self.limits).and_then(|bytes| {
                trellis_common::failpoint::hit("storage.layer.after-unpack")?;
                Ok(bytes)
            });
            let bytes = match result {
                Ok(bytes) => bytes,
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&temp);
                    // The entry alone does not say where the disk is full.
                    if trellis_common::error::is_out_of_space(&error) {
                        if let Some(space) = &self.space {
                            space.ran_out(&self.root);
                        }
                        return Err(StorageError::OutOfSpace {
                            path: temp,
                            source: Box::new(error),
                        });
                    }
                    return Err(error);
                }
            };
            if let Err(source) = std::fs::rename(&temp, &final_dir) {
                let _ = std::fs::remove_dir_all(&temp);
                if !final_dir.is_dir() {
                    return Err(StorageError::io(
                        format!("cannot move layer into {}", final_dir.display()),
                        source,
                    ));
                }
            }
            unpack.record("layer.unpacked_bytes", bytes);
            bytes
        };
        let hex = header.diff_id.trim_start_matches("sha256:");
        links::ensure(&self.root, hex).map_err(|source| {
            StorageError::io(
                format!("cannot make the short link of layer {}", header.diff_id),
                source,
            )
        })?;
        drop(unpack);
        let record = LayerRecord {
            chain_id: header.chain_id.clone(),
            diff_id: header.diff_id.clone(),
            parent_chain_id: header.parent_chain_id.clone(),
            blob_digest: header.digest.clone(),
            unpacked_bytes,
        };
        trellis_common::failpoint::hit("storage.layer.before-record")?;
        self.table.put(&record.chain_id, &record)?;
        Ok(record)
    }

    /// Every recorded chain id.
    pub fn chain_ids(&self) -> Result<Vec<String>, StorageError> {
        Ok(self.records()?.into_iter().map(|r| r.chain_id).collect())
    }

    pub fn records(&self) -> Result<Vec<LayerRecord>, StorageError> {
        self.table.all()
    }

    fn table_record_for_diff(&self, diff_id: &str) -> Result<Option<LayerRecord>, StorageError> {
        Ok(self.records()?.into_iter().find(|r| r.diff_id == diff_id))
    }

    /// Forgets the given chains, and removes the content no remaining chain uses.
    pub fn remove_chains(&self, chain_ids: &[String]) -> Result<(), StorageError> {
        for chain in chain_ids {
            self.table.delete(chain)?;
        }
        let step = trellis_common::step_span!("layer.remove", layer.count = chain_ids.len());
        step.in_scope(|| self.remove_unrecorded())
    }

    /// Removes `tmp-` leftovers, and layer directories no record points at with their
    /// short links.
    fn remove_unrecorded(&self) -> Result<(), StorageError> {
        let recorded: HashSet<String> = self
            .records()?
            .iter()
            .map(|r| r.diff_id.trim_start_matches("sha256:").to_string())
            .collect();
        let entries = std::fs::read_dir(&self.root).map_err(|source| {
            StorageError::io(format!("cannot list {}", self.root.display()), source)
        })?;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            if name == links::LINK_DIR || name.to_str().is_some_and(|hex| recorded.contains(hex)) {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing layer content no record uses (a pull cut short, or a removed image)");
            std::fs::remove_dir_all(&path).map_err(|source| {
                StorageError::io(format!("cannot remove {}", path.display()), source)
            })?;
        }
        links::sweep(&self.root, &recorded).map_err(|source| {
            StorageError::io(
                format!(
                    "cannot tidy the short links in {}/{}",
                    self.root.display(),
                    links::LINK_DIR
                ),
                source,
            )
        })
    }
}

/// Counts and hashes what passes through; the count is shared, so that a reader
/// further down the chain can compare sizes.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: Rc<Cell<u64>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes.set(self.bytes.get() + n as u64);
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: Rc::default(),
        }
    }

    fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

/// The uncompressed stream, cut off with an error once it passes the limits; why is
/// kept in `exceeded` for the caller's message.
struct Bounded<R> {
    inner: R,
    read: u64,
    compressed: Rc<Cell<u64>>,
    limits: Limits,
    exceeded: Rc<Cell<Option<Exceeded>>>,
}

#[derive(Debug, Clone, Copy)]
enum Exceeded {
    Bytes(u64),
    Ratio(u64),
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let Limits {
            max_bytes,
            max_ratio,
        } = self.limits;
        let exceeded = if max_bytes > 0 && self.read > max_bytes {
            Some(Exceeded::Bytes(max_bytes))
        } else if max_ratio > 0
            && self.read > COMPRESSION_RATIO_GRACE_BYTES
            && self.read / self.compressed.get().max(1) > max_ratio
        {
            Some(Exceeded::Ratio(max_ratio))
        } else {
            None
        };
        if let Some(exceeded) = exceeded {
            self.exceeded.set(Some(exceeded));
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the layer is over its size limit",
            ));
        }
        Ok(n)
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Blob → (gzip | zstd | plain) → tar, verifying the blob digest and size and the
/// diff id over the whole streams, including what tar leaves unread at the end, and
/// stopping as soon as the uncompressed stream passes the limits.
fn unpack_verified(
    header: &LayerHeader,
    reader: impl Read,
    dest: &Path,
    limits: Limits,
) -> Result<u64, StorageError> {
    let mut blob = BufReader::with_capacity(256 * 1024, Hashing::new(reader));
    let compressed = blob.get_ref().bytes.clone();
    let magic = blob
        .fill_buf()
        .map_err(|source| StorageError::io(format!("cannot read layer {}", header.digest), source))?
        .to_vec();
    let decompressed: Box<dyn Read + '_> = if magic.starts_with(&GZIP_MAGIC) {
        Box::new(flate2::read::MultiGzDecoder::new(&mut blob))
    } else if magic.starts_with(&ZSTD_MAGIC) {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(&mut blob).map_err(|e| {
                StorageError::Corrupt(format!(
                    "layer {} is not valid zstd: {}",
                    header.digest,
                    excerpt(&e.to_string())
                ))
            })?,
        )
    } else {
        Box::new(&mut blob)
    };
    let exceeded = Rc::new(Cell::new(None));
    let bounded = Bounded {
        inner: decompressed,
        read: 0,
        compressed,
        limits,
        exceeded: exceeded.clone(),
    };
    let mut tar_stream = Hashing::new(bounded);
    let written = extract::unpack(&mut tar_stream, dest);
    let too_large = |exceeded: Exceeded| {
        let reason = match exceeded {
            Exceeded::Bytes(max) => {
                format!("it unpacks to more than {max} bytes (storage.max_layer_bytes)")
            }
            Exceeded::Ratio(max) => format!(
                "it unpacks to more than {max} times its compressed size (storage.max_compression_ratio): a decompression bomb"
            ),
        };
        StorageError::TooLarge {
            image: header.image.clone(),
            digest: header.digest.clone(),
            reason,
        }
    };
    if let Some(exceeded) = exceeded.get() {
        return Err(too_large(exceeded));
    }
    // Read what is left even when unpacking failed, so a digest mismatch (the likelier
    // cause of garbage) is what gets reported.
    let drained = io::copy(&mut tar_stream, &mut io::sink());
    if let Some(exceeded) = exceeded.get() {
        return Err(too_large(exceeded));
    }
    let diff_id = tar_stream.digest();
    drop(tar_stream);
    io::copy(&mut blob, &mut io::sink()).map_err(|source| {
        StorageError::io(format!("cannot read layer {}", header.digest), source)
    })?;
    let blob = blob.into_inner();
    if blob.digest() != header.digest {
        return Err(StorageError::DigestMismatch {
            image: header.image.clone(),
            digest: header.digest.clone(),
            actual: blob.digest(),
        });
    }
    if blob.bytes.get() != header.size as u64 {
        return Err(StorageError::SizeMismatch {
            image: header.image.clone(),
            digest: header.digest.clone(),
            expected: header.size as u64,
            actual: blob.bytes.get(),
        });
    }
    let written = written?;
    drained.map_err(|source| {
        StorageError::io(format!("cannot decompress layer {}", header.digest), source)
    })?;
    if diff_id != header.diff_id {
        return Err(StorageError::DiffIdMismatch {
            image: header.image.clone(),
            digest: header.digest.clone(),
            expected: header.diff_id.clone(),
            actual: diff_id,
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A gzip layer of one file of `size` zeros, and its header.
    fn zeros_layer(size: usize) -> (Vec<u8>, LayerHeader) {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(size as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, "zeros", std::io::repeat(0).take(size as u64))
            .expect("tar");
        let tar = builder.into_inner().expect("tar");
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&tar).expect("gzip");
        let blob = gzip.finish().expect("gzip");
        let digest = |data: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let diff_id = digest(&tar);
        let header = LayerHeader {
            digest: digest(&blob),
            size: blob.len() as i64,
            chain_id: diff_id.clone(),
            diff_id,
            image: "test/bomb".into(),
            ..Default::default()
        };
        (blob, header)
    }

    #[test]
    fn layers_past_the_ratio_or_the_size_stop_early_and_say_which_limit() {
        let (blob, header) = zeros_layer(80 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let ratio = unpack_verified(
            &header,
            blob.as_slice(),
            dir.path(),
            Limits {
                max_bytes: 0,
                max_ratio: 100,
            },
        )
        .expect_err("a bomb");
        assert!(
            matches!(&ratio, StorageError::TooLarge { reason, .. } if reason.contains("storage.max_compression_ratio")),
            "{ratio}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let size = unpack_verified(
            &header,
            blob.as_slice(),
            dir.path(),
            Limits {
                max_bytes: 1 << 20,
                max_ratio: 0,
            },
        )
        .expect_err("too large");
        assert!(
            matches!(&size, StorageError::TooLarge { reason, .. } if reason.contains("more than 1048576 bytes")),
            "{size}"
        );
        assert_eq!(
            tonic::Status::from(size).code(),
            tonic::Code::ResourceExhausted
        );
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            unpack_verified(
                &header,
                blob.as_slice(),
                dir.path(),
                Limits {
                    max_bytes: 0,
                    max_ratio: 0
                }
            )
            .expect("no limits"),
            80 << 20
        );
    }
}
