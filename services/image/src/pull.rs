//! Pulling an image: manifest and config from the first source that has them, each
//! missing layer streamed to the storage service (which verifies and unpacks it),
//! then the image recorded. Concurrent pulls of one image share one download, and
//! pulls of different images share a blob they both need.
//!
//! Each pull runs in a task of its own, watched by another: a panic in the registry
//! client (hostile registries have found some) fails that pull for its waiters and
//! nothing else, and a pull nobody waits for any more is dropped there, which stops
//! its downloads and its streams to storage. Whatever the way a pull ended without
//! its image, the layers it imported and nobody needs are pruned.

mod layer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use oci_client::secrets::RegistryAuth;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;
use trellis_common::config::ImageConfig;
use trellis_common::locks::KeyedLocks;
use trellis_common::reference::{NamedRef, chain_id};
use trellis_common::step_span;
use trellis_common::telemetry::traced_request;
use trellis_common::text::excerpt_to;
use trellis_proto::storage::v1::storage_client::StorageClient;
use trellis_proto::storage::v1::{Image, LayerHeader, PruneLayersRequest, PutImageRequest};

use crate::error::ImageError;
use crate::failure::{REGISTRY_TEXT_CHARS, SourceFailure, classify};
use crate::image_config::stored_config;
use crate::index::{Change, ImageIndex};
use crate::inflight::{InFlight, Outcome, Start};
use crate::metrics::{PullMetrics, PullOutcome};
use crate::registry::{Source, auth_for, client_for, sources};

/// Layers downloaded at once for one image.
const PARALLEL_LAYERS: usize = 3;
/// How long a prune may take before pulls stop waiting for it.
const PRUNE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the prune at start waits for a storage service that is not up yet.
const STARTUP_PRUNE_PATIENCE: Duration = Duration::from_secs(30);

pub struct Puller {
    config: ImageConfig,
    storage: Channel,
    /// Where `storage` dials, for messages.
    storage_socket: PathBuf,
    /// Told of each image recorded, before the pull answers its callers.
    index: Arc<ImageIndex>,
    credentials: std::collections::HashMap<String, RegistryAuth>,
    inflight: Arc<InFlight>,
    /// One download per blob at a time: concurrent pulls of images sharing a layer
    /// wait for the first and then find it stored.
    blobs: KeyedLocks,
    metrics: PullMetrics,
    /// This process among the image replicas (see [`Puller::holder`]).
    replica: String,
    /// Whether this replica's previous process still drains its pulls.
    predecessor_serving: bool,
}

fn auth_fingerprint(auth: &RegistryAuth) -> String {
    let secret = match auth {
        RegistryAuth::Anonymous => return "anonymous".into(),
        RegistryAuth::Basic(user, password) => format!("basic:{user}:{password}"),
        RegistryAuth::Bearer(token) => format!("bearer:{token}"),
    };
    hex::encode(&Sha256::digest(secret.as_bytes())[..8])
}

/// What a panic inside a pull said, for the log (its text may come from a registry).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    excerpt_to(&text, REGISTRY_TEXT_CHARS)
}

impl Puller {
    pub fn new(
        config: ImageConfig,
        storage: Channel,
        storage_socket: PathBuf,
        index: Arc<ImageIndex>,
        registry: &mut Registry,
        replica: &str,
        predecessor_serving: bool,
    ) -> Result<Self, ImageError> {
        let credentials = crate::registry::load_credentials(&config.credentials_file)?;
        Ok(Self {
            config,
            storage,
            storage_socket,
            index,
            credentials,
            inflight: Arc::default(),
            blobs: Default::default(),
            metrics: PullMetrics::register(registry),
            replica: replica.to_string(),
            predecessor_serving,
        })
    }

    /// Pull `id` as storage knows it when it holds layers for it (storage's `holds`):
    /// `<replica>:<pid>/pull-<id>`, so that a later process of the same replica can
    /// release what a killed one held (`<replica>:`), and no other replica's.
    fn holder(&self, id: u64) -> String {
        format!("{}:{}/pull-{id}", self.replica, std::process::id())
    }

    fn storage(&self) -> StorageClient<Channel> {
        StorageClient::new(self.storage.clone())
            .max_decoding_message_size(trellis_common::grpc::MAX_MESSAGE_BYTES)
    }

    fn storage_failed(&self, status: Status) -> SourceFailure {
        SourceFailure::storage(&self.storage_socket, status)
    }

