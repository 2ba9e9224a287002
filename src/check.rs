//! `hoist check`: an fsck for a root. It holds what the database records
//! against what is on disk (content rows and blobs, snapshot rows and
//! directories), follows each image through its `gc.ref` labels, and looks
//! for leases past their expiry and ingests no live lease holds. With
//! [`Options::verify_digests`] it also re-hashes every blob.
//!
//! [`repair`] removes the bytes that are wrong, the snapshots that cannot
//! be mounted and the images whose content is gone, records again what an
//! image still needs when only its row is lost, and leaves the rest (rows
//! without blobs, blobs without rows, orphaned directories, expired leases,
//! stale ingests) to garbage collection, which removes exactly those.
//!
//! A check may run beside commands writing the same root (it takes the
//! root shared): it looks twice and reports only what it saw both times,
//! so a blob between its rename and its row, or a snapshot being built, is
//! not taken for damage. A repair needs the root to itself.

use crate::content::local::IngestEntry;
use crate::digest::{Digest, Digester};
use crate::images::{self, platform};
use crate::metadata::gc::{
    GcReport, LABEL_REF_CONTENT, LABEL_REF_SNAPSHOT, SnapshotCollector, ingest_owner,
    is_content_ref,
};
use crate::metadata::images::{Image, all_images};
use crate::metadata::leases::{Lease, all_leases};
use crate::metadata::{Db, Labels, load_all_labels};
use crate::snapshot::SnapshotRoot;
use crate::snapshot::store::Record;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Metadata(#[from] crate::metadata::Error),
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    #[error("metadata database: {}", crate::metadata::describe_db_error(.0))]
    Database(#[from] rusqlite::Error),
}

/// One thing wrong with a root. `Display` gives it as one line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Finding {
    /// A blob whose length differs from what a content row records.
    BlobSize {
        digest: Digest,
        path: PathBuf,
        recorded: u64,
        actual: u64,
    },
    /// A blob whose bytes hash to another digest than its name.
    BlobDigest {
        digest: Digest,
        path: PathBuf,
        actual: Digest,
    },
    /// A blob that cannot be read to the end.
    BlobUnreadable {
        digest: Digest,
        path: PathBuf,
        error: String,
    },
    /// A content row whose blob is gone.
    RowWithoutBlob {
        namespace: String,
        digest: String,
    },
    /// A blob no namespace records.
    BlobWithoutRow {
        digest: Digest,
        path: PathBuf,
    },
    /// A snapshot row whose directory (or its `fs` tree) is gone.
    SnapshotMissing {
        snapshotter: String,
        namespace: String,
        key: String,
        path: PathBuf,
    },
    /// A snapshot directory no row owns.
    SnapshotOrphan {
        snapshotter: String,
        path: PathBuf,
    },
    /// A snapshot whose kind or tree is not one a snapshot can have.
    SnapshotWrongKind {
        snapshotter: String,
        namespace: String,
        key: String,
        problem: String,
    },
    SnapshotParentMissing {
        snapshotter: String,
        namespace: String,
        key: String,
        parent: String,
    },
    SnapshotParentCycle {
        snapshotter: String,
        namespace: String,
        key: String,
    },
    /// A snapshot on a parent that is not committed (only committed
    /// snapshots are immutable enough to build on).
    SnapshotParentNotCommitted {
        snapshotter: String,
        namespace: String,
        key: String,
        kind: String,
        parent: String,
        parent_kind: String,
    },
    /// Content an image needs (its target, or a child its labels name)
    /// that has no blob.
    ImageContentMissing {
        namespace: String,
        image: String,
        kind: String,
        digest: String,
        parent: Option<String>,
    },
    /// Content an image needs whose blob is there but whose row is not.
    ImageContentUnrecorded {
        namespace: String,
        image: String,
        kind: String,
        digest: Digest,
        parent: Option<String>,
    },
    LeaseExpired {
        namespace: String,
        lease: String,
        expired_at: SystemTime,
    },
    IngestWithoutLease {
        reference: String,
        path: PathBuf,
    },
    IngestLeaseExpired {
        reference: String,
        path: PathBuf,
        lease: String,
        expired_at: SystemTime,
    },
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn snapshot_subject(snapshotter: &str, namespace: &str, key: &str) -> String {
    format!("snapshot {key} in namespace {namespace} ({snapshotter})")
}

fn referenced_by(parent: &Option<String>) -> String {
    parent
        .as_ref()
        .map(|p| format!(" (referenced by {p})"))
        .unwrap_or_default()
}

impl Finding {
    /// What the finding is about.
    pub fn subject(&self) -> String {
        use Finding::*;
        match self {
            SnapshotMissing { .. }
            | SnapshotWrongKind { .. }
            | SnapshotParentMissing { .. }
            | SnapshotParentCycle { .. }
            | SnapshotParentNotCommitted { .. } => self
                .broken_snapshot()
                .map(|(snapshotter, namespace, key)| snapshot_subject(snapshotter, namespace, key))
                .unwrap_or_default(),
            BlobSize { digest, path, .. }
            | BlobDigest { digest, path, .. }
            | BlobUnreadable { digest, path, .. }
            | BlobWithoutRow { digest, path } => format!("blob {digest} ({})", path.display()),
            RowWithoutBlob { namespace, digest } => {
                format!("content row {digest} in namespace {namespace}")
            }
            SnapshotOrphan { path, .. } => format!("snapshot directory {}", path.display()),
            ImageContentMissing {
                namespace, image, ..
            }
            | ImageContentUnrecorded {
                namespace, image, ..
            } => format!("image {image} in namespace {namespace}"),
            LeaseExpired {
                namespace, lease, ..
            } => format!("lease {lease} in namespace {namespace}"),
            IngestWithoutLease { reference, path }
            | IngestLeaseExpired {
                reference, path, ..
            } => {
                format!("ingest {reference} ({})", path.display())
            }
        }
    }

    /// What is wrong with it.
    pub fn problem(&self) -> String {
        use Finding::*;
        match self {
            BlobSize {
                recorded, actual, ..
            } => format!("{actual} bytes on disk, {recorded} recorded"),
            BlobDigest { actual, .. } => format!("its bytes hash to {actual}"),
            BlobUnreadable { error, .. } => format!("unreadable: {error}"),
            RowWithoutBlob { .. } => "its blob is missing".to_string(),
            BlobWithoutRow { .. } => "no namespace records it".to_string(),
            SnapshotMissing { path, .. }
                if path.ends_with(crate::archive::LAYER_TAR)
                    || path.ends_with(crate::archive::LAYER_IMAGE) =>
            {
                format!("its layer file {} is missing", path.display())
            }
            SnapshotMissing { path, .. } => format!("its directory {} is missing", path.display()),
            SnapshotOrphan { .. } => "no snapshot owns it".to_string(),
            SnapshotWrongKind { problem, .. } => problem.clone(),
            SnapshotParentMissing { parent, .. } => format!("its parent {parent} does not exist"),
            SnapshotParentCycle { .. } => "its chain of parents loops back to it".to_string(),
            SnapshotParentNotCommitted {
                kind,
                parent,
                parent_kind,
                ..
            } => format!("it is {kind}, but its parent {parent} is {parent_kind}, not Committed"),
            ImageContentMissing {
                kind,
                digest,
                parent,
                ..
            } => format!("{kind} {digest} is missing{}", referenced_by(parent)),
            ImageContentUnrecorded {
                kind,
                digest,
                parent,
                ..
            } => format!(
                "{kind} {digest} has a blob but no content row{}",
                referenced_by(parent)
            ),
            LeaseExpired { expired_at, .. } => format!("it expired at {}", rfc3339(*expired_at)),
            IngestWithoutLease { .. } => "no lease holds it".to_string(),
            IngestLeaseExpired {
                lease, expired_at, ..
            } => format!("its lease {lease} expired at {}", rfc3339(*expired_at)),
        }
    }

    /// Where a report lists it: blobs, rows, snapshots, images, leases, ingests.
    fn order(&self) -> u8 {
        use Finding::*;
        match self {
            BlobSize { .. } | BlobDigest { .. } | BlobUnreadable { .. } => 0,
            RowWithoutBlob { .. } | BlobWithoutRow { .. } => 1,
            SnapshotMissing { .. }
            | SnapshotOrphan { .. }
            | SnapshotWrongKind { .. }
            | SnapshotParentMissing { .. }
            | SnapshotParentCycle { .. }
            | SnapshotParentNotCommitted { .. } => 2,
            ImageContentMissing { .. } | ImageContentUnrecorded { .. } => 3,
            LeaseExpired { .. } => 4,
            IngestWithoutLease { .. } | IngestLeaseExpired { .. } => 5,
        }
    }

    /// Bytes that are wrong, which only removing them puts right.
    fn bad_blob(&self) -> Option<&Digest> {
        match self {
            Finding::BlobSize { digest, .. }
            | Finding::BlobDigest { digest, .. }
            | Finding::BlobUnreadable { digest, .. } => Some(digest),
            _ => None,
        }
    }

    /// The snapshot this finding makes unusable, as (snapshotter, namespace, key).
    fn broken_snapshot(&self) -> Option<(&str, &str, &str)> {
        use Finding::*;
        match self {
            SnapshotMissing {
                snapshotter,
                namespace,
                key,
                ..
            }
            | SnapshotWrongKind {
                snapshotter,
                namespace,
                key,
                ..
            }
            | SnapshotParentMissing {
                snapshotter,
                namespace,
                key,
                ..
            }
            | SnapshotParentCycle {
                snapshotter,
                namespace,
                key,
            }
            | SnapshotParentNotCommitted {
                snapshotter,
                namespace,
                key,
                ..
            } => Some((snapshotter, namespace, key)),
            _ => None,
        }
    }

    /// What garbage collection does about it, if it is GC's to fix.
    fn collected_as(&self) -> Option<&'static str> {
        use Finding::*;
        match self {
            RowWithoutBlob { .. } => Some("dropped"),
            BlobWithoutRow { .. }
            | SnapshotOrphan { .. }
            | LeaseExpired { .. }
            | IngestWithoutLease { .. }
            | IngestLeaseExpired { .. } => Some("removed"),
            _ => None,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject(), self.problem())
    }
}

