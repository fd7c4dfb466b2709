//! Image references, normalised the way the kubelet and docker write them:
//! `busybox` → `docker.io/library/busybox:latest`, `quay.io/x/y@sha256:…` kept, and
//! image ids (`sha256:<64 hex>`, or the bare hex) told apart from names.

use std::fmt;

pub const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid image reference `{reference}`: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: &'static str,
}

/// What a CRI image string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image id, `sha256:<hex>`.
    Id(String),
    Named(NamedRef),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl NamedRef {
    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The repo-tag form, `registry/repository:tag`, when a tag is named.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|tag| format!("{}:{tag}", self.name()))
    }

    /// The repo-digest form for a given manifest digest.
    pub fn with_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }
}

impl fmt::Display for NamedRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn is_hex_digest(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_digest(value: &str) -> bool {
    value.strip_prefix("sha256:").is_some_and(is_hex_digest)
}

pub fn parse(reference: &str) -> Result<ImageRef, ReferenceError> {
    let error = |reason| ReferenceError { reference: reference.to_string(), reason };
    if is_digest(reference) {
        return Ok(ImageRef::Id(reference.to_string()));
    }
    if is_hex_digest(reference) {
        return Ok(ImageRef::Id(format!("sha256:{reference}")));
    }
    if reference.is_empty() {
        return Err(error("it is empty"));
    }
    if reference.len() > 4096 || reference.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(error("it holds whitespace or control characters, or is too long"));
    }
    let (name, digest) = match reference.split_once('@') {
        Some((name, digest)) if is_digest(digest) => (name, Some(digest.to_string())),
        Some(_) => return Err(error("the digest after '@' must be sha256:<64 lowercase hex>")),
        None => (reference, None),
    };
    // A tag is a ':' after the last '/', so a registry port is not mistaken for one.
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(name[last_slash + i + 1..].to_string())),
        None => (name, None),
    };
    if let Some(tag) = &tag
        && (tag.is_empty() || tag.len() > 128 || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        return Err(error("a tag is 1-128 letters, digits, '.', '_' or '-'"));
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first.to_string(), rest.to_string()),
        _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
    };
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') { format!("library/{repository}") } else { repository };
    let valid_component = |c: &str| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch));
    if !repository.split('/').all(valid_component) {
        return Err(error("a repository is lowercase letters, digits and '.', '_', '-', separated by '/'"));
    }
    let tag = if tag.is_none() && digest.is_none() { Some(DEFAULT_TAG.to_string()) } else { tag };
    Ok(ImageRef::Named(NamedRef { registry, repository, tag, digest }))
}

/// The OCI chain id of a layer on top of `parent` (none for the bottom layer):
/// the diff id itself at the bottom, then sha256 of "<parent chain id> <diff id>".
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    use sha2::Digest;
    match parent {
        None => diff_id.to_string(),
        Some(parent) => format!("sha256:{}", hex::encode(sha2::Sha256::digest(format!("{parent} {diff_id}").as_bytes()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(reference: &str) -> NamedRef {
        match parse(reference).expect("valid") {
            ImageRef::Named(named) => named,
            ImageRef::Id(id) => panic!("{reference} parsed as id {id}"),
        }
    }

    #[test]
    fn normalises_like_the_kubelet() {
        assert_eq!(named("busybox").to_string(), "docker.io/library/busybox:latest");
        assert_eq!(named("busybox:1.36").to_string(), "docker.io/library/busybox:1.36");
        assert_eq!(named("user/app").to_string(), "docker.io/user/app:latest");
        assert_eq!(named("registry.k8s.io/pause:3.9").to_string(), "registry.k8s.io/pause:3.9");
        assert_eq!(named("127.0.0.1:5000/e2e/nginx:1.14-2").to_string(), "127.0.0.1:5000/e2e/nginx:1.14-2");
        assert_eq!(named("localhost/app").to_string(), "localhost/app:latest");
        let digest = format!("sha256:{}", "a".repeat(64));
        let by_digest = named(&format!("quay.io/x/y@{digest}"));
        assert_eq!((by_digest.tag.clone(), by_digest.digest.clone()), (None, Some(digest.clone())));
        assert_eq!(by_digest.with_digest(&digest), format!("quay.io/x/y@{digest}"));
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        use sha2::Digest;
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(None, &a), a);
        let expected = format!("sha256:{}", hex::encode(sha2::Sha256::digest(format!("{a} {b}").as_bytes())));
        assert_eq!(chain_id(Some(&a), &b), expected);
    }

    #[test]
    fn ids_are_not_names() {
        let hex = "b".repeat(64);
        assert_eq!(parse(&format!("sha256:{hex}")), Ok(ImageRef::Id(format!("sha256:{hex}"))));
        assert_eq!(parse(&hex), Ok(ImageRef::Id(format!("sha256:{hex}"))));
    }

    #[test]
    fn rejects_what_is_not_a_reference() {
        for bad in ["", "Busybox", "a b", "x@sha256:short", "x:", "x:!!", "UPPER/case"] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
