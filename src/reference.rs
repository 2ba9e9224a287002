//! Docker/OCI image references: parsing and normalisation.
//!
//! Grammar (github.com/distribution/reference):
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [domain "/"] path
//! domain           := host [":" port]
//! host             := domain-name | "[" ipv6 "]"
//! domain-name      := domain-component ("." domain-component)*
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! port             := [0-9]+
//! path             := path-component ("/" path-component)*
//! path-component   := [a-z0-9]+ (separator [a-z0-9]+)*
//! separator        := "." | "_" | "__" | "-"+
//! tag              := [\w][\w.-]{0,127}
//! digest           := algorithm ":" hex
//! ```
//!
//! [`parse`] follows `ParseNormalizedNamed` followed by `ParseDockerRef`:
//! the domain defaults to `docker.io`, `index.docker.io` becomes `docker.io`,
//! single-component docker.io names gain `library/`, a reference with neither
//! tag nor digest gets `latest`, and a reference with both keeps only the
//! digest (the digest pins the content, so the tag is redundant and could
//! only disagree with it). A [`Reference`] therefore always carries exactly
//! one of tag and digest.

use std::fmt;
use std::str::FromStr;

/// The registry assumed when a reference names none.
const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's historical name, folded into [`DEFAULT_DOMAIN`].
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
/// Namespace of Docker Hub's official images (`busybox` is `library/busybox`).
const OFFICIAL_REPO_PREFIX: &str = "library/";
/// Tag used when a reference names neither tag nor digest.
const DEFAULT_TAG: &str = "latest";
/// Upper bound on `domain/path`, as in distribution's `NameTotalLengthMax`.
const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// Upper bound on a tag (one leading word char plus up to 127 more).
const TAG_LENGTH_MAX: usize = 128;
/// Digest algorithms we accept, with the hex length each one produces.
const DIGEST_ALGORITHMS: [(&str, usize); 3] = [("sha256", 64), ("sha384", 96), ("sha512", 128)];

/// Why a string is not a valid image reference. Every message quotes the
/// whole input so a user can see which of several references was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid reference \"\": repository name must not be empty")]
    Empty,
    #[error("invalid reference {reference:?}: cannot specify 64-byte hexadecimal strings")]
    HexOnly { reference: String },
    #[error(
        "invalid reference {reference:?}: repository name must not be more than \
         {NAME_TOTAL_LENGTH_MAX} characters (got {length})"
    )]
    NameTooLong { reference: String, length: usize },
    #[error("invalid reference {reference:?}: invalid domain {domain:?}")]
    InvalidDomain { reference: String, domain: String },
    #[error("invalid reference {reference:?}: repository name must be lowercase")]
    UppercasePath { reference: String, path: String },
    #[error("invalid reference {reference:?}: invalid repository path {path:?}")]
    InvalidPath { reference: String, path: String },
    #[error("invalid reference {reference:?}: invalid tag {tag:?}")]
    InvalidTag { reference: String, tag: String },
    #[error("invalid reference {reference:?}: unsupported digest algorithm {algorithm:?}")]
    UnsupportedDigestAlgorithm {
        reference: String,
        algorithm: String,
    },
    #[error("invalid reference {reference:?}: invalid digest {digest:?}")]
    InvalidDigest { reference: String, digest: String },
}

