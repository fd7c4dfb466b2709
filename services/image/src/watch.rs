//! Follows the storage service's image generations for the index (see `index`): a
//! stream held open for as long as the service runs, dialled again when it breaks.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use trellis_proto::storage::v1::WatchImagesRequest;
use trellis_proto::storage::v1::storage_client::StorageClient;

use crate::index::ImageIndex;

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Runs until the process ends.
pub async fn follow(storage: Channel, index: Arc<ImageIndex>) {
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        match StorageClient::new(storage.clone())
            .watch_images(WatchImagesRequest {})
            .await
        {
            Ok(response) => {
                let mut generations = response.into_inner();
                // The first generation is storage's current one: the index starts over.
                if let Ok(Some(first)) = generations.message().await {
                    index.watching(first.generation);
                    delay = FIRST_RETRY_DELAY;
                    tracing::debug!(
                        generation = first.generation,
                        "following the storage service's image records"
                    );
                    while let Ok(Some(next)) = generations.message().await {
                        index.observed(next.generation);
                    }
                    index.lost();
                    tracing::debug!(
                        "the storage service's image generations stopped; images are read from it until they are back"
                    );
                }
            }
            Err(status) => {
                tracing::debug!(error = %status.message(), "cannot follow the storage service's image records yet");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}
