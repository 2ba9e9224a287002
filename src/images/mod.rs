//! Image formats: media types, manifests and indexes, their children, and the
//! GC labels a parent gets for them.

pub mod platform;
pub mod stored;

use crate::descriptor::{Descriptor, Platform};
use crate::metadata::Labels;
use serde::Deserialize;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_NONDIST_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_SCHEMA1_PLAIN: &str = "application/vnd.docker.distribution.manifest.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unsupported media type {0:?}: Docker image manifest schema 1 is deprecated and not supported"
    )]
    Schema1(String),
    #[error("unsupported media type {media_type:?} for {digest}")]
    UnknownMediaType { media_type: String, digest: String },
    #[error("invalid {what} {digest}: {message}")]
    Invalid {
        what: &'static str,
        digest: String,
        message: String,
    },
    #[error("no manifest for platform {wanted} in index {digest} (it has: {available})")]
    NoMatchingPlatform {
        wanted: String,
        digest: String,
        available: String,
    },
    #[error(
        "manifest {manifest} was chosen for platform {wanted}, but its config {config} is for {found}"
    )]
    ConfigPlatformMismatch {
        manifest: String,
        config: String,
        wanted: String,
        found: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Index,
    Manifest,
    Config,
    Layer(Compression),
}

impl Kind {
    /// What the progress display and ingest refs call it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Index => "index",
            Kind::Manifest => "manifest",
            Kind::Config => "config",
            Kind::Layer(_) => "layer",
        }
    }
}

/// Classifies a descriptor by media type; schema 1 and unknown types are errors.
pub fn kind(desc: &Descriptor) -> Result<Kind, Error> {
    let mt = desc.media_type.as_str();
    Ok(match mt {
        OCI_INDEX | DOCKER_LIST => Kind::Index,
        OCI_MANIFEST | DOCKER_MANIFEST => Kind::Manifest,
        OCI_CONFIG | DOCKER_CONFIG => Kind::Config,
        OCI_LAYER | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
            Kind::Layer(Compression::None)
        }
        OCI_LAYER_GZIP | OCI_LAYER_NONDIST_GZIP | DOCKER_LAYER_GZIP | DOCKER_LAYER_FOREIGN => {
            Kind::Layer(Compression::Gzip)
        }
        OCI_LAYER_ZSTD | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            Kind::Layer(Compression::Zstd)
        }
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_PLAIN => return Err(Error::Schema1(mt.to_string())),
        _ => {
            return Err(Error::UnknownMediaType {
                media_type: mt.to_string(),
                digest: desc.digest.to_string(),
            });
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sniff {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(default)]
    fs_layers: Option<serde_json::Value>,
}

/// The media type a manifest body declares or implies, for registries that
/// answer with a generic `Content-Type`.
pub fn sniff_media_type(body: &[u8]) -> Option<String> {
    let s: Sniff = serde_json::from_slice(body).ok()?;
    if let Some(mt) = s.media_type {
        return Some(mt);
    }
    Some(
        if s.manifests.is_some() {
            OCI_INDEX
        } else if s.config.is_some() {
            OCI_MANIFEST
        } else if s.schema_version == Some(1) || s.fs_layers.is_some() {
            DOCKER_SCHEMA1
        } else {
            return None;
        }
        .to_string(),
    )
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

fn parse<'a, T: Deserialize<'a>>(
    what: &'static str,
    desc: &Descriptor,
    body: &'a [u8],
) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Invalid {
        what,
        digest: desc.digest.to_string(),
        message: e.to_string(),
    })
}

pub fn parse_manifest(desc: &Descriptor, body: &[u8]) -> Result<Manifest, Error> {
    parse("manifest", desc, body)
}

pub fn parse_index(desc: &Descriptor, body: &[u8]) -> Result<Index, Error> {
    parse("index", desc, body)
}

/// Attestation manifests (buildkit's provenance) sit in indexes as `unknown/unknown`.
pub fn is_attestation(desc: &Descriptor) -> bool {
    desc.platform
        .as_ref()
        .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
        || desc
            .annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest")
}

/// The labels that make GC follow a parent to its children, as containerd
/// names them: `.m.<i>` for an index's manifests, `.config` and `.l.<i>` for
/// a manifest's config and layers.
pub fn gc_child_labels(kind: Kind, children: &[Descriptor]) -> Labels {
    let mut labels = Labels::new();
    let mut layer = 0;
    for (i, child) in children.iter().enumerate() {
        let key = match (kind, crate::images::kind(child)) {
            (Kind::Index, _) => format!("containerd.io/gc.ref.content.m.{i}"),
            (_, Ok(Kind::Config)) => "containerd.io/gc.ref.content.config".to_string(),
            _ => {
                layer += 1;
                format!("containerd.io/gc.ref.content.l.{}", layer - 1)
            }
        };
        labels.insert(key, child.digest.to_string());
    }
    labels
}

/// An index's labels for the manifests chosen from it, numbered by their
/// place in the whole index, so that pulling another platform later adds
/// a label instead of overwriting the first one's.
pub fn gc_index_labels(all: &[Descriptor], chosen: &[Descriptor]) -> Labels {
    chosen
        .iter()
        .filter_map(|c| {
            let i = all.iter().position(|m| m.digest == c.digest)?;
            Some((
                format!("containerd.io/gc.ref.content.m.{i}"),
                c.digest.to_string(),
            ))
        })
        .collect()
}

