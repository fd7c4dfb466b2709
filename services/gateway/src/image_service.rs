//! The CRI ImageService on the kubelet's socket: every call goes to the image service.

use std::sync::Arc;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;

use crate::backend::{Backends, forwarding_impl};

pub struct Gateway(pub Arc<Backends>);

impl Gateway {
    fn backends(&self) -> &Backends {
        &self.0
    }
}

forwarding_impl! {
    impl image_service_server::ImageService, for Gateway, client ImageServiceClient, backend image;
    forward {
        list_images(ListImagesRequest) -> ListImagesResponse = "ListImages", Idempotent;
        image_status(ImageStatusRequest) -> ImageStatusResponse = "ImageStatus", Idempotent;
        image_fs_info(ImageFsInfoRequest) -> ImageFsInfoResponse = "ImageFsInfo", Idempotent;
        pull_image(PullImageRequest) -> PullImageResponse = "PullImage", Once;
        remove_image(RemoveImageRequest) -> RemoveImageResponse = "RemoveImage", Once;
    }
}
