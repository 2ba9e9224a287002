//! How CRI sees image records: one image per config digest (its id), with
//! every `repo:tag`, `repo@digest` and the id itself recorded as a name that
//! points at the same target. The id, size and user are kept as labels at
//! pull time, so listing never reads content.

use crate::content::Labels;
use crate::filters::Filter;
use crate::images::stored::platform_image;
use crate::metadata::{Db, NAMESPACE_CRI};
use crate::pull::Pulled;
use crate::reference::Reference;
use crate::snapshot::{SnapshotRoot, Usage};
use k8s_cri::v1::{Image, ImageSpec, Int64Value};
use std::collections::BTreeMap;

pub const LABEL_MANAGED: &str = "io.cri-containerd.image";
pub const LABEL_ID: &str = "io.hoist.image.id";
pub const LABEL_SIZE: &str = "io.hoist.image.size";
pub const LABEL_USER: &str = "io.hoist.image.user";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Metadata(#[from] crate::metadata::Error),
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    #[error(transparent)]
    Stored(#[from] crate::images::stored::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    #[error("image {0}: nothing was fetched for this platform")]
    NoManifest(String),
    /// Removed while it was being pulled: what the pull fetched may be
    /// collected already, so its names are not recorded.
    #[error("image {0} was removed while it was being pulled")]
    Removed(String),
}

/// Records every name of a pulled image; returns its id (the config digest).
pub fn record(db: &std::sync::Arc<Db>, pulled: &Pulled) -> Result<String, Error> {
    let manifest = pulled
        .manifests
        .first()
        .ok_or_else(|| Error::NoManifest(pulled.name.clone()))?;
    let id = manifest.config.digest.to_string();
    let size = manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
    let store = db.content_store(NAMESPACE_CRI);
    let removed = || Error::Removed(pulled.name.clone());
    let config = match crate::images::stored::read_all(&store, &manifest.config.digest) {
        Ok(config) => config,
        // Collected since the pull: the image was removed meanwhile.
        Err(e) => match db.image(NAMESPACE_CRI, &pulled.name) {
            Ok(image) if image.target.digest == pulled.target.digest => return Err(e.into()),
            Ok(_) | Err(crate::metadata::Error::NotFound(_)) => return Err(removed()),
            Err(other) => return Err(other.into()),
        },
    };
    let user = crate::images::parse_config(&manifest.config, &config)
        .ok()
        .and_then(|c| c.config)
        .and_then(|c| c.user)
        .unwrap_or_default();
    let mut labels: Labels = [
        (LABEL_MANAGED.to_string(), "managed".to_string()),
        (LABEL_ID.to_string(), id.clone()),
        (LABEL_SIZE.to_string(), size.to_string()),
    ]
    .into();
    if !user.is_empty() {
        labels.insert(LABEL_USER.to_string(), user);
    }
    let reference = Reference::parse(&pulled.name)
        .map_err(|e| crate::metadata::Error::InvalidArgument(e.to_string()))?;
    let by_digest = format!("{}@{}", reference.repository(), pulled.target.digest);
    let mut names = vec![pulled.name.clone(), by_digest, id.clone()];
    names.dedup();
    match db.put_names_while_pulled(NAMESPACE_CRI, &pulled.name, &pulled.target, &names, &labels)? {
        true => Ok(id),
        false => Err(removed()),
    }
}

/// All names of one image id.
#[derive(Debug, Clone)]
pub struct ImageGroup {
    pub id: String,
    pub names: Vec<String>,
    pub labels: Labels,
    pub target: crate::descriptor::Descriptor,
}

pub fn groups(db: &std::sync::Arc<Db>) -> Result<Vec<ImageGroup>, Error> {
    let mut by_id: BTreeMap<String, ImageGroup> = BTreeMap::new();
    for record in db.list_images(NAMESPACE_CRI, &Filter::default())? {
        let Some(id) = record.labels.get(LABEL_ID).cloned() else {
            continue;
        };
        by_id
            .entry(id.clone())
            .or_insert_with(|| ImageGroup {
                id,
                names: Vec::new(),
                labels: record.labels.clone(),
                target: record.target.clone(),
            })
            .names
            .push(record.name);
    }
    Ok(by_id.into_values().collect())
}

/// The fewest hex digits a query needs to be taken as an id prefix; shorter
/// ones are names only, so `busybox` or `cafe` never match an id by chance.
pub const MIN_ID_PREFIX: usize = 12;

/// An id prefix that more than one image id starts with.
#[derive(Debug, thiserror::Error)]
#[error("image id prefix {prefix} is ambiguous: it matches {}", .candidates.join(", "))]
pub struct Ambiguous {
    pub prefix: String,
    pub candidates: Vec<String>,
}

/// Finds an image by id (`sha256:<hex>` or bare hex), by any tag or digest
/// reference, by a name without tag (meaning `:latest`), or else by a unique
/// id prefix of at least [`MIN_ID_PREFIX`] hex digits, with or without
/// `sha256:`. Names win over prefixes, as in containerd's CRI, so a repository
/// named like hex still resolves by name.
pub fn find<'a>(
    groups: &'a [ImageGroup],
    query: &str,
) -> Result<Option<&'a ImageGroup>, Ambiguous> {
    let query = query.trim();
    if query.is_empty() {
        return Ok(None);
    }
    let with_algorithm = query.strip_prefix("sha256:");
    let hex = with_algorithm.unwrap_or(query);
    let is_hex = hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex.len() == 64 && (is_hex || with_algorithm.is_some()) {
        let id = format!("sha256:{hex}");
        return Ok(groups.iter().find(|g| g.id == id));
    }
    if let Ok(name) = Reference::parse(query).map(|r| r.to_string())
        && let Some(g) = groups.iter().find(|g| g.names.contains(&name))
    {
        return Ok(Some(g));
    }
    if !is_hex || !(MIN_ID_PREFIX..64).contains(&hex.len()) {
        return Ok(None);
    }
    // Ids are config digests; a bare prefix matches the hex of any algorithm.
    let mut matches = groups.iter().filter(|g| {
        g.id.split_once(':').is_some_and(|(algorithm, id_hex)| {
            id_hex.starts_with(hex) && (with_algorithm.is_none() || algorithm == "sha256")
        })
    });
    let Some(first) = matches.next() else {
        return Ok(None);
    };
    let others: Vec<&ImageGroup> = matches.collect();
    if others.is_empty() {
        return Ok(Some(first));
    }
    Err(Ambiguous {
        prefix: query.to_string(),
        candidates: std::iter::once(first)
            .chain(others)
            .map(|g| g.id.clone())
            .collect(),
    })
}

