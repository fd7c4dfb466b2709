//! A NATS cluster on loopback: several `nats-server -js` processes routed to each
//! other, the shared bus of a fleet of test nodes.
//!
//! Every server takes the same nkey users (the caller's, and an administrator of the
//! cluster's own, through which the cluster is checked and `client` connects); each
//! has its own client port, route port, store and log under the
//! cluster's temporary directory, so clusters of parallel tests share nothing. A test
//! may kill a server with SIGKILL to see the fleet ride it out; every server still
//! running is stopped, and the directory removed, when the cluster is dropped, even
//! when the test failed.

use std::path::PathBuf;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use trellis_common::bus::permissions::Permissions;
use trellis_common::bus::server_config::{NatsUser, ServerConfig};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A user of a test's bus, with its seed written to a 0600 file of its own.
pub struct TestUser {
    pub user: NatsUser,
    pub seed: String,
    pub seed_file: PathBuf,
}

impl TestUser {
    pub fn new(dir: &std::path::Path, name: &str, permissions: Permissions) -> TestUser {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().expect("seed");
        let seed_file = dir.join(format!("{name}.nk"));
        trellis_common::dirs::write_private_file(&seed_file, seed.as_bytes())
            .expect("write the seed");
        TestUser {
            user: NatsUser {
                public_key: pair.public_key(),
                permissions,
            },
            seed,
            seed_file,
        }
    }
}

struct ClusterServer {
    name: String,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    servers: Vec<ClusterServer>,
    admin: TestUser,
    // Dropped after `Drop::drop` has stopped the servers that use it.
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` clustered servers named `<name>-0`, `<name>-1`, …, taking
    /// `users`, and returns once JetStream has a meta leader (before that, streams
    /// cannot be created).
    pub async fn start(name: &str, size: usize, users: &[&NatsUser]) -> NatsCluster {
        let dir = tempfile::Builder::new()
            .prefix("trellis-nats-cluster-")
            .tempdir()
            .expect("cluster dir");
        let route_ports: Vec<u16> = (0..size).map(|_| crate::free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let everything = Permissions {
            publish: vec![">".into()],
            subscribe: vec![">".into()],
        };
        let admin = TestUser::new(dir.path(), "admin", everything);
        let mut users: Vec<NatsUser> = users.iter().map(|&user| user.clone()).collect();
        users.push(admin.user.clone());
        let mut cluster = NatsCluster {
            servers: Vec::new(),
            admin,
            dir,
        };
        for (n, route_port) in route_ports.iter().enumerate() {
            let server_name = format!("{name}-{n}");
            let port = crate::free_port();
            let store = cluster.dir.path().join(&server_name);
            let log = cluster.dir.path().join(format!("{server_name}.log"));
            let config = cluster.dir.path().join(format!("{server_name}.conf"));
            let text = ServerConfig {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                store_dir: store,
                users: users.clone(),
                tls: None,
            }
            .render()
            .expect("render the nats-server configuration");
            trellis_common::dirs::write_private_file(&config, text.as_bytes())
                .expect("write the nats-server configuration");
            let log_file = std::fs::File::create(&log).expect("nats log");
            // The file for users, port and store; the flags for the cluster.
            let child = Command::new(crate::nats::nats_server())
                .arg("-c")
                .arg(&config)
                .args(["-n", &server_name, "--cluster_name", name])
                .args(["--cluster", &format!("nats://127.0.0.1:{route_port}")])
                .args(["--routes", &routes])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log"))
                .stderr(log_file)
                .spawn()
                .expect("spawn nats-server");
            cluster.servers.push(ClusterServer {
                name: server_name,
                port,
                log,
                child: Some(child),
            });
        }
        cluster.wait_meta_leader(Duration::from_secs(30)).await;
        cluster
    }

    /// Every server's URL, comma-separated: what a node's `bus.url` lists.
    pub fn urls(&self) -> String {
        (0..self.servers.len())
            .map(|n| self.url(n))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, n: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[n].port)
    }

    /// A client of the cluster's administrator (every permission), on a server
    /// still running.
    pub async fn client(&self) -> async_nats::Client {
        self.connect(&self.live_url())
            .await
            .expect("connect to the NATS cluster")
    }

    async fn connect(&self, url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_nkey(self.admin.seed.clone())
            .connect(url)
            .await
    }

    /// The URL of a server still running.
    pub fn live_url(&self) -> String {
        let n = self
            .servers
            .iter()
            .position(|server| server.child.is_some())
            .expect("a server still running");
        self.url(n)
    }

    /// The index of the server named `name` (as JetStream names stream leaders).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|server| server.name == name)
    }

    /// SIGKILL: no goodbye to the cluster or the clients, nothing flushed.
    pub fn kill9(&mut self, n: usize) {
        if let Some(mut child) = self.servers[n].child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Every server's log, for a failure's message.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|server| {
                format!(
                    "--- {} ---\n{}",
                    server.name,
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Each server answers JetStream account requests (`$JS.API.INFO`), which only a
    /// cluster with a meta leader does.
    async fn wait_meta_leader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for n in 0..self.servers.len() {
            let mut last = String::from("not tried");
            loop {
                assert!(
                    Instant::now() < deadline,
                    "the NATS cluster has no JetStream meta leader after {timeout:?} ({last}):\n{}",
                    self.logs()
                );
                let ready = async {
                    let client = self
                        .connect(&self.url(n))
                        .await
                        .map_err(|e| e.to_string())?;
                    // Raw: async-nats 0.51 cannot parse nats-server 2.9's answer.
                    let answer = client
                        .request("$JS.API.INFO", "".into())
                        .await
                        .map_err(|e| e.to_string())?;
                    let text = String::from_utf8_lossy(&answer.payload).into_owned();
                    if text.contains("account_info_response") && !text.contains("\"error\"") {
                        Ok(())
                    } else {
                        Err(text)
                    }
                };
                match tokio::time::timeout(Duration::from_secs(2), ready).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(error)) => last = error,
                    Err(_) => last = "no answer within 2 s".into(),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
                let _ = child.wait();
            }
        }
    }
}
