//! The steps inside the image, storage and network services are spans of their own,
//! with the attributes that say which image, layer, pod or plugin they were for: a
//! slow pull or pod network shows which registry request, layer, unpack or CNI plugin
//! took the time (issue 14, item 2).

use std::time::Duration;

use trellis_integration::cri::{self, Pod};
use trellis_integration::otlp::{self, ReceivedSpan, Receiver, TracedNode};
use trellis_integration::pods::container_config;
use trellis_integration::registry::{Registry, small_image};
use trellis_integration::{Node, NodeOptions};

const WAIT: Duration = Duration::from_secs(20);
/// The most of a call's time its steps may leave unexplained.
const MOST_OUTSIDE: f64 = 0.10;

/// The one span of `service` serving `method` (`Network/SetUpPod`, ...).
fn served<'a>(spans: &'a [ReceivedSpan], service: &str, method: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name.ends_with(&format!(".{method}")))
}

fn named<'a>(spans: &'a [ReceivedSpan], below: &ReceivedSpan, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == below.trace_id && s.name == name && is_below(spans, s, below))
        .collect()
}

/// Whether `span` is a descendant of `ancestor`.
fn is_below(spans: &[ReceivedSpan], span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
    let mut parent = span.parent_span_id.clone();
    while !parent.is_empty() {
        if parent == ancestor.span_id {
            return true;
        }
        parent = spans
            .iter()
            .find(|s| s.trace_id == span.trace_id && s.span_id == parent)
            .map(|s| s.parent_span_id.clone())
            .unwrap_or_default();
    }
    false
}

/// `span`'s time outside its children, as a complaint when above [`MOST_OUTSIDE`].
fn too_much_outside(spans: &[ReceivedSpan], span: &ReceivedSpan) -> Option<String> {
    let outside = otlp::share_outside_children(spans, span);
    (outside > MOST_OUTSIDE).then(|| {
        format!(
            "{} at {}: {:.1} % of {:?} outside child spans",
            span.name,
            span.service,
            outside * 100.0,
            span.duration()
        )
    })
}

/// Pulls a two-layer image, runs a pod with a network, creates a container and
/// removes the pod; then reads the spans of the image, storage and network services.
#[tokio::test(flavor = "multi_thread")]
async fn pull_rootfs_and_pod_network_steps_are_spans_with_their_attributes() {
    let built = small_image("traced-steps");
    let traced = TracedNode::start("tests/steps", &built).await;
    let (node, receiver, reference) = (&traced.node, &traced.receiver, &traced.reference);

    cri::pull(node, reference).await.expect("PullImage");
    let config = cri::pod_config("steps", false);
    let pod: Pod = cri::run_pod(node, config.clone()).await;
    let container = cri::create(
        node,
        &pod,
        container_config("sleeper", reference, &["sleep", "600"]),
    )
    .await
    .expect("CreateContainer");
    cri::remove_pod(node, &pod.id).await;

    let calls = [
        ("trellis-image", "ImageService/PullImage"),
        ("trellis-network", "Network/SetUpPod"),
        ("trellis-network", "Network/TearDownPod"),
        ("trellis-storage", "Storage/PrepareRootfs"),
        ("trellis-storage", "Storage/ReleaseRootfs"),
    ];
    receiver
        .wait_for("the served calls' spans", WAIT, |spans| {
            calls
                .iter()
                .all(|(service, method)| served(spans, service, method).is_some())
                .then_some(())
        })
        .await;
    // The steps are exported with or before their call's span; a moment more for
    // the last batch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spans = receiver.spans();
    let call = |service: &str, method: &str| {
        served(&spans, service, method)
            .unwrap_or_else(|| panic!("no {method} span"))
            .clone()
    };
    let pull = call("trellis-image", "ImageService/PullImage");
    let set_up = call("trellis-network", "Network/SetUpPod");
    let tear_down = call("trellis-network", "Network/TearDownPod");
    let prepare = call("trellis-storage", "Storage/PrepareRootfs");
    let release = call("trellis-storage", "Storage/ReleaseRootfs");
    let mut report = String::new();
    for span in [&pull, &set_up, &tear_down, &prepare, &release] {
        report.push_str(&otlp::render_tree(&spans, span));
    }
    println!("{report}");

    // The pull: its registry requests, each layer's fetch with storage's import (and
    // its unpack) under it.
    assert_eq!(
        pull.attribute("container.image.name"),
        Some(reference.as_str()),
        "{pull:#?}"
    );
    let manifest = named(&spans, &pull, "registry.manifest");
    assert_eq!(manifest.len(), 1, "one manifest fetch:\n{report}");
    assert!(
        manifest[0]
            .attribute("registry.reference")
            .is_some_and(|r| r.ends_with("tests/steps:1")),
        "{:#?}",
        manifest[0]
    );
    let config_fetch = named(&spans, &pull, "registry.config");
    assert_eq!(config_fetch.len(), 1, "one config fetch:\n{report}");
    let fetches = named(&spans, &pull, "layer.fetch");
    let unpacks = named(&spans, &pull, "layer.unpack");
    assert_eq!(fetches.len(), 2, "a fetch per layer:\n{report}");
    assert_eq!(unpacks.len(), 2, "an unpack per layer:\n{report}");
    for layer in &built.layers {
        let digest = layer.digest();
        let fetch = fetches
            .iter()
            .find(|s| s.attribute("layer.digest") == Some(digest.as_str()))
            .unwrap_or_else(|| panic!("no layer.fetch of {digest}:\n{report}"));
        assert_eq!(
            fetch.attribute("layer.size"),
            Some(layer.blob.len().to_string().as_str()),
            "{fetch:#?}"
        );
        assert_eq!(
            named(&spans, fetch, "registry.blob").len(),
            1,
            "the blob's request under its fetch:\n{report}"
        );
        let import = spans
            .iter()
            .find(|s| s.name.ends_with("Storage/ImportLayer") && is_below(&spans, s, fetch))
            .unwrap_or_else(|| panic!("no ImportLayer under the fetch of {digest}:\n{report}"));
        assert_eq!(
            import.attribute("container.image.name"),
            Some(reference.as_str())
        );
        let unpack = named(&spans, import, "layer.unpack");
        assert_eq!(unpack.len(), 1, "the unpack under its import:\n{report}");
        assert_eq!(unpack[0].attribute("layer.digest"), Some(digest.as_str()));
        assert!(
            unpack[0]
                .attribute("layer.unpacked_bytes")
                .and_then(|b| b.parse::<u64>().ok())
                .is_some_and(|b| b > 0),
            "{:#?}",
            unpack[0]
        );
    }

    // The pod network: the namespace and each plugin, with the pod's names on the call.
    let metadata = config.metadata.clone().unwrap_or_default();
    for (key, value) in [
        ("k8s.pod.name", metadata.name.as_str()),
        ("k8s.namespace.name", metadata.namespace.as_str()),
        ("k8s.pod.uid", metadata.uid.as_str()),
        ("k8s.pod.sandbox_id", pod.id.as_str()),
    ] {
        assert_eq!(set_up.attribute(key), Some(value), "{key}: {set_up:#?}");
    }
    assert_eq!(named(&spans, &set_up, "netns.create").len(), 1, "{report}");
    assert_eq!(
        named(&spans, &tear_down, "netns.remove").len(),
        1,
        "{report}"
    );
    for (call, step) in [(&set_up, "cni.add"), (&tear_down, "cni.del")] {
        let mut plugins: Vec<&str> = named(&spans, call, step)
            .into_iter()
            .map(|s| {
                assert!(
                    s.attribute("cni.network").is_some_and(|n| !n.is_empty()),
                    "{s:#?}"
                );
                s.attribute("cni.plugin").unwrap_or_default()
            })
            .collect();
        plugins.sort();
        assert_eq!(
            plugins,
            ["bridge", "portmap"],
            "{step} per plugin:\n{report}"
        );
    }

    // The container's root filesystem.
    for (call, step) in [(&prepare, "rootfs.prepare"), (&release, "rootfs.remove")] {
        assert_eq!(call.attribute("container.id"), Some(container.as_str()));
        let steps = named(&spans, call, step);
        assert_eq!(steps.len(), 1, "{step}:\n{report}");
        assert_eq!(steps[0].attribute("container.id"), Some(container.as_str()));
    }

    // Each call's time is in its steps.
    let pull_task = otlp::children(&spans, &pull)
        .into_iter()
        .find(|s| s.name == "pull")
        .expect("the pull under PullImage")
        .clone();
    let too_much: Vec<String> = [&pull, &pull_task, &set_up, &tear_down]
        .into_iter()
        .filter_map(|span| too_much_outside(&spans, span))
        .collect();
    assert!(too_much.is_empty(), "{too_much:#?}\n{report}");

    traced.stop();
}