/// A normalised image reference: `domain/path` plus exactly one of a tag or
/// a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// Parses and normalises a reference the way `docker pull` and containerd's
/// CRI plugin read it (`ParseDockerRef`).
pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
    if input.is_empty() {
        return Err(ReferenceError::Empty);
    }
    // Docker refuses these so an image ID is never mistaken for a name.
    if is_hex_identifier(input) {
        return Err(ReferenceError::HexOnly {
            reference: input.to_string(),
        });
    }
    let (name_and_tag, digest) = match input.split_once('@') {
        Some((name_and_tag, digest)) => (name_and_tag, Some(digest)),
        None => (input, None),
    };
    let (name, tag) = split_tag(name_and_tag);
    let (domain, remainder) = split_domain(name);

    // Checked first, like ParseNormalizedNamed, so `Foo` gets the helpful
    // message rather than a generic format error.
    if remainder.chars().any(char::is_uppercase) {
        return Err(ReferenceError::UppercasePath {
            reference: input.to_string(),
            path: remainder.to_string(),
        });
    }
    if !is_domain(domain) {
        return Err(ReferenceError::InvalidDomain {
            reference: input.to_string(),
            domain: domain.to_string(),
        });
    }
    if !is_path(remainder) {
        return Err(ReferenceError::InvalidPath {
            reference: input.to_string(),
            path: remainder.to_string(),
        });
    }
    if let Some(tag) = tag {
        check_tag(input, tag)?;
    }
    if let Some(digest) = digest {
        check_digest(input, digest)?;
    }

    let path = if domain == DEFAULT_DOMAIN && !remainder.contains('/') {
        format!("{OFFICIAL_REPO_PREFIX}{remainder}")
    } else {
        remainder.to_string()
    };
    // Measured on the normalised name, as distribution does.
    let length = domain.len() + 1 + path.len();
    if length > NAME_TOTAL_LENGTH_MAX {
        return Err(ReferenceError::NameTooLong {
            reference: input.to_string(),
            length,
        });
    }

    // ParseDockerRef: a digest wins over a tag; no pin at all means latest.
    let tag = match (tag, digest) {
        (_, Some(_)) => None,
        (Some(tag), None) => Some(tag.to_string()),
        (None, None) => Some(DEFAULT_TAG.to_string()),
    };
    Ok(Reference {
        domain: domain.to_string(),
        path,
        tag,
        digest: digest.map(str::to_string),
    })
}

impl Reference {
    /// Same as the module-level [`parse`].
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        parse(input)
    }

    /// Registry host, with port if any (`docker.io`, `localhost:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Repository path within the registry (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag; `None` exactly when the reference is digested.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:…`), if the reference is pinned to one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// Whether the reference is pinned to content rather than a tag.
    pub fn is_digested(&self) -> bool {
        self.digest.is_some()
    }

    /// `domain/path`, the name without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The short form docker prints: `busybox:latest`, `foo/bar:1`,
    /// `localhost:5000/x:y`.
    pub fn familiar(&self) -> String {
        format!("{}{}", self.familiar_name(), self.pin())
    }

    /// A copy pointing at `tag`. Any digest is dropped so the result keeps
    /// the one-pin invariant (the old digest would not match the new tag).
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        check_tag(&format!("{}:{tag}", self.repository()), tag)?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// A copy pinned to `digest`; the tag is dropped, as `ParseDockerRef`
    /// does for `name:tag@digest`.
    pub fn with_digest(&self, digest: &str) -> Result<Reference, ReferenceError> {
        check_digest(&format!("{}@{digest}", self.repository()), digest)?;
        Ok(Reference {
            tag: None,
            digest: Some(digest.to_string()),
            ..self.clone()
        })
    }

    /// `:tag` or `@digest`, whichever this reference carries.
    fn pin(&self) -> String {
        match (&self.tag, &self.digest) {
            (_, Some(digest)) => format!("@{digest}"),
            (Some(tag), None) => format!(":{tag}"),
            (None, None) => String::new(),
        }
    }

    /// The name with docker.io and the official `library/` elided, except
    /// where eliding would change what the short form parses back to.
    fn familiar_name(&self) -> String {
        if self.domain != DEFAULT_DOMAIN {
            return self.repository();
        }
        // Only `library/x` is shortened: `library/x/y` is not an official
        // image and would re-parse as `x/y`.
        let short = match self.path.strip_prefix(OFFICIAL_REPO_PREFIX) {
            Some(rest) if !rest.contains('/') => rest,
            _ => &self.path,
        };
        // `docker.io/foo.bar/baz` shortened to `foo.bar/baz` would re-parse
        // with `foo.bar` as the registry, so keep the domain there.
        match short.split_once('/') {
            Some((first, _)) if looks_like_domain(first) => self.repository(),
            _ => short.to_string(),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

impl fmt::Display for Reference {
    /// The canonical form: `docker.io/library/busybox:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}{}", self.domain, self.path, self.pin())
    }
}

/// A 64-char lowercase hex string, which docker reserves for image IDs.
fn is_hex_identifier(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

/// Splits `name[:tag]`. Only a colon after the last `/` starts a tag; an
/// earlier one is a registry port (`localhost:5000/x`).
fn split_tag(s: &str) -> (&str, Option<&str>) {
    let last_component_start = s.rfind('/').map_or(0, |slash| slash + 1);
    let (head, last) = s.split_at(last_component_start);
    match last.split_once(':') {
        Some((last_name, tag)) => (&s[..head.len() + last_name.len()], Some(tag)),
        None => (s, None),
    }
}

/// Splits `[domain/]remainder` with docker's heuristic, folding
/// `index.docker.io` into `docker.io`.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest)) if looks_like_domain(first) => {
            let domain = if first == LEGACY_DEFAULT_DOMAIN {
                DEFAULT_DOMAIN
            } else {
                first
            };
            (domain, rest)
        }
        _ => (DEFAULT_DOMAIN, name),
    }
}

