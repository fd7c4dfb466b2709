//! Image references, normalised the way the kubelet and docker write them:
//! `busybox` → `docker.io/library/busybox:latest`, `quay.io/x/y@sha256:…` kept, and
//! image ids (`sha256:<64 hex>`, or the bare hex) told apart from names.
//!
//! A name becomes a URL path on a registry, so it follows the distribution reference
//! grammar (github.com/distribution/reference) to the letter: a `..` component or a
//! port that does not exist never reaches a registry or a mirror.

use std::fmt;

use crate::text::excerpt;

pub const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";
/// The distribution grammar's limit on a whole name (registry and repository).
pub const NAME_MAX_BYTES: usize = 255;
/// Longer than any valid reference (name, 128-byte tag, digest): refused before parsing.
const REFERENCE_MAX_BYTES: usize = NAME_MAX_BYTES + 1 + 128 + 1 + 71;

/// Why a reference was refused; `reference` is an excerpt of it, never the whole input.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid image reference `{reference}`: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
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
        self.tag
            .as_ref()
            .map(|tag| format!("{}:{tag}", self.name()))
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
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The id prefix a short image id stands for (`crictl images` shows 13 hex
/// characters, and users type fewer): `sha256:<hex>`, for hex shorter than a whole
/// id. A name is looked up as a reference first; only when it names no image is it
/// tried as an id prefix, as containerd does.
pub fn short_id_prefix(value: &str) -> Option<String> {
    let hex = !value.is_empty()
        && value.len() < 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    hex.then(|| format!("sha256:{value}"))
}

/// The one id among `ids` that starts with `prefix`, or none; `Err` with how many do
/// when several do, which a caller must refuse rather than take for "no such image"
/// (containerd refuses an ambiguous prefix too).
pub fn unique_by_prefix<'a>(
    prefix: &str,
    ids: impl Iterator<Item = &'a str>,
) -> Result<Option<&'a str>, usize> {
    let mut matching = ids.filter(|id| id.starts_with(prefix));
    let Some(first) = matching.next() else {
        return Ok(None);
    };
    match matching.count() {
        0 => Ok(Some(first)),
        others => Err(others + 1),
    }
}

fn is_digest(value: &str) -> bool {
    value.strip_prefix("sha256:").is_some_and(is_hex_digest)
}

/// A path component: `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`.
fn is_path_component(component: &str) -> bool {
    let mut rest = component;
    loop {
        let run = rest
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            .count();
        if run == 0 {
            return false;
        }
        rest = &rest[run..];
        if rest.is_empty() {
            return true;
        }
        let length = rest
            .bytes()
            .take_while(|b| matches!(b, b'.' | b'_' | b'-'))
            .count();
        let separator = &rest[..length];
        if length == 0
            || !(matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-'))
        {
            return false;
        }
        rest = &rest[length..];
    }
}

/// A domain label: `[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?`.
fn is_domain_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// A tag: `[\w][\w.-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    tag.len() <= 128
        && tag.bytes().next().is_some_and(word)
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-')
}

/// `host[:port]`, the host a name of dot-separated labels or a bracketed IPv6
/// address, the port 1-65535. The reason when it is not.
fn check_domain(domain: &str) -> Result<(), String> {
    let (labels, port) = match domain.strip_prefix('[') {
        Some(bracketed) => {
            let (address, after) = bracketed.split_once(']').ok_or_else(|| {
                "an IPv6 registry address opened with '[' is not closed".to_string()
            })?;
            // The grammar's character set, and a real address (`[:::]` matches the former).
            if address.is_empty()
                || !address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
                || address.parse::<std::net::Ipv6Addr>().is_err()
            {
                return Err(format!("`[{}]` is not an IPv6 address", excerpt(address)));
            }
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("`{}` after the IPv6 address is not `:port`", excerpt(after))
                })?),
            };
            (None, port)
        }
        None => match domain.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(domain), None),
        },
    };
    if let Some(label) = labels
        .into_iter()
        .flat_map(|host| host.split('.'))
        .find(|label| !is_domain_label(label))
    {
        return Err(format!(
            "registry host label `{}` is not letters and digits with inner '-'",
            excerpt(label)
        ));
    }
    if let Some(port) = port {
        let number = (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
        if !number || !port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p)) {
            return Err(format!(
                "registry port `{}` is not a number from 1 to 65535",
                excerpt(port)
            ));
        }
    }
    Ok(())
}

