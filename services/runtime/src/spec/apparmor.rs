//! AppArmor: the CRI's `apparmor` SecurityProfile or the deprecated
//! `apparmor_profile` ("runtime/default", "unconfined", "localhost/<name>") as the
//! OCI process's `apparmorProfile`.
//!
//! Trellis loads no profile of its own, so RuntimeDefault, like Unconfined, leaves the
//! container unconfined; a named profile is applied when AppArmor is enabled and the
//! profile loaded, and refused with its name otherwise (never silently dropped).

use std::path::Path;

use k8s_cri::v1::LinuxContainerSecurityContext;
use k8s_cri::v1::security_profile::ProfileType;
use trellis_common::text::excerpt;

use crate::error::RuntimeError;

const ENABLED: &str = "/sys/module/apparmor/parameters/enabled";
const PROFILES: &str = "/sys/kernel/security/apparmor/profiles";

/// What a container asked for: `None` for unconfined or the runtime's default, else
/// the name of a profile.
#[allow(deprecated)] // apparmor_profile: still sent by older kubelets
pub fn requested(
    security: Option<&LinuxContainerSecurityContext>,
) -> Result<Option<String>, RuntimeError> {
    let Some(security) = security else {
        return Ok(None);
    };
    if let Some(profile) = &security.apparmor {
        return match ProfileType::try_from(profile.profile_type) {
            Ok(ProfileType::RuntimeDefault | ProfileType::Unconfined) => Ok(None),
            Ok(ProfileType::Localhost) => named(
                profile
                    .localhost_ref
                    .strip_prefix("localhost/")
                    .unwrap_or(&profile.localhost_ref),
            ),
            Err(_) => Err(RuntimeError::InvalidArgument(format!(
                "apparmor: unknown profile type {}",
                profile.profile_type
            ))),
        };
    }
    match security.apparmor_profile.as_str() {
        "" | "runtime/default" | "unconfined" => Ok(None),
        other => named(other.strip_prefix("localhost/").unwrap_or(other)),
    }
}

fn named(name: &str) -> Result<Option<String>, RuntimeError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(RuntimeError::InvalidArgument(
            "apparmor: a Localhost profile needs a name".into(),
        ));
    }
    Ok(Some(name.to_string()))
}

/// Whether `name` is among the loaded profiles (lines `name (mode)`).
fn loaded(profiles: &str, name: &str) -> bool {
    profiles
        .lines()
        .any(|line| line.rsplit_once(" (").map_or(line, |(n, _)| n) == name)
}

/// The `apparmorProfile` for a container: none when privileged or unconfined; a
/// named profile only when the host can apply it.
pub fn for_container(
    security: Option<&LinuxContainerSecurityContext>,
    privileged: bool,
) -> Result<Option<String>, RuntimeError> {
    let Some(name) = requested(security)? else {
        return Ok(None);
    };
    if privileged {
        return Ok(None);
    }
    check(&name, Path::new(ENABLED), Path::new(PROFILES))?;
    Ok(Some(name))
}

fn check(name: &str, enabled: &Path, profiles: &Path) -> Result<(), RuntimeError> {
    let on = std::fs::read_to_string(enabled).is_ok_and(|v| v.trim() == "Y");
    if !on {
        return Err(RuntimeError::FailedPrecondition(format!(
            "AppArmor profile {} cannot be applied: AppArmor is not enabled on this host",
            excerpt(name)
        )));
    }
    let list = std::fs::read_to_string(profiles).map_err(|e| {
        RuntimeError::FailedPrecondition(format!(
            "AppArmor profile {}: cannot read {}: {e}",
            excerpt(name),
            profiles.display()
        ))
    })?;
    if !loaded(&list, name) {
        return Err(RuntimeError::InvalidArgument(format!(
            "AppArmor profile {} is not loaded",
            excerpt(name)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1::SecurityProfile;

    use super::*;

    #[allow(deprecated)]
    fn context(profile: Option<(ProfileType, &str)>, field: &str) -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext {
            apparmor: profile.map(|(kind, reference)| SecurityProfile {
                profile_type: kind as i32,
                localhost_ref: reference.into(),
            }),
            apparmor_profile: field.into(),
            ..Default::default()
        }
    }

    #[test]
    fn default_and_unconfined_need_nothing_and_names_are_kept() {
        assert_eq!(requested(None).expect("none"), None);
        for ok in [
            context(None, ""),
            context(None, "runtime/default"),
            context(None, "unconfined"),
            context(Some((ProfileType::RuntimeDefault, "")), "localhost/x"),
        ] {
            assert_eq!(requested(Some(&ok)).expect("no profile"), None);
        }
        assert_eq!(
            requested(Some(&context(
                Some((ProfileType::Localhost, "localhost/web")),
                ""
            )))
            .expect("named"),
            Some("web".into())
        );
        assert_eq!(
            requested(Some(&context(None, "localhost/web"))).expect("named"),
            Some("web".into())
        );
        assert!(requested(Some(&context(Some((ProfileType::Localhost, "")), ""))).is_err());
        assert_eq!(
            for_container(Some(&context(None, "localhost/web")), true).expect("privileged"),
            None
        );
    }

    #[test]
    fn a_named_profile_needs_apparmor_and_the_profile_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (enabled, profiles) = (dir.path().join("enabled"), dir.path().join("profiles"));
        let error = check("web", &enabled, &profiles).expect_err("no apparmor");
        assert!(
            matches!(error, RuntimeError::FailedPrecondition(ref m) if m.contains("web") && m.contains("not enabled")),
            "{error}"
        );
        std::fs::write(&enabled, "Y\n").expect("write");
        std::fs::write(&profiles, "docker-default (enforce)\nweb (complain)\n").expect("write");
        assert!(check("web", &enabled, &profiles).is_ok());
        assert!(
            matches!(check("db", &enabled, &profiles), Err(RuntimeError::InvalidArgument(ref m)) if m.contains("db"))
        );
    }
}
