//! What `trellis bench churn` does to the node while its clients cycle: an operator's
//! restart or upgrade through `trellis up`, or a kill -9 of a service.

use std::path::{Path, PathBuf};

use super::churn::ChurnArgs;
use crate::control::{Request, order};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Restart(String),
    Upgrade(String),
    Kill(String),
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (verb, service) = text.split_once(':').unwrap_or((text, ""));
        let known = ["gateway", "runtime", "image", "storage", "network"];
        if verb == "none" && service.is_empty() {
            return Ok(Self::None);
        }
        if !known.contains(&service) {
            return Err(format!(
                "`{text}`: expected none, or restart:, upgrade: or kill: with one of {}",
                known.join(", ")
            ));
        }
        let service = service.to_string();
        match verb {
            "restart" => Ok(Self::Restart(service)),
            "upgrade" => Ok(Self::Upgrade(service)),
            "kill" => Ok(Self::Kill(service)),
            _ => Err(format!("`{text}`: unknown action `{verb}`")),
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Restart(service) => write!(f, "restart:{service}"),
            Self::Upgrade(service) => write!(f, "upgrade:{service}"),
            Self::Kill(service) => write!(f, "kill:{service}"),
        }
    }
}

/// Carries out one action; its outcome in words.
pub async fn act(
    action: &Action,
    churn: &ChurnArgs,
    config: &trellis_common::Config,
) -> Result<String, String> {
    let run_dir = &config.node.run_dir;
    let replaced = match action {
        Action::None => return Ok(String::new()),
        Action::Restart(service) => {
            let request = Request::Restart {
                service: service.clone(),
            };
            order(run_dir, &request).await
        }
        Action::Upgrade(service) => {
            let request = Request::Upgrade {
                service: service.clone(),
                binary: binary_dir(churn).join(format!("trellis-{service}")),
            };
            order(run_dir, &request).await
        }
        Action::Kill(service) => return kill(config, service).await,
    };
    replaced
        .map(|done| {
            format!(
                "pid {} -> {} in {} ms",
                done.old_pid, done.new_pid, done.millis
            )
        })
        .map_err(|error| error.to_string())
}

/// kill -9 of the service's process, found by asking it for its pid.
async fn kill(config: &trellis_common::Config, service: &str) -> Result<String, String> {
    let kind = trellis_common::ServiceKind::START_ORDER
        .into_iter()
        .find(|kind| kind.name() == service)
        .ok_or_else(|| format!("no service {service}"))?;
    let socket = config.endpoint(kind).socket;
    let pid = crate::probe::info(&socket).await?.pid;
    let pid = i32::try_from(pid).map_err(|_| format!("{service} says its pid is {pid}"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|error| format!("kill -9 {pid}: {error}"))?;
    Ok(format!("killed pid {pid}"))
}

fn binary_dir(churn: &ChurnArgs) -> PathBuf {
    churn.binary_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_read_as_written_and_unknown_ones_are_refused() {
        assert_eq!("none".parse(), Ok(Action::None));
        assert_eq!(
            "restart:runtime".parse(),
            Ok(Action::Restart("runtime".into()))
        );
        assert_eq!(
            "upgrade:gateway".parse(),
            Ok(Action::Upgrade("gateway".into()))
        );
        assert_eq!("kill:image".parse(), Ok(Action::Kill("image".into())));
        assert!("restart:kernel".parse::<Action>().is_err());
        assert!("reboot:runtime".parse::<Action>().is_err());
        assert_eq!(Action::Kill("image".into()).to_string(), "kill:image");
    }
}