pub fn parse(reference: &str) -> Result<ImageRef, ReferenceError> {
    let error = |reason: String| ReferenceError {
        reference: excerpt(reference),
        reason,
    };
    if is_digest(reference) {
        return Ok(ImageRef::Id(reference.to_string()));
    }
    if is_hex_digest(reference) {
        return Ok(ImageRef::Id(format!("sha256:{reference}")));
    }
    if reference.is_empty() {
        return Err(error("it is empty".into()));
    }
    if reference.len() > REFERENCE_MAX_BYTES {
        return Err(error(format!(
            "it is {} bytes, longer than any valid reference ({REFERENCE_MAX_BYTES})",
            reference.len()
        )));
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(error("it holds whitespace or control characters".into()));
    }
    let (name, digest) = match reference.split_once('@') {
        Some((name, digest)) if is_digest(digest) => (name, Some(digest.to_string())),
        Some(_) => {
            return Err(error(
                "the digest after '@' must be sha256:<64 lowercase hex>".into(),
            ));
        }
        None => (reference, None),
    };
    // A tag is a ':' after the last '/', so a registry port is not mistaken for one.
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (
            &name[..last_slash + i],
            Some(name[last_slash + i + 1..].to_string()),
        ),
        None => (name, None),
    };
    if let Some(tag) = &tag
        && !is_tag(tag)
    {
        return Err(error(format!(
            "tag `{}` is not 1-128 letters, digits, '_', '.' or '-' starting with a letter, digit or '_'",
            excerpt(tag)
        )));
    }
    // Only a first component that looks like a host is one: `user/app` is on Docker Hub.
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            check_domain(first).map_err(error)?;
            (first.to_string(), rest.to_string())
        }
        _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
    };
    if let Some(bad) = repository
        .split('/')
        .find(|component| !is_path_component(component))
    {
        return Err(error(format!(
            "path component `{}` is not lowercase letters and digits joined by '.', '_', '__' or dashes",
            excerpt(bad)
        )));
    }
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    let named = NamedRef {
        registry,
        repository,
        tag: if tag.is_none() && digest.is_none() {
            Some(DEFAULT_TAG.to_string())
        } else {
            tag
        },
        digest,
    };
    if named.name().len() > NAME_MAX_BYTES {
        return Err(error(format!(
            "the name (registry and repository) is {} bytes, more than {NAME_MAX_BYTES}",
            named.name().len()
        )));
    }
    Ok(ImageRef::Named(named))
}