impl ImageGroup {
    pub fn to_cri(&self, pinned: bool) -> Image {
        let mut repo_tags = Vec::new();
        let mut repo_digests = Vec::new();
        for n in &self.names {
            if n.contains('@') {
                repo_digests.push(n.clone());
            } else if !n.starts_with("sha256:") {
                repo_tags.push(n.clone());
            }
        }
        let (uid, username) = parse_user(
            self.labels
                .get(LABEL_USER)
                .map(String::as_str)
                .unwrap_or(""),
        );
        Image {
            id: self.id.clone(),
            repo_tags,
            repo_digests,
            size: self
                .labels
                .get(LABEL_SIZE)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            uid: uid.map(|value| Int64Value { value }),
            username,
            spec: Some(ImageSpec {
                image: self.id.clone(),
                ..Default::default()
            }),
            pinned,
        }
    }
}

/// The config's `User`: `1002` is a uid, `www-data` a name; after a colon
/// comes the group, which CRI does not report.
pub fn parse_user(user: &str) -> (Option<i64>, String) {
    let user = user.split(':').next().unwrap_or("");
    if user.is_empty() {
        return (None, String::new());
    }
    match user.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, user.to_string()),
    }
}

/// `ImageStatus(verbose)`'s `info["info"]`: the chain ID and the image config.
pub fn verbose_info(db: &std::sync::Arc<Db>, group: &ImageGroup) -> Result<String, Error> {
    let store = db.content_store(NAMESPACE_CRI);
    let image = platform_image(&store, &group.target, None)?;
    let spec: serde_json::Value =
        serde_json::from_slice(&image.config_bytes).unwrap_or(serde_json::Value::Null);
    let chain = image
        .chain_ids()
        .last()
        .map(|c| c.to_string())
        .unwrap_or_default();
    let info = serde_json::json!({ "chainID": chain, "imageSpec": spec });
    Ok(info.to_string())
}

