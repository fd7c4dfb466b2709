//! Where an image can be pulled from (its mirrors, then its registry) and with what
//! credentials.

use std::collections::HashMap;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use trellis_common::config::ImageConfig;
use trellis_common::reference::NamedRef;

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
    let name = host.rsplit_once(':').filter(|(h, port)| !h.is_empty() && port.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h);
    matches!(name, "localhost" | "127.0.0.1" | "[::1]" | "::1") || name.starts_with("127.")
}

/// Mirrors in configured order, then the registry itself.
pub fn sources(config: &ImageConfig, image: &NamedRef) -> Vec<Source> {
    let at = |registry: String, repository: String| match (&image.digest, &image.tag) {
        (Some(digest), _) => Reference::with_digest(registry, repository, digest.clone()),
        (None, tag) => Reference::with_tag(registry, repository, tag.clone().unwrap_or_else(|| "latest".into())),
    };
    let mut sources: Vec<Source> = config
        .mirrors_of(&image.registry)
        .into_iter()
        .map(|mirror| {
            let repository = if mirror.prefix.is_empty() { image.repository.clone() } else { format!("{}/{}", mirror.prefix, image.repository) };
            let scheme = if mirror.plain_http { "http" } else { "https" };
            Source {
                label: format!("mirror {scheme}://{}", mirror.host),
                plain_http: mirror.plain_http || is_loopback(&mirror.host),
                reference: at(mirror.host, repository),
            }
        })
        .collect();
    let insecure = is_loopback(&image.registry) || config.insecure_registries.iter().any(|r| *r == image.registry || image.registry.split(':').next() == Some(r.as_str()));
    sources.push(Source { label: format!("registry {}", image.registry), plain_http: insecure, reference: at(image.registry.clone(), image.repository.clone()) });
    sources
}

/// A client for one source. Fresh per pull: oci-client caches credentials per
/// registry, and one kubelet request's credentials must not serve another's.
pub fn client_for(source: &Source, read_timeout: std::time::Duration) -> Client {
    let protocol = if source.plain_http { ClientProtocol::HttpsExcept(vec![source.reference.registry().to_string()]) } else { ClientProtocol::Https };
    Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        read_timeout: Some(read_timeout),
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        ..Default::default()
    })
}

/// Credentials from the CRI request, else from the credentials file for `registry`.
pub fn auth_for(request: Option<&k8s_cri::v1::AuthConfig>, file: &HashMap<String, RegistryAuth>, registry: &str) -> Result<RegistryAuth, ImageError> {
    if let Some(auth) = request {
        if !auth.username.is_empty() {
            return Ok(RegistryAuth::Basic(auth.username.clone(), auth.password.clone()));
        }
        if !auth.auth.is_empty() {
            return decode_basic(&auth.auth).ok_or_else(|| ImageError::InvalidArgument("AuthConfig.auth is not base64 of `user:password`".into()));
        }
        for token in [&auth.registry_token, &auth.identity_token] {
            if !token.is_empty() {
                return Ok(RegistryAuth::Bearer(token.clone()));
            }
        }
    }
    Ok(file.get(registry).cloned().unwrap_or(RegistryAuth::Anonymous))
}

fn decode_basic(encoded: &str) -> Option<RegistryAuth> {
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(RegistryAuth::Basic(user.to_string(), password.to_string()))
}

/// Reads a docker-style config.json: `{"auths": {"registry": {"auth": "..."} | {"username", "password"}}}`.
pub fn load_credentials(path: &str) -> Result<HashMap<String, RegistryAuth>, ImageError> {
    if path.is_empty() {
        return Ok(HashMap::new());
    }
    let bad = |reason: String| ImageError::Credentials { path: path.to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let mut credentials = HashMap::new();
    for (registry, entry) in json.get("auths").and_then(|a| a.as_object()).into_iter().flatten() {
        let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let auth = if !field("username").is_empty() {
            RegistryAuth::Basic(field("username"), field("password"))
        } else {
            decode_basic(&field("auth")).ok_or_else(|| bad(format!("entry {registry} has neither username/password nor a valid auth")))?
        };
        let host = registry.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/').split('/').next().unwrap_or_default();
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
        let config = ImageConfig { mirrors: vec!["registry.k8s.io=http://127.0.0.1:5000".into()], ..Default::default() };
        let sources = sources(&config, &named("registry.k8s.io/e2e-test-images/nginx:1.14-2"));
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].reference.whole(), "127.0.0.1:5000/e2e-test-images/nginx:1.14-2");
        assert!(sources[0].plain_http);
        assert_eq!(sources[1].reference.registry(), "registry.k8s.io");
        assert!(!sources[1].plain_http);
    }

    #[test]
    fn loopback_and_listed_registries_are_plain_http() {
        let config = ImageConfig { insecure_registries: vec!["registry.lan".into()], ..Default::default() };
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
        assert!(matches!(from_file.get("reg.example:5000"), Some(RegistryAuth::Basic(u, p)) if u == "u" && p == "p"));
        let request = k8s_cri::v1::AuthConfig { username: "x".into(), password: "y".into(), ..Default::default() };
        assert!(matches!(auth_for(Some(&request), &from_file, "reg.example:5000").expect("auth"), RegistryAuth::Basic(u, _) if u == "x"));
        assert!(matches!(auth_for(None, &from_file, "other.example").expect("auth"), RegistryAuth::Basic(u, _) if u == "a"));
        assert!(matches!(auth_for(None, &from_file, "nowhere").expect("auth"), RegistryAuth::Anonymous));
    }
}
