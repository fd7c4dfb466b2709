//! OpenTelemetry: one CRI call is one trace across the services; the steps inside
//! each service are spans of their own, so a slow pod start shows where its time went.

use std::time::Duration;

use k8s_cri::v1::*;
use trellis_integration::cri::{self, Pod};
use trellis_integration::otlp::{self, ReceivedSpan, Receiver};
use trellis_integration::pods::container_config;
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions};

const WAIT: Duration = Duration::from_secs(20);

async fn traced_node(receiver_endpoint: &str, with_cni_config: bool) -> Node {
    Node::start(NodeOptions {
        env: Receiver::node_env(receiver_endpoint),
        with_cni_config,
        ..Default::default()
    })
    .await
}

/// The gateway's span of the one call to `method` (`RunPodSandbox`, ...).
fn gateway_span<'a>(spans: &'a [ReceivedSpan], method: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == "trellis-gateway" && s.name.ends_with(&format!("/{method}")))
}

/// The span of the service that served the call the gateway forwarded as `gateway`
/// (a grandchild: the gateway's client span lies between).
fn served_span<'a>(spans: &'a [ReceivedSpan], gateway: &ReceivedSpan) -> Option<&'a ReceivedSpan> {
    otlp::children(spans, gateway)
        .into_iter()
        .flat_map(|client| otlp::children(spans, client))
        .find(|s| s.name == gateway.name)
}

fn trace_of<'a>(spans: &'a [ReceivedSpan], root: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_cri_call_is_one_trace_across_gateway_and_runtime() {
    let (receiver, endpoint) = Receiver::start().await;
    let node = traced_node(&endpoint, false).await;
    node.runtime()
        .version(VersionRequest::default())
        .await
        .expect("Version");
    let (gateway, runtime) = receiver
        .wait_for("Version at the gateway and the runtime", WAIT, |spans| {
            let gateway = gateway_span(spans, "Version")?;
            let runtime = served_span(spans, gateway)?;
            Some((gateway.clone(), runtime.clone()))
        })
        .await;
    assert_eq!(gateway.trace_id.len(), 16);
    assert_ne!(gateway.trace_id, vec![0u8; 16]);
    assert_eq!(runtime.service, "trellis-runtime");
    assert_eq!(gateway.attribute("rpc.grpc.status_code"), Some("0"));
    assert_eq!(runtime.attribute("rpc.grpc.status_code"), Some("0"));
    node.stop();
}

/// A failed call's spans say so, with the code and the message, at the gateway and
/// at the service that failed it.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_call_ends_its_spans_with_an_error_status() {
    let (receiver, endpoint) = Receiver::start().await;
    let node = traced_node(&endpoint, false).await;
    let error = node
        .runtime()
        .container_status(ContainerStatusRequest {
            container_id: "f00dfeedf00dfeed".into(),
            verbose: false,
        })
        .await
        .expect_err("ContainerStatus of no container");
    assert_eq!(error.code(), tonic::Code::NotFound);
    let (gateway, runtime) = receiver
        .wait_for(
            "ContainerStatus at the gateway and the runtime",
            WAIT,
            |spans| {
                let gateway = gateway_span(spans, "ContainerStatus")?;
                let runtime = served_span(spans, gateway)?;
                Some((gateway.clone(), runtime.clone()))
            },
        )
        .await;
    for span in [&gateway, &runtime] {
        assert_eq!(span.status_code, otlp::STATUS_ERROR, "{span:#?}");
        assert_eq!(
            span.attribute("rpc.grpc.status_code"),
            Some("5"),
            "{span:#?}"
        );
        assert!(
            span.status_message.contains("NotFound") && span.status_message.contains("f00dfeed"),
            "the status says what failed: {span:#?}"
        );
    }
    assert_eq!(runtime.attribute("container.id"), Some("f00dfeedf00dfeed"));
    node.stop();
}

