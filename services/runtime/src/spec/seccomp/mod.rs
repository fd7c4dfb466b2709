//! Seccomp: which profile a container gets (the CRI's `seccomp` SecurityProfile, or
//! the deprecated `seccomp_profile_path`), reading a Localhost profile in the
//! OCI/Docker JSON format, and turning a profile into the OCI spec's `linux.seccomp`
//! for one container: rules gated on capabilities, architectures or the kernel
//! version are kept or left out here, as the Docker format means.

mod default;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{LinuxContainerSecurityContext, SecurityProfile};
use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
};
use serde::Deserialize;
use trellis_common::text::{excerpt, excerpt_path};

use crate::error::RuntimeError;

/// Which profile a container asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Selected {
    Unconfined,
    RuntimeDefault,
    Localhost(PathBuf),
}

/// A seccomp profile in the Docker format (a superset of the OCI one): rules may name
/// one syscall (`name`) or several (`names`) and be conditional (`includes`,
/// `excludes`); architectures may be listed plainly or through `archMap`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Profile {
    pub default_action: String,
    pub default_errno_ret: Option<u32>,
    pub architectures: Vec<String>,
    pub arch_map: Vec<ArchMap>,
    pub syscalls: Vec<Rule>,
    pub flags: Vec<String>,
    pub listener_path: Option<PathBuf>,
    pub listener_metadata: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ArchMap {
    pub architecture: String,
    pub sub_architectures: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Rule {
    pub name: Option<String>,
    pub names: Vec<String>,
    pub action: String,
    pub errno_ret: Option<u32>,
    pub args: Vec<Arg>,
    pub includes: Filter,
    pub excludes: Filter,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Arg {
    pub index: usize,
    pub value: u64,
    pub value_two: u64,
    pub op: String,
}

/// A rule's condition: capabilities the container holds (all of them), its
/// architecture (any of them), the lowest kernel version ("major.minor").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Filter {
    pub caps: Vec<String>,
    pub arches: Vec<String>,
    pub min_kernel: Option<String>,
}

/// What the profile is evaluated against: the container's capabilities, the
/// machine's seccomp architecture and kernel version.
pub struct Target<'a> {
    pub capabilities: &'a HashSet<Capability>,
    pub arch: &'a str,
    pub kernel: (u32, u32),
}

fn from_profile(profile: &SecurityProfile, field: &str) -> Result<Selected, RuntimeError> {
    match ProfileType::try_from(profile.profile_type) {
        Ok(ProfileType::RuntimeDefault) => Ok(Selected::RuntimeDefault),
        Ok(ProfileType::Unconfined) => Ok(Selected::Unconfined),
        Ok(ProfileType::Localhost) => localhost(&profile.localhost_ref, field),
        Err(_) => Err(RuntimeError::InvalidArgument(format!(
            "{field}: unknown profile type {}",
            profile.profile_type
        ))),
    }
}

fn localhost(path: &str, field: &str) -> Result<Selected, RuntimeError> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(RuntimeError::InvalidArgument(format!(
            "{field}: the Localhost seccomp profile `{}` must be an absolute path",
            excerpt_path(path)
        )));
    }
    Ok(Selected::Localhost(path.to_path_buf()))
}

/// The profile a container asked for: its `seccomp` field when set, else its
/// deprecated `seccomp_profile_path` ("runtime/default", "docker/default",
/// "unconfined", "localhost/<path>"); nothing at all is unconfined, as for the
/// kubelet, which always says what it wants.
#[allow(deprecated)] // seccomp_profile_path: still sent by older kubelets
pub fn select(security: Option<&LinuxContainerSecurityContext>) -> Result<Selected, RuntimeError> {
    let Some(security) = security else {
        return Ok(Selected::Unconfined);
    };
    if let Some(profile) = &security.seccomp {
        return from_profile(profile, "seccomp");
    }
    match security.seccomp_profile_path.as_str() {
        "" | "unconfined" => Ok(Selected::Unconfined),
        "runtime/default" | "docker/default" => Ok(Selected::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(path) => localhost(path, "seccomp_profile_path"),
            None => Err(RuntimeError::InvalidArgument(format!(
                "seccomp_profile_path `{}`: expected runtime/default, docker/default, unconfined or localhost/<path>",
                excerpt(other)
            ))),
        },
    }
}

