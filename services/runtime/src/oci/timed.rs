//! An OCI runtime whose steps are timed for the metrics and traced (one span each,
//! `runc.create`, `runc.start`, ...): wraps the real one, so the lifecycle and the
//! conmon code stay as they are.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{ExecOutput, Exit, Launch, OciRuntime};
use crate::error::RuntimeError;
use crate::metrics::RuntimeMetrics;

pub struct Timed {
    inner: Arc<dyn OciRuntime>,
    metrics: RuntimeMetrics,
}

impl Timed {
    pub fn new(inner: Arc<dyn OciRuntime>, metrics: RuntimeMetrics) -> Self {
        Self { inner, metrics }
    }

    /// Times one step, failed or not: a slow failure is as slow for the pod.
    async fn timed<T>(
        &self,
        operation: &'static str,
        step: impl Future<Output = Result<T, RuntimeError>>,
    ) -> Result<T, RuntimeError> {
        let span = trellis_common::step_span!("oci", otel.name = %format!("runc.{operation}"));
        let started = Instant::now();
        let result = step.instrument(span.clone()).await;
        self.metrics.oci_step(operation, started.elapsed());
        if let Err(error) = &result {
            trellis_common::telemetry::record_error(&span, error);
        }
        result
    }
}

#[tonic::async_trait]
impl OciRuntime for Timed {
    async fn create(&self, launch: &Launch<'_>) -> Result<u32, RuntimeError> {
        self.timed("create", self.inner.create(launch)).await
    }

    async fn start(&self, runtime: &Path, id: &str, pid: u32) -> Result<(), RuntimeError> {
        self.timed("start", self.inner.start(runtime, id, pid))
            .await
    }

    async fn update(
        &self,
        runtime: &Path,
        id: &str,
        resources_json: &[u8],
    ) -> Result<(), RuntimeError> {
        self.timed("update", self.inner.update(runtime, id, resources_json))
            .await
    }

    async fn kill(&self, runtime: &Path, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.timed("kill", self.inner.kill(runtime, id, signal))
            .await
    }

    async fn delete(&self, runtime: &Path, id: &str) -> Result<(), RuntimeError> {
        self.timed("delete", self.inner.delete(runtime, id)).await
    }

    fn exit(&self, id: &str, bundle: &Path) -> Option<Exit> {
        self.inner.exit(id, bundle)
    }

    fn exited(&self) -> HashSet<String> {
        self.inner.exited()
    }

    fn forget_exit(&self, id: &str) {
        self.inner.forget_exit(id)
    }

    fn forget_others(&self, known: &HashSet<String>) {
        self.inner.forget_others(known)
    }

    async fn exec_sync(
        &self,
        runtime: &Path,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, RuntimeError> {
        self.timed("exec_sync", self.inner.exec_sync(runtime, id, cmd, timeout))
            .await
    }

    async fn reopen_log(&self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        self.inner.reopen_log(id, bundle).await
    }
}
