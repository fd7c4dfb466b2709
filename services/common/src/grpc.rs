//! Helpers for the CRI services the runtime and image services serve.

use std::path::{Path, PathBuf};

/// Largest CRI message accepted or sent, as the kubelet configures its own client.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The answer for a CRI RPC the service does not do yet, naming it the way the CRI
/// API spells it (`run_pod_sandbox` → `RunPodSandbox`).
pub fn unimplemented_rpc(service: &str, method: &str) -> tonic::Status {
    let name: String = method
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    tonic::Status::unimplemented(format!(
        "{name} is not implemented by trellis-{service} yet"
    ))
}

/// Implements a tonic service trait with the listed RPCs answering `Unimplemented`
/// and the remaining methods written out by hand after them. One macro emits the
/// whole impl because `#[async_trait]` must see every method already expanded.
#[macro_export]
macro_rules! grpc_service_impl {
    (
        impl $trait:path, for $ty:ty, service $service:literal;
        unimplemented { $( $method:ident ( $req:ty ) -> $resp:ty ),* $(,)? }
        $($implemented:tt)*
    ) => {
        #[tonic::async_trait]
        impl $trait for $ty {
            $(
                async fn $method(&self, _request: tonic::Request<$req>) -> Result<tonic::Response<$resp>, tonic::Status> {
                    Err($crate::grpc::unimplemented_rpc($service, stringify!($method)))
                }
            )*
            $($implemented)*
        }
    };
}

/// Finds a program the way a shell would: a name containing `/` is taken as a path,
/// anything else is searched in `PATH` (and the sbin directories, which root's
/// `PATH` does not always hold).
pub fn find_executable(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return is_executable(&path).then_some(path);
    }
    let path_var = std::env::var("PATH").unwrap_or_default();
    path_var
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unimplemented_names_the_rpc_in_cri_spelling() {
        let status = unimplemented_rpc("runtime", "run_pod_sandbox");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(
            status.message(),
            "RunPodSandbox is not implemented by trellis-runtime yet"
        );
    }

    #[test]
    fn finds_programs_by_name_and_path() {
        assert!(find_executable("sh").is_some());
        assert_eq!(find_executable("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(find_executable("no-such-program-trellis"), None);
        assert_eq!(find_executable("/etc/passwd"), None, "not executable");
    }
}