/// One pod start (pull, run, create, start) as the kubelet makes it: every CRI call's
/// time, at the gateway and at the service that serves it, lies at least 90 % in
/// child spans (the steps inside); the steps are there under their names, and the
/// spans carry the pod's, container's and image's names.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_start_spends_nine_tenths_of_each_call_in_named_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/busybox", "1", &built).await;
    let reference = format!("{}/tests/busybox:1", registry.address);
    let (receiver, endpoint) = Receiver::start().await;
    let node = traced_node(&endpoint, true).await;

    cri::pull(&node, &reference).await.expect("PullImage");
    let config = cri::pod_config("traced", false);
    let pod: Pod = cri::run_pod(&node, config.clone()).await;
    let container = cri::start(
        &node,
        &pod,
        container_config("sleeper", &reference, &["sleep", "600"]),
    )
    .await;

    let methods = [
        "PullImage",
        "RunPodSandbox",
        "CreateContainer",
        "StartContainer",
    ];
    // Every call's trees are in once each call's served span has arrived and a
    // moment more has passed for the spans exported with it.
    receiver
        .wait_for("the four calls' spans", WAIT, |spans| {
            methods
                .iter()
                .all(|m| {
                    gateway_span(spans, m)
                        .and_then(|g| served_span(spans, g))
                        .is_some()
                })
                .then_some(())
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spans = receiver.spans();

    let mut report = String::new();
    let mut too_much = Vec::new();
    for method in methods {
        let gateway = gateway_span(&spans, method).expect("gateway span");
        let served = served_span(&spans, gateway).expect("served span");
        report.push_str(&otlp::render_tree(&spans, gateway));
        for span in [gateway, served] {
            let outside = otlp::share_outside_children(&spans, span);
            if outside > 0.10 {
                too_much.push(format!(
                    "{} at {}: {:.1} % of {:?} outside child spans",
                    method,
                    span.service,
                    outside * 100.0,
                    span.duration()
                ));
            }
        }
    }
    println!("{report}");
    assert!(too_much.is_empty(), "{too_much:#?}\n{report}");

    let named = |method: &str, name: &str| {
        let gateway = gateway_span(&spans, method).expect("gateway span");
        trace_of(&spans, gateway)
            .into_iter()
            .any(|s| s.name == name)
    };
    for (method, step) in [
        ("PullImage", "registry.manifest"),
        ("PullImage", "layer.fetch"),
        ("PullImage", "layer.unpack"),
        ("RunPodSandbox", "cni.add"),
        ("RunPodSandbox", "namespaces.set_up"),
        ("RunPodSandbox", "record.write"),
        ("CreateContainer", "spec.build"),
        ("CreateContainer", "runc.create"),
        ("CreateContainer", "rootfs.prepare"),
        ("CreateContainer", "record.write"),
        ("StartContainer", "runc.start"),
    ] {
        assert!(
            named(method, step),
            "no {step} span in {method}'s trace:\n{report}"
        );
    }

    let served = |method: &str| {
        let gateway = gateway_span(&spans, method).expect("gateway span");
        served_span(&spans, gateway).expect("served span").clone()
    };
    let metadata = config.metadata.clone().unwrap_or_default();
    let run = served("RunPodSandbox");
    assert_eq!(run.attribute("k8s.pod.name"), Some(metadata.name.as_str()));
    assert_eq!(run.attribute("k8s.pod.uid"), Some(metadata.uid.as_str()));
    assert_eq!(
        run.attribute("k8s.namespace.name"),
        Some(metadata.namespace.as_str())
    );
    assert_eq!(run.attribute("k8s.pod.sandbox_id"), Some(pod.id.as_str()));
    let create = served("CreateContainer");
    assert_eq!(create.attribute("container.name"), Some("sleeper"));
    assert_eq!(
        create.attribute("k8s.pod.name"),
        Some(metadata.name.as_str())
    );
    assert_eq!(
        create.attribute("container.image.name"),
        Some(reference.as_str())
    );
    assert_eq!(create.attribute("container.id"), Some(container.as_str()));
    assert_eq!(
        served("StartContainer").attribute("container.id"),
        Some(container.as_str())
    );
    assert_eq!(
        served("PullImage").attribute("container.image.name"),
        Some(reference.as_str())
    );

    cri::remove_pod(&node, &pod.id).await;
    node.stop();
}