/// How much a check looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub blobs: usize,
    pub blob_bytes: u64,
    pub content_rows: usize,
    pub snapshots: usize,
    pub images: usize,
    pub leases: usize,
    pub ingests: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub stats: Stats,
    /// Whether every blob was re-hashed (else only sizes were compared).
    pub digests_verified: bool,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// One line: what was looked at and the verdict.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let how = if self.digests_verified {
            "digests verified"
        } else {
            "sizes only"
        };
        let verdict = match self.findings.len() {
            0 => "clean".to_string(),
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        };
        let n = |count: usize, what: &str| match count {
            1 => format!("1 {what}"),
            _ => format!("{count} {what}s"),
        };
        format!(
            "checked {} ({}, {how}), {}, {}, {}, {}, {}: {verdict}",
            n(s.blobs, "blob"),
            crate::root::human_size(s.blob_bytes),
            n(s.content_rows, "content row"),
            n(s.snapshots, "snapshot"),
            n(s.images, "image"),
            n(s.leases, "lease"),
            n(s.ingests, "ingest"),
        )
    }
}

/// Told how re-hashing goes, from the threads that hash.
pub trait HashProgress: Sync {
    fn start(&self, blobs: usize, bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

#[derive(Default, Clone, Copy)]
pub struct Options<'a> {
    /// Re-hash every blob (reads the whole store); otherwise sizes only.
    pub verify_digests: bool,
    pub progress: Option<&'a dyn HashProgress>,
}

/// Checks the root of `db` and the snapshotters `snapshots` (all of them
/// on this root: see [`crate::snapshot::open_existing`]).
pub fn check(db: &Arc<Db>, snapshots: &[Arc<SnapshotRoot>], opts: &Options<'_>) -> Result<Report> {
    let first = look(db, snapshots)?;
    let mut hashed = Vec::new();
    if opts.verify_digests {
        let sized: HashSet<&Digest> = first
            .findings
            .iter()
            .filter_map(Finding::bad_blob)
            .collect();
        let todo: Vec<(Digest, u64)> = first
            .blobs
            .iter()
            .filter(|(d, _)| !sized.contains(d))
            .map(|(d, s)| (d.clone(), *s))
            .collect();
        hashed = verify_blobs(db, &todo, opts.progress);
    }
    // A second look: what another command was in the middle of has moved on.
    let second = look(db, snapshots)?;
    let seen: HashSet<&Finding> = second.findings.iter().collect();
    let mut findings: Vec<Finding> = first
        .findings
        .iter()
        .filter(|f| seen.contains(f))
        .cloned()
        .collect();
    findings.extend(
        hashed
            .into_iter()
            .filter(|f| f.bad_blob().is_some_and(|d| second.blobs.contains_key(d))),
    );
    findings.sort_by_cached_key(|f| (f.order(), f.to_string()));
    Ok(Report {
        findings,
        stats: second.stats,
        digests_verified: opts.verify_digests,
    })
}

/// What one look at the root found, with what re-hashing needs.
struct Look {
    findings: Vec<Finding>,
    stats: Stats,
    blobs: BTreeMap<Digest, u64>,
    /// Snapshot records by snapshotter.
    records: Vec<(Arc<SnapshotRoot>, Vec<Record>)>,
}

/// What an image's content node is, as its parent's label (or the image
/// target's media type) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Index,
    Manifest,
    Config,
    Layer,
    Content,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Index => "index",
            Part::Manifest => "manifest",
            Part::Config => "config",
            Part::Layer => "layer",
            Part::Content => "content",
        }
    }

    fn of_label(key: &str) -> Part {
        let rest = key.strip_prefix(LABEL_REF_CONTENT).unwrap_or_default();
        if rest.starts_with(".m.") {
            Part::Manifest
        } else if rest == ".config" {
            Part::Config
        } else if rest.starts_with(".l.") {
            Part::Layer
        } else {
            Part::Content
        }
    }

    fn of_descriptor(desc: &crate::descriptor::Descriptor) -> Part {
        match images::kind(desc) {
            Ok(images::Kind::Index) => Part::Index,
            Ok(images::Kind::Manifest) => Part::Manifest,
            Ok(images::Kind::Config) => Part::Config,
            Ok(images::Kind::Layer(_)) => Part::Layer,
            Err(_) => Part::Content,
        }
    }
}

