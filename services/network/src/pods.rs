//! Setting pod networks up and tearing them down: the namespace, the loopback, the
//! CNI chain, with intent recorded before each change and repaired on start.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Map, Value};
use tracing::Instrument;
use trellis_common::bus::EventBus;
use trellis_common::config::Config;
use trellis_common::locks::KeyedLocks;
use trellis_common::store::Store;
use trellis_proto::events::v1::event::Payload;
use trellis_proto::events::v1::{NetworkEvent, network_event};

use crate::cni::result::{CniResult, PodAddress};
use crate::cni::{self, Attachment, POD_INTERFACE};
use crate::cni_config;
use crate::error::NetworkError;
use crate::metrics::NetworkMetrics;
use crate::netns;
use crate::records::{PodRecord, PodState, Records};

/// Who the pod is, as the plugins are told in `CNI_ARGS`.
pub struct PodIdentity {
    pub sandbox_id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

pub struct Pods {
    config_dir: PathBuf,
    plugins: cni::Plugins,
    run_dir: PathBuf,
    records: Records,
    /// One operation per sandbox at a time: a SetUpPod and a TearDownPod of one pod
    /// must not interleave their plugin calls. Different pods do not wait.
    locks: KeyedLocks,
    bus: EventBus,
    metrics: NetworkMetrics,
    /// Turns for CNI plugin chains (see `network.max_parallel_cni`).
    cni_slots: tokio::sync::Semaphore,
}

impl Pods {
    pub fn new(
        config: &Config,
        store: &dyn Store,
        bus: EventBus,
        metrics: NetworkMetrics,
    ) -> Result<Self, NetworkError> {
        Ok(Self {
            config_dir: config.network.cni_config_dir.clone(),
            plugins: cni::Plugins {
                dirs: config.network.cni_plugin_dirs.clone(),
                timeout: std::time::Duration::from_secs(config.network.cni_plugin_timeout_seconds),
                metrics: metrics.clone(),
            },
            run_dir: config.node.run_dir.clone(),
            records: Records::open(store)?,
            locks: KeyedLocks::new(),
            bus,
            metrics,
            cni_slots: tokio::sync::Semaphore::new(trellis_common::config::parallelism(
                config.network.max_parallel_cni,
                2,
            )),
        })
    }

    pub fn network_status(&self) -> Result<cni_config::CniNetwork, cni_config::CniError> {
        cni_config::load_network(&self.config_dir, &self.plugins.dirs)
    }

    /// Sets the pod's network up, or answers the one it has. A failed set-up is rolled
    /// back before the error is returned.
    pub async fn set_up(
        &self,
        pod: PodIdentity,
        host_network: bool,
        runtime_config: Map<String, Value>,
    ) -> Result<PodRecord, NetworkError> {
        let _serialised = self.locks.lock(&pod.sandbox_id).await;
        match self.records.get(&pod.sandbox_id)? {
            Some(existing) if existing.state == PodState::Ready => return Ok(existing),
            // What an earlier failure left is cleaned before starting again.
            Some(unfinished) => self.detach(unfinished).await?,
            None => {}
        }
        if host_network {
            let record = PodRecord {
                sandbox_id: pod.sandbox_id,
                state: PodState::Ready,
                host_network: true,
                config_file: PathBuf::new(),
                network_name: String::new(),
                attachment: None,
                result: None,
            };
            self.records.settle(&record)?;
            return Ok(record);
        }
        let network = self.network_status().map_err(NetworkError::not_ready)?;
        let attachment = Attachment {
            netns: netns::pin_path(&self.run_dir, &pod.sandbox_id),
            args: cni::kubernetes_args(&pod.namespace, &pod.name, &pod.sandbox_id, &pod.uid),
            sandbox_id: pod.sandbox_id.clone(),
            network: network.config,
            runtime_config,
        };
        let mut record = PodRecord {
            sandbox_id: pod.sandbox_id,
            state: PodState::Adding,
            host_network: false,
            config_file: network.file,
            network_name: network.name,
            attachment: Some(attachment),
            result: None,
        };
        let started = Instant::now();
        self.records.begin(&record)?;
        match self.attach(&mut record).await {
            Ok(addresses) => {
                record.state = PodState::Ready;
                self.records.settle(&record)?;
                self.metrics.observe_add(started.elapsed());
                self.publish(network_event::Kind::SetUp, &record, &addresses);
                tracing::info!(sandbox_id = %record.sandbox_id, ips = ?addresses.iter().map(|a| a.ip).collect::<Vec<_>>(), elapsed = ?started.elapsed(), "pod network set up");
                Ok(record)
            }
            Err(error) => {
                self.metrics.failed("add", error.plugin());
                tracing::warn!(sandbox_id = %record.sandbox_id, %error, "pod network set-up failed; rolling back");
                let sandbox_id = record.sandbox_id.clone();
                match self.detach(record).await {
                    Ok(()) => Err(error),
                    Err(rollback) => Err(NetworkError::RollbackFailed {
                        sandbox_id,
                        error: Box::new(error),
                        rollback: Box::new(rollback),
                    }),
                }
            }
        }
    }

    /// Namespace (with its loopback up), ADD chain; the result is kept in `record` as soon as there
    /// is one, so a roll-back hands it to DEL.
    async fn attach(&self, record: &mut PodRecord) -> Result<Vec<PodAddress>, NetworkError> {
        let Some(attachment) = record.attachment.as_ref() else {
            return Ok(Vec::new());
        };
        let _turn = self.cni_turn().await?;
        netns::create(&attachment.netns, &attachment.sandbox_id).await?;
        trellis_common::failpoint::hit_async("network.setup.after-netns").await?;
        let result = cni::add(attachment, &self.plugins).await?;
        record.result = Some(result.clone());
        trellis_common::failpoint::hit_async("network.setup.after-add").await?;
        addresses(record)
    }

