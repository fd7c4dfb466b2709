//! Who a container's process is and what it sees of its pod: user and groups,
//! environment, hostname and the files the runtime writes for the pod.

use k8s_cri::v1::*;

use super::{Observed, Side, pod_or_note, replace_all};

pub async fn identity_and_environment(side: &Side, observed: &mut Observed) {
    let kinds = [
        ("pod-network", false, true),
        ("pod-network-no-hostname", false, false),
        ("host-network", true, false),
    ];
    for (kind, host_network, hostname) in kinds {
        let Some(pod) = pod_or_note(side, kind, host_network, hostname, observed).await else {
            continue;
        };
        let users = [
            ("image-user", None),
            (
                "run-as-1000-3000-supplemental-4000",
                Some((1000, 3000, 4000)),
            ),
        ];
        for (user, ids) in users {
            let mut config = side.container(user, &["sleep", "3600"]);
            if let Some((uid, gid, supplemental)) = ids {
                config.linux = Some(LinuxContainerConfig {
                    security_context: Some(LinuxContainerSecurityContext {
                        run_as_user: Some(Int64Value { value: uid }),
                        run_as_group: Some(Int64Value { value: gid }),
                        supplemental_groups: vec![supplemental],
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            let key = format!("{kind}/{user}");
            let Some(id) = side.create_and_start(&pod, config, &key, observed).await else {
                continue;
            };
            let mut replacements = pod.replacements.clone();
            replacements.push((id.clone(), "<container-id>"));
            let views = [
                ("id", "id"),
                ("env", "env | sort"),
                ("hostname", "hostname; cat /etc/hostname"),
                ("hosts", "cat /etc/hosts"),
                ("resolv.conf", "cat /etc/resolv.conf"),
            ];
            for (what, script) in views {
                let seen = replace_all(side.exec(&id, script).await, &replacements);
                observed.insert(format!("{key}/{what}"), seen);
            }
        }
    }
}
