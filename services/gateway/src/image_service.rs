//! The CRI ImageService on the kubelet's socket: every call goes to the image service
//! as bytes (see `passthrough`); the typed service only answers methods it does not
//! know as Unimplemented.

use k8s_cri::v1::*;

use crate::backend::forwarding_impl;

pub struct Gateway;

forwarding_impl! {
    impl image_service_server::ImageService, for Gateway, service "runtime.v1.ImageService";
    forward {
        list_images(ListImagesRequest) -> ListImagesResponse = "ListImages", Idempotent;
        image_status(ImageStatusRequest) -> ImageStatusResponse = "ImageStatus", Idempotent;
        image_fs_info(ImageFsInfoRequest) -> ImageFsInfoResponse = "ImageFsInfo", Idempotent;
        pull_image(PullImageRequest) -> PullImageResponse = "PullImage", Repeatable;
        remove_image(RemoveImageRequest) -> RemoveImageResponse = "RemoveImage", Once;
    }
}
