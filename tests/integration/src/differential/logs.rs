//! The CRI log of a process writing a line in two writes, a long line, and a last
//! line without a newline: timestamps replaced, the rest compared as written, and
//! the long line also as a reader joins it (its P entries up to the F one).

use std::path::Path;
use std::time::Duration;

use super::{Observed, PodUnderTest, Side, pod_or_note};

/// Longer than containerd's 16 KiB and conmon's 8 KiB pieces.
const LONG_LINE: usize = 20_000;

pub async fn log_lines(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "logs", true, false, observed).await else {
        return;
    };
    let long = format!("head -c {LONG_LINE} /dev/zero | tr '\\0' x; echo");
    let writers = [
        ("split-line", "printf 'split '; sleep 0.3; printf 'line\\n'"),
        ("long-line", long.as_str()),
        ("unterminated", "printf 'no newline at the end'"),
    ];
    for (writer, script) in writers {
        let Some(text) = log_of(side, &pod, writer, script, observed).await else {
            continue;
        };
        let entries: Vec<(String, String)> = text
            .lines()
            .filter_map(|line| {
                let (_time, rest) = line.split_once(' ')?;
                let (stream, rest) = rest.split_once(' ')?;
                let (tag, content) = rest.split_once(' ').unwrap_or((rest, ""));
                Some((format!("{stream} {tag}"), content.to_string()))
            })
            .collect();
        let shown: Vec<String> = entries
            .iter()
            .map(
                |(stream_tag, content)| match content.starts_with("xxxxxxxx") {
                    true => format!("<time> {stream_tag} <{} x>", content.len()),
                    false => format!("<time> {stream_tag} {content}"),
                },
            )
            .collect();
        observed.insert(format!("logs/{writer}/entries"), shown.join("\n"));
        if writer == "long-line" {
            let joined: String = entries
                .iter()
                .map(|(_, content)| content.as_str())
                .collect();
            let tags: Vec<&str> = entries.iter().map(|(tag, _)| tag.as_str()).collect();
            observed.insert(
                format!("logs/{writer}/joined"),
                format!(
                    "{} characters, all x: {}, last entry {:?}",
                    joined.len(),
                    joined.bytes().all(|b| b == b'x'),
                    tags.last()
                ),
            );
        }
    }
}

/// The CRI log of a container of `pod` running `script`, once it exited.
async fn log_of(
    side: &Side,
    pod: &PodUnderTest,
    name: &str,
    script: &str,
    observed: &mut Observed,
) -> Option<String> {
    let writer = side.container(name, &["/bin/sh", "-c", script]);
    let key = format!("logs/{name}");
    let id = side.create_and_start(pod, writer, &key, observed).await?;
    side.wait_exited(&id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = Path::new(&pod.config.log_directory).join(format!("{name}.log"));
    Some(std::fs::read_to_string(&path).unwrap_or_else(|e| format!("unreadable: {e}")))
}
