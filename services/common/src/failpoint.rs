//! Fail points: named places in a service's work where a test makes it fail on
//! purpose, to prove that every failure, a kill -9 included, is rolled back or
//! repaired. The way containerd's integration tests inject failures into a shim.
//!
//! Only debug builds have them: in a release build [`hit`] and [`hit_async`] are
//! empty and compile to nothing, so no environment can make a production node fail.
//!
//! Switched on by the environment, in the syntax `point=action[;point=action…]`:
//! - `TRELLIS_FAILPOINTS`: read once at the first hit; counts are this process's;
//! - `TRELLIS_FAILPOINTS_FILE`: a file in the same syntax, read at every hit, so a
//!   test changes points on a running node. A counted action fired from the file is
//!   counted down in the file before it acts, so `1*kill` kills one process once,
//!   not every process the supervisor starts again after it (one node's services
//!   share the file; two of them hitting counted points at the same instant may
//!   both fire: tests arm one point at a time).
//!
//! Actions: `kill` (SIGKILL of the own process: a real kill -9 at that point),
//! `error` (the call fails with Internal "fail point <name>"), `sleep(<ms>)` (up to
//! 60 s; [`hit`] blocks its thread, [`hit_async`] only its task), `off`; an `N*`
//! prefix fires the first N hits only. Anything malformed (unknown action, bad name,
//! a file over 4 KiB) is ignored with a warning: a typo never makes a node fail.
//!
//! Points, named service.operation.step:
//! - runtime.sandbox.before-network, runtime.sandbox.after-network (network and
//!   namespaces set up), runtime.sandbox.after-files (hostname, hosts, resolv.conf),
//!   runtime.sandbox.after-pause (pause process started), runtime.sandbox.before-record
//!   (before the pod is recorded Ready), runtime.sandbox.after-record (Ready and
//!   announced, not yet answered);
//! - runtime.container.after-rootfs, runtime.container.after-bundle (config.json
//!   written), runtime.container.after-create (OCI create done),
//!   runtime.container.before-record (before the container is recorded Created) and
//!   runtime.container.after-record (Created and announced, not yet answered);
//! - runtime.rollback.start (a failed set-up's clean-up, each attempt);
//! - network.setup.after-netns, network.setup.after-add (CNI ADD done, before the
//!   record says so);
//! - storage.layer.after-unpack (before the rename into place),
//!   storage.layer.before-record, storage.rootfs.after-mount (before the record says
//!   mounted), storage.image.before-record;
//! - image.pull.after-layer (a layer imported), image.pull.before-record.

/// The error an `error` action makes a call fail with (gRPC Internal in every service).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fail point {point}")]
pub struct FailPointError {
    pub point: String,
}

/// The environment variable with a fixed set of fail points.
pub const ENV: &str = "TRELLIS_FAILPOINTS";
/// The environment variable naming a file of fail points, read at every hit.
pub const ENV_FILE: &str = "TRELLIS_FAILPOINTS_FILE";

/// Acts on `point` if a fail point is set there. Blocking (a `sleep` blocks the thread).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_point: &'static str) -> Result<(), FailPointError> {
    Ok(())
}

/// Acts on `point` if a fail point is set there; a `sleep` waits without a thread.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn hit_async(_point: &'static str) -> Result<(), FailPointError> {
    Ok(())
}

#[cfg(debug_assertions)]
pub use active::{hit, hit_async};

/// What a fail point does when hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill,
    Error,
    Sleep(u64),
    Off,
}

/// One `point=[N*]action` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub point: String,
    pub action: Action,
    /// Hits left to fire (None: every hit).
    pub count: Option<u32>,
}

/// The longest fail point text read (environment or file).
pub const MAX_SPEC_BYTES: usize = 4096;
const MAX_SLEEP_MS: u64 = 60_000;
const MAX_COUNT: u32 = 1_000_000;

fn valid_point(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

fn parse_action(text: &str) -> Result<(Action, Option<u32>), String> {
    let (count, kind) = match text.split_once('*') {
        Some((count, kind)) => {
            let count: u32 = count
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=MAX_COUNT).contains(n))
                .ok_or_else(|| format!("count must be 1 to {MAX_COUNT}"))?;
            (Some(count), kind.trim())
        }
        None => (None, text.trim()),
    };
    let action = match kind {
        "kill" => Action::Kill,
        "error" => Action::Error,
        "off" => Action::Off,
        _ => {
            let ms = kind
                .strip_prefix("sleep(")
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|ms| ms.trim().parse::<u64>().ok())
                .filter(|ms| *ms <= MAX_SLEEP_MS)
                .ok_or_else(|| {
                    "action must be kill, error, off or sleep(<ms up to 60000>)".to_string()
                })?;
            Action::Sleep(ms)
        }
    };
    Ok((action, count))
}

