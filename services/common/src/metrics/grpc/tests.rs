use tower::{Layer, Service, ServiceExt};

use super::*;

const TEST: GrpcService = GrpcService {
    name: "test.v1.Test",
    methods: &["Get", "Put"],
};

fn text(registry: &Registry) -> String {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry).expect("encode");
    body
}

fn handled(body: &str, method: &str, code: &str) -> Option<u64> {
    let series = format!(
        "trellis_grpc_server_handled_total{{grpc_service=\"test.v1.Test\",grpc_method=\"{method}\",grpc_code=\"{code}\"}} "
    );
    body.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.parse().expect("a count"))
}

/// Before any call, every method has a series at 0 for every code, and a latency
/// histogram with no observations.
#[test]
fn every_method_and_code_exists_at_zero() {
    let mut registry = Registry::with_prefix("trellis");
    let _metrics = GrpcMetrics::register(&mut registry, &[TEST]);
    let body = text(&registry);
    for method in TEST.methods {
        for code in CODES {
            assert_eq!(handled(&body, method, code_name(code)), Some(0), "{body}");
        }
        assert!(body.contains(&format!(
            "trellis_grpc_server_handling_seconds_count{{grpc_service=\"test.v1.Test\",grpc_method=\"{method}\"}} 0"
        )));
    }
    let series = body
        .lines()
        .filter(|line| line.starts_with("trellis_grpc_server_handled_total{"))
        .count();
    assert_eq!(series, TEST.methods.len() * CODES.len());
}

/// A trailers-only answer counts under its code; a path the process does not serve
/// counts under one "unknown" series, whatever the path.
#[tokio::test]
async fn the_layer_counts_answers_by_code() {
    let mut registry = Registry::with_prefix("trellis");
    let metrics = GrpcMetrics::register(&mut registry, &[TEST]);
    let inner = tower::service_fn(|_request: http::Request<()>| async {
        let answer = tonic::Status::not_found("no such thing").into_http::<tonic::body::Body>();
        Ok::<_, std::convert::Infallible>(answer)
    });
    let mut service = metrics.layer().layer(inner);
    for path in [
        "/test.v1.Test/Get",
        "/test.v1.Test/Get",
        "/evil/a1b2c3",
        "/evil/d4e5",
    ] {
        let request = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        let answer = service.ready().await.expect("ready").call(request).await;
        drop(answer.expect("answer"));
    }
    let body = text(&registry);
    assert_eq!(handled(&body, "Get", "NotFound"), Some(2), "{body}");
    assert_eq!(handled(&body, "Get", "OK"), Some(0), "{body}");
    assert!(body.contains(
        "trellis_grpc_server_handled_total{grpc_service=\"unknown\",grpc_method=\"unknown\",grpc_code=\"NotFound\"} 2"
    ), "{body}");
    assert!(!body.contains("a1b2c3"), "{body}");
}

#[test]
fn code_names_follow_the_code_numbers() {
    for (number, code) in CODES.iter().enumerate() {
        assert_eq!(*code as usize, number);
        assert_eq!(Code::from(number as i32), *code);
    }
}

/// The tables of Trellis's own services name every rpc of their protos, and only
/// those (the CRI's are checked against the gateway's, which the compiler holds to
/// the CRI).
#[test]
fn tables_match_the_protos() {
    let protos = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    for (file, table) in [
        ("trellis/storage/v1/storage.proto", STORAGE),
        ("trellis/network/v1/network.proto", NETWORK),
        ("trellis/service/v1/service.proto", SERVICE_INFO),
    ] {
        let text = std::fs::read_to_string(protos.join(file)).expect("read proto");
        let package = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("package "))
            .map(|package| package.trim_end_matches(';').trim())
            .expect("package");
        let service = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("service "))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("service");
        assert_eq!(table.name, format!("{package}.{service}"));
        let mut rpcs: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("rpc "))
            .filter_map(|rest| rest.split('(').next())
            .map(str::trim)
            .collect();
        let mut methods = table.methods.to_vec();
        rpcs.sort_unstable();
        methods.sort_unstable();
        assert_eq!(methods, rpcs, "{file}");
    }
}