/// Reads a Localhost profile; one that is missing or malformed is refused with its path.
pub fn read(path: &Path) -> Result<Profile, RuntimeError> {
    let text = std::fs::read(path).map_err(|e| {
        RuntimeError::InvalidArgument(format!(
            "cannot read the seccomp profile {}: {e}",
            excerpt_path(path)
        ))
    })?;
    let profile: Profile = serde_json::from_slice(&text).map_err(|e| {
        RuntimeError::InvalidArgument(format!(
            "the seccomp profile {} is not valid JSON of a seccomp profile: {}",
            excerpt_path(path),
            excerpt(&e.to_string())
        ))
    })?;
    if profile.default_action.is_empty() {
        return Err(RuntimeError::InvalidArgument(format!(
            "the seccomp profile {} has no defaultAction",
            excerpt_path(path)
        )));
    }
    Ok(profile)
}

/// A name from a profile as one of the OCI spec's enumerations (they spell them
/// as the profile does: `SCMP_ACT_ERRNO`, `SCMP_ARCH_X86_64`, `SCMP_CMP_EQ`...).
fn named<T: serde::de::DeserializeOwned>(value: &str, what: &str) -> Result<T, RuntimeError> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| {
        RuntimeError::InvalidArgument(format!("unknown seccomp {what} `{}`", excerpt(value)))
    })
}

/// The seccomp architecture of this machine, as profiles name it.
pub fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "SCMP_ARCH_X86_64",
        "x86" => "SCMP_ARCH_X86",
        "aarch64" => "SCMP_ARCH_AARCH64",
        "arm" => "SCMP_ARCH_ARM",
        "powerpc64" => "SCMP_ARCH_PPC64LE",
        "s390x" => "SCMP_ARCH_S390X",
        "riscv64" => "SCMP_ARCH_RISCV64",
        _ => "SCMP_ARCH_NATIVE",
    }
}

/// The running kernel's version (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    parse_version(&release).unwrap_or((0, 0))
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

impl Filter {
    /// Whether a rule with this as `includes` applies to `target`.
    fn includes(&self, target: &Target<'_>) -> Result<bool, RuntimeError> {
        let has_caps = self.caps.iter().all(|c| {
            crate::spec::capabilities::parse(c).is_ok_and(|c| target.capabilities.contains(&c))
        });
        let arch = self.arches.is_empty() || self.arches.iter().any(|a| a == target.arch);
        let kernel = match &self.min_kernel {
            Some(minimum) => {
                target.kernel
                    >= parse_version(minimum).ok_or_else(|| {
                        RuntimeError::InvalidArgument(format!(
                            "seccomp minKernel `{}` is not major.minor",
                            excerpt(minimum)
                        ))
                    })?
            }
            None => true,
        };
        Ok(has_caps && arch && kernel)
    }

    /// Whether a rule with this as `excludes` is left out for `target`.
    fn excludes(&self, target: &Target<'_>) -> bool {
        self.caps.iter().any(|c| {
            crate::spec::capabilities::parse(c).is_ok_and(|c| target.capabilities.contains(&c))
        }) || self.arches.iter().any(|a| a == target.arch)
    }
}

impl Profile {
    /// The architectures the filter covers: this machine's entry of `archMap` (with
    /// its sub-architectures) when there is one, else `architectures`.
    fn arches(&self, target: &Target<'_>) -> Result<Vec<Arch>, RuntimeError> {
        let names: Vec<&String> = match self.arch_map.iter().find(|m| m.architecture == target.arch)
        {
            Some(map) => std::iter::once(&map.architecture)
                .chain(&map.sub_architectures)
                .collect(),
            None if self.arch_map.is_empty() => self.architectures.iter().collect(),
            None => Vec::new(),
        };
        names
            .into_iter()
            .map(|name| named(name, "architecture"))
            .collect()
    }

