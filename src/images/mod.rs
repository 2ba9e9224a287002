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
    /// A body that could be read as a manifest and as an index; which one
    /// it is must not depend on who reads it.
    #[error("{expected} {digest}: media-type: expected {expected} but {found}")]
    MediaTypeMismatch {
        expected: &'static str,
        digest: String,
        found: String,
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

/// Parses a manifest body, refusing one that could also be read as an index.
pub fn parse_manifest(desc: &Descriptor, body: &[u8]) -> Result<Manifest, Error> {
    check_document(Kind::Manifest, desc, body)?;
    parse("manifest", desc, body)
}

/// Parses an index body, refusing one that could also be read as a manifest.
pub fn parse_index(desc: &Descriptor, body: &[u8]) -> Result<Index, Error> {
    check_document(Kind::Index, desc, body)?;
    parse("index", desc, body)
}

/// Whether a field is in a document at all, whatever its value (`null` and
/// `[]` included): a reader that looks for it finds it.
#[derive(Debug, Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Present(true))
    }
}

/// The fields that tell a manifest from an index.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Present,
    #[serde(default)]
    config: Present,
    #[serde(default)]
    layers: Present,
    #[serde(default)]
    fs_layers: Present,
}

/// Refuses a body that is not plainly of the kind `expected` (a manifest or
/// an index), as containerd's `validateMediaType` does: a body with both
/// shapes would be a different image to a reader that takes it as the other
/// kind. A declared `mediaType` must be of the expected kind (Docker or OCI
/// spelling alike), a manifest must not carry `manifests`, and an index must
/// not carry `config` or `layers`.
fn check_document(expected: Kind, desc: &Descriptor, body: &[u8]) -> Result<(), Error> {
    let what = expected.name();
    let mismatch = |found: String| Error::MediaTypeMismatch {
        expected: what,
        digest: desc.digest.to_string(),
        found,
    };
    let same_kind = |mt: &str| match expected {
        Kind::Manifest => mt == OCI_MANIFEST || mt == DOCKER_MANIFEST,
        _ => mt == OCI_INDEX || mt == DOCKER_LIST,
    };
    if !same_kind(&desc.media_type) {
        return Err(mismatch(format!(
            "its descriptor says {:?}",
            desc.media_type
        )));
    }
    let shape: Shape = parse(what, desc, body)?;
    if shape.fs_layers.0 {
        return Err(mismatch(
            "its body carries `fsLayers` (Docker schema 1, not supported)".to_string(),
        ));
    }
    // An empty string is how an absent mediaType serialises in Go.
    if let Some(mt) = shape.media_type.filter(|mt| !mt.is_empty())
        && !same_kind(&mt)
    {
        return Err(mismatch(format!("its body declares mediaType {mt:?}")));
    }
    let foreign: &[(&str, bool)] = match expected {
        Kind::Manifest => &[("manifests", shape.manifests.0)],
        _ => &[("config", shape.config.0), ("layers", shape.layers.0)],
    };
    match foreign.iter().find(|(_, present)| *present) {
        Some((field, _)) => Err(mismatch(format!("its body carries `{field}`"))),
        None => Ok(()),
    }
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

    /// A manifest body: config and one layer, plus `extra` fields.
    fn manifest_body(extra: &str) -> String {
        let d = Digest::of(b"c");
        format!(
            r#"{{"schemaVersion":2,{extra}"config":{{"mediaType":"{OCI_CONFIG}","digest":"{d}","size":1}},"layers":[{{"mediaType":"{OCI_LAYER_GZIP}","digest":"{d}","size":1}}]}}"#
        )
    }

    /// An index body: one manifest, plus `extra` fields.
    fn index_body(extra: &str) -> String {
        let d = Digest::of(b"m");
        format!(
            r#"{{"schemaVersion":2,{extra}"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1}}]}}"#
        )
    }

    /// Asserts that `result` is a media-type mismatch naming `desc` and `part`.
    fn refused<T: std::fmt::Debug>(result: Result<T, Error>, desc: &Descriptor, part: &str) {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::MediaTypeMismatch { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&desc.digest.to_string()), "{text}");
        assert!(text.contains(part), "{part} missing from {text}");
    }

    #[test]
    fn a_manifest_must_not_carry_manifests() {
        let desc = Descriptor::new(OCI_MANIFEST, Digest::of(b"ambiguous"), 1);
        for list in [
            format!(
                r#"[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}}]"#,
                Digest::of(b"x")
            ),
            "[]".to_string(),
            "null".to_string(),
        ] {
            let body = manifest_body(&format!(r#""manifests":{list},"#));
            refused(parse_manifest(&desc, body.as_bytes()), &desc, "`manifests`");
        }
        let plain = parse_manifest(&desc, manifest_body("").as_bytes()).unwrap();
        assert_eq!(plain.layers.len(), 1);
    }

    #[test]
    fn an_index_must_not_carry_config_or_layers() {
        let desc = Descriptor::new(OCI_INDEX, Digest::of(b"ambiguous"), 1);
        let d = Digest::of(b"c");
        let config = format!(r#""config":{{"mediaType":"{OCI_CONFIG}","digest":"{d}","size":1}},"#);
        refused(
            parse_index(&desc, index_body(&config).as_bytes()),
            &desc,
            "`config`",
        );
        for layers in ["\"layers\":[],", "\"layers\":null,"] {
            refused(
                parse_index(&desc, index_body(layers).as_bytes()),
                &desc,
                "`layers`",
            );
        }
        assert_eq!(
            parse_index(&desc, index_body("").as_bytes())
                .unwrap()
                .manifests
                .len(),
            1
        );
    }

    #[test]
    fn a_declared_media_type_must_be_of_the_kind_fetched() {
        let manifest = |mt: &str| Descriptor::new(mt, Digest::of(b"m"), 1);
        let index = |mt: &str| Descriptor::new(mt, Digest::of(b"i"), 1);
        let declared = |mt: &str| format!(r#""mediaType":"{mt}","#);
        for body_mt in [OCI_INDEX, DOCKER_LIST, OCI_CONFIG, "application/x-other"] {
            let desc = manifest(OCI_MANIFEST);
            let body = manifest_body(&declared(body_mt));
            refused(parse_manifest(&desc, body.as_bytes()), &desc, body_mt);
        }
        for body_mt in [OCI_MANIFEST, DOCKER_MANIFEST, "application/x-other"] {
            let desc = index(OCI_INDEX);
            let body = index_body(&declared(body_mt));
            refused(parse_index(&desc, body.as_bytes()), &desc, body_mt);
        }
        // Docker and OCI spell each kind differently; within a kind either
        // will do, and so does no mediaType (or Go's empty one) at all.
        for (desc_mt, body) in [
            (DOCKER_MANIFEST, manifest_body(&declared(OCI_MANIFEST))),
            (OCI_MANIFEST, manifest_body(&declared(DOCKER_MANIFEST))),
            (OCI_MANIFEST, manifest_body(&declared(""))),
            (DOCKER_MANIFEST, manifest_body("")),
        ] {
            parse_manifest(&manifest(desc_mt), body.as_bytes()).unwrap();
        }
        for (desc_mt, body) in [
            (DOCKER_LIST, index_body(&declared(OCI_INDEX))),
            (OCI_INDEX, index_body(&declared(DOCKER_LIST))),
            (OCI_INDEX, index_body("")),
        ] {
            parse_index(&index(desc_mt), body.as_bytes()).unwrap();
        }
        // Read as the other kind than its descriptor says, a body is refused
        // whatever it holds.
        let desc = index(OCI_INDEX);
        refused(
            parse_manifest(&desc, manifest_body("").as_bytes()),
            &desc,
            OCI_INDEX,
        );
        let desc = manifest(DOCKER_MANIFEST);
        refused(
            parse_index(&desc, index_body("").as_bytes()),
            &desc,
            DOCKER_MANIFEST,
        );
    }

    #[test]
    fn schema1_fields_are_refused_in_a_manifest() {
        let desc = Descriptor::new(DOCKER_MANIFEST, Digest::of(b"s1"), 1);
        let body = manifest_body(r#""fsLayers":[],"#);
        refused(parse_manifest(&desc, body.as_bytes()), &desc, "`fsLayers`");
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