/// Everything the database says, read in one transaction.
struct Recorded {
    /// (namespace, digest) -> size.
    rows: BTreeMap<(String, String), u64>,
    labels: BTreeMap<(String, String), Labels>,
    images: Vec<(String, Image)>,
    leases: Vec<(String, Lease)>,
    /// (namespace, ingest ref) -> the leases holding it.
    ingest_holders: HashMap<(String, String), Vec<String>>,
}

fn read_records(db: &Db) -> Result<Recorded> {
    Ok(db.transaction(|tx| -> rusqlite::Result<Recorded> {
        let rows = tx
            .prepare("SELECT namespace, digest, size FROM content")?
            .query_map([], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    u64::try_from(r.get::<_, i64>(2)?).unwrap_or(u64::MAX),
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut ingest_holders: HashMap<(String, String), Vec<String>> = HashMap::new();
        let held = tx
            .prepare(
                "SELECT namespace, lease, resource FROM lease_resources WHERE kind = 'ingests'",
            )?
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (ns, lease, resource) in held {
            ingest_holders
                .entry((ns, resource))
                .or_default()
                .push(lease);
        }
        Ok(Recorded {
            rows,
            labels: load_all_labels(tx, "content_labels", None)?,
            images: all_images(tx, None)?,
            leases: all_leases(tx)?,
            ingest_holders,
        })
    })?)
}

fn look(db: &Arc<Db>, roots: &[Arc<SnapshotRoot>]) -> Result<Look> {
    let now = SystemTime::now();
    let local = db.local_content();
    // Ingests before their leases, rows before blobs, so that what a
    // writer does meanwhile shows up on the side the second look clears.
    let ingests = local.ingests()?;
    let recorded = read_records(db)?;
    let blobs: BTreeMap<Digest, u64> = local.blobs()?.into_iter().collect();
    let mut records = Vec::new();
    for root in roots {
        records.push((root.clone(), root.records()?));
    }
    let mut findings = Vec::new();

    // Content rows against blobs.
    let mut by_digest: HashMap<&str, Vec<u64>> = HashMap::new();
    for ((ns, digest), size) in &recorded.rows {
        by_digest.entry(digest).or_default().push(*size);
        let present = digest
            .parse::<Digest>()
            .is_ok_and(|d| blobs.contains_key(&d));
        if !present {
            findings.push(Finding::RowWithoutBlob {
                namespace: ns.clone(),
                digest: digest.clone(),
            });
        }
    }
    for (digest, size) in &blobs {
        let path = local.blob_path(digest);
        match by_digest.get(digest.to_string().as_str()) {
            None => findings.push(Finding::BlobWithoutRow {
                digest: digest.clone(),
                path,
            }),
            Some(sizes) => {
                if let Some(recorded) = sizes.iter().find(|s| *s != size) {
                    findings.push(Finding::BlobSize {
                        digest: digest.clone(),
                        path,
                        recorded: *recorded,
                        actual: *size,
                    });
                }
            }
        }
    }

    // Snapshot rows against directories, and their parent chains.
    for (root, recs) in &records {
        findings.extend(check_snapshots(root, recs)?);
    }

    // Images through their labels.
    for (ns, image) in &recorded.images {
        findings.extend(check_image(db, &recorded, &blobs, ns, image));
    }

    // Leases past their expiry, and the ingests they no longer hold.
    let mut expiry: HashMap<(&str, &str), Option<SystemTime>> = HashMap::new();
    for (ns, lease) in &recorded.leases {
        let expires = lease.expires_at();
        expiry.insert((ns.as_str(), lease.id.as_str()), expires);
        if let Some(t) = expires.filter(|t| *t <= now) {
            findings.push(Finding::LeaseExpired {
                namespace: ns.clone(),
                lease: lease.id.clone(),
                expired_at: t,
            });
        }
    }
    for ingest in &ingests {
        if let Some(f) = check_ingest(ingest, &recorded, &expiry, now) {
            findings.push(f);
        }
    }

    let stats = Stats {
        blobs: blobs.len(),
        blob_bytes: blobs.values().sum(),
        content_rows: recorded.rows.len(),
        snapshots: records.iter().map(|(_, r)| r.len()).sum(),
        images: recorded.images.len(),
        leases: recorded.leases.len(),
        ingests: ingests.len(),
    };
    Ok(Look {
        findings,
        stats,
        blobs,
        records,
    })
}

fn check_ingest(
    ingest: &IngestEntry,
    recorded: &Recorded,
    expiry: &HashMap<(&str, &str), Option<SystemTime>>,
    now: SystemTime,
) -> Option<Finding> {
    let reference = if ingest.reference.is_empty() {
        "(unnamed)".to_string()
    } else {
        ingest.reference.clone()
    };
    let path = ingest.dir.clone();
    let holders: Vec<(&String, Option<SystemTime>)> = match ingest_owner(ingest) {
        Some((ns, r)) => recorded
            .ingest_holders
            .get(&(ns.to_string(), r.to_string()))
            .into_iter()
            .flatten()
            .map(|l| (l, expiry.get(&(ns, l.as_str())).copied().flatten()))
            .collect(),
        None => Vec::new(),
    };
    if holders.is_empty() {
        return Some(Finding::IngestWithoutLease { reference, path });
    }
    // Held while any holder has not expired; else name the last to expire.
    let mut last: Option<(&String, SystemTime)> = None;
    for (lease, expires) in holders {
        match expires {
            Some(t) if t <= now => {
                if last.is_none_or(|(_, l)| t > l) {
                    last = Some((lease, t));
                }
            }
            _ => return None,
        }
    }
    last.map(|(lease, expired_at)| Finding::IngestLeaseExpired {
        reference,
        path,
        lease: lease.clone(),
        expired_at,
    })
}

/// What a snapshot's directory (or its tree) turned out to be.
enum Entry {
    Missing,
    Dir,
    /// Something else, as a message names it.
    Other(&'static str),
}

fn entry(path: &Path) -> std::io::Result<Entry> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(Entry::Dir),
        Ok(m) if m.file_type().is_symlink() => Ok(Entry::Other("a symbolic link")),
        Ok(m) if m.is_file() => Ok(Entry::Other("a file")),
        Ok(_) => Ok(Entry::Other("a special file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Entry::Missing),
        Err(e) => Err(e),
    }
}

fn check_snapshots(root: &SnapshotRoot, records: &[Record]) -> Result<Vec<Finding>> {
    let name = root.name().to_string();
    let mut out = Vec::new();
    let by_key: HashMap<(&str, &str), &Record> = records
        .iter()
        .map(|r| ((r.namespace.as_str(), r.key.as_str()), r))
        .collect();
    let io = |path: &Path| {
        let context = format!("stat {}", path.display());
        move |source| crate::snapshot::Error::Io { context, source }
    };
    for r in records {
        let subject = |problem: String| Finding::SnapshotWrongKind {
            snapshotter: name.clone(),
            namespace: r.namespace.clone(),
            key: r.key.clone(),
            problem,
        };
        let missing = |path: PathBuf| Finding::SnapshotMissing {
            snapshotter: name.clone(),
            namespace: r.namespace.clone(),
            key: r.key.clone(),
            path,
        };
        if crate::snapshot::Kind::parse(&r.kind).is_none() {
            out.push(subject(format!(
                "its kind {:?} is none of View, Active and Committed",
                r.kind
            )));
        }
        let dir = root.dir(r.id);
        let tree = dir.join("fs");
        match entry(&dir).map_err(io(&dir))? {
            Entry::Missing => out.push(missing(dir.clone())),
            Entry::Dir => match entry(&tree).map_err(io(&tree))? {
                Entry::Missing => out.push(missing(tree)),
                Entry::Dir => {}
                Entry::Other(what) => out.push(subject(format!(
                    "{} is {what}, not a directory",
                    tree.display()
                ))),
            },
            Entry::Other(what) => out.push(subject(format!(
                "{} is {what}, not a directory",
                dir.display()
            ))),
        }
        // An indexed layer is its tar and its image: one without the other
        // cannot be mounted.
        let (tar, image) = (
            dir.join(crate::archive::LAYER_TAR),
            dir.join(crate::archive::LAYER_IMAGE),
        );
        if r.kind == "Committed" {
            match (tar.is_file(), image.is_file()) {
                (true, false) => out.push(missing(image)),
                (false, true) => out.push(missing(tar)),
                _ => {}
            }
        }
        if let Some(parent) = &r.parent {
            match by_key.get(&(r.namespace.as_str(), parent.as_str())) {
                None => out.push(Finding::SnapshotParentMissing {
                    snapshotter: name.clone(),
                    namespace: r.namespace.clone(),
                    key: r.key.clone(),
                    parent: parent.clone(),
                }),
                Some(p) if p.kind != "Committed" => out.push(Finding::SnapshotParentNotCommitted {
                    snapshotter: name.clone(),
                    namespace: r.namespace.clone(),
                    key: r.key.clone(),
                    kind: r.kind.clone(),
                    parent: parent.clone(),
                    parent_kind: p.kind.clone(),
                }),
                Some(_) => {}
            }
        }
        // A chain no longer than the records, or it loops.
        let mut next = r.parent.as_deref();
        for _ in 0..records.len() {
            let Some(p) = next else { break };
            if p == r.key {
                out.push(Finding::SnapshotParentCycle {
                    snapshotter: name.clone(),
                    namespace: r.namespace.clone(),
                    key: r.key.clone(),
                });
                break;
            }
            next = by_key
                .get(&(r.namespace.as_str(), p))
                .and_then(|p| p.parent.as_deref());
        }
    }
    for path in root.orphan_dirs()? {
        out.push(Finding::SnapshotOrphan {
            snapshotter: name.clone(),
            path,
        });
    }
    Ok(out)
}

/// Documents past this size are not manifests or indexes hoist would store.
const MAX_DOCUMENT: u64 = 4 << 20;

/// A manifest or index blob, read whole.
fn read_document(path: &Path) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    let mut body = Vec::new();
    file.take(MAX_DOCUMENT + 1).read_to_end(&mut body).ok()?;
    (body.len() as u64 <= MAX_DOCUMENT).then_some(body)
}

/// The children of a manifest or index, and the labels its row gives them.
struct Children {
    parts: Vec<(Part, Digest)>,
    labels: Labels,
}

/// What a manifest or index blob says its children are, for content whose
/// row (and so its labels) is gone: a manifest's config and layers, an
/// index's manifests that this root holds (it never had the others).
/// `None` when the blob is not a document of that kind.
fn children_from_blob(
    part: Part,
    media_type: Option<&str>,
    digest: &Digest,
    body: &[u8],
    present: &dyn Fn(&Digest) -> bool,
) -> Option<Children> {
    let sniffed = media_type
        .map(str::to_string)
        .or_else(|| images::sniff_media_type(body));
    let as_kind = |mt: &str| crate::descriptor::Descriptor::new(mt, digest.clone(), 0);
    let try_manifest = |mt: &str| {
        let desc = as_kind(mt);
        let m = images::parse_manifest(&desc, body).ok()?;
        let mut children = vec![m.config.clone()];
        children.extend(m.layers.iter().cloned());
        let labels = images::gc_child_labels(images::Kind::Manifest, &children);
        let parts = children
            .iter()
            .map(|c| (Part::of_descriptor(c), c.digest.clone()))
            .collect();
        Some(Children { parts, labels })
    };
    let try_index = |mt: &str| {
        let desc = as_kind(mt);
        let index = images::parse_index(&desc, body).ok()?;
        let mut held: Vec<crate::descriptor::Descriptor> = index
            .manifests
            .iter()
            .filter(|m| present(&m.digest))
            .cloned()
            .collect();
        if held.is_empty() {
            // None of it is here: name the one this machine would pull.
            let host = platform::host();
            let candidates = index
                .manifests
                .iter()
                .filter(|m| !images::is_attestation(m));
            held.extend(platform::best_match(&host, candidates).cloned());
        }
        let labels = images::gc_index_labels(&index.manifests, &held);
        let parts = held
            .iter()
            .map(|m| match Part::of_descriptor(m) {
                Part::Index => (Part::Index, m.digest.clone()),
                _ => (Part::Manifest, m.digest.clone()),
            })
            .collect();
        Some(Children { parts, labels })
    };
    if !matches!(part, Part::Index | Part::Manifest) {
        return None;
    }
    let declared = sniffed
        .as_deref()
        .map(|mt| (mt, Part::of_descriptor(&as_kind(mt))));
    match declared {
        Some((mt, Part::Index)) => try_index(mt),
        Some((mt, Part::Manifest)) => try_manifest(mt),
        _ => try_manifest(images::OCI_MANIFEST).or_else(|| try_index(images::OCI_INDEX)),
    }
}

/// Follows an image from its target along the `gc.ref.content` labels of
/// each row, or along what the blob says where the row is gone.
fn check_image(
    db: &Db,
    recorded: &Recorded,
    blobs: &BTreeMap<Digest, u64>,
    ns: &str,
    image: &Image,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let target = &image.target;
    let mut stack: Vec<(Part, String, Option<String>, Option<String>)> = vec![(
        Part::of_descriptor(target),
        target.digest.to_string(),
        None,
        Some(target.media_type.clone()),
    )];
    let mut seen: HashSet<String> = HashSet::new();
    let present = |d: &Digest| {
        blobs.contains_key(d) || recorded.rows.contains_key(&(ns.to_string(), d.to_string()))
    };
    while let Some((part, digest, parent, media_type)) = stack.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let parsed = digest
            .parse::<Digest>()
            .ok()
            .filter(|d| blobs.contains_key(d));
        let Some(d) = parsed else {
            out.push(Finding::ImageContentMissing {
                namespace: ns.to_string(),
                image: image.name.clone(),
                kind: part.name().to_string(),
                digest,
                parent,
            });
            continue;
        };
        let key = (ns.to_string(), digest.clone());
        if recorded.rows.contains_key(&key) {
            for (k, v) in recorded.labels.get(&key).into_iter().flatten() {
                if is_content_ref(k) {
                    stack.push((Part::of_label(k), v.clone(), Some(digest.clone()), None));
                }
            }
            continue;
        }
        out.push(Finding::ImageContentUnrecorded {
            namespace: ns.to_string(),
            image: image.name.clone(),
            kind: part.name().to_string(),
            digest: d.clone(),
            parent,
        });
        let body = match part {
            Part::Index | Part::Manifest => read_document(&db.local_content().blob_path(&d)),
            _ => None,
        };
        if let Some(children) = body
            .as_deref()
            .and_then(|b| children_from_blob(part, media_type.as_deref(), &d, b, &present))
        {
            for (p, c) in children.parts {
                stack.push((p, c.to_string(), Some(digest.clone()), None));
            }
        }
    }
    out
}

