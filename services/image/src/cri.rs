//! The CRI ImageService as the image service answers it. Image records live in the
//! storage service; this service resolves names, pulls, and translates, and answers
//! lists and statuses from its index of the records (`index`) while that is current.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_cri::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use trellis_common::bus::EventBus;
use trellis_common::reference::{self, ImageRef};
use trellis_common::telemetry::annotate;
use trellis_proto::events::v1::{ImageEvent, event::Payload, image_event};
use trellis_proto::storage::v1::storage_client::StorageClient;
use trellis_proto::storage::v1::{self as storage, FsUsageRequest, GetImageRequest};

use crate::index::{Change, ImageIndex};
use crate::pull::Puller;

pub struct ImageService {
    storage: Channel,
    /// Where `storage` dials, for messages.
    storage_socket: PathBuf,
    puller: Arc<Puller>,
    bus: EventBus,
    index: Arc<ImageIndex>,
}

fn image_name(spec: Option<&ImageSpec>, rpc: &str) -> Result<String, Status> {
    match spec.map(|s| s.image.trim()) {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(Status::invalid_argument(format!(
            "{rpc} needs an image name (ImageSpec.image is empty)"
        ))),
    }
}

/// The CRI view of a stored image.
fn to_cri(image: storage::Image) -> Image {
    let user = image
        .config
        .as_ref()
        .map(|c| c.user.clone())
        .unwrap_or_default();
    let user_part = user.split(':').next().unwrap_or_default();
    let (uid, username) = match user_part.parse::<i64>() {
        Ok(uid) => (Some(Int64Value { value: uid }), String::new()),
        Err(_) => (None, user_part.to_string()),
    };
    Image {
        id: image.id.clone(),
        repo_tags: image.repo_tags,
        repo_digests: image.repo_digests,
        size: image.size,
        uid,
        username,
        spec: Some(ImageSpec {
            image: image.id,
            ..Default::default()
        }),
        pinned: false,
    }
}

fn image_event(kind: image_event::Kind, image: &storage::Image) -> Payload {
    Payload::Image(ImageEvent {
        kind: kind.into(),
        image_id: image.id.clone(),
        repo_tags: image.repo_tags.clone(),
        repo_digests: image.repo_digests.clone(),
        size_bytes: image.size,
    })
}

impl ImageService {
    pub fn new(
        storage: Channel,
        storage_socket: PathBuf,
        puller: Arc<Puller>,
        bus: EventBus,
        index: Arc<ImageIndex>,
    ) -> Self {
        Self {
            storage,
            storage_socket,
            puller,
            bus,
            index,
        }
    }

    fn storage(&self) -> StorageClient<Channel> {
        StorageClient::new(self.storage.clone())
            .max_decoding_message_size(trellis_common::grpc::MAX_MESSAGE_BYTES)
    }