/// The OCI chain id of a layer on top of `parent` (none for the bottom layer):
/// the diff id itself at the bottom, then sha256 of "<parent chain id> <diff id>".
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    use sha2::Digest;
    match parent {
        None => diff_id.to_string(),
        Some(parent) => format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(
                format!("{parent} {diff_id}").as_bytes()
            ))
        ),
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
        assert_eq!(
            named("busybox").to_string(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            named("busybox:1.36").to_string(),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(named("user/app").to_string(), "docker.io/user/app:latest");
        assert_eq!(
            named("registry.k8s.io/pause:3.9").to_string(),
            "registry.k8s.io/pause:3.9"
        );
        assert_eq!(
            named("127.0.0.1:5000/e2e/nginx:1.14-2").to_string(),
            "127.0.0.1:5000/e2e/nginx:1.14-2"
        );
        assert_eq!(named("localhost/app").to_string(), "localhost/app:latest");
        let digest = format!("sha256:{}", "a".repeat(64));
        let by_digest = named(&format!("quay.io/x/y@{digest}"));
        assert_eq!(
            (by_digest.tag.clone(), by_digest.digest.clone()),
            (None, Some(digest.clone()))
        );
        assert_eq!(
            by_digest.with_digest(&digest),
            format!("quay.io/x/y@{digest}")
        );
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        use sha2::Digest;
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(None, &a), a);
        let expected = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(chain_id(Some(&a), &b), expected);
    }

    #[test]
    fn ids_are_not_names() {
        let hex = "b".repeat(64);
        assert_eq!(
            parse(&format!("sha256:{hex}")),
            Ok(ImageRef::Id(format!("sha256:{hex}")))
        );
        assert_eq!(parse(&hex), Ok(ImageRef::Id(format!("sha256:{hex}"))));
    }

    #[test]
    fn rejects_what_is_not_a_reference() {
        for bad in [
            "",
            "Busybox",
            "a b",
            "x@sha256:short",
            "x:",
            "x:!!",
            "UPPER/case",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn the_kubelets_usual_forms_parse() {
        let digest = format!("sha256:{}", "c".repeat(64));
        assert_eq!(
            named("library/busybox:1.36").to_string(),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(
            named("localhost:5000/x").to_string(),
            "localhost:5000/x:latest"
        );
        let by_digest = named(&format!("127.0.0.1:5000/a/b@{digest}"));
        assert_eq!(
            (
                by_digest.registry.as_str(),
                by_digest.repository.as_str(),
                by_digest.digest.as_deref()
            ),
            ("127.0.0.1:5000", "a/b", Some(digest.as_str()))
        );
        assert_eq!(named("[::1]:5000/x").registry, "[::1]:5000");
        assert_eq!(named("[fe80::1]/x:v1").to_string(), "[fe80::1]/x:v1");
        assert_eq!(
            named("registry.example.com:65535/team/app:v1.2_rc-3").registry,
            "registry.example.com:65535"
        );
        assert_eq!(
            named("Registry-1.Example.COM/x").registry,
            "Registry-1.Example.COM",
            "host labels may be upper case"
        );
        assert_eq!(
            named("a__b/c--d/e.f/g_h:_tag").repository,
            "a__b/c--d/e.f/g_h"
        );
        assert_eq!(
            named(&format!("busybox:1.36@{digest}")).tag.as_deref(),
            Some("1.36")
        );
        // Id prefixes are not resolved as ids by the store; they stay names (not found there).
        assert_eq!(
            named("0123456789ab").to_string(),
            "docker.io/library/0123456789ab:latest"
        );
        assert_eq!(
            named("sha256:0123456789ab").to_string(),
            "docker.io/library/sha256:0123456789ab"
        );
        let longest_name = format!("quay.io/{}", "a".repeat(NAME_MAX_BYTES - "quay.io/".len()));
        assert_eq!(named(&longest_name).name().len(), NAME_MAX_BYTES);
    }

    #[test]
    fn loose_names_are_refused_naming_what_is_wrong() {
        let reason = |reference: &str| parse(reference).expect_err(reference).reason;
        for bad in [
            "127.0.0.1:5000/a/../b",
            "127.0.0.1:5000/..",
            "x/./y",
            "a/.b",
            "a/b.",
            "a/b_",
            "a/b___c",
            "a/b-_c",
            "a/b..c",
            "a//b",
            "/a",
            "a/",
            "quay.io/A/b",
        ] {
            assert!(
                reason(bad).starts_with("path component"),
                "{bad:?}: {}",
                reason(bad)
            );
        }
        assert!(
            reason("127.0.0.1:5000/a/../b").contains("`..`"),
            "{}",
            reason("127.0.0.1:5000/a/../b")
        );
        for bad in [
            "127.0.0.1:70000/x",
            "localhost:0/x",
            "localhost:/x",
            "localhost:99999999999999999999/x",
            "localhost:+80/x",
            "localhost:8a/x",
            "[::1]:65536/x",
        ] {
            assert!(
                reason(bad).starts_with("registry port"),
                "{bad:?}: {}",
                reason(bad)
            );
        }
        for bad in [
            "-reg.io/x",
            "reg-.io/x",
            "reg..io/x",
            ".reg.io/x",
            "reg_io.com/x",
            "r\u{e9}g.io/x",
            ":5000/x",
        ] {
            assert!(
                reason(bad).starts_with("registry host label"),
                "{bad:?}: {}",
                reason(bad)
            );
        }
        for bad in [
            "[::1/x",
            "[zz::1]/x",
            "[:::]/x",
            "[::ffff:1.2.3.4]/x",
            "[]/x",
            "[::1]5000/x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
        for bad in ["x:..", "x:.v1", "x:-v1", &format!("x:{}", "t".repeat(129))] {
            assert!(reason(bad).starts_with("tag"), "{bad:?}: {}", reason(bad));
        }
        let too_long = format!("quay.io/{}", "a".repeat(NAME_MAX_BYTES));
        assert!(
            reason(&too_long).contains("more than 255"),
            "{}",
            reason(&too_long)
        );
    }

    #[test]
    fn messages_quote_an_excerpt_of_the_input() {
        let huge = format!("quay.io/{}", "a/".repeat(10_000));
        let message = parse(&huge).expect_err("too long").to_string();
        assert!(message.len() < 300, "{} bytes: {message}", message.len());
        let hostile = format!("quay.io/x\n{}", "b".repeat(100));
        let message = parse(&hostile).expect_err("control character").to_string();
        assert!(
            !message.contains('\n') && message.contains("x\\n"),
            "{message}"
        );
        let component = format!("quay.io/{}/x", "Z".repeat(300));
        let message = parse(&component).expect_err("bad component").to_string();
        assert!(message.len() < 400, "{} bytes: {message}", message.len());
    }

    #[test]
    fn short_ids_are_hex_prefixes_of_one_id() {
        assert_eq!(short_id_prefix("0a1b2c"), Some("sha256:0a1b2c".into()));
        for not_short in ["", "busybox", "0A1B", &"a".repeat(64), "ab:1"] {
            assert_eq!(short_id_prefix(not_short), None, "{not_short}");
        }
        let ids = ["sha256:aa11", "sha256:aa22", "sha256:bb33"];
        assert_eq!(
            unique_by_prefix("sha256:b", ids.into_iter()),
            Ok(Some("sha256:bb33"))
        );
        assert_eq!(
            unique_by_prefix("sha256:aa", ids.into_iter()),
            Err(2),
            "ambiguous"
        );
        assert_eq!(unique_by_prefix("sha256:c", ids.into_iter()), Ok(None));
    }
}