/// Re-hashes `blobs` on a few threads; returns the ones that are wrong.
fn verify_blobs(
    db: &Db,
    blobs: &[(Digest, u64)],
    progress: Option<&dyn HashProgress>,
) -> Vec<Finding> {
    if let Some(p) = progress {
        p.start(blobs.len(), blobs.iter().map(|(_, s)| s).sum());
    }
    let next = AtomicUsize::new(0);
    let found = parking_lot::Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, 4)
        .min(blobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((digest, _)) = blobs.get(i) else {
                        break;
                    };
                    let path = db.local_content().blob_path(digest);
                    if let Some(f) = verify_blob(digest, &path, &mut buf, progress) {
                        found.lock().push(f);
                    }
                }
            });
        }
    });
    if let Some(p) = progress {
        p.finish();
    }
    found.into_inner()
}

/// Hashes one blob; a finding when it is wrong or unreadable, none when
/// it is right or was removed meanwhile.
fn verify_blob(
    digest: &Digest,
    path: &Path,
    buf: &mut [u8],
    progress: Option<&dyn HashProgress>,
) -> Option<Finding> {
    let unreadable = |e: std::io::Error| Finding::BlobUnreadable {
        digest: digest.clone(),
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(unreadable(e)),
    };
    let mut hasher = Digester::new();
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                if let Some(p) = progress {
                    p.advance(n as u64);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Some(unreadable(e)),
        }
    }
    let actual = hasher.finish();
    (actual != *digest).then(|| Finding::BlobDigest {
        digest: digest.clone(),
        path: path.to_path_buf(),
        actual,
    })
}