/// Bytes and inodes used by content and snapshots.
pub fn filesystem_usage(db: &std::sync::Arc<Db>, snapshots: &SnapshotRoot) -> Result<Usage, Error> {
    let blobs = db.local_content().blobs()?;
    let mut usage = snapshots.total_usage()?;
    usage.size += blobs.iter().map(|(_, size)| size).sum::<u64>();
    usage.inodes += blobs.len() as u64;
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_forms() {
        assert_eq!(parse_user("1002"), (Some(1002), String::new()));
        assert_eq!(parse_user("www-data"), (None, "www-data".to_string()));
        assert_eq!(parse_user("1003:1004"), (Some(1003), String::new()));
        assert_eq!(parse_user("www-data:1004"), (None, "www-data".to_string()));
        assert_eq!(parse_user(""), (None, String::new()));
    }

    #[test]
    fn find_by_every_form() {
        let hex = "a".repeat(64);
        let g = ImageGroup {
            id: format!("sha256:{hex}"),
            names: vec![
                "docker.io/library/busybox:latest".into(),
                format!("docker.io/library/busybox@sha256:{}", "b".repeat(64)),
                format!("sha256:{hex}"),
            ],
            labels: Labels::new(),
            target: crate::descriptor::Descriptor::new("x", crate::digest::Digest::of(b"x"), 1),
        };
        let groups = vec![g];
        for q in [
            format!("sha256:{hex}"),
            hex.clone(),
            "busybox".to_string(),
            "busybox:latest".to_string(),
            "docker.io/library/busybox".to_string(),
            format!("busybox@sha256:{}", "b".repeat(64)),
        ] {
            assert!(matches!(find(&groups, &q), Ok(Some(_))), "{q}");
        }
        assert!(matches!(find(&groups, "busybox:other"), Ok(None)));
        assert!(matches!(find(&groups, ""), Ok(None)));
        let cri = groups[0].to_cri(false);
        assert_eq!(cri.repo_tags, ["docker.io/library/busybox:latest"]);
        assert_eq!(cri.repo_digests.len(), 1);
    }

    fn group(id_hex: &str, names: &[&str]) -> ImageGroup {
        ImageGroup {
            id: format!("sha256:{id_hex}"),
            names: names.iter().map(|n| n.to_string()).collect(),
            labels: Labels::new(),
            target: crate::descriptor::Descriptor::new("x", crate::digest::Digest::of(b"x"), 1),
        }
    }

    fn found<'a>(groups: &'a [ImageGroup], query: &str) -> Option<&'a str> {
        match find(groups, query) {
            Ok(g) => g.map(|g| g.id.as_str()),
            Err(e) => panic!("{query}: {e}"),
        }
    }

    #[test]
    fn find_by_unique_id_prefix() {
        let a = format!("abcdef0123450{}", "0".repeat(51));
        let b = format!("abcdef0123451{}", "1".repeat(51));
        let groups = vec![group(&a, &[]), group(&b, &[])];
        let (id_a, id_b) = (format!("sha256:{a}"), format!("sha256:{b}"));
        for q in [&a[..13], &a[..40], &format!("sha256:{}", &a[..13])] {
            assert_eq!(found(&groups, q), Some(id_a.as_str()), "{q}");
        }
        assert_eq!(found(&groups, &b[..13]), Some(id_b.as_str()));
        // Fewer than twelve digits, upper case, or no match at all: not an id.
        let lone = vec![group(&a, &[])];
        assert_eq!(found(&lone, &a[..12]), Some(id_a.as_str()));
        assert_eq!(found(&lone, &a[..11]), None);
        assert_eq!(found(&lone, &format!("sha256:{}", &a[..11])), None);
        assert_eq!(found(&lone, &a[..12].to_uppercase()), None);
        assert_eq!(found(&lone, "ffffffffffffff"), None);
        assert_eq!(found(&lone, &format!("sha512:{}", &a[..12])), None);
    }

    #[test]
    fn an_ambiguous_id_prefix_names_its_candidates() {
        let a = format!("abcdef0123450{}", "0".repeat(51));
        let b = format!("abcdef0123451{}", "1".repeat(51));
        let groups = vec![group(&a, &[]), group(&b, &[])];
        for q in ["abcdef012345", "sha256:abcdef012345", "abcdef012345  "] {
            let e = match find(&groups, q) {
                Err(e) => e,
                Ok(g) => panic!("{q}: {g:?}"),
            };
            assert_eq!(e.candidates, [format!("sha256:{a}"), format!("sha256:{b}")]);
            let message = e.to_string();
            assert!(message.contains(&a) && message.contains(&b), "{message}");
        }
    }

    #[test]
    fn a_name_wins_over_an_id_prefix() {
        let a = format!("abcdef0123450{}", "0".repeat(51));
        let b = format!("abcdef0123451{}", "1".repeat(51));
        let groups = vec![
            group(&a, &[]),
            group(&b, &["docker.io/library/abcdef012345:latest"]),
        ];
        assert_eq!(
            found(&groups, "abcdef012345"),
            Some(format!("sha256:{b}").as_str())
        );
        assert!(find(&groups, "sha256:abcdef012345").is_err());
    }
}