    /// Removes every layer no image uses: what pulls cut short by a crash or a kill of
    /// this service left. Called once, before any pull: none can declare a layer it
    /// needs until this is done, so none loses one to it.
    pub fn prune_at_start(self: &Arc<Self>) {
        let Some(gate) = self.inflight.pruning_now() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _gate = gate;
            let deadline = Instant::now() + STARTUP_PRUNE_PATIENCE;
            loop {
                // This replica's earlier process is gone, unless it still drains (an
                // overlapping restart): its pulls hold nothing any more.
                let released_prefix = if this.predecessor_serving {
                    String::new()
                } else {
                    format!("{}:", this.replica)
                };
                let request = traced_request(PruneLayersRequest {
                    chain_ids: Vec::new(),
                    holder: String::new(),
                    released_prefix,
                });
                match tokio::time::timeout(PRUNE_TIMEOUT, this.storage().prune_layers(request))
                    .await
                {
                    Ok(Ok(response)) => {
                        let removed = response.into_inner().removed.len();
                        tracing::info!(removed, "layers no image uses removed at start");
                        return;
                    }
                    Ok(Err(status))
                        if status.code() == Code::Unavailable && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(250)).await
                    }
                    Ok(Err(status)) => {
                        return tracing::warn!(error = %status.message(), "cannot remove the layers no image uses at start");
                    }
                    Err(_) => {
                        return tracing::warn!(
                            seconds = PRUNE_TIMEOUT.as_secs(),
                            "the storage service did not finish removing the layers no image uses"
                        );
                    }
                }
            }
        });
    }

    /// Pulls `image` (or waits for the same pull already under way) and returns it.
    /// Dropping the returned future withdraws this caller; the pull stops when no
    /// caller is left.
    pub async fn pull(
        self: &Arc<Self>,
        image: NamedRef,
        request_auth: Option<&k8s_cri::v1::AuthConfig>,
    ) -> Result<Image, Status> {
        let auth = auth_for(request_auth, &self.credentials, &image.registry)?;
        let key = format!("{image}|{}", auth_fingerprint(&auth));
        let mut started = false;
        let mut waiter = self.inflight.join(&key, |start| {
            started = true;
            // A child of the first caller's span, so storage calls stay in its trace.
            let span = tracing::info_span!("pull", container.image.name = %image);
            tokio::spawn(
                self.clone()
                    .run(key.clone(), image.clone(), auth, start)
                    .instrument(span),
            );
        });
        // A caller that joined a pull under way waits for it: its trace says so (the
        // steps are in the first caller's).
        let waiting = if started {
            tracing::Span::none()
        } else {
            step_span!("pull.wait", container.image.name = %image)
        };
        match waiter.outcome().instrument(waiting).await {
            Some(Ok(pulled)) => Ok(pulled),
            Some(Err((code, message))) => Err(Status::new(code, message)),
            None => Err(Status::internal(format!(
                "pulling {image}: the pull stopped without an answer"
            ))),
        }
    }

    /// Runs one pull to its end, answers its waiters, and removes what it left.
    async fn run(self: Arc<Self>, key: String, image: NamedRef, auth: RegistryAuth, start: Start) {
        let Start {
            id,
            abandoned,
            outcome,
        } = start;
        let started = Instant::now();
        let mut worker = tokio::spawn({
            let this = self.clone();
            let image = image.clone();
            async move { this.pull_from_sources(id, &image, &auth).await }.in_current_span()
        });
        // Waiters are answered once what the pull left is pruned, so that they see
        // the store as the pull left it; but a storage down or stuck may not prune
        // for a long time (PRUNE_TIMEOUT), and what it says is known already.
        let mut answer_first = false;
        let ended: Option<Outcome> = tokio::select! {
            joined = &mut worker => Some(match joined {
                Ok(Ok(pulled)) => Ok(pulled),
                Ok(Err(error)) => {
                    answer_first = matches!(error, ImageError::StorageDown { .. });
                    let status = Status::from(error);
                    Err((status.code(), status.message().to_string()))
                }
                Err(error) if error.is_panic() => {
                    tracing::error!(image = %image, panic = %panic_text(&error.into_panic()), "the registry client panicked; the pull fails, the service goes on");
                    Err((Code::Internal, format!("pulling {image}: the registry client failed (it panicked; the image service log says where)")))
                }
                Err(_) => Err((Code::Aborted, format!("pulling {image}: the pull was cancelled"))),
            }),
            _ = abandoned => {
                worker.abort();
                // Returns once the pull is dropped, so its streams to storage are closed.
                let _ = worker.await;
                tracing::info!(image = %image, "pull abandoned by every caller: stopped");
                None
            }
        };
        self.inflight.finished(&key, id);
        let kept = match &ended {
            Some(Ok(pulled)) => pulled.chain_ids.clone(),
            _ => Vec::new(),
        };
        if answer_first {
            outcome.send_replace(ended.clone());
        }
        self.prune_leftovers(id, &image, &kept).await;
        let pulled = match &ended {
            Some(Ok(_)) => PullOutcome::Ok,
            Some(Err((code, _))) => PullOutcome::Failed(*code),
            None => PullOutcome::Abandoned,
        };
        self.metrics.pulled(pulled, started.elapsed().as_secs_f64());
        if let Some(ended) = ended.filter(|_| !answer_first) {
            outcome.send_replace(Some(ended));
        }
    }

    /// Forgets pull `id`, removing the layers it needed or imported that neither its
    /// image (`kept`) nor any other pull under way needs.
    async fn prune_leftovers(&self, id: u64, image: &NamedRef, kept: &[String]) {
        // The usual case, a pull that got its image, need not wait for other prunes.
        if self.inflight.forget_if_clean(id, kept) {
            return;
        }
        let _gate = self.inflight.pruning().await;
        let chains = self.inflight.settle(id, kept);
        if chains.is_empty() {
            return;
        }
        let request = traced_request(PruneLayersRequest {
            chain_ids: chains.clone(),
            holder: self.holder(id),
            ..Default::default()
        });
        match tokio::time::timeout(PRUNE_TIMEOUT, self.storage().prune_layers(request)).await {
            Ok(Ok(response)) => {
                tracing::info!(image = %image, removed = response.into_inner().removed.len(), "layers a pull left without its image removed")
            }
            Ok(Err(status)) => {
                tracing::warn!(image = %image, layers = chains.len(), error = %status.message(), "cannot remove the layers a pull left; the next start of the image service will")
            }
            Err(_) => {
                tracing::warn!(image = %image, layers = chains.len(), "removing the layers a pull left timed out; the next start of the image service will")
            }
        }
    }

    async fn pull_from_sources(
        &self,
        id: u64,
        image: &NamedRef,
        auth: &RegistryAuth,
    ) -> Result<Image, ImageError> {
        let mut failures = Vec::new();
        let mut code = Code::Unavailable;
        for source in sources(&self.config, image) {
            match self.pull_from(id, image, &source, auth).await {
                Ok(pulled) => return Ok(pulled),
                Err(failure) if failure.storage_down => {
                    tracing::warn!(image = %image, error = %failure.message, "pull failed: storage is down");
                    return Err(ImageError::StorageDown {
                        image: image.to_string(),
                        message: failure.message,
                        code: failure.code,
                    });
                }
                Err(failure) => {
                    tracing::warn!(image = %image, source = %source.label, error = %failure.message, "pull source failed");
                    failures.push(format!("{}: {}", source.label, failure.message));
                    code = failure.code;
                    if failure.fatal {
                        break;
                    }
                }
            }
        }
        Err(ImageError::Registry {
            image: image.to_string(),
            failures: failures.join("; "),
            code,
        })
    }

    async fn pull_from(
        &self,
        id: u64,
        image: &NamedRef,
        source: &Source,
        auth: &RegistryAuth,
    ) -> Result<Image, SourceFailure> {
        let timeout = Duration::from_secs(self.config.pull_progress_timeout_seconds);
        // The HTTP client's own read timeout is a backstop; ours fires first and says what stalled.
        // A client of its own per pull (see `client_for`), whose TLS set-up (the root
        // certificates read and parsed) takes milliseconds: a step of its own.
        let client = step_span!("registry.client", registry.source = %source.label)
            .in_scope(|| client_for(source, timeout + Duration::from_secs(5)));
        let stalled = |what: &str| {
            let error = ImageError::Stalled {
                image: image.to_string(),
                digest: what.to_string(),
                source_name: source.label.clone(),
                seconds: timeout.as_secs(),
            };
            SourceFailure::new(Code::DeadlineExceeded, error.to_string())
        };
        // The registry's token exchange, when it asks for one, happens in here: the
        // client fetches a token at its first request.
        let manifest_step = step_span!(
            "registry.manifest",
            registry.reference = %source.reference,
            registry.source = %source.label
        );
        let (manifest, manifest_digest, list_digest) = tokio::time::timeout(
            timeout,
            client.pull_image_manifest_and_list_digest(&source.reference, auth),
        )
        .instrument(manifest_step)
        .await
        .map_err(|_| stalled("the manifest"))?
        .map_err(classify)?;
        let mut config_bytes = Vec::new();
        let config_step = step_span!("registry.config", oci.blob.digest = %manifest.config.digest);
        tokio::time::timeout(
            timeout,
            client.pull_blob(&source.reference, &manifest.config, &mut config_bytes),
        )
        .instrument(config_step)
        .await
        .map_err(|_| stalled(&manifest.config.digest))?
        .map_err(classify)?;
        let config_digest = manifest.config.digest.clone();
        let bad_config = |reason: String| SourceFailure {
            fatal: true,
            ..SourceFailure::new(
                Code::DataLoss,
                ImageError::BadConfig {
                    image: image.to_string(),
                    digest: config_digest.clone(),
                    reason,
                }
                .to_string(),
            )
        };
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad_config(format!("not JSON: {e}")))?;
        let diff_ids: Vec<String> = config
            .pointer("/rootfs/diff_ids")
            .and_then(|v| v.as_array())
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != manifest.layers.len() {
            return Err(bad_config(format!(
                "{} diff ids for {} layers",
                diff_ids.len(),
                manifest.layers.len()
            )));
        }
        let mut chain_ids: Vec<String> = Vec::with_capacity(diff_ids.len());
        for diff_id in &diff_ids {
            chain_ids.push(chain_id(chain_ids.last().map(String::as_str), diff_id));
        }
        self.inflight.need(id, &chain_ids).await;

        let image_name = image.to_string();
        let mut imports = Vec::with_capacity(manifest.layers.len());
        for (i, layer) in manifest.layers.iter().enumerate() {
            let header = LayerHeader {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                size: layer.size,
                diff_id: diff_ids[i].clone(),
                chain_id: chain_ids[i].clone(),
                parent_chain_id: if i == 0 {
                    String::new()
                } else {
                    chain_ids[i - 1].clone()
                },
                image: image_name.clone(),
                holder: self.holder(id),
            };
            imports.push(self.import_layer(id, &client, source, layer, header, timeout));
        }
        futures::stream::iter(imports)
            .buffer_unordered(PARALLEL_LAYERS)
            .try_collect::<Vec<()>>()
            .await?;

        let repo_digest = image.with_digest(list_digest.as_deref().unwrap_or(&manifest_digest));
        let record = Image {
            id: config_digest,
            repo_tags: image.tagged().into_iter().collect(),
            repo_digests: vec![repo_digest],
            size: manifest
                .layers
                .iter()
                .map(|l| l.size.max(0) as u64)
                .sum::<u64>()
                + manifest.config.size.max(0) as u64,
            chain_ids,
            config: Some(stored_config(&config)),
            config_json: String::from_utf8_lossy(&config_bytes).into_owned(),
            pulled_unix_nano: trellis_common::clock::now_nanos(),
        };
        fail_point("image.pull.before-record").await?;
        let epoch = self.index.epoch();
        let message = PutImageRequest {
            image: Some(record),
            holder: self.holder(id),
        };
        let stored = self
            .ask_storage(timeout, message, |mut storage, request| async move {
                storage.put_image(request).await
            })
            .await?;
        let image = stored.image.ok_or_else(|| SourceFailure {
            fatal: true,
            ..SourceFailure::new(Code::Internal, "storage returned no image".into())
        })?;
        self.index
            .applied(epoch, stored.generation, Change::Put(image.clone()));
        Ok(image)
    }

    /// A call to storage that must answer within the pull's progress timeout.
    /// `send` gets a client and the request (with the trace context); a call never
    /// sent (storage was draining for a restart) is sent again.
    async fn ask_storage<M, T, Fut>(
        &self,
        timeout: Duration,
        message: M,
        send: impl Fn(StorageClient<Channel>, tonic::Request<M>) -> Fut,
    ) -> Result<T, SourceFailure>
    where
        M: Clone,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let call = trellis_common::upstream::traced_call("storage", &message, |request| {
            send(self.storage(), request)
        });
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| SourceFailure::storage_stuck(&self.storage_socket, timeout))?
            .map(tonic::Response::into_inner)
            .map_err(|status| self.storage_failed(status))
    }
}

/// A fail point set by a test (debug builds only), failing the pull as Internal.
async fn fail_point(point: &'static str) -> Result<(), SourceFailure> {
    trellis_common::failpoint::hit_async(point)
        .await
        .map_err(|error| SourceFailure {
            fatal: true,
            ..SourceFailure::new(Code::Internal, error.to_string())
        })
}