    /// The OCI `linux.seccomp` of this profile for one container.
    pub fn to_oci(&self, target: &Target<'_>) -> Result<LinuxSeccomp, RuntimeError> {
        let mut syscalls = Vec::new();
        for rule in &self.syscalls {
            if !rule.includes.includes(target)? || rule.excludes.excludes(target) {
                continue;
            }
            let names: Vec<String> = rule.name.iter().chain(&rule.names).cloned().collect();
            if names.is_empty() {
                return Err(RuntimeError::InvalidArgument(format!(
                    "a seccomp rule with action `{}` names no syscall",
                    excerpt(&rule.action)
                )));
            }
            let args = rule
                .args
                .iter()
                .map(|a| {
                    let op: LinuxSeccompOperator = named(&a.op, "operator")?;
                    let mut arg = LinuxSeccompArgBuilder::default()
                        .index(a.index)
                        .value(a.value)
                        .op(op);
                    if a.value_two != 0 {
                        arg = arg.value_two(a.value_two);
                    }
                    arg.build().map_err(|e| {
                        RuntimeError::Oci(format!("cannot build a seccomp argument rule: {e}"))
                    })
                })
                .collect::<Result<Vec<_>, RuntimeError>>()?;
            let mut syscall = LinuxSyscall::default();
            syscall.set_names(names);
            syscall.set_action(named(&rule.action, "action")?);
            syscall.set_errno_ret(rule.errno_ret);
            syscall.set_args((!args.is_empty()).then_some(args));
            syscalls.push(syscall);
        }
        let default_action: LinuxSeccompAction = named(&self.default_action, "action")?;
        let flags = self
            .flags
            .iter()
            .map(|f| named::<LinuxSeccompFilterFlag>(f, "flag"))
            .collect::<Result<Vec<_>, _>>()?;
        let arches = self.arches(target)?;
        let mut seccomp = LinuxSeccomp::default();
        seccomp.set_default_action(default_action);
        seccomp.set_default_errno_ret(self.default_errno_ret);
        seccomp.set_architectures((!arches.is_empty()).then_some(arches));
        seccomp.set_flags((!flags.is_empty()).then_some(flags));
        seccomp.set_listener_path(self.listener_path.clone());
        seccomp.set_listener_metadata(self.listener_metadata.clone());
        seccomp.set_syscalls(Some(syscalls));
        Ok(seccomp)
    }
}

