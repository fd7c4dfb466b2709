//! Where an image can be pulled from (its mirrors, then its registry) and with what
//! credentials.

use std::collections::HashMap;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use trellis_common::config::ImageConfig;
use trellis_common::reference::NamedRef;
use trellis_common::text::excerpt;

use crate::error::ImageError;

/// One place to pull an image from.
#[derive(Debug, Clone)]
pub struct Source {
    /// What to ask that place for.
    pub reference: Reference,
    pub plain_http: bool,
    /// For messages: `mirror http://127.0.0.1:5000` or `registry docker.io`.
    pub label: String,
}

fn is_loopback(host: &str) -> bool {
    let name = host
        .rsplit_once(':')
        .filter(|(h, port)| !h.is_empty() && port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    matches!(name, "localhost" | "127.0.0.1" | "[::1]" | "::1") || name.starts_with("127.")
}

/// Mirrors in configured order, then the registry itself.
pub fn sources(config: &ImageConfig, image: &NamedRef) -> Vec<Source> {
    let at = |registry: String, repository: String| match (&image.digest, &image.tag) {
        (Some(digest), _) => Reference::with_digest(registry, repository, digest.clone()),
        (None, tag) => Reference::with_tag(
            registry,
            repository,
            tag.clone().unwrap_or_else(|| "latest".into()),
        ),
    };
    let mut sources: Vec<Source> = config
        .mirrors_of(&image.registry)
        .into_iter()
        .map(|mirror| {
            let repository = if mirror.prefix.is_empty() {
                image.repository.clone()
            } else {
                format!("{}/{}", mirror.prefix, image.repository)
            };
            let scheme = if mirror.plain_http { "http" } else { "https" };
            Source {
                label: format!("mirror {scheme}://{}", mirror.host),
                plain_http: mirror.plain_http || is_loopback(&mirror.host),
                reference: at(mirror.host, repository),
            }
        })
        .collect();
    let insecure = is_loopback(&image.registry)
        || config
            .insecure_registries
            .iter()
            .any(|r| *r == image.registry || image.registry.split(':').next() == Some(r.as_str()));
    sources.push(Source {
        label: format!("registry {}", image.registry),
        plain_http: insecure,
        reference: at(image.registry.clone(), image.repository.clone()),
    });
    sources
}

/// A client for one source. Fresh per pull: oci-client caches credentials per
/// registry, and one kubelet request's credentials must not serve another's.
pub fn client_for(source: &Source, read_timeout: std::time::Duration) -> Client {
    let protocol = if source.plain_http {
        ClientProtocol::HttpsExcept(vec![source.reference.registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        read_timeout: Some(read_timeout),
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        ..Default::default()
    })
}

/// Longest credential field taken: well above real tokens (JWTs of a few KB), well
/// below what would bloat every request to the registry.
const CREDENTIAL_MAX_BYTES: usize = 16 * 1024;

/// What a credential field is used as, for the checks it must pass.
#[derive(Clone, Copy)]
enum Secret {
    Username,
    Password,
    /// Sent as is in `Authorization: Bearer …`.
    Token,
}

/// Why `value` cannot be used as `kind`, in words that never quote it: a secret
/// does not belong in an error message or a log.
fn check_secret(value: &str, kind: Secret) -> Result<(), String> {
    if value.len() > CREDENTIAL_MAX_BYTES {
        return Err(format!(
            "is {} bytes, more than {CREDENTIAL_MAX_BYTES}",
            value.len()
        ));
    }
    match kind {
        // A header value cannot hold control characters (the HTTP client would panic
        // building it), and RFC 6750 tokens are printable ASCII without spaces.
        Secret::Token if !value.bytes().all(|b| b.is_ascii_graphic()) => Err("holds a control character, a space or a non-ASCII character, which a bearer token cannot".into()),
        Secret::Username | Secret::Password if value.chars().any(char::is_control) => Err("holds a control character".into()),
        // Basic authentication joins them as `user:password`: a ':' in the user would move the split.
        Secret::Username if value.contains(':') => Err("holds ':', which separates user and password".into()),
        _ => Ok(()),
    }
}

/// Credentials from the CRI request, else from the credentials file for `registry`.
/// Every field the request sets is checked, used or not: it is hostile until then.
pub fn auth_for(
    request: Option<&k8s_cri::v1::AuthConfig>,
    file: &HashMap<String, RegistryAuth>,
    registry: &str,
) -> Result<RegistryAuth, ImageError> {
    let Some(auth) = request else {
        return Ok(file
            .get(registry)
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous));
    };
    let refuse = |field: &str, problem: String| {
        ImageError::InvalidArgument(format!(
            "AuthConfig.{field} {problem} (its value is not shown)"
        ))
    };
    for (field, value, kind) in [
        ("username", &auth.username, Secret::Username),
        ("password", &auth.password, Secret::Password),
        ("registry_token", &auth.registry_token, Secret::Token),
        ("identity_token", &auth.identity_token, Secret::Token),
    ] {
        check_secret(value, kind).map_err(|problem| refuse(field, problem))?;
    }
    let decoded = if auth.auth.is_empty() {
        None
    } else {
        Some(decode_basic(&auth.auth).map_err(|problem| refuse("auth", problem))?)
    };
    if !auth.username.is_empty() {
        return Ok(RegistryAuth::Basic(
            auth.username.clone(),
            auth.password.clone(),
        ));
    }
    if let Some((user, password)) = decoded {
        return Ok(RegistryAuth::Basic(user, password));
    }
    for token in [&auth.registry_token, &auth.identity_token] {
        if !token.is_empty() {
            return Ok(RegistryAuth::Bearer(token.clone()));
        }
    }
    Ok(file
        .get(registry)
        .cloned()
        .unwrap_or(RegistryAuth::Anonymous))
}

/// `base64(user:password)`, checked like the separate fields.
fn decode_basic(encoded: &str) -> Result<(String, String), String> {
    let encoded = encoded.trim();
    check_secret(encoded, Secret::Token)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "is not base64".to_string())?;
    let text = String::from_utf8(decoded).map_err(|_| "is not base64 of UTF-8 text".to_string())?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| "is not base64 of `user:password`".to_string())?;
    check_secret(user, Secret::Username)
        .map_err(|problem| format!("decodes to a user name that {problem}"))?;
    check_secret(password, Secret::Password)
        .map_err(|problem| format!("decodes to a password that {problem}"))?;
    Ok((user.to_string(), password.to_string()))
}