/// Docker's rule for whether a leading component is a registry: path
/// components can hold neither `:` nor upper case, and `localhost` has no
/// dot. A `.` is ambiguous (`foo.bar/x`); docker resolves it as a domain.
fn looks_like_domain(component: &str) -> bool {
    component.contains(['.', ':'])
        || component == "localhost"
        || component.chars().any(char::is_uppercase)
}

/// `host[:port]`, where host is a DNS name, IPv4 address or `[ipv6]`.
fn is_domain(domain: &str) -> bool {
    let (host_ok, rest) = match domain.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((address, rest)) => (is_ipv6_literal(address), rest),
            None => return false,
        },
        None => {
            let (host, rest) = domain.split_at(domain.find(':').unwrap_or(domain.len()));
            (is_domain_name(host), rest)
        }
    };
    host_ok && (rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port))
}

/// Loose on purpose, like distribution: hex digits and colons, no
/// zone or embedded IPv4; the registry connection rejects anything wrong.
fn is_ipv6_literal(address: &str) -> bool {
    !address.is_empty() && address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
}

/// Dot-separated labels; IPv4 addresses also match this.
fn is_domain_name(host: &str) -> bool {
    host.split('.').all(is_domain_component)
}

/// Alphanumerics with inner hyphens (`xn--bcher-kva`, `my-registry`).
fn is_domain_component(label: &str) -> bool {
    let bytes = label.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
}

fn is_port(port: &str) -> bool {
    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
}

/// Slash-separated path components; empty ones (`a//b`, `a/`) are invalid.
fn is_path(path: &str) -> bool {
    path.split('/').all(is_path_component)
}

/// Lowercase alphanumeric runs joined by single separators, so `..`, `-a`
/// and `a.` are rejected and a path can never climb with `..`.
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    bytes.first().is_some_and(is_lower_alnum)
        && bytes.last().is_some_and(is_lower_alnum)
        && bytes
            .chunk_by(|a, b| is_lower_alnum(a) == is_lower_alnum(b))
            .all(|run| run.first().is_some_and(is_lower_alnum) || is_separator(run))
}

