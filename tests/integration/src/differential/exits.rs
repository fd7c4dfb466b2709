//! How a process's end is reported (exit code and reason), and where and how a
//! command that cannot run fails.

use k8s_cri::v1::*;

use super::{Observed, Side, code_of, pod_or_note};

/// The memory limit of the container that allocates more than it.
const OOM_LIMIT: i64 = 32 << 20;

pub async fn exits(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "exits", true, false, observed).await else {
        return;
    };
    // dd's block buffer is one allocation it fills from /dev/zero: 64 MiB touched.
    let allocate = "dd if=/dev/zero of=/dev/null bs=64M count=1";
    let cases: [(&str, &[&str]); 7] = [
        ("exit-0", &["/bin/sh", "-c", "exit 0"]),
        ("exit-3", &["/bin/sh", "-c", "exit 3"]),
        ("stopped-after-sigterm-ignored", &["sleep", "3600"]),
        ("oom", &["/bin/sh", "-c", allocate]),
        ("missing-executable", &["/no/such/binary"]),
        ("missing-from-path", &["no-such-command"]),
        ("not-executable", &["/etc/passwd"]),
    ];
    for (case, command) in cases {
        let key = |what: &str| format!("exits/{case}/{what}");
        let mut config = side.container(case, command);
        if case == "oom" {
            config.linux = Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    memory_limit_in_bytes: OOM_LIMIT,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let id = match side.create(&pod, config).await {
            Ok(id) => id,
            Err(status) => {
                observed.insert(key("create"), format!("{:?}", status.code()));
                continue;
            }
        };
        let started = side.start(&id).await;
        observed.insert(key("start"), code_of(&started));
        if case.starts_with("stopped") {
            // PID 1 without a handler ignores SIGTERM: SIGKILL after the timeout.
            let stopped = side
                .runtime
                .clone()
                .stop_container(StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 1,
                })
                .await;
            observed.insert(key("stop"), code_of(&stopped));
        }
        let status = if started.is_ok() {
            side.wait_exited(&id).await
        } else {
            side.status(&id).await.unwrap_or_default()
        };
        observed.insert(
            key("status"),
            format!(
                "{:?} exit {} reason {:?}",
                ContainerState::try_from(status.state).unwrap_or(ContainerState::ContainerUnknown),
                status.exit_code,
                status.reason
            ),
        );
    }
}