/// The `linux.seccomp` of a container: none when privileged (a privileged
/// container ignores its profile, as the kubelet expects) or unconfined.
pub fn for_container(
    security: Option<&LinuxContainerSecurityContext>,
    privileged: bool,
    capabilities: &HashSet<Capability>,
) -> Result<Option<LinuxSeccomp>, RuntimeError> {
    if privileged {
        return Ok(None);
    }
    let target = Target {
        capabilities,
        arch: native_arch(),
        kernel: kernel_version(),
    };
    match select(security)? {
        Selected::Unconfined => Ok(None),
        Selected::RuntimeDefault => default::profile().to_oci(&target).map(Some),
        Selected::Localhost(path) => read(&path)?.to_oci(&target).map(Some).map_err(|e| {
            RuntimeError::InvalidArgument(format!(
                "the seccomp profile {}: {e}",
                excerpt_path(&path)
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(deprecated)]
    fn context(seccomp: Option<SecurityProfile>, path: &str) -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext {
            seccomp,
            seccomp_profile_path: path.into(),
            ..Default::default()
        }
    }

    fn profile(kind: ProfileType, reference: &str) -> Option<SecurityProfile> {
        Some(SecurityProfile {
            profile_type: kind as i32,
            localhost_ref: reference.into(),
        })
    }

    #[test]
    fn selection_from_both_fields() {
        assert_eq!(select(None).expect("none"), Selected::Unconfined);
        assert_eq!(
            select(Some(&context(None, ""))).expect("empty"),
            Selected::Unconfined
        );
        assert_eq!(
            select(Some(&context(Some(SecurityProfile::default()), ""))).expect("empty profile"),
            Selected::RuntimeDefault
        );
        assert_eq!(
            select(Some(&context(
                profile(ProfileType::Unconfined, ""),
                "runtime/default"
            )))
            .expect("field wins"),
            Selected::Unconfined
        );
        assert_eq!(
            select(Some(&context(
                profile(ProfileType::Localhost, "/p.json"),
                ""
            )))
            .expect("localhost"),
            Selected::Localhost("/p.json".into())
        );
        for (path, expected) in [
            ("runtime/default", Selected::RuntimeDefault),
            ("docker/default", Selected::RuntimeDefault),
            ("unconfined", Selected::Unconfined),
            (
                "localhost//x/y.json",
                Selected::Localhost("/x/y.json".into()),
            ),
        ] {
            assert_eq!(select(Some(&context(None, path))).expect(path), expected);
        }
        for bad in [
            context(None, "localhost/relative.json"),
            context(None, "mine"),
            context(profile(ProfileType::Localhost, "relative.json"), ""),
        ] {
            assert!(
                matches!(select(Some(&bad)), Err(RuntimeError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn localhost_profiles_that_are_missing_or_malformed_name_their_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.json");
        let error = read(&missing).expect_err("missing");
        assert!(
            matches!(error, RuntimeError::InvalidArgument(ref m) if m.contains("missing.json")),
            "{error}"
        );
        let malformed = dir.path().join("bad.json");
        std::fs::write(&malformed, b"{\"syscalls\": 3").expect("write");
        let error = read(&malformed).expect_err("malformed");
        assert!(
            matches!(error, RuntimeError::InvalidArgument(ref m) if m.contains("bad.json")),
            "{error}"
        );
        let no_default = dir.path().join("no-default.json");
        std::fs::write(&no_default, b"{\"syscalls\": []}").expect("write");
        assert!(
            matches!(read(&no_default), Err(RuntimeError::InvalidArgument(ref m)) if m.contains("no-default.json"))
        );
        let bad_action = dir.path().join("bad-action.json");
        std::fs::write(&bad_action, br#"{"defaultAction": "SCMP_ACT_PERHAPS"}"#).expect("write");
        let asking = context(
            profile(ProfileType::Localhost, bad_action.to_str().expect("utf-8")),
            "",
        );
        let error = for_container(Some(&asking), false, &HashSet::new()).expect_err("bad action");
        assert!(
            matches!(error, RuntimeError::InvalidArgument(ref m) if m.contains("bad-action.json") && m.contains("SCMP_ACT_PERHAPS")),
            "{error}"
        );
    }

    #[test]
    fn docker_format_rules_are_evaluated_for_the_container() {
        let text = r#"{
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"name": "mount", "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}], "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["SCMP_ARCH_X86_64"]}},
                {"names": ["new_thing"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.1"}}
            ]}"#;
        let parsed: Profile = serde_json::from_str(text).expect("parse");
        let plain: HashSet<Capability> = [Capability::Chown].into_iter().collect();
        let target = Target {
            capabilities: &plain,
            arch: "SCMP_ARCH_X86_64",
            kernel: (6, 1),
        };
        let oci = parsed.to_oci(&target).expect("convert");
        assert_eq!(oci.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(oci.default_errno_ret(), Some(1));
        assert_eq!(
            oci.architectures().clone().expect("arches"),
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
        );
        let names: Vec<Vec<String>> = oci
            .syscalls()
            .clone()
            .expect("rules")
            .iter()
            .map(|s| s.names().clone())
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["read".to_string(), "write".to_string()],
                vec!["clone".to_string()],
                vec!["arch_prctl".to_string()]
            ]
        );
        let clone = &oci.syscalls().clone().expect("rules")[1];
        let arg = clone.args().clone().expect("args")[0];
        assert_eq!(
            (arg.index(), arg.value(), arg.value_two(), arg.op()),
            (0, 2114060288, None, LinuxSeccompOperator::ScmpCmpMaskedEq)
        );

        let admin: HashSet<Capability> = [Capability::SysAdmin].into_iter().collect();
        let target = Target {
            capabilities: &admin,
            arch: "SCMP_ARCH_AARCH64",
            kernel: (6, 1),
        };
        let oci = parsed.to_oci(&target).expect("convert");
        let names: Vec<Vec<String>> = oci
            .syscalls()
            .clone()
            .expect("rules")
            .iter()
            .map(|s| s.names().clone())
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["read".to_string(), "write".to_string()],
                vec!["mount".to_string()]
            ]
        );
        assert_eq!(
            oci.architectures().clone().expect("arches"),
            vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
        );
    }

    #[test]
    fn unknown_names_are_refused() {
        let plain = HashSet::new();
        let target = Target {
            capabilities: &plain,
            arch: "SCMP_ARCH_X86_64",
            kernel: (6, 1),
        };
        for text in [
            r#"{"defaultAction": "SCMP_ACT_MAYBE"}"#,
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}"#,
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]}"#,
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]}"#,
        ] {
            let parsed: Profile = serde_json::from_str(text).expect("parse");
            assert!(
                matches!(
                    parsed.to_oci(&target),
                    Err(RuntimeError::InvalidArgument(_))
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn privileged_and_unconfined_get_no_filter_and_the_default_confines() {
        let caps = crate::spec::capabilities::available(Some(40), None);
        let default = context(Some(SecurityProfile::default()), "");
        assert!(
            for_container(Some(&default), true, &caps)
                .expect("privileged")
                .is_none()
        );
        assert!(
            for_container(Some(&context(None, "unconfined")), false, &caps)
                .expect("unconfined")
                .is_none()
        );
        let filter = for_container(Some(&default), false, &caps)
            .expect("default")
            .expect("a filter");
        assert_eq!(filter.default_action(), LinuxSeccompAction::ScmpActErrno);
        let missing = context(
            profile(ProfileType::Localhost, "/nonexistent/profile.json"),
            "",
        );
        let error = for_container(Some(&missing), false, &caps).expect_err("missing");
        assert!(
            error.to_string().contains("/nonexistent/profile.json"),
            "{error}"
        );
    }
}