    async fn cni_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, NetworkError> {
        if let Ok(turn) = self.cni_slots.try_acquire() {
            return Ok(turn);
        }
        // A wait for a turn is a step of its own in the trace: under a burst of pods it
        // can be most of a set-up's time.
        let span = trellis_common::step_span!("cni.wait");
        self.cni_slots
            .acquire()
            .instrument(span)
            .await
            .map_err(|_| NetworkError::ShuttingDown)
    }

    /// Tears the pod's network down; a pod with none is fine.
    pub async fn tear_down(&self, sandbox_id: &str) -> Result<(), NetworkError> {
        let _serialised = self.locks.lock(sandbox_id).await;
        match self.records.get(sandbox_id)? {
            Some(record) => {
                let started = Instant::now();
                let event = (record.state == PodState::Ready && !record.host_network)
                    .then(|| (record.clone(), addresses(&record).unwrap_or_default()));
                self.detach(record)
                    .await
                    .inspect_err(|error| self.metrics.failed("del", error.plugin()))?;
                if let Some((record, addresses)) = event {
                    self.metrics.observe_del(started.elapsed());
                    self.publish(network_event::Kind::TornDown, &record, &addresses);
                }
                Ok(())
            }
            // No record, but perhaps a pin from outside the records' knowledge.
            None => {
                Ok(netns::remove(&netns::pin_path(&self.run_dir, sandbox_id), sandbox_id).await?)
            }
        }
    }

    /// DEL chain, then the namespace, then the records; the intent is recorded first.
    /// A DEL that fails keeps the namespace and the record (as Removing), so a retry
    /// hands the plugins everything again.
    async fn detach(&self, mut record: PodRecord) -> Result<(), NetworkError> {
        record.state = PodState::Removing;
        self.records.begin_removal(&record)?;
        if let Some(attachment) = &record.attachment {
            let netns_exists = netns::is_pinned(&attachment.netns);
            let _turn = self.cni_turn().await?;
            cni::del(
                attachment,
                record.result.as_ref(),
                netns_exists,
                &self.plugins,
            )
            .await?;
            netns::remove(&attachment.netns, &record.sandbox_id).await?;
        }
        self.records.forget(&record.sandbox_id)
    }

    /// The pod's record; with `check`, the CNI CHECK chain is run against it first.
    pub async fn status(
        &self,
        sandbox_id: &str,
        check: bool,
    ) -> Result<(PodRecord, Vec<PodAddress>), NetworkError> {
        let _serialised = self.locks.lock(sandbox_id).await;
        let record = self
            .records
            .get(sandbox_id)?
            .ok_or_else(|| NetworkError::NotFound(sandbox_id.to_string()))?;
        if check
            && record.state == PodState::Ready
            && let (Some(attachment), Some(result)) = (&record.attachment, &record.result)
        {
            cni::check(attachment, result, &self.plugins).await?;
        }
        let addresses = addresses(&record)?;
        Ok((record, addresses))
    }

    /// Finishes or rolls back whatever a crash interrupted: an ADD not recorded as
    /// done is undone (DEL, namespace removed, record deleted); a DEL is finished.
    pub async fn recover(&self) -> Result<(), NetworkError> {
        while let Some((record, finished)) = self.records.first_in_flight()? {
            let sandbox_id = record.sandbox_id.clone();
            if record.state == PodState::Adding && finished {
                // The crash came between recording "done" and dropping the intent.
                tracing::info!(%sandbox_id, "pod network set-up had completed; dropping its intent");
                self.records.drop_intent(&sandbox_id)?;
                continue;
            }
            tracing::warn!(%sandbox_id, state = ?record.state, "repairing a pod network interrupted by a restart");
            if let Err(error) = self.detach(record.clone()).await {
                tracing::error!(%sandbox_id, %error, "cannot repair the pod network now; TearDownPod will retry");
                self.records.settle(&PodRecord {
                    state: PodState::Removing,
                    ..record
                })?;
            }
        }
        Ok(())
    }

    fn publish(&self, kind: network_event::Kind, record: &PodRecord, addresses: &[PodAddress]) {
        let event = NetworkEvent {
            kind: kind.into(),
            sandbox_id: record.sandbox_id.clone(),
            netns_path: record
                .attachment
                .as_ref()
                .map(|a| a.netns.display().to_string())
                .unwrap_or_default(),
            ips: addresses.iter().map(|a| a.ip.to_string()).collect(),
        };
        if let Err(error) = self.bus.publish(Payload::Network(event)) {
            tracing::error!(%error, sandbox_id = %record.sandbox_id, "cannot record a network event");
        }
    }
}

impl Pods {
    /// The addresses of the pods whose network is set up.
    pub fn addresses_in_use(&self) -> Result<usize, NetworkError> {
        let ready = self.records.finished()?;
        Ok(ready
            .iter()
            .filter(|record| record.state == PodState::Ready)
            .map(|record| addresses(record).map_or(0, |found| found.len()))
            .sum())
    }
}

/// The pod's addresses from its recorded result.
pub fn addresses(record: &PodRecord) -> Result<Vec<PodAddress>, NetworkError> {
    let Some(result) = record.result.as_ref() else {
        return Ok(Vec::new());
    };
    let bad = |message: String| NetworkError::BadResult {
        sandbox_id: record.sandbox_id.clone(),
        network: record.network_name.clone(),
        message,
    };
    CniResult::parse(result)
        .and_then(|r| r.pod_addresses(POD_INTERFACE))
        .map_err(bad)
}