/// The rules of a fail point text, and a complaint for each entry left out.
pub fn parse(text: &str) -> (Vec<Rule>, Vec<String>) {
    let mut rules = Vec::new();
    let mut problems = Vec::new();
    if text.len() > MAX_SPEC_BYTES {
        problems.push(format!(
            "{} bytes of fail points, more than {MAX_SPEC_BYTES}: all ignored",
            text.len()
        ));
        return (rules, problems);
    }
    for entry in text.split([';', '\n']).map(str::trim) {
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let complain = |why: &str| format!("`{}`: {why}", crate::text::excerpt(entry));
        let Some((point, action)) = entry.split_once('=') else {
            problems.push(complain("expected point=action"));
            continue;
        };
        let point = point.trim();
        if !valid_point(point) {
            problems.push(complain("a point name is 1 to 64 of a-z, 0-9, `.`, `-`"));
            continue;
        }
        match parse_action(action) {
            Ok((action, count)) => rules.push(Rule {
                point: point.to_string(),
                action,
                count,
            }),
            Err(why) => problems.push(complain(&why)),
        }
    }
    (rules, problems)
}

/// The text of `rules`, as [`parse`] reads it.
pub fn render(rules: &[Rule]) -> String {
    let entries: Vec<String> = rules
        .iter()
        .map(|rule| {
            let action = match rule.action {
                Action::Kill => "kill".to_string(),
                Action::Error => "error".to_string(),
                Action::Off => "off".to_string(),
                Action::Sleep(ms) => format!("sleep({ms})"),
            };
            match rule.count {
                Some(count) => format!("{}={count}*{action}", rule.point),
                None => format!("{}={action}", rule.point),
            }
        })
        .collect();
    entries.join(";")
}

/// Takes one hit of `point` from `rules`: the action to take, if any, and whether
/// the rules changed (a count went down, a spent rule went away).
pub fn take(rules: &mut Vec<Rule>, point: &str) -> (Option<Action>, bool) {
    let Some(index) = rules.iter().position(|rule| rule.point == point) else {
        return (None, false);
    };
    let rule = &mut rules[index];
    let action = rule.action;
    match rule.count {
        None => (Some(action), false),
        Some(left) if left <= 1 => {
            rules.remove(index);
            (Some(action), true)
        }
        Some(left) => {
            rule.count = Some(left - 1);
            (Some(action), true)
        }
    }
}

#[cfg(debug_assertions)]
mod active {
    use std::io::Read;
    use std::path::Path;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use super::{Action, ENV, ENV_FILE, FailPointError, MAX_SPEC_BYTES, Rule, parse, render, take};

    /// The environment's rules, with this process's counts.
    fn env_rules() -> &'static Mutex<Vec<Rule>> {
        static RULES: OnceLock<Mutex<Vec<Rule>>> = OnceLock::new();
        RULES.get_or_init(|| {
            let text = std::env::var(ENV).unwrap_or_default();
            let (rules, problems) = parse(&text);
            for problem in problems {
                tracing::warn!(variable = ENV, %problem, "fail point ignored");
            }
            Mutex::new(rules)
        })
    }

    /// Serialises this process's read-and-count-down of the file.
    static FILE_TURN: Mutex<()> = Mutex::new(());

    pub(super) fn from_file(path: &Path, point: &str) -> Option<Action> {
        let _turn = FILE_TURN.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = String::new();
        let file = std::fs::File::open(path).ok()?;
        // One byte past the limit, so an oversized file is told from a full one.
        file.take(MAX_SPEC_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .ok()?;
        let (mut rules, problems) = parse(&text);
        if !problems.is_empty() {
            tracing::warn!(file = %path.display(), ?problems, "fail points ignored");
        }
        let (action, changed) = take(&mut rules, point);
        if changed {
            // Replaced whole, so a service reading it meanwhile sees before or after.
            let temp = path.with_extension(format!("{}.tmp", std::process::id()));
            let written =
                std::fs::write(&temp, render(&rules)).and_then(|()| std::fs::rename(&temp, path));
            if let Err(error) = written {
                let _ = std::fs::remove_file(&temp);
                // Not counted down: firing again and again is worse than not firing.
                tracing::warn!(file = %path.display(), %error, "cannot count a fail point down; not firing it");
                return None;
            }
        }
        action
    }

    fn decide(point: &'static str) -> Option<Action> {
        let from_env = {
            let mut rules = env_rules().lock().unwrap_or_else(|p| p.into_inner());
            take(&mut rules, point).0
        };
        let action = match std::env::var_os(ENV_FILE) {
            Some(path) if from_env.is_none() => from_file(Path::new(&path), point),
            _ => from_env,
        };
        if let Some(action) = action
            && action != Action::Off
        {
            tracing::warn!(point, ?action, "fail point fires");
        }
        action
    }

    fn act(point: &'static str, action: Option<Action>) -> Result<Option<u64>, FailPointError> {
        match action {
            None | Some(Action::Off) => Ok(None),
            Some(Action::Sleep(ms)) => Ok(Some(ms)),
            Some(Action::Error) => Err(FailPointError {
                point: point.to_string(),
            }),
            Some(Action::Kill) => {
                eprintln!(
                    "fail point {point}: kill -9 of process {}",
                    std::process::id()
                );
                let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
                // SIGKILL cannot be caught; this is never reached unless it was refused.
                std::process::abort()
            }
        }
    }

    pub fn hit(point: &'static str) -> Result<(), FailPointError> {
        if let Some(ms) = act(point, decide(point))? {
            std::thread::sleep(Duration::from_millis(ms));
        }
        Ok(())
    }

    pub async fn hit_async(point: &'static str) -> Result<(), FailPointError> {
        if let Some(ms) = act(point, decide(point))? {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
