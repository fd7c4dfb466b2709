//! The CRI ImageService as the image service answers it.

use k8s_cri::v1::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use trellis_common::grpc_service_impl;
use trellis_common::telemetry::inject_grpc_context;
use trellis_proto::storage::v1::FsUsageRequest;
use trellis_proto::storage::v1::storage_client::StorageClient;

pub struct ImageService {
    storage: Channel,
}

impl ImageService {
    pub fn new(storage: Channel) -> Self {
        Self { storage }
    }
}

grpc_service_impl! {
    impl image_service_server::ImageService, for ImageService, service "image";
    unimplemented {
        list_images(ListImagesRequest) -> ListImagesResponse,
        image_status(ImageStatusRequest) -> ImageStatusResponse,
        pull_image(PullImageRequest) -> PullImageResponse,
        remove_image(RemoveImageRequest) -> RemoveImageResponse,
    }

    async fn image_fs_info(&self, _request: Request<ImageFsInfoRequest>) -> Result<Response<ImageFsInfoResponse>, Status> {
        let mut request = Request::new(FsUsageRequest {});
        inject_grpc_context(request.metadata_mut());
        let usage = StorageClient::new(self.storage.clone()).fs_usage(request).await?.into_inner();
        let filesystem = FilesystemUsage {
            timestamp: usage.timestamp_unix_nano,
            fs_id: Some(FilesystemIdentifier { mountpoint: usage.mountpoint }),
            used_bytes: Some(UInt64Value { value: usage.used_bytes }),
            inodes_used: Some(UInt64Value { value: usage.inodes_used }),
        };
        // Container writable layers live in the same store until the runtime service
        // reports them separately.
        Ok(Response::new(ImageFsInfoResponse { image_filesystems: vec![filesystem.clone()], container_filesystems: vec![filesystem] }))
    }
}
