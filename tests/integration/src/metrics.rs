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
    let mut stream = std::net::TcpStream::connect(address).expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, text) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{response}");
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
