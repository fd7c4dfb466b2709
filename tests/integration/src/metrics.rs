//! Scraping a test node's Prometheus metrics: the environment that turns every
//! service's listener on (a free loopback port each), and a parsed scrape.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::Node;

/// Every service with a metrics listener on a port of its own choosing, through
/// the environment `trellis up` hands to its children.
pub fn listeners_env() -> Vec<(String, String)> {
    ["GATEWAY", "RUNTIME", "IMAGE", "STORAGE", "NETWORK"]
        .into_iter()
        .map(|service| {
            (
                format!("TRELLIS_{service}_METRICS_LISTEN"),
                "127.0.0.1:0".to_string(),
            )
        })
        .collect()
}

/// One scrape: each series (`name{labels}`) with its value.
pub struct Scrape {
    pub text: String,
    pub series: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of the series written exactly so (`name{a="b",…}`), if scraped.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }

    /// The value of a series that must be there.
    pub fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no series {series} in\n{}", self.text))
    }

    /// Whether any series of metric `name` was scraped.
    pub fn has(&self, name: &str) -> bool {
        self.series
            .keys()
            .any(|series| series == name || series.starts_with(&format!("{name}{{")))
    }

    /// Every label value of every series.
    pub fn label_values(&self) -> Vec<String> {
        let mut values = Vec::new();
        for series in self.series.keys() {
            let Some(labels) = series.split_once('{').map(|(_, rest)| rest) else {
                continue;
            };
            for pair in labels.trim_end_matches('}').split("\",") {
                if let Some((_, value)) = pair.split_once("=\"") {
                    values.push(value.trim_end_matches('"').to_string());
                }
            }
        }
        values
    }
}

/// Scrapes service `service` of `node`, at the address its Info reports.
pub async fn scrape(node: &Node, service: &str) -> Scrape {
    let address = node.info(service).await.expect("info").metrics_address;
    assert!(
        !address.is_empty(),
        "{service} has no metrics listener: was the node started with_metrics?"
    );
    scrape_address(&address)
}

/// Scrapes the metrics listener at `address` (`host:port`).
pub fn scrape_address(address: &str) -> Scrape {
    let text = http_get(address, "/metrics").unwrap_or_else(|error| panic!("{error}"));
    let series = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect();
    Scrape {
        text: text.to_string(),
        series,
    }
}

/// The body of `GET path` on `address` (`host:port`), or why there is none (not 200).
/// One request a connection, the body read to the end (chunks joined).
pub fn http_get(address: &str, path: &str) -> Result<String, String> {
    let mut stream =
        std::net::TcpStream::connect(address).map_err(|e| format!("{address}: {e}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{path}: {response}"));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
