//! One layer of a pull: asked of storage first, else downloaded and streamed to it
//! as it arrives (storage verifies and unpacks). A file of its own for the steps a
//! trace shows of it: `layer.wait` (another pull downloads the same blob),
//! `layer.fetch` (the download and the stream, with `registry.blob`, the request up
//! to the registry's answer, and the storage call under it), so a slow pull says
//! which layer, and whether the registry or the unpack was slow.

use std::task::Poll;
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::manifest::OciDescriptor;
use tokio::sync::mpsc;
use tonic::Code;
use tracing::Instrument;
use trellis_common::locks::KeyGuard;
use trellis_common::step_span;
use trellis_common::telemetry::{client_span, traced_request};
use trellis_common::upstream;
use trellis_proto::storage::v1::{
    HasLayerRequest, ImportLayerChunk, LayerHeader, import_layer_chunk::Part,
};

use super::{Puller, fail_point};
use crate::error::ImageError;
use crate::failure::{SourceFailure, broken_download, classify};
use crate::registry::Source;

impl Puller {
    async fn has_layer(
        &self,
        id: u64,
        chain_id: &str,
        timeout: Duration,
    ) -> Result<bool, SourceFailure> {
        let message = HasLayerRequest {
            chain_id: chain_id.to_string(),
            holder: self.holder(id),
        };
        let asked = self.ask_storage(timeout, message, |mut storage, request| async move {
            storage.has_layer(request).await
        });
        Ok(asked.await?.present)
    }

    /// Whether storage has the layer already (counted as reused).
    async fn reused(
        &self,
        id: u64,
        chain_id: &str,
        timeout: Duration,
    ) -> Result<bool, SourceFailure> {
        let present = self.has_layer(id, chain_id, timeout).await?;
        if present {
            self.metrics.layers_reused.inc();
        }
        Ok(present)
    }

    /// The right to download `digest`: at once when no other pull downloads it; a wait
    /// for that other pull is a step of its own.
    async fn blob_turn(&self, digest: &str) -> KeyGuard {
        let mut locking = std::pin::pin!(self.blobs.lock(digest));
        if let Poll::Ready(turn) = futures::poll!(locking.as_mut()) {
            return turn;
        }
        locking
            .instrument(step_span!("layer.wait", layer.digest = %digest))
            .await
    }

    /// Streams one layer from the source into the storage service, unless present.
    pub(super) async fn import_layer(
        &self,
        id: u64,
        client: &oci_client::Client,
        source: &Source,
        layer: &OciDescriptor,
        header: LayerHeader,
        timeout: Duration,
    ) -> Result<(), SourceFailure> {
        if self.reused(id, &header.chain_id, timeout).await? {
            return Ok(());
        }
        let _downloading = self.blob_turn(&layer.digest).await;
        // Another pull may have brought it meanwhile.
        if self.reused(id, &header.chain_id, timeout).await? {
            return Ok(());
        }
        // From here storage may end up with the layer, whatever happens to this pull.
        self.inflight.importing(id, &header.chain_id);
        let started = Instant::now();
        let step = step_span!("layer.fetch", layer.digest = %layer.digest, layer.size = layer.size);
        self.fetch_layer(client, source, layer, header, timeout)
            .instrument(step)
            .await?;
        self.metrics
            .layer_import
            .observe(started.elapsed().as_secs_f64());
        fail_point("image.pull.after-layer").await
    }

    /// The download of one layer, forwarded chunk by chunk to storage's ImportLayer.
    async fn fetch_layer(
        &self,
        client: &oci_client::Client,
        source: &Source,
        layer: &OciDescriptor,
        header: LayerHeader,
        timeout: Duration,
    ) -> Result<(), SourceFailure> {
        let blob = client
            .pull_blob_stream(&source.reference, layer)
            .instrument(step_span!("registry.blob", layer.digest = %layer.digest))
            .await
            .map_err(classify)?;
        let (chunks, outgoing) = mpsc::channel::<ImportLayerChunk>(16);
        let digest = header.digest.clone();
        let image = header.image.clone();
        // Storage taking no bytes, or giving no answer once it has them all, for the
        // progress timeout is stuck: said so, rather than the pull waiting forever.
        let stuck = || SourceFailure::storage_stuck(&self.storage_socket, timeout);
        let (done, forward_done) = tokio::sync::oneshot::channel::<()>();
        if chunks
            .send(ImportLayerChunk {
                part: Some(Part::Header(header)),
            })
            .await
            .is_err()
        {
            return Err(SourceFailure::new(
                Code::Unavailable,
                "storage stream closed".into(),
            ));
        }
        let mut storage = self.storage();
        // The request is made inside the client span, so that storage's ImportLayer
        // (and its unpack) is found under this layer's fetch.
        let upload = async {
            let upload = storage.import_layer(traced_request(
                tokio_stream::wrappers::ReceiverStream::new(outgoing),
            ));
            tokio::pin!(upload);
            tokio::select! {
                answer = &mut upload => Ok(answer),
                _ = forward_done => tokio::time::timeout(timeout, upload).await.map_err(|_| stuck()),
            }
        }
        .instrument(client_span("storage"));
        let forward = async move {
            // Dropped when the forwarding ends, however it ends.
            let _done = done;
            let mut stream = blob.stream;
            loop {
                let next = match tokio::time::timeout(timeout, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let stalled = ImageError::Stalled {
                            image,
                            digest,
                            source_name: source.label.clone(),
                            seconds: timeout.as_secs(),
                        };
                        return Err(SourceFailure::new(
                            Code::DeadlineExceeded,
                            stalled.to_string(),
                        ));
                    }
                };
                match next {
                    None => return Ok(()),
                    Some(Ok(bytes)) => {
                        self.metrics.bytes.inc_by(bytes.len() as u64);
                        let chunk = ImportLayerChunk {
                            part: Some(Part::Data(bytes)),
                        };
                        match tokio::time::timeout(timeout, chunks.send(chunk)).await {
                            Ok(Ok(())) => {}
                            // Storage stopped reading: its answer says why.
                            Ok(Err(_)) => return Ok(()),
                            Err(_) => return Err(stuck()),
                        }
                    }
                    Some(Err(error)) => return Err(broken_download(&digest, &error)),
                }
            }
        };
        let (forwarded, uploaded) = tokio::join!(forward, upload);
        match (forwarded, uploaded?) {
            (_, Err(status)) if upstream::not_reached(&status) => Err(self.storage_failed(status)),
            (Err(failure), _) if failure.storage_down => Err(failure),
            // The download broke, stalled or brought bytes that do not match: storage's
            // complaint about the stream it got follows from that.
            (Err(broken), Err(_)) => Err(broken),
            // Storage's verdict (digest, size, unsafe entries) on a whole download.
            (Ok(()), Err(status)) => Err(self.storage_failed(status)),
            (Err(broken), Ok(_)) => Err(broken),
            (Ok(()), Ok(_)) => Ok(()),
        }
    }
}
