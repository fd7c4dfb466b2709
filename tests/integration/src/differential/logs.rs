//! The CRI log of a process writing a line in two writes, a long line, and a last
//! line without a newline: timestamps replaced, the rest compared as written.

use std::path::Path;
use std::time::Duration;

use super::{Observed, Side, pod_or_note};

pub async fn log_lines(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "logs", true, false, observed).await else {
        return;
    };
    let script = "printf 'split '; sleep 0.3; printf 'line\\n'; \
                  head -c 20000 /dev/zero | tr '\\0' x; echo; \
                  printf 'no newline at the end'";
    let writer = side.container("writer", &["/bin/sh", "-c", script]);
    let Some(id) = side
        .create_and_start(&pod, writer, "logs", observed)
        .await
    else {
        return;
    };
    side.wait_exited(&id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = Path::new(&pod.config.log_directory).join("writer.log");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("unreadable: {e}"));
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let line = match line.split_once(' ') {
                Some((_, rest)) => format!("<time> {rest}"),
                None => line.to_string(),
            };
            // A long line is shown by its length, not its 20000 x's.
            match line.find("xxxxxxxx") {
                Some(at) => format!("{}<{} x>", &line[..at], line.len() - at),
                None => line,
            }
        })
        .collect();
    observed.insert("logs/partial-long-and-unterminated".into(), lines.join("\n"));
}
