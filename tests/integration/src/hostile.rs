//! Hostile network peers for pull tests: a token endpoint that hands out a token no
//! HTTP header can carry, and a TCP proxy that trickles a registry's answers so a
//! test can abandon a pull in the middle of a layer, or cut the registry off under
//! it. Both are real servers on loopback ports, stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP server answering every request with `{"token": <token>}`, as docker's
/// token endpoints do, counting the requests.
pub struct TokenServer {
    pub url: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    pub fn start(token: &str) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}/token", listener.local_addr().expect("address"));
        let body = serde_json::json!({ "token": token, "access_token": token, "expires_in": 300 })
            .to_string();
        let (requests, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = std::thread::spawn({
            let (requests, stop) = (requests.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes());
                }
            }
        });
        TokenServer {
            url,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// How many token requests it answered.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP proxy to `upstream` that, while slow, passes the upstream's bytes on a few
/// at a time. It counts what it passed and the connections open through it. Cut, it
/// closes every connection and each new one at once, as a registry that went away.
pub struct TrickleProxy {
    pub address: String,
    slow: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts a connection open for as long as its task lives, aborted or not.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TrickleProxy {
    /// Slow, it passes `chunk` bytes every `tick`.
    pub async fn start(upstream: &str, chunk: usize, tick: Duration) -> TrickleProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let (slow, cut, forwarded, open) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let upstream = upstream.to_string();
        let task = tokio::spawn({
            let (slow, cut, forwarded, open) =
                (slow.clone(), cut.clone(), forwarded.clone(), open.clone());
            async move {
                // Dropped with this task, which aborts every connection's task.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    open.fetch_add(1, Ordering::SeqCst);
                    let guard = OpenGuard(open.clone());
                    let (slow, cut, forwarded, upstream) = (
                        slow.clone(),
                        cut.clone(),
                        forwarded.clone(),
                        upstream.clone(),
                    );
                    connections.spawn(async move {
                        let _guard = guard;
                        let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        let requests = tokio::io::copy(&mut client_read, &mut server_write);
                        let answers = async {
                            let mut buffer = vec![0u8; 64 * 1024];
                            loop {
                                if cut.load(Ordering::SeqCst) {
                                    return;
                                }
                                let limit = if slow.load(Ordering::Relaxed) {
                                    chunk
                                } else {
                                    buffer.len()
                                };
                                let n = match server_read.read(&mut buffer[..limit]).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if client_write.write_all(&buffer[..n]).await.is_err() {
                                    return;
                                }
                                forwarded.fetch_add(n as u64, Ordering::SeqCst);
                                if slow.load(Ordering::Relaxed) {
                                    tokio::time::sleep(tick).await;
                                }
                            }
                        };
                        // Either side closing ends the connection, as a proxy's would.
                        tokio::select! {
                            _ = requests => {}
                            _ = answers => {}
                        }
                    });
                    while connections.try_join_next().is_some() {}
                }
            }
        });
        TrickleProxy {
            address,
            slow,
            cut,
            forwarded,
            open,
            task,
        }
    }

    /// From now on, bytes pass at full speed.
    pub fn full_speed(&self) {
        self.slow.store(false, Ordering::Relaxed);
    }

    /// Closes every connection (within one tick) and each new one at once.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Passes connections again, after [`TrickleProxy::cut`].
    pub fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Bytes passed from the upstream to clients so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for TrickleProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A small layer that lands at once, then 3 MB that a trickling proxy takes seconds
/// to pass: a pull that can be caught half-way.
pub fn slow_image() -> crate::registry::BuiltImage {
    use crate::registry::{Compression, Entry, image, layer};
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    image(
        vec![
            layer(
                &[Entry::File("small", b"small".to_vec())],
                Compression::Gzip,
            ),
            layer(&[Entry::File("big", big)], Compression::None),
        ],
        &["/x"],
        "amd64",
        false,
    )
}
