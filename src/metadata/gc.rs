//! Garbage collection, containerd's mark and sweep.
//!
//! Roots: image targets, the resources of unexpired leases, and objects
//! labelled `containerd.io/gc.root`. Edges: `containerd.io/gc.ref.content[.<x>]`
//! and `containerd.io/gc.ref.snapshot.<snapshotter>` labels, and a snapshot's
//! parent. Everything unreachable is swept: content rows and blobs, snapshots
//! (through [`SnapshotCollector`]), ingests no lease holds, expired leases.
//! GC also repairs what a crash can leave: rows without blobs, blobs without
//! rows, ingests without a writer.

use super::images::all_images;
use super::leases::all_leases;
use super::{Db, Labels, Result, load_all_labels};
use crate::content::local::IngestEntry;
use rusqlite::params;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

pub const LABEL_ROOT: &str = "containerd.io/gc.root";
pub const LABEL_REF_CONTENT: &str = "containerd.io/gc.ref.content";
pub const LABEL_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.";

/// One snapshot as garbage collection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotNode {
    pub namespace: String,
    pub key: String,
    pub parent: Option<String>,
    pub labels: Labels,
}

/// The hook a snapshotter gives the collector: what exists, and how to remove it.
pub trait SnapshotCollector: Send + Sync {
    /// The name in `containerd.io/gc.ref.snapshot.<name>` labels and leases.
    fn snapshotter(&self) -> &str;
    fn snapshots(&self) -> Result<Vec<SnapshotNode>>;
    /// Removes one snapshot that has no children; returns the bytes freed.
    fn remove(&self, namespace: &str, key: &str) -> Result<u64>;
    /// Removes what a crash left behind that no record describes; returns
    /// the bytes freed.
    fn sweep_leftovers(&self) -> Result<u64> {
        Ok(0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub content_removed: usize,
    pub snapshots_removed: usize,
    pub ingests_removed: usize,
    pub leases_removed: usize,
    /// Rows whose blob had vanished, dropped so the store stops claiming them.
    pub dangling_rows_removed: usize,
    pub bytes_freed: u64,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Node {
    Content {
        ns: String,
        digest: String,
    },
    Snapshot {
        ns: String,
        snapshotter: String,
        key: String,
    },
}

/// Whether a label key is `containerd.io/gc.ref.content[.<x>]`.
pub(crate) fn is_content_ref(key: &str) -> bool {
    key == LABEL_REF_CONTENT
        || key
            .strip_prefix(LABEL_REF_CONTENT)
            .is_some_and(|s| s.starts_with('.'))
}

/// The objects `labels` point at.
fn label_refs(ns: &str, labels: &Labels) -> impl Iterator<Item = Node> {
    labels.iter().filter_map(move |(k, v)| {
        if is_content_ref(k) {
            return Some(Node::Content {
                ns: ns.to_string(),
                digest: v.clone(),
            });
        }
        let snapshotter = k.strip_prefix(LABEL_REF_SNAPSHOT)?;
        // `gc.ref.snapshot.<name>/<suffix>` lets one object point at several.
        let snapshotter = snapshotter.split('/').next().unwrap_or(snapshotter);
        Some(Node::Snapshot {
            ns: ns.to_string(),
            snapshotter: snapshotter.to_string(),
            key: v.clone(),
        })
    })
}

impl Db {
    /// Runs one full collection. Operations that create objects wait for it
    /// (and it for them), so nothing in flight under a lease is swept. That
    /// holds within this process only: the caller must have the root to
    /// itself, as the daemon does, or a command holding
    /// [`RootLock::collector`](crate::root::RootLock::collector).
    pub fn garbage_collect(&self, snapshotters: &[&dyn SnapshotCollector]) -> Result<GcReport> {
        let started = Instant::now();
        let _exclusive = self.gc_lock.write();
        let mut report = GcReport::default();

        // Snapshots first: their records belong to the snapshotters.
        let mut snapshots: Vec<(String, Vec<SnapshotNode>)> = Vec::new();
        for s in snapshotters {
            snapshots.push((s.snapshotter().to_string(), s.snapshots()?));
        }

        let blobs: BTreeMap<String, u64> = self
            .content
            .blobs()?
            .into_iter()
            .map(|(d, size)| (d.to_string(), size))
            .collect();

        let (marked, live_ingests) = self.transaction(|tx| -> Result<_> {
            // Expired leases go first, so what they held is no longer a root.
            let now = SystemTime::now();
            for (ns, lease) in all_leases(tx)? {
                if lease.is_expired(now) {
                    tx.execute(
                        "DELETE FROM leases WHERE namespace = ?1 AND id = ?2",
                        params![ns, lease.id],
                    )?;
                    report.leases_removed += 1;
                }
            }
            // Rows whose blob is gone describe nothing; drop them.
            let mut rows: Vec<(String, String)> = tx
                .prepare("SELECT namespace, digest FROM content")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows.retain(|(ns, digest)| {
                let present = blobs.contains_key(digest);
                if !present {
                    report.dangling_rows_removed += 1;
                    tracing::warn!(namespace = %ns, %digest, "dropping a content row whose blob is missing");
                }
                present
            });
            let content_labels = load_all_labels(tx, "content_labels", None)?;

            let mut roots: Vec<Node> = Vec::new();
            let mut live_ingests: HashSet<(String, String)> = HashSet::new();
            for (ns, image) in all_images(tx, None)? {
                roots.push(Node::Content {
                    ns: ns.clone(),
                    digest: image.target.digest.to_string(),
                });
                roots.extend(label_refs(&ns, &image.labels));
            }
            let mut stmt = tx.prepare("SELECT namespace, kind, resource FROM lease_resources")?;
            let resources = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })?;
            for res in resources {
                let (ns, kind, id) = res?;
                match kind.as_str() {
                    "content" => roots.push(Node::Content { ns, digest: id }),
                    "ingests" => {
                        live_ingests.insert((ns, id));
                    }
                    k => {
                        if let Some(snapshotter) = k.strip_prefix("snapshots/") {
                            roots.push(Node::Snapshot {
                                ns,
                                snapshotter: snapshotter.to_string(),
                                key: id,
                            });
                        }
                    }
                }
            }
            for ((ns, digest), labels) in &content_labels {
                if labels.contains_key(LABEL_ROOT) {
                    roots.push(Node::Content {
                        ns: ns.clone(),
                        digest: digest.clone(),
                    });
                }
            }
            let mut snapshot_index: HashMap<Node, &SnapshotNode> = HashMap::new();
            for (snapshotter, nodes) in &snapshots {
                for n in nodes {
                    let node = Node::Snapshot {
                        ns: n.namespace.clone(),
                        snapshotter: snapshotter.clone(),
                        key: n.key.clone(),
                    };
                    if n.labels.contains_key(LABEL_ROOT) {
                        roots.push(node.clone());
                    }
                    snapshot_index.insert(node, n);
                }
            }

            crate::failpoint!("gc-mark");
            // Mark.
            let mut marked: HashSet<Node> = HashSet::new();
            while let Some(node) = roots.pop() {
                if marked.contains(&node) {
                    continue;
                }
                match &node {
                    Node::Content { ns, digest } => {
                        if let Some(labels) = content_labels.get(&(ns.clone(), digest.clone())) {
                            roots.extend(label_refs(ns, labels));
                        }
                    }
                    Node::Snapshot { ns, snapshotter, .. } => {
                        if let Some(snap) = snapshot_index.get(&node) {
                            roots.extend(label_refs(ns, &snap.labels));
                            if let Some(parent) = &snap.parent {
                                roots.push(Node::Snapshot {
                                    ns: ns.clone(),
                                    snapshotter: snapshotter.clone(),
                                    key: parent.clone(),
                                });
                            }
                        }
                    }
                }
                marked.insert(node);
            }

            // Sweep content rows: the unreachable and the dangling.
            let mut delete = tx.prepare("DELETE FROM content WHERE namespace = ?1 AND digest = ?2")?;
            let all_rows: Vec<(String, String)> = tx
                .prepare("SELECT namespace, digest FROM content")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let kept: HashSet<&(String, String)> = rows.iter().collect();
            for row in &all_rows {
                let node = Node::Content {
                    ns: row.0.clone(),
                    digest: row.1.clone(),
                };
                let dangling = !kept.contains(row);
                if dangling || !marked.contains(&node) {
                    delete.execute(params![row.0, row.1])?;
                    if !dangling {
                        report.content_removed += 1;
                    }
                }
            }
            Ok((marked, live_ingests))
        })?;
        crate::failpoint!("gc-sweep");

        // Blobs that no namespace records any more (or never did, after a
        // crash between rename and row) are freed.
        let recorded: HashSet<String> = self.transaction(|tx| {
            tx.prepare("SELECT DISTINCT digest FROM content")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()
        })?;
        for (digest, _) in self.content.blobs()? {
            if !recorded.contains(&digest.to_string()) {
                report.bytes_freed += self.content.delete_blob(&digest)?;
            }
        }

        // Snapshots, children before parents.
        for (collector, (snapshotter, nodes)) in snapshotters.iter().zip(&snapshots) {
            let mut doomed: Vec<&SnapshotNode> = nodes
                .iter()
                .filter(|n| {
                    !marked.contains(&Node::Snapshot {
                        ns: n.namespace.clone(),
                        snapshotter: snapshotter.clone(),
                        key: n.key.clone(),
                    })
                })
                .collect();
            while !doomed.is_empty() {
                let parents: HashSet<(&str, &str)> = doomed
                    .iter()
                    .filter_map(|n| Some((n.namespace.as_str(), n.parent.as_deref()?)))
                    .collect();
                let (leaves, rest): (Vec<_>, Vec<_>) = doomed
                    .into_iter()
                    .partition(|n| !parents.contains(&(n.namespace.as_str(), n.key.as_str())));
                if leaves.is_empty() {
                    tracing::warn!(
                        snapshotter,
                        left = rest.len(),
                        "snapshot parents form a cycle; leaving them"
                    );
                    break;
                }
                for leaf in leaves {
                    report.bytes_freed += collector.remove(&leaf.namespace, &leaf.key)?;
                    report.snapshots_removed += 1;
                }
                doomed = rest;
            }
            report.bytes_freed += collector.sweep_leftovers()?;
        }

        // Ingests no live lease holds, unless a writer has them open.
        for ingest in self.content.ingests()? {
            if ingest_is_held(&ingest, &live_ingests) {
                continue;
            }
            let size = std::fs::metadata(ingest.dir.join("data"))
                .map(|m| m.len())
                .unwrap_or(0);
            if self.content.remove_ingest_if_unlocked(&ingest)? {
                report.ingests_removed += 1;
                report.bytes_freed += size;
            }
        }

        report.duration = started.elapsed();
        crate::metrics::gc_done(report.bytes_freed);
        tracing::info!(?report, "garbage collection done");
        self.notify(|| super::Change::Collected(report.clone()));
        Ok(report)
    }
}

/// On disk an ingest ref is `<namespace>/<ref>`; leases hold `(namespace, ref)`.
pub(crate) fn ingest_owner(ingest: &IngestEntry) -> Option<(&str, &str)> {
    ingest.reference.split_once('/')
}

fn ingest_is_held(ingest: &IngestEntry, live: &HashSet<(String, String)>) -> bool {
    ingest_owner(ingest).is_some_and(|(ns, r)| live.contains(&(ns.to_string(), r.to_string())))
}

#[cfg(test)]
#[path = "gc_tests.rs"]
mod tests;
