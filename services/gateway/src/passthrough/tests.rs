//! The byte path against a real tonic backend on a Unix socket: answers and errors
//! arrive as the backend sent them, and methods outside the table reach the typed
//! service.

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::*;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};
use trellis_common::config::Config;
use trellis_common::transport::unix_channel;

use super::*;
use crate::image_service;

/// An image service that knows one image.
struct OneImage;

fn the_image() -> Image {
    Image {
        id: "sha256:0123".into(),
        repo_tags: vec!["127.0.0.1:5000/one:latest".into()],
        size: 4096,
        pinned: true,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ImageService for OneImage {
    async fn list_images(
        &self,
        _: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        Ok(Response::new(ListImagesResponse {
            images: vec![the_image()],
        }))
    }
    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let asked = request.into_inner().image.unwrap_or_default().image;
        Err(Status::not_found(format!("image {asked} is not here")))
    }
    async fn pull_image(
        &self,
        _: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        Err(Status::unimplemented("no pulls"))
    }
    async fn remove_image(
        &self,
        _: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        Err(Status::unimplemented("no removals"))
    }
    async fn image_fs_info(
        &self,
        _: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        Err(Status::unimplemented("no filesystems"))
    }
}

fn serve(socket: &Path, routes: Routes) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
    })
}

/// A gateway whose image backend is `OneImage`, and a client of the gateway.
async fn gateway_over_one_image(
    dir: &Path,
) -> (
    ImageServiceClient<tonic::transport::Channel>,
    [tokio::task::JoinHandle<()>; 2],
) {
    let mut config = Config::default();
    config.node.run_dir = dir.to_path_buf();
    let backends = Arc::new(Backends::new(&config, Duration::from_secs(1)));
    let backend = serve(
        &config.endpoint(trellis_common::ServiceKind::Image).socket,
        Routes::new(ImageServiceServer::new(OneImage)),
    );
    let front = dir.join("gateway.sock");
    let gateway = serve(
        &front,
        Routes::new(Passthrough::new(
            ImageServiceServer::new(image_service::Gateway),
            backends,
            image_service::FORWARDED,
            |backends| &backends.image,
        )),
    );
    (
        ImageServiceClient::new(unix_channel(&front)),
        [backend, gateway],
    )
}

#[tokio::test]
async fn answers_and_errors_pass_through_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut client, servers) = gateway_over_one_image(dir.path()).await;

    let listed = client
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages through the gateway")
        .into_inner();
    assert_eq!(listed.images, vec![the_image()]);

    let status = client
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: "missing:1".into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .expect_err("the backend has no such image");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "image missing:1 is not here");
    servers.iter().for_each(|server| server.abort());
}

/// A method the table does not list goes to the typed service, which does not know
/// it either.
#[tokio::test]
async fn methods_outside_the_table_reach_the_typed_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_typed, servers) = gateway_over_one_image(dir.path()).await;
    let mut raw = tonic::client::Grpc::new(unix_channel(&dir.path().join("gateway.sock")));
    raw.ready().await.expect("ready");
    let status = raw
        .unary::<Bytes, Bytes, _>(
            Request::new(Bytes::new()),
            http::uri::PathAndQuery::from_static("/runtime.v1.ImageService/NoSuchMethod"),
            RawCodec,
        )
        .await
        .expect_err("no such method");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    servers.iter().for_each(|server| server.abort());
}

#[test]
fn the_tables_hold_each_forwarded_method_once_under_its_service() {
    for (service, table) in [
        (
            "runtime.v1.RuntimeService",
            crate::runtime_service::FORWARDED,
        ),
        ("runtime.v1.ImageService", image_service::FORWARDED),
    ] {
        let mut paths: Vec<&str> = table.iter().map(|method| method.path).collect();
        for method in table {
            assert_eq!(method.path, format!("/{service}/{}", method.name));
        }
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), table.len(), "{service} lists a method twice");
    }
    let runtime: Vec<&str> = crate::runtime_service::FORWARDED
        .iter()
        .map(|method| method.name)
        .collect();
    for answered_here in ["Status", "GetContainerEvents"] {
        assert!(!runtime.contains(&answered_here), "{answered_here}");
    }
    assert_eq!(image_service::FORWARDED.len(), 5, "every image method");
}