    /// A call to storage within what the caller's deadline leaves, failing with
    /// words that name storage (see `trellis_common::upstream`).
    /// `send` gets a client and the request (with the trace context); a call never
    /// sent (storage was draining for a restart) is sent again.
    async fn ask<M, T, Fut>(
        &self,
        message: M,
        send: impl Fn(StorageClient<Channel>, Request<M>) -> Fut,
    ) -> Result<T, Status>
    where
        M: Clone,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        use trellis_common::upstream::{no_answer_message, pass_on, time_left, traced_call};
        let call = traced_call("storage", &message, |request| send(self.storage(), request));
        let answer = match time_left() {
            None => call.await,
            Some(left) => tokio::time::timeout(left, call).await.map_err(|_| {
                Status::deadline_exceeded(no_answer_message("storage", &self.storage_socket, left))
            })?,
        };
        answer
            .map(Response::into_inner)
            .map_err(|status| pass_on("storage", &self.storage_socket, &status))
    }

    /// Every image: from the index when it is current, else listed by storage (and
    /// the index rebuilt from that listing).
    async fn list(&self) -> Result<Vec<storage::Image>, Status> {
        if let Some(images) = self.index.list() {
            return Ok(images);
        }
        let listing = self.index.listing();
        let listed = self
            .ask(
                storage::ListImagesRequest {},
                |mut client, request| async move { client.list_images(request).await },
            )
            .await?;
        self.index
            .install(listing, listed.images.clone(), listed.generation);
        Ok(listed.images)
    }

    /// The image `reference` names, if any: from the index when it is current (after
    /// a listing if it was not), else from storage.
    async fn find(&self, reference: &str) -> Result<Option<storage::Image>, Status> {
        if let Some(found) = self.index.resolve(reference) {
            return Ok(found);
        }
        if self.index.list().is_none() {
            self.list().await?;
            if let Some(found) = self.index.resolve(reference) {
                return Ok(found);
            }
        }
        self.stored(reference).await
    }

    /// The image `reference` names, as storage has it (with its config as pulled).
    async fn stored(&self, reference: &str) -> Result<Option<storage::Image>, Status> {
        let message = GetImageRequest {
            reference: reference.to_string(),
        };
        let asked = self.ask(message, |mut client, request| async move {
            client.get_image(request).await
        });
        match asked.await {
            Ok(image) => Ok(Some(image)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    fn publish(&self, payload: Payload) {
        if let Err(error) = self.bus.publish(payload) {
            tracing::error!(%error, "cannot record an image event");
        }
    }
}

#[tonic::async_trait]
impl image_service_server::ImageService for ImageService {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|spec| spec.image)
            .filter(|name| !name.is_empty());
        let images = match filter {
            Some(name) => self.find(&name).await?.into_iter().collect(),
            None => self.list().await?,
        };
        Ok(Response::new(ListImagesResponse {
            images: images.into_iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref(), "ImageStatus")?;
        annotate(&[("container.image.name", &name)]);
        // The index keeps no config as pulled, which verbose status shows.
        let found = if request.verbose {
            self.stored(&name).await?
        } else {
            self.find(&name).await?
        };
        let Some(image) = found else {
            return Ok(Response::new(ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if request.verbose {
            let verbose = serde_json::json!({
                "chainIds": image.chain_ids,
                "config": serde_json::from_str::<serde_json::Value>(&image.config_json).unwrap_or_default(),
                "pulledUnixNano": image.pulled_unix_nano,
            });
            info.insert("info".to_string(), verbose.to_string());
        }
        Ok(Response::new(ImageStatusResponse {
            image: Some(to_cri(image)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref(), "PullImage")?;
        annotate(&[("container.image.name", &name)]);
        let named =
            match reference::parse(&name).map_err(|e| Status::invalid_argument(e.to_string()))? {
                ImageRef::Named(named) => named,
                ImageRef::Id(id) => {
                    return Err(Status::invalid_argument(format!(
                        "cannot pull an image id ({id}); give a name with a tag or digest"
                    )));
                }
            };
        // tonic's server drops this call at the caller's `grpc-timeout`, as when the
        // caller hangs up; either way this caller withdraws from the pull.
        let image = self.puller.pull(named, request.auth.as_ref()).await?;
        tracing::info!(image = %name, id = %image.id, "pulled");
        self.publish(image_event(image_event::Kind::Pulled, &image));
        Ok(Response::new(PullImageResponse {
            image_ref: image.id,
        }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let name = image_name(request.get_ref().image.as_ref(), "RemoveImage")?;
        annotate(&[("container.image.name", &name)]);
        let epoch = self.index.epoch();
        let message = storage::RemoveImageRequest { reference: name };
        let removal = self
            .ask(message, |mut client, request| async move {
                client.remove_image(request).await
            })
            .await?;
        if let Some(image) = removal.image {
            if removal.deleted {
                self.publish(image_event(image_event::Kind::Removed, &image));
            }
            let change = Change::Removed {
                image,
                deleted: removal.deleted,
            };
            self.index.applied(epoch, removal.generation, change);
        }
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let usage = self
            .ask(FsUsageRequest {}, |mut client, request| async move {
                client.fs_usage(request).await
            })
            .await?;
        let filesystem = FilesystemUsage {
            timestamp: usage.timestamp_unix_nano,
            fs_id: Some(FilesystemIdentifier {
                mountpoint: usage.mountpoint,
            }),
            used_bytes: Some(UInt64Value {
                value: usage.used_bytes,
            }),
            inodes_used: Some(UInt64Value {
                value: usage.inodes_used,
            }),
        };
        // Container writable layers live in the same store until the runtime service
        // reports them separately.
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![filesystem.clone()],
            container_filesystems: vec![filesystem],
        }))
    }
}
