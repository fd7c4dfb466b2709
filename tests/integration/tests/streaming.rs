//! Exec, Attach and PortForward through the streaming server, with a SPDY client
//! speaking as client-go does (remotecommand v4, portforward.k8s.io).

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::Node;
use trellis_integration::cri::{BusyboxNode, exec, pod_config, run_pod, start};
use trellis_integration::spdy_client::{Received, SpdyClient};

const V4: &str = "v4.channel.k8s.io";
const LIMIT: Duration = Duration::from_secs(30);

fn exec_request(container_id: &str, cmd: &[&str], stdin: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: container_id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        stdin,
        stdout: true,
        stderr: !tty,
        tty,
    }
}

/// A remotecommand session as client-go's v4 streamer opens it: error first, then
/// stdin, stdout, stderr and resize as asked.
struct Session {
    client: SpdyClient,
    ids: HashMap<&'static str, u32>,
}

impl Session {
    async fn open(url: &str, kinds: &[&'static str]) -> Session {
        let mut client = SpdyClient::connect(
            url,
            &[
                "v5.channel.k8s.io",
                V4,
                "v3.channel.k8s.io",
                "v2.channel.k8s.io",
                "channel.k8s.io",
            ],
        )
        .await
        .expect("upgrade");
        assert_eq!(client.protocol, V4);
        let mut ids = HashMap::new();
        for kind in kinds {
            ids.insert(*kind, client.open(&[("streamtype", kind)]).await);
        }
        Session { client, ids }
    }

    fn id(&self, kind: &str) -> u32 {
        self.ids[kind]
    }

    /// Reads until the error stream is finished: the session is over.
    async fn finish(&mut self) -> Received {
        let error = self.id("error");
        self.client
            .read_until(LIMIT, |_, finished| finished.contains(&error))
            .await
    }

    fn status(&self, received: &Received) -> serde_json::Value {
        serde_json::from_str(&received.text(self.id("error")))
            .expect("a metav1.Status on the error stream")
    }
}

/// A busybox node with a pod named `name` whose container `sleeper` sleeps.
async fn sleeper_pod(name: &str) -> (BusyboxNode, trellis_integration::cri::Pod, String) {
    let options = trellis_integration::NodeOptions {
        with_cni_config: true,
        ..Default::default()
    };
    BusyboxNode::with_sleeper(options, name).await
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_commands_with_pipes_and_with_a_terminal() {
    let (busybox, pod, sleeper) = sleeper_pod("exec").await;
    let node = &busybox.node;
    let mut runtime = node.runtime();

    // echo: stdout, then Success on the error stream.
    let url = runtime
        .exec(exec_request(&sleeper, &["echo", "hello"], false, false))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/exec/"),
        "{url}"
    );
    let mut session = Session::open(&url, &["error", "stdout", "stderr"]).await;
    let received = session.finish().await;
    assert_eq!(received.text(session.id("stdout")), "hello\n");
    assert_eq!(received.text(session.id("stderr")), "");
    assert!(
        received.finished.contains(&session.id("stdout"))
            && received.finished.contains(&session.id("stderr")),
        "output streams closed first"
    );
    assert_eq!(session.status(&received)["status"], "Success");

    // A non-zero exit: Failure, NonZeroExitCode, with the code as the ExitCode cause.
    let url = runtime
        .exec(exec_request(
            &sleeper,
            &["sh", "-c", "echo oops >&2; exit 7"],
            false,
            false,
        ))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let mut session = Session::open(&url, &["error", "stdout", "stderr"]).await;
    let received = session.finish().await;
    assert_eq!(received.text(session.id("stderr")), "oops\n");
    let status = session.status(&received);
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("Failure"), Some("NonZeroExitCode")),
        "{status}"
    );
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "7");

    // stdin: cat echoes it back and ends when the client closes its side.
    let url = runtime
        .exec(exec_request(&sleeper, &["cat"], true, false))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let mut session = Session::open(&url, &["error", "stdin", "stdout", "stderr"]).await;
    session
        .client
        .send(session.id("stdin"), b"line one\n", false)
        .await;
    session
        .client
        .send(session.id("stdin"), b"line two\n", true)
        .await;
    let received = session.finish().await;
    assert_eq!(received.text(session.id("stdout")), "line one\nline two\n");
    assert_eq!(session.status(&received)["status"], "Success");

    // A terminal: resized before the command looks, stdin and stdout through the pty.
    let url = runtime
        .exec(exec_request(
            &sleeper,
            &[
                "sh",
                "-c",
                "sleep 1; stty size; read line; echo got $line; exit 3",
            ],
            true,
            true,
        ))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let mut session = Session::open(&url, &["error", "stdin", "stdout", "resize"]).await;
    session
        .client
        .send(session.id("resize"), br#"{"Width":100,"Height":40}"#, false)
        .await;
    session
        .client
        .send(session.id("stdin"), b"typed\r", false)
        .await;
    let received = session.finish().await;
    let output = received.text(session.id("stdout"));
    assert!(
        output.contains("40 100"),
        "terminal size seen by the command: {output:?}"
    );
    assert!(output.contains("got typed"), "terminal input: {output:?}");
    assert_eq!(
        session.status(&received)["details"]["causes"][0]["message"],
        "3"
    );

    // Requests the kubelet would refuse, refused the same way.
    let code = |result: Result<tonic::Response<ExecResponse>, tonic::Status>| {
        result.expect_err("refused").code()
    };
    let mut tty_stderr = exec_request(&sleeper, &["true"], false, true);
    tty_stderr.stderr = true;
    assert_eq!(code(runtime.exec(tty_stderr).await), Code::InvalidArgument);
    let mut silent = exec_request(&sleeper, &["true"], false, false);
    (silent.stdout, silent.stderr) = (false, false);
    assert_eq!(code(runtime.exec(silent).await), Code::InvalidArgument);
    assert_eq!(
        code(
            runtime
                .exec(exec_request("0123456789abcdef", &["true"], false, false))
                .await
        ),
        Code::NotFound
    );
    let done = start(node, &pod, busybox.container("done", &["true"])).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let state = runtime
            .container_status(ContainerStatusRequest {
                container_id: done.clone(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status")
            .state;
        if state == ContainerState::ContainerExited as i32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "container `done` did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        code(
            runtime
                .exec(exec_request(&done, &["true"], false, false))
                .await
        ),
        Code::FailedPrecondition
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn urls_are_single_use() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, pod_config("tokens", false)).await;
    let sleeper = start(
        node,
        &pod,
        busybox.container("sleeper", &["/bin/sleep", "3600"]),
    )
    .await;
    let url = node
        .runtime()
        .exec(exec_request(&sleeper, &["true"], false, false))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let mut session = Session::open(&url, &["error", "stdout", "stderr"]).await;
    let received = session.finish().await;
    assert_eq!(session.status(&received)["status"], "Success");
    let again = SpdyClient::connect(&url, &[V4])
        .await
        .err()
        .expect("a used token is refused");
    assert_eq!(again.status, 404, "{}", again.head);
    let forged = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{}", "0".repeat(64)))
        .expect("token");
    assert_eq!(
        SpdyClient::connect(&forged, &[V4])
            .await
            .err()
            .expect("unknown token")
            .status,
        404
    );
    // An exec URL is not a port-forward URL.
    let url = node
        .runtime()
        .exec(exec_request(&sleeper, &["true"], false, false))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    assert_eq!(
        SpdyClient::connect(
            &url.replace("/exec/", "/portforward/"),
            &["portforward.k8s.io"]
        )
        .await
        .err()
        .expect("wrong kind")
        .status,
        404
    );
    let url = node
        .runtime()
        .exec(exec_request(&sleeper, &["true"], false, false))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    assert_eq!(
        SpdyClient::connect(&url, &["v9.channel.k8s.io"])
            .await
            .err()
            .expect("no common protocol")
            .status,
        403
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_joins_the_containers_stdio() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, pod_config("attach", false)).await;
    let mut runtime = node.runtime();

    // As critest does: a shell on stdin (stdin_once), no terminal.
    let shell = start(
        node,
        &pod,
        ContainerConfig {
            stdin: true,
            stdin_once: true,
            ..busybox.container("shell", &["/bin/sh"])
        },
    )
    .await;
    let request = AttachRequest {
        container_id: shell.clone(),
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let url = runtime
        .attach(request)
        .await
        .expect("Attach")
        .into_inner()
        .url;
    assert!(url.contains("/attach/"), "{url}");
    let mut session = Session::open(&url, &["error", "stdin", "stdout", "stderr"]).await;
    let stdout = session.id("stdout");
    session
        .client
        .send(session.id("stdin"), b"echo hello; echo oops >&2\n", false)
        .await;
    let received = session
        .client
        .read_until(LIMIT, |data, _| {
            data.get(&stdout).is_some_and(|d| d.ends_with(b"hello\n"))
        })
        .await;
    assert_eq!(received.text(stdout), "hello\n");
    // Closing stdin ends the shell (stdin_once), and with it the session.
    session.client.send(session.id("stdin"), b"", true).await;
    let received = session.finish().await;
    assert_eq!(session.status(&received)["status"], "Success");
    assert!(
        received.text(session.id("stderr")).contains("oops"),
        "{:?}",
        received.text(session.id("stderr"))
    );

    // A terminal: output through conmon's pty, input typed into it.
    // (Not an interactive shell: its line editor queries the terminal and eats input.)
    let reader = [
        "/bin/sh",
        "-c",
        "while read line; do echo got $line; stty size; done",
    ];
    let terminal = start(
        node,
        &pod,
        ContainerConfig {
            stdin: true,
            tty: true,
            ..busybox.container("terminal", &reader)
        },
    )
    .await;
    let request = AttachRequest {
        container_id: terminal.clone(),
        stdin: true,
        stdout: true,
        stderr: false,
        tty: true,
    };
    let url = runtime
        .attach(request)
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let mut session = Session::open(&url, &["error", "stdin", "stdout", "resize"]).await;
    let stdout = session.id("stdout");
    session
        .client
        .send(session.id("resize"), br#"{"Width":120,"Height":50}"#, false)
        .await;
    let seen = |data: &HashMap<u32, Vec<u8>>, text: &str| {
        data.get(&stdout)
            .is_some_and(|d| String::from_utf8_lossy(d).contains(text))
    };
    // The resize reaches conmon by its control fifo, the input by the socket: type
    // again until the size shows.
    let mut output = String::new();
    for _ in 0..20 {
        session
            .client
            .send(session.id("stdin"), b"typed\r", false)
            .await;
        let received = session
            .client
            .read_for(Duration::from_secs(1), |data, _| seen(data, "50 120"))
            .await;
        output.push_str(&received.text(stdout));
        if !received.timed_out {
            break;
        }
    }
    assert!(output.contains("got typed\r\n50 120"), "{output:?}");

    // A terminal and stderr do not go together; tty must match the container's.
    let refused = runtime
        .attach(AttachRequest {
            container_id: terminal.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: true,
        })
        .await
        .expect_err("tty+stderr");
    assert_eq!(refused.code(), Code::InvalidArgument);
}

/// The lines of `ps` in a container that show `sleep 300` (or a zombie sleep).
async fn sleeps_left(node: &Node, container_id: &str) -> Vec<String> {
    let ps = exec(node, container_id, &["ps"]).await;
    assert_eq!(ps.code, 0, "ps: {}", ps.stderr);
    ps.stdout
        .lines()
        .filter(|l| l.contains("sleep 300") || l.contains("[sleep]"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_is_killed_when_the_client_goes_away() {
    let (busybox, _, sleeper) = sleeper_pod("hangup").await;
    let node = &busybox.node;
    let mut runtime = node.runtime();
    for tty in [false, true] {
        let url = runtime
            .exec(exec_request(&sleeper, &["sleep", "300"], tty, tty))
            .await
            .expect("Exec")
            .into_inner()
            .url;
        let kinds: &[&'static str] = if tty {
            &["error", "stdin", "stdout", "resize"]
        } else {
            &["error", "stdout", "stderr"]
        };
        let session = Session::open(&url, kinds).await;
        let deadline = tokio::time::Instant::now() + LIMIT;
        while sleeps_left(node, &sleeper).await.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tty={tty}: `sleep 300` never ran"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The connection closes with the client, mid-command.
        drop(session);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = sleeps_left(node, &sleeper).await;
            if left.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tty={tty}: still running after the client left: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