/// `containerd.io/distribution.source.<host>=<repository>`.
pub fn distribution_source_label(registry: &str, repository: &str) -> (String, String) {
    (
        format!("containerd.io/distribution.source.{registry}"),
        repository.to_string(),
    )
}

/// `linux/amd64`, `linux/arm/v7`.
pub fn platform_string(p: &Platform) -> String {
    match &p.variant {
        Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
        _ => format!("{}/{}", p.os, p.architecture),
    }
}

/// The parts of an image config hoist reads; the whole JSON is kept for
/// callers that show it.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default)]
    pub config: Option<RuntimeConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<crate::digest::Digest>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

pub fn parse_config(desc: &Descriptor, body: &[u8]) -> Result<ImageConfig, Error> {
    parse("config", desc, body)
}

impl ImageConfig {
    /// The platform the config says the image is built for, normalised.
    pub fn platform(&self) -> Platform {
        platform::normalize(Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            os_version: None,
            os_features: Vec::new(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        })
    }
}

/// Checks that the config of `manifest`, chosen from an index for `wanted`,
/// is for the same OS and architecture (after normalisation), as containerd
/// checks a config's platform before it unpacks an image.
pub fn check_config_platform(
    manifest: &Descriptor,
    config_desc: &Descriptor,
    config: &ImageConfig,
    wanted: &Platform,
) -> Result<(), Error> {
    let found = config.platform();
    let wanted = platform::normalize(wanted.clone());
    if found.os == wanted.os && found.architecture == wanted.architecture {
        return Ok(());
    }
    let shown = |p: &Platform| match (p.os.is_empty(), p.architecture.is_empty()) {
        (true, true) => "no platform".to_string(),
        _ => platform_string(p),
    };
    Err(Error::ConfigPlatformMismatch {
        manifest: manifest.digest.to_string(),
        config: config_desc.digest.to_string(),
        wanted: platform_string(&wanted),
        found: shown(&found),
    })
}

/// containerd's chain IDs: `chain(0) = diff(0)`,
/// `chain(i) = sha256(chain(i-1) + " " + diff(i))`.
pub fn chain_ids(diff_ids: &[crate::digest::Digest]) -> Vec<crate::digest::Digest> {
    let mut out: Vec<crate::digest::Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => crate::digest::Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    #[test]
    fn chain_ids_follow_containerd() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = Digest::of(b"c");
        let ids = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], Digest::of(format!("{a} {b}").as_bytes()));
        assert_eq!(ids[2], Digest::of(format!("{} {c}", ids[1]).as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn media_types_classify_and_refuse_by_name() {
        let d = |mt: &str| Descriptor::new(mt, Digest::of(b"x"), 1);
        assert_eq!(
            kind(&d(OCI_LAYER_ZSTD)).unwrap(),
            Kind::Layer(Compression::Zstd)
        );
        assert_eq!(
            kind(&d(DOCKER_LAYER_GZIP)).unwrap(),
            Kind::Layer(Compression::Gzip)
        );
        assert_eq!(kind(&d(OCI_LAYER)).unwrap(), Kind::Layer(Compression::None));
        assert_eq!(kind(&d(DOCKER_LIST)).unwrap(), Kind::Index);
        let err = kind(&d(DOCKER_SCHEMA1)).unwrap_err();
        assert!(err.to_string().contains(DOCKER_SCHEMA1), "{err}");
        let err = kind(&d("application/x-odd")).unwrap_err();
        assert!(err.to_string().contains("application/x-odd"), "{err}");
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":1,"fsLayers":[]}"#).as_deref(),
            Some(DOCKER_SCHEMA1)
        );
        assert_eq!(
            sniff_media_type(br#"{"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
    }

    #[test]
    fn config_platform_must_match_the_chosen_one() {
        let manifest = Descriptor::new(OCI_MANIFEST, Digest::of(b"m"), 1);
        let config_desc = Descriptor::new(OCI_CONFIG, Digest::of(b"c"), 1);
        let config = |body: &str| parse_config(&config_desc, body.as_bytes()).unwrap();
        let check = |body: &str, wanted: &str| {
            check_config_platform(
                &manifest,
                &config_desc,
                &config(body),
                &platform::parse(wanted).unwrap(),
            )
        };
        check(r#"{"os":"linux","architecture":"arm64"}"#, "linux/arm64/v8").unwrap();
        check(r#"{"os":"linux","architecture":"x86_64"}"#, "linux/amd64").unwrap();
        // The variant is the index's business; the config need not repeat it.
        check(r#"{"os":"linux","architecture":"amd64"}"#, "linux/amd64/v3").unwrap();
        let err = check(r#"{"os":"linux","architecture":"arm64"}"#, "linux/amd64")
            .unwrap_err()
            .to_string();
        for part in [
            manifest.digest.to_string(),
            config_desc.digest.to_string(),
            "linux/amd64".to_string(),
            "linux/arm64/v8".to_string(),
        ] {
            assert!(err.contains(&part), "{part} missing from {err}");
        }
        let err = check(r#"{"os":"windows","architecture":"amd64"}"#, "linux/amd64").unwrap_err();
        assert!(err.to_string().contains("windows/amd64"), "{err}");
        let err = check(r#"{"rootfs":{"type":"layers"}}"#, "linux/amd64").unwrap_err();
        assert!(err.to_string().contains("no platform"), "{err}");
    }
}
