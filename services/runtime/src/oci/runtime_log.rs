//! What an OCI runtime's log says, for an error message.
//!
//! runc reports a failure as logrus lines (`time="…" level=error msg="…"`, or the
//! same as JSON), often after warnings that say nothing about the failure (`cannot
//! toggle freezer`). A CRI caller gets the error lines' messages only, unquoted; text
//! that is not a log line is kept as it is, shortened and with control characters
//! escaped.

use trellis_common::text::excerpt_to;

/// Enough for runc's longest error chains, short enough for one status message.
const MESSAGE_CHARS: usize = 1024;

/// The messages of the error lines in `log`, joined; the whole text when it holds
/// no log line.
pub fn failure_message(log: &str) -> String {
    let mut errors = Vec::new();
    let mut any_log_line = false;
    for line in log.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((level, message)) = logrus_line(line).or_else(|| json_line(line)) else {
            errors.push(line.to_string());
            continue;
        };
        any_log_line = true;
        if matches!(level.as_str(), "error" | "fatal" | "panic") {
            errors.push(message);
        }
    }
    if errors.is_empty() && any_log_line {
        return "the OCI runtime failed without saying why".into();
    }
    excerpt_to(&errors.join("; "), MESSAGE_CHARS)
}

/// `level` and `msg` of a logrus text line.
fn logrus_line(line: &str) -> Option<(String, String)> {
    let level = field(line, "level")?;
    let message = field(line, "msg")?;
    Some((level, message))
}

/// `level` and `msg` of a logrus JSON line.
fn json_line(line: &str) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let level = value.get("level")?.as_str()?.to_string();
    let message = value.get("msg")?.as_str()?.to_string();
    Some((level, message))
}

/// The value of `key=` in a logrus text line: a bare word, or a Go-quoted string.
fn field(line: &str, key: &str) -> Option<String> {
    let pattern = format!("{key}=");
    let start = line
        .match_indices(&pattern)
        .find(|(at, _)| *at == 0 || line[..*at].ends_with(' '))
        .map(|(at, _)| at + pattern.len())?;
    let rest = &line[start..];
    let Some(quoted) = rest.strip_prefix('"') else {
        return Some(
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    };
    let mut value = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_error_lines_are_kept_unquoted() {
        let log = concat!(
            "time=\"2026-12-01T08:56:15Z\" level=warning msg=\"cannot toggle freezer: cgroups not configured for container\"\n",
            "time=\"2026-12-01T08:56:15Z\" level=error msg=\"runc create failed: unable to start container process: exec: \\\"/no/such/binary\\\": stat /no/such/binary: no such file or directory\"\n",
        );
        assert_eq!(
            failure_message(log),
            "runc create failed: unable to start container process: exec: \"/no/such/binary\": stat /no/such/binary: no such file or directory"
        );
    }

    #[test]
    fn json_lines_and_plain_text() {
        let json = r#"{"level":"error","msg":"container not running","time":"x"}"#;
        assert_eq!(failure_message(json), "container not running");
        assert_eq!(failure_message("plain failure\n"), "plain failure");
        assert_eq!(
            failure_message("time=\"x\" level=warning msg=\"just a warning\""),
            "the OCI runtime failed without saying why"
        );
        assert_eq!(failure_message("a\u{1b}[31mred"), "a\\u{1b}[31mred");
    }
}