/// What a repair did, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A finding put right: `done` says how (`removed`, `dropped`).
    Fixed {
        done: &'static str,
        finding: Finding,
    },
    /// A snapshot removed because one below it was.
    RemovedChild {
        snapshotter: String,
        namespace: String,
        key: String,
        parent: String,
    },
    /// Content an image needs recorded again from its blob.
    Recorded {
        namespace: String,
        image: String,
        kind: String,
        digest: Digest,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Fixed { done, finding } => {
                write!(f, "{done} {}: {}", finding.subject(), finding.problem())
            }
            Action::RemovedChild {
                snapshotter,
                namespace,
                key,
                parent,
            } => write!(
                f,
                "removed {}: its parent {parent} was removed",
                snapshot_subject(snapshotter, namespace, key)
            ),
            Action::Recorded {
                namespace,
                image,
                kind,
                digest,
            } => write!(
                f,
                "recorded {kind} {digest} in namespace {namespace} again, for image {image}"
            ),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Repair {
    pub actions: Vec<Action>,
    /// The collection that removed what no longer had a use.
    pub collected: GcReport,
    /// What a check (of sizes) still finds afterwards.
    pub after: Report,
}

/// Puts right what `report` found, then collects garbage, then checks again
/// (sizes only: the bytes hashed before are the ones left). The caller has
/// the root to itself ([`crate::root::RootLock::collector`], or the daemon);
/// in this process, nothing is made visible while it runs.
pub fn repair(db: &Arc<Db>, snapshots: &[Arc<SnapshotRoot>], report: &Report) -> Result<Repair> {
    let mut actions = Vec::new();
    let mut recorded_again: HashSet<Digest> = HashSet::new();
    let before = {
        let _collection = db.collection_guard();
        // Bytes that are wrong go first: every reader would trust them.
        for f in &report.findings {
            let Some(digest) = f.bad_blob() else { continue };
            let path = db.local_content().blob_path(digest);
            // Only if it is still the same wrong blob.
            let still = look_at_blob(db, digest, &path)?;
            if still.is_some() {
                db.local_content().delete_blob(digest)?;
                actions.push(Action::Fixed {
                    done: "removed",
                    finding: f.clone(),
                });
            }
        }
        let now = look(db, snapshots)?;
        actions.extend(remove_broken_snapshots(&now)?);
        let (images, recorded) = repair_images(db, &now)?;
        actions.extend(images);
        recorded_again.extend(recorded);
        now
    };
    let collectors: Vec<&dyn SnapshotCollector> = snapshots
        .iter()
        .map(|r| &**r as &dyn SnapshotCollector)
        .collect();
    let collected = db.garbage_collect(&collectors)?;
    let after = check(db, snapshots, &Options::default())?;
    let left: HashSet<&Finding> = after.findings.iter().collect();
    for f in &before.findings {
        let Some(done) = f.collected_as() else {
            continue;
        };
        if left.contains(f) {
            continue;
        }
        if let Finding::BlobWithoutRow { digest, .. } = f
            && recorded_again.contains(digest)
        {
            continue;
        }
        actions.push(Action::Fixed {
            done,
            finding: f.clone(),
        });
    }
    Ok(Repair {
        actions,
        collected,
        after,
    })
}

/// A blob's size against its rows and its bytes against its name, now.
fn look_at_blob(db: &Arc<Db>, digest: &Digest, path: &Path) -> Result<Option<Finding>> {
    let Some(size) = db.local_content().blob_size(digest)? else {
        return Ok(None);
    };
    let key = digest.to_string();
    let recorded: Vec<u64> = db.transaction(|tx| {
        tx.prepare("SELECT size FROM content WHERE digest = ?1")?
            .query_map([&key], |r| {
                Ok(u64::try_from(r.get::<_, i64>(0)?).unwrap_or(u64::MAX))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
    })?;
    if let Some(r) = recorded.iter().find(|r| **r != size) {
        return Ok(Some(Finding::BlobSize {
            digest: digest.clone(),
            path: path.to_path_buf(),
            recorded: *r,
            actual: size,
        }));
    }
    let mut buf = vec![0u8; 1 << 20];
    Ok(verify_blob(digest, path, &mut buf, None))
}

/// Removes every snapshot a finding makes unusable, with the snapshots
/// built on it.
fn remove_broken_snapshots(now: &Look) -> Result<Vec<Action>> {
    let mut actions = Vec::new();
    for (root, records) in &now.records {
        let broken: BTreeMap<(String, String), &Finding> = now
            .findings
            .iter()
            .filter_map(|f| {
                let (s, ns, key) = f.broken_snapshot()?;
                (s == root.name()).then(|| ((ns.to_string(), key.to_string()), f))
            })
            .collect();
        if broken.is_empty() {
            continue;
        }
        // Children by (namespace, parent).
        let mut children: HashMap<(&str, &str), Vec<&Record>> = HashMap::new();
        for r in records {
            if let Some(p) = &r.parent {
                children.entry((&r.namespace, p)).or_default().push(r);
            }
        }
        let mut doomed: BTreeSet<(String, String)> = BTreeSet::new();
        let mut queue: Vec<(String, String, Option<String>)> = broken
            .keys()
            .map(|(ns, k)| (ns.clone(), k.clone(), None))
            .collect();
        let mut order = Vec::new();
        while let Some((ns, key, parent)) = queue.pop() {
            if !doomed.insert((ns.clone(), key.clone())) {
                continue;
            }
            for c in children
                .get(&(ns.as_str(), key.as_str()))
                .into_iter()
                .flatten()
            {
                queue.push((c.namespace.clone(), c.key.clone(), Some(key.clone())));
            }
            order.push((ns, key, parent));
        }
        // Children before parents, as a collection removes them.
        for (ns, key, parent) in order.into_iter().rev() {
            match root.remove_broken(&ns, &key) {
                Ok(_) | Err(crate::snapshot::Error::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let action = match (broken.get(&(ns.clone(), key.clone())), parent) {
                (Some(f), _) => Action::Fixed {
                    done: "removed",
                    finding: (*f).clone(),
                },
                (None, Some(parent)) => Action::RemovedChild {
                    snapshotter: root.name().to_string(),
                    namespace: ns,
                    key,
                    parent,
                },
                (None, None) => continue,
            };
            actions.push(action);
        }
    }
    Ok(actions)
}

/// Removes the images whose content is gone (pulling them again brings
/// them back whole) and records again, from its blob, the content an image
/// needs whose row alone is lost. Returns the actions and the digests
/// recorded.
fn repair_images(db: &Arc<Db>, now: &Look) -> Result<(Vec<Action>, Vec<Digest>)> {
    let mut actions = Vec::new();
    let mut removed: HashSet<(String, String)> = HashSet::new();
    for f in &now.findings {
        let Finding::ImageContentMissing {
            namespace, image, ..
        } = f
        else {
            continue;
        };
        if !removed.insert((namespace.clone(), image.clone())) {
            continue;
        }
        match db.delete_image(namespace, image) {
            Ok(()) | Err(crate::metadata::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        actions.push(Action::Fixed {
            done: "removed",
            finding: f.clone(),
        });
    }
    let mut recorded = Vec::new();
    let mut done: HashSet<(String, Digest)> = HashSet::new();
    for f in &now.findings {
        let Finding::ImageContentUnrecorded {
            namespace,
            image,
            kind,
            digest,
            ..
        } = f
        else {
            continue;
        };
        if removed.contains(&(namespace.clone(), image.clone()))
            || !done.insert((namespace.clone(), digest.clone()))
        {
            continue;
        }
        let path = db.local_content().blob_path(digest);
        let Some(size) = db.local_content().blob_size(digest)? else {
            continue;
        };
        // Recorded again only if its bytes are what the image names.
        let mut buf = vec![0u8; 1 << 20];
        if let Some(bad) = verify_blob(digest, &path, &mut buf, None) {
            db.local_content().delete_blob(digest)?;
            actions.push(Action::Fixed {
                done: "removed",
                finding: bad,
            });
            if removed.insert((namespace.clone(), image.clone())) {
                db.delete_image(namespace, image).or_else(|e| match e {
                    crate::metadata::Error::NotFound(_) => Ok(()),
                    e => Err(e),
                })?;
            }
            continue;
        }
        let labels = labels_for(db, now, namespace, kind, digest, &path);
        db.content_store(namespace).record(digest, size, &labels)?;
        actions.push(Action::Recorded {
            namespace: namespace.clone(),
            image: image.clone(),
            kind: kind.clone(),
            digest: digest.clone(),
        });
        recorded.push(digest.clone());
    }
    Ok((actions, recorded))
}

/// The labels a row recorded again needs so that collection keeps what
/// the content points at: a manifest's or index's children, a config's
/// unpacked snapshot.
fn labels_for(
    db: &Db,
    now: &Look,
    namespace: &str,
    kind: &str,
    digest: &Digest,
    path: &Path,
) -> Labels {
    let part = match kind {
        "index" => Part::Index,
        "manifest" => Part::Manifest,
        "config" => Part::Config,
        _ => return Labels::new(),
    };
    let Some(body) = read_document(path) else {
        return Labels::new();
    };
    if part == Part::Config {
        let desc = crate::descriptor::Descriptor::new(images::OCI_CONFIG, digest.clone(), 0);
        let Ok(config) = images::parse_config(&desc, &body) else {
            return Labels::new();
        };
        let Some(top) = images::chain_ids(&config.rootfs.diff_ids).pop() else {
            return Labels::new();
        };
        let top = top.to_string();
        return now
            .records
            .iter()
            .filter(|(_, recs)| {
                recs.iter()
                    .any(|r| r.namespace == namespace && r.key == top && r.kind == "Committed")
            })
            .map(|(root, _)| (format!("{LABEL_REF_SNAPSHOT}{}", root.name()), top.clone()))
            .collect();
    }
    let present = |d: &Digest| {
        db.local_content().blob_size(d).ok().flatten().is_some()
            || now
                .findings
                .iter()
                .any(|f| matches!(f, Finding::ImageContentUnrecorded { digest, .. } if digest == d))
    };
    children_from_blob(part, None, digest, &body, &present)
        .map(|c| c.labels)
        .unwrap_or_default()
}

/// The daemon's start-up check of every snapshotter on the root (sizes
/// only): findings at warn, then one summary line.
pub fn log_at_start(db: &Arc<Db>) {
    let checked = crate::snapshot::open_existing(db)
        .map_err(Error::from)
        .and_then(|roots| check(db, &roots, &Options::default()));
    match checked {
        Ok(report) if report.is_clean() => tracing::info!("{}", report.summary()),
        Ok(report) => {
            for f in &report.findings {
                tracing::warn!("check: {f}");
            }
            tracing::warn!(
                "{}; `hoist check --repair`, with the daemon stopped, repairs the root",
                report.summary()
            );
        }
        Err(e) => tracing::warn!(error = %e, "could not check the root"),
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