fn is_lower_alnum(b: &u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `.`, `_`, `__` or any run of `-`; other mixes (`._`, `___`) are not.
fn is_separator(run: &[u8]) -> bool {
    matches!(run, b"." | b"_" | b"__") || run.iter().all(|b| *b == b'-')
}

/// `[\w][\w.-]{0,127}`.
fn check_tag(reference: &str, tag: &str) -> Result<(), ReferenceError> {
    let bytes = tag.as_bytes();
    let valid = bytes.len() <= TAG_LENGTH_MAX
        && bytes.first().is_some_and(is_word)
        && bytes.iter().all(|b| is_word(b) || matches!(b, b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag {
            reference: reference.to_string(),
            tag: tag.to_string(),
        })
    }
}

fn is_word(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || *b == b'_'
}

/// `algorithm:hex`. A well-formed but unknown algorithm is reported by name
/// (the user may just need a newer hoist); anything else malformed, including
/// upper-case hex, which go-digest also refuses, is an invalid digest.
fn check_digest(reference: &str, digest: &str) -> Result<(), ReferenceError> {
    let invalid = || ReferenceError::InvalidDigest {
        reference: reference.to_string(),
        digest: digest.to_string(),
    };
    let (algorithm, hex) = digest.split_once(':').ok_or_else(invalid)?;
    if !is_digest_algorithm(algorithm) {
        return Err(invalid());
    }
    let (_, hex_len) = DIGEST_ALGORITHMS
        .iter()
        .find(|(name, _)| *name == algorithm)
        .ok_or_else(|| ReferenceError::UnsupportedDigestAlgorithm {
            reference: reference.to_string(),
            algorithm: algorithm.to_string(),
        })?;
    if hex.len() == *hex_len && hex.bytes().all(is_lower_hex) {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// `[A-Za-z][A-Za-z0-9]*` components joined by one of `+ . _ -`.
fn is_digest_algorithm(algorithm: &str) -> bool {
    algorithm.split(['+', '.', '_', '-']).all(|component| {
        let bytes = component.as_bytes();
        bytes.first().is_some_and(u8::is_ascii_alphabetic)
            && bytes.iter().all(u8::is_ascii_alphanumeric)
    })
}

fn is_lower_hex(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA256: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const SHA384: &str = "sha384:38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b";
    const SHA512: &str = "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";
    const HEX64: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// Tables write `<sha256>` etc. so rows stay readable.
    fn expand(s: &str) -> String {
        s.replace("<sha256>", SHA256)
            .replace("<sha384>", SHA384)
            .replace("<sha512>", SHA512)
            .replace("<hex64>", HEX64)
    }

    /// (input, canonical Display form, familiar form)
    #[rustfmt::skip]
    const VALID: &[(&str, &str, &str)] = &[
        // docker.io defaults and library/
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("busybox:latest", "docker.io/library/busybox:latest", "busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("docker.io/library/busybox:musl", "docker.io/library/busybox:musl", "busybox:musl"),
        ("foo/bar", "docker.io/foo/bar:latest", "foo/bar:latest"),
        ("foo/bar:1", "docker.io/foo/bar:1", "foo/bar:1"),
        ("docker.io/foo/bar/baz", "docker.io/foo/bar/baz:latest", "foo/bar/baz:latest"),
        ("library/foo/bar", "docker.io/library/foo/bar:latest", "library/foo/bar:latest"),
        ("a/b/c/d/e/f/g/h", "docker.io/a/b/c/d/e/f/g/h:latest", "a/b/c/d/e/f/g/h:latest"),
        ("docker.io/library/library", "docker.io/library/library:latest", "library:latest"),
        // index.docker.io folds into docker.io
        ("index.docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1", "busybox:1"),
        ("index.docker.io/foo/bar:1", "docker.io/foo/bar:1", "foo/bar:1"),
        // localhost and ports
        ("localhost/foo", "localhost/foo:latest", "localhost/foo:latest"),
        ("localhost:5000/x:y", "localhost:5000/x:y", "localhost:5000/x:y"),
        ("localhost:5000/a/b@<sha256>", "localhost:5000/a/b@<sha256>", "localhost:5000/a/b@<sha256>"),
        ("127.0.0.1:5000/foo/bar:v1", "127.0.0.1:5000/foo/bar:v1", "127.0.0.1:5000/foo/bar:v1"),
        ("10.0.0.1/x:y", "10.0.0.1/x:y", "10.0.0.1/x:y"),
        ("[::1]:5000/foo:tag", "[::1]:5000/foo:tag", "[::1]:5000/foo:tag"),
        ("[::1]/foo", "[::1]/foo:latest", "[::1]/foo:latest"),
        ("[2001:db8::1]:443/ns/app", "[2001:db8::1]:443/ns/app:latest", "[2001:db8::1]:443/ns/app:latest"),
        // Without a slash, `localhost:5000` is image `localhost`, tag `5000`.
        ("localhost:5000", "docker.io/library/localhost:5000", "localhost:5000"),
        ("localhost", "docker.io/library/localhost:latest", "localhost:latest"),
        // other registries
        ("registry.example.com/team/app:1.2.3", "registry.example.com/team/app:1.2.3", "registry.example.com/team/app:1.2.3"),
        ("example.com:443/a/b/c/d/e:tag", "example.com:443/a/b/c/d/e:tag", "example.com:443/a/b/c/d/e:tag"),
        ("gcr.io/distroless/static:nonroot", "gcr.io/distroless/static:nonroot", "gcr.io/distroless/static:nonroot"),
        ("ghcr.io/owner/repo-name:sha-abc", "ghcr.io/owner/repo-name:sha-abc", "ghcr.io/owner/repo-name:sha-abc"),
        ("my-registry.local:5000/x", "my-registry.local:5000/x:latest", "my-registry.local:5000/x:latest"),
        ("xn--bcher-kva.example/app", "xn--bcher-kva.example/app:latest", "xn--bcher-kva.example/app:latest"),
        // An upper-case first component is a domain (docker's rule).
        ("Registry.Example.com/app", "Registry.Example.com/app:latest", "Registry.Example.com/app:latest"),
        ("Foo/bar", "Foo/bar:latest", "Foo/bar:latest"),
        // separators
        ("foo.bar", "docker.io/library/foo.bar:latest", "foo.bar:latest"),
        ("a.b/c.d/e.f", "a.b/c.d/e.f:latest", "a.b/c.d/e.f:latest"),
        ("foo/a_b", "docker.io/foo/a_b:latest", "foo/a_b:latest"),
        ("foo/a__b", "docker.io/foo/a__b:latest", "foo/a__b:latest"),
        ("foo/a---b", "docker.io/foo/a---b:latest", "foo/a---b:latest"),
        ("foo/a-b-c.d_e__f", "docker.io/foo/a-b-c.d_e__f:latest", "foo/a-b-c.d_e__f:latest"),
        ("quay.io/org/app_name:tag", "quay.io/org/app_name:tag", "quay.io/org/app_name:tag"),
        ("0123/4567", "docker.io/0123/4567:latest", "0123/4567:latest"),
        // docker.io is kept where dropping it would make a domain appear
        ("docker.io/localhost/foo", "docker.io/localhost/foo:latest", "docker.io/localhost/foo:latest"),
        ("docker.io/foo.bar/baz", "docker.io/foo.bar/baz:latest", "docker.io/foo.bar/baz:latest"),
        // tags
        ("busybox:v1.2.3-rc.1_final", "docker.io/library/busybox:v1.2.3-rc.1_final", "busybox:v1.2.3-rc.1_final"),
        ("busybox:_underscore-start", "docker.io/library/busybox:_underscore-start", "busybox:_underscore-start"),
        ("busybox:UPPER-Tag", "docker.io/library/busybox:UPPER-Tag", "busybox:UPPER-Tag"),
        ("busybox:1..2--3__4", "docker.io/library/busybox:1..2--3__4", "busybox:1..2--3__4"),
        // A 64-hex name is fine once it has a tag; only the bare form is refused.
        ("<hex64>:latest", "docker.io/library/<hex64>:latest", "<hex64>:latest"),
        // digests; a tag next to a digest is dropped
        ("busybox@<sha256>", "docker.io/library/busybox@<sha256>", "busybox@<sha256>"),
        ("busybox:1.36@<sha256>", "docker.io/library/busybox@<sha256>", "busybox@<sha256>"),
        ("foo/bar@<sha384>", "docker.io/foo/bar@<sha384>", "foo/bar@<sha384>"),
        ("foo/bar@<sha512>", "docker.io/foo/bar@<sha512>", "foo/bar@<sha512>"),
        ("localhost:5000/a/b:tag@<sha256>", "localhost:5000/a/b@<sha256>", "localhost:5000/a/b@<sha256>"),
        ("docker.io/library/busybox:latest@<sha256>", "docker.io/library/busybox@<sha256>", "busybox@<sha256>"),
    ];

    /// (input, expected ReferenceError variant)
    #[rustfmt::skip]
    const INVALID: &[(&str, &str)] = &[
        ("", "Empty"),
        ("<hex64>", "HexOnly"),
        // upper case in the path
        ("Busybox", "UppercasePath"),
        ("FOO", "UppercasePath"),
        ("docker/Docker", "UppercasePath"),
        ("docker.io/Foo/bar", "UppercasePath"),
        ("localhost:5000/Foo", "UppercasePath"),
        ("Foo:bad!tag", "UppercasePath"),
        // path shape
        ("foo/", "InvalidPath"),
        ("/foo", "InvalidPath"),
        ("foo//bar", "InvalidPath"),
        ("docker///docker", "InvalidPath"),
        (":", "InvalidPath"),
        ("docker.io/", "InvalidPath"),
        ("@<sha256>", "InvalidPath"),
        ("-foo", "InvalidPath"),
        (".foo", "InvalidPath"),
        ("_foo", "InvalidPath"),
        ("foo-", "InvalidPath"),
        ("foo/bar_", "InvalidPath"),
        ("a/../b", "InvalidPath"),
        ("foo..bar", "InvalidPath"),
        ("foo___bar", "InvalidPath"),
        ("foo.-bar", "InvalidPath"),
        ("foo bar", "InvalidPath"),
        (" busybox", "InvalidPath"),
        ("busybox ", "InvalidPath"),
        ("ümlaut", "InvalidPath"),
        // domain
        ("localhost:abc/foo", "InvalidDomain"),
        ("example.com:/foo", "InvalidDomain"),
        ("-bad.com/foo", "InvalidDomain"),
        ("bad-.com/foo", "InvalidDomain"),
        ("bad_domain.com/foo", "InvalidDomain"),
        ("example..com/foo", "InvalidDomain"),
        ("[::1/foo", "InvalidDomain"),
        ("[]:5000/foo", "InvalidDomain"),
        ("[zz::1]:5000/foo", "InvalidDomain"),
        ("[::1]5000/foo", "InvalidDomain"),
        ("foo:bar/baz", "InvalidDomain"),
        // tag
        ("foo/bar:", "InvalidTag"),
        ("foo:bad!tag", "InvalidTag"),
        ("foo:-leading", "InvalidTag"),
        ("foo:.leading", "InvalidTag"),
        ("foo:tag with space", "InvalidTag"),
        ("foo:bar:baz", "InvalidTag"),
        ("foo:t!g@<sha256>", "InvalidTag"),
        // digest
        ("foo@", "InvalidDigest"),
        ("foo@sha256", "InvalidDigest"),
        ("foo@:abc", "InvalidDigest"),
        ("foo@sha256:", "InvalidDigest"),
        ("foo@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85", "InvalidDigest"),
        ("foo@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555", "InvalidDigest"),
        ("foo@sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855", "InvalidDigest"),
        ("foo@sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "InvalidDigest"),
        ("foo@sha384:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "InvalidDigest"),
        ("foo@1sha:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "InvalidDigest"),
        ("foo@<sha256>:extra", "InvalidDigest"),
        ("foo@<sha256>@<sha256>", "InvalidDigest"),
        ("foo@md5:d41d8cd98f00b204e9800998ecf8427e", "UnsupportedDigestAlgorithm"),
        ("foo@sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709", "UnsupportedDigestAlgorithm"),
        ("foo@SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "UnsupportedDigestAlgorithm"),
        ("foo@sha256+b64:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "UnsupportedDigestAlgorithm"),
    ];

    fn variant(err: &ReferenceError) -> &'static str {
        match err {
            ReferenceError::Empty => "Empty",
            ReferenceError::HexOnly { .. } => "HexOnly",
            ReferenceError::NameTooLong { .. } => "NameTooLong",
            ReferenceError::InvalidDomain { .. } => "InvalidDomain",
            ReferenceError::UppercasePath { .. } => "UppercasePath",
            ReferenceError::InvalidPath { .. } => "InvalidPath",
            ReferenceError::InvalidTag { .. } => "InvalidTag",
            ReferenceError::UnsupportedDigestAlgorithm { .. } => "UnsupportedDigestAlgorithm",
            ReferenceError::InvalidDigest { .. } => "InvalidDigest",
        }
    }

    /// Rows built at run time because their inputs are long.
    fn invalid_rows() -> Vec<(String, &'static str)> {
        let mut rows: Vec<(String, &'static str)> = INVALID
            .iter()
            .map(|(input, kind)| (expand(input), *kind))
            .collect();
        rows.push((format!("busybox:{}", "a".repeat(129)), "InvalidTag"));
        // docker.io/ + 128 + / + 128 = 267 > 255
        rows.push((
            format!("{}/{}", "a".repeat(128), "b".repeat(128)),
            "NameTooLong",
        ));
        // Counted after normalisation: 246 chars become 256 with docker.io/.
        rows.push((format!("a/{}", "b".repeat(244)), "NameTooLong"));
        rows
    }

    #[test]
    fn valid_references_normalise() {
        assert!(VALID.len() >= 40);
        for (input, canonical, familiar) in VALID {
            let (input, canonical, familiar) = (expand(input), expand(canonical), expand(familiar));
            let reference = parse(&input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(reference.to_string(), canonical, "canonical of {input:?}");
            assert_eq!(reference.familiar(), familiar, "familiar of {input:?}");
            assert_eq!(
                reference.tag().is_some(),
                !reference.is_digested(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn canonical_and_familiar_forms_round_trip() {
        for (input, _, _) in VALID {
            let reference = parse(&expand(input)).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(
                parse(&reference.to_string()),
                Ok(reference.clone()),
                "{input:?}"
            );
            assert_eq!(
                parse(&reference.familiar()),
                Ok(reference.clone()),
                "{input:?}"
            );
        }
    }

    #[test]
    fn invalid_references_name_the_wrong_part() {
        let rows = invalid_rows();
        assert!(rows.len() >= 30);
        for (input, expected) in &rows {
            let err = parse(input).expect_err(input);
            assert_eq!(variant(&err), *expected, "{input:?}: {err}");
            assert!(
                err.to_string().contains(&format!("{input:?}")),
                "message of {input:?} lacks the input: {err}"
            );
        }
    }

    #[test]
    fn boundaries_are_inclusive() {
        let tag = "a".repeat(128);
        let reference = parse(&format!("busybox:{tag}")).map(|r| r.tag().map(str::to_string));
        assert_eq!(reference, Ok(Some(tag)));
        // docker.io/ (10) + a/ (2) + 243 = 255
        let name = format!("a/{}", "b".repeat(243));
        assert_eq!(parse(&name).map(|r| r.repository().len()), Ok(255));
    }

    #[test]
    fn accessors_expose_the_parts() {
        let r = parse("localhost:5000/a/b:v1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.domain(), "localhost:5000");
        assert_eq!(r.path(), "a/b");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.repository(), "localhost:5000/a/b");
        assert!(!r.is_digested());

        let r: Reference = format!("busybox@{SHA256}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.path(), "library/busybox");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(SHA256));
        assert!(r.is_digested());
        assert!(Reference::parse("busybox@").is_err());
    }

    #[test]
    fn with_tag_and_with_digest_replace_the_pin() {
        let r = parse("foo/bar:1").unwrap_or_else(|e| panic!("{e}"));
        let digested = r.with_digest(SHA256).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(digested.to_string(), format!("docker.io/foo/bar@{SHA256}"));
        assert_eq!(digested.tag(), None);
        let tagged = digested.with_tag("2").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tagged.to_string(), "docker.io/foo/bar:2");
        assert_eq!(tagged.digest(), None);
        assert_eq!(r.to_string(), "docker.io/foo/bar:1", "original untouched");

        assert!(matches!(
            r.with_tag("-x"),
            Err(ReferenceError::InvalidTag { .. })
        ));
        assert!(matches!(
            r.with_digest("md5:d41d8cd98f00b204e9800998ecf8427e"),
            Err(ReferenceError::UnsupportedDigestAlgorithm { .. })
        ));
        assert!(matches!(
            r.with_digest("sha256:abc"),
            Err(ReferenceError::InvalidDigest { .. })
        ));
    }

    #[test]
    fn messages_quote_input_and_part() {
        let message = |s: &str| parse(s).map_err(|e| e.to_string());
        assert_eq!(
            message("Foo"),
            Err(r#"invalid reference "Foo": repository name must be lowercase"#.to_string())
        );
        assert_eq!(
            message("docker.io/Foo/bar"),
            Err(
                r#"invalid reference "docker.io/Foo/bar": repository name must be lowercase"#
                    .to_string()
            )
        );
        assert_eq!(
            message("foo@md5:d41d8cd98f00b204e9800998ecf8427e"),
            Err(r#"invalid reference "foo@md5:d41d8cd98f00b204e9800998ecf8427e": unsupported digest algorithm "md5""#.to_string())
        );
        assert_eq!(
            message("foo:-x"),
            Err(r#"invalid reference "foo:-x": invalid tag "-x""#.to_string())
        );
        assert_eq!(
            message(""),
            Err(r#"invalid reference "": repository name must not be empty"#.to_string())
        );
        assert_eq!(
            message(HEX64),
            Err(format!(
                "invalid reference \"{HEX64}\": cannot specify 64-byte hexadecimal strings"
            ))
        );
    }
}