/// A PullImage that joins a pull of the same image under way spends its time in a
/// `pull.wait` step: the pull's own steps are in the first caller's trace.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_joining_one_under_way_waits_in_a_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    registry
        .push("tests/joined", "1", &small_image("joined-pull"))
        .await;
    let reference = format!("{}/tests/joined:1", registry.address);
    let (receiver, endpoint) = Receiver::start().await;
    let node = Node::start(NodeOptions {
        env: Receiver::node_env(&endpoint),
        // The first pull holds on before recording its image, for the second to join.
        failpoints: Some("image.pull.before-record=1*sleep(3000)".into()),
        ..Default::default()
    })
    .await;

    let first = cri::pull_in_background(&node, &reference);
    // Both layers fetched: the first pull is at its fail point, or nearly.
    receiver
        .wait_for("the first pull's layers", WAIT, |spans| {
            (spans.iter().filter(|s| s.name == "layer.fetch").count() == 2).then_some(())
        })
        .await;
    cri::pull(&node, &reference)
        .await
        .expect("the joining PullImage");
    first
        .await
        .expect("the first pull's task")
        .expect("the first PullImage");

    let calls = receiver
        .wait_for("both PullImage spans", WAIT, |spans| {
            let calls: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.service == "trellis-image" && s.name.ends_with("/PullImage"))
                .cloned()
                .collect();
            (calls.len() == 2).then_some(calls)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spans = receiver.spans();
    // The pull or the wait for it; every call also publishes and answers.
    let step_of = |call: &ReceivedSpan| {
        otlp::children(&spans, call)
            .into_iter()
            .map(|s| s.name.clone())
            .filter(|name| name.starts_with("pull"))
            .collect::<Vec<_>>()
    };
    let mut steps: Vec<Vec<String>> = calls.iter().map(step_of).collect();
    steps.sort();
    assert_eq!(steps, [["pull"], ["pull.wait"]], "one pulls, one waits");
    let joined = calls
        .iter()
        .find(|call| step_of(call) == ["pull.wait"])
        .expect("the joining call");
    assert!(
        joined.duration() > Duration::from_secs(1),
        "it waited for the first: {joined:#?}"
    );
    assert_eq!(too_much_outside(&spans, joined), None);
    let wait = otlp::children(&spans, joined)
        .into_iter()
        .find(|s| s.name == "pull.wait")
        .expect("the wait");
    assert_eq!(
        wait.attribute("container.image.name"),
        Some(reference.as_str())
    );
    node.stop();
}