/// Reads a docker-style config.json: `{"auths": {"registry": {"auth": "..."} | {"username", "password"}}}`.
/// An entry that could not be sent as it is stops the service from starting, naming
/// the entry and the field, not the secret.
pub fn load_credentials(path: &str) -> Result<HashMap<String, RegistryAuth>, ImageError> {
    if path.is_empty() {
        return Ok(HashMap::new());
    }
    let bad = |reason: String| ImageError::Credentials {
        path: path.to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let mut credentials = HashMap::new();
    for (registry, entry) in json
        .get("auths")
        .and_then(|a| a.as_object())
        .into_iter()
        .flatten()
    {
        let entry_name = excerpt(registry);
        let field = |name: &str| {
            entry
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let auth = if !field("username").is_empty() {
            for (name, kind) in [
                ("username", Secret::Username),
                ("password", Secret::Password),
            ] {
                check_secret(&field(name), kind)
                    .map_err(|problem| bad(format!("entry {entry_name}: {name} {problem}")))?;
            }
            RegistryAuth::Basic(field("username"), field("password"))
        } else if !field("auth").is_empty() {
            let (user, password) = decode_basic(&field("auth"))
                .map_err(|problem| bad(format!("entry {entry_name}: auth {problem}")))?;
            RegistryAuth::Basic(user, password)
        } else {
            return Err(bad(format!(
                "entry {entry_name} has neither username/password nor auth"
            )));
        };
        let host = registry
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        credentials.insert(host.to_string(), auth);
    }
    Ok(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_common::reference::{ImageRef, parse};

    fn named(reference: &str) -> NamedRef {
        match parse(reference).expect("valid") {
            ImageRef::Named(named) => named,
            ImageRef::Id(_) => panic!("not a name"),
        }
    }

    #[test]
    fn mirrors_come_first_and_keep_the_repository() {
        let config = ImageConfig {
            mirrors: vec![
                "registry.k8s.io=http://127.0.0.1:5000"
                    .parse()
                    .expect("a mirror"),
            ],
            ..Default::default()
        };
        let sources = sources(
            &config,
            &named("registry.k8s.io/e2e-test-images/nginx:1.14-2"),
        );
        assert_eq!(sources.len(), 2);
        assert_eq!(
            sources[0].reference.whole(),
            "127.0.0.1:5000/e2e-test-images/nginx:1.14-2"
        );
        assert!(sources[0].plain_http);
        assert_eq!(sources[1].reference.registry(), "registry.k8s.io");
        assert!(!sources[1].plain_http);
    }

    #[test]
    fn loopback_and_listed_registries_are_plain_http() {
        let config = ImageConfig {
            insecure_registries: vec!["registry.lan".into()],
            ..Default::default()
        };
        assert!(sources(&config, &named("127.0.0.1:5000/x"))[0].plain_http);
        assert!(sources(&config, &named("localhost:5000/x"))[0].plain_http);
        assert!(sources(&config, &named("registry.lan:5000/x"))[0].plain_http);
        assert!(!sources(&config, &named("quay.io/x"))[0].plain_http);
    }

    #[test]
    fn credentials_from_request_then_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.json");
        std::fs::write(&file, r#"{"auths":{"https://reg.example:5000":{"auth":"dTpw"},"other.example":{"username":"a","password":"b"}}}"#).expect("write");
        let from_file = load_credentials(file.to_str().expect("utf-8")).expect("load");
        assert!(
            matches!(from_file.get("reg.example:5000"), Some(RegistryAuth::Basic(u, p)) if u == "u" && p == "p")
        );
        let request = k8s_cri::v1::AuthConfig {
            username: "x".into(),
            password: "y".into(),
            ..Default::default()
        };
        assert!(
            matches!(auth_for(Some(&request), &from_file, "reg.example:5000").expect("auth"), RegistryAuth::Basic(u, _) if u == "x")
        );
        assert!(
            matches!(auth_for(None, &from_file, "other.example").expect("auth"), RegistryAuth::Basic(u, _) if u == "a")
        );
        assert!(matches!(
            auth_for(None, &from_file, "nowhere").expect("auth"),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn request_credentials_are_checked_by_field_without_echoing_them() {
        let none = HashMap::new();
        let refused = |auth: k8s_cri::v1::AuthConfig| {
            auth_for(Some(&auth), &none, "reg.example")
                .expect_err("refused")
                .to_string()
        };
        let secret = "s3cret-\u{1}-value";
        let cases = [
            (
                "registry_token",
                k8s_cri::v1::AuthConfig {
                    registry_token: format!("tok\n{secret}"),
                    ..Default::default()
                },
            ),
            (
                "registry_token",
                k8s_cri::v1::AuthConfig {
                    registry_token: format!("tok {secret}"),
                    ..Default::default()
                },
            ),
            (
                "identity_token",
                k8s_cri::v1::AuthConfig {
                    identity_token: format!("tok\r{secret}"),
                    ..Default::default()
                },
            ),
            (
                "identity_token",
                k8s_cri::v1::AuthConfig {
                    identity_token: format!("tók{secret}"),
                    ..Default::default()
                },
            ),
            (
                "username",
                k8s_cri::v1::AuthConfig {
                    username: format!("a:{secret}"),
                    password: "p".into(),
                    ..Default::default()
                },
            ),
            (
                "username",
                k8s_cri::v1::AuthConfig {
                    username: format!("a\n{secret}"),
                    ..Default::default()
                },
            ),
            (
                "password",
                k8s_cri::v1::AuthConfig {
                    username: "u".into(),
                    password: format!("p\u{7f}{secret}"),
                    ..Default::default()
                },
            ),
            // Checked even when another field would be used.
            (
                "registry_token",
                k8s_cri::v1::AuthConfig {
                    username: "u".into(),
                    password: "p".into(),
                    registry_token: format!("\n{secret}"),
                    ..Default::default()
                },
            ),
            (
                "auth",
                k8s_cri::v1::AuthConfig {
                    auth: base64::engine::general_purpose::STANDARD
                        .encode(format!("u:p\n{secret}")),
                    ..Default::default()
                },
            ),
            (
                "auth",
                k8s_cri::v1::AuthConfig {
                    auth: format!("not base64 {secret}"),
                    ..Default::default()
                },
            ),
            (
                "registry_token",
                k8s_cri::v1::AuthConfig {
                    registry_token: "t".repeat(CREDENTIAL_MAX_BYTES + 1),
                    ..Default::default()
                },
            ),
        ];
        for (field, auth) in cases {
            let message = refused(auth);
            assert!(
                message.starts_with(&format!("AuthConfig.{field} ")),
                "{field}: {message}"
            );
            assert!(
                !message.contains("s3cret") && !message.contains("ttttt"),
                "the secret stays out of the message: {message}"
            );
            let status = tonic::Status::from(ImageError::InvalidArgument(message));
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
        let fine = k8s_cri::v1::AuthConfig {
            registry_token: "eyJhbGciOi.J9-_~+/=".into(),
            ..Default::default()
        };
        assert!(
            matches!(auth_for(Some(&fine), &none, "r").expect("a JWT-like token"), RegistryAuth::Bearer(t) if t == "eyJhbGciOi.J9-_~+/=")
        );
        let spaced = k8s_cri::v1::AuthConfig {
            username: "u".into(),
            password: "pass word:ünïcode".into(),
            ..Default::default()
        };
        assert!(
            matches!(auth_for(Some(&spaced), &none, "r").expect("printable passwords"), RegistryAuth::Basic(_, p) if p == "pass word:ünïcode")
        );
    }

    #[test]
    fn credentials_file_entries_are_checked_by_entry_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.json");
        let path = file.to_str().expect("utf-8");
        let cases = [
            (
                r#"{"auths":{"reg.example":{"username":"u","password":"p\u0001s3cret"}}}"#,
                "entry reg.example: password holds a control character",
            ),
            (
                r#"{"auths":{"reg.example":{"username":"u:s3cret","password":"p"}}}"#,
                "entry reg.example: username holds ':'",
            ),
            (
                r#"{"auths":{"reg.example":{"auth":"dTpwCnMzY3JldA=="}}}"#,
                "entry reg.example: auth decodes to a password that holds a control character",
            ),
            (
                r#"{"auths":{"reg\nforged.example":{"auth":"!!s3cret"}}}"#,
                "entry reg\\nforged.example: auth is not base64",
            ),
        ];
        for (json, expected) in cases {
            std::fs::write(&file, json).expect("write");
            let message = load_credentials(path).expect_err("refused").to_string();
            assert!(message.contains(expected), "{expected}: {message}");
            assert!(!message.contains("s3cret"), "{message}");
        }
    }
}
