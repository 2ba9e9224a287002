//! Garbage collection: every root and edge kind, leases, and crash leftovers.

use super::*;
use crate::content::{Error as ContentError, Store};
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::filters::Filter;
use crate::metadata::images::Image;
use crate::metadata::leases::{Resource, expire_label};
use crate::metadata::{Error, NAMESPACE_DEFAULT as NS};
use parking_lot::Mutex;
use std::io::Write;
use std::sync::Arc;

fn db() -> (tempfile::TempDir, Arc<Db>) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    (dir, db)
}

fn put(db: &Arc<Db>, ns: &str, data: &[u8], labels: &[(&str, String)]) -> Digest {
    let desc = Descriptor::new(
        "application/octet-stream",
        Digest::of(data),
        data.len() as u64,
    );
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    crate::content::write_blob(&db.content_store(ns), "put", data, &desc, labels).unwrap()
}

fn has(db: &Arc<Db>, ns: &str, d: &Digest) -> bool {
    match db.content_store(ns).info(d) {
        Ok(_) => true,
        Err(ContentError::NotFound(_)) => false,
        Err(e) => panic!("{e}"),
    }
}

fn gc(db: &Db) -> GcReport {
    db.garbage_collect(&[]).unwrap()
}

/// An index -> manifest -> (config, two layers) tree, wired with GC labels.
struct Tree {
    index: Digest,
    manifest: Digest,
    config: Digest,
    layers: [Digest; 2],
    bytes: u64,
}

fn tree(db: &Arc<Db>, ns: &str, tag: &str) -> Tree {
    let l0 = put(db, ns, format!("layer0 {tag}").as_bytes(), &[]);
    let l1 = put(db, ns, format!("layer1 {tag}").as_bytes(), &[]);
    let config = put(db, ns, format!("config {tag}").as_bytes(), &[]);
    let manifest = put(
        db,
        ns,
        format!("manifest {tag}").as_bytes(),
        &[
            ("containerd.io/gc.ref.content.config", config.to_string()),
            ("containerd.io/gc.ref.content.l.0", l0.to_string()),
            ("containerd.io/gc.ref.content.l.1", l1.to_string()),
        ],
    );
    let index = put(
        db,
        ns,
        format!("index {tag}").as_bytes(),
        &[("containerd.io/gc.ref.content.m.0", manifest.to_string())],
    );
    let bytes = ["layer0 ", "layer1 ", "config ", "manifest ", "index "]
        .iter()
        .map(|p| (p.len() + tag.len()) as u64)
        .sum();
    Tree {
        index,
        manifest,
        config,
        layers: [l0, l1],
        bytes,
    }
}

impl Tree {
    fn all(&self) -> Vec<&Digest> {
        vec![
            &self.index,
            &self.manifest,
            &self.config,
            &self.layers[0],
            &self.layers[1],
        ]
    }
}

#[test]
fn image_targets_keep_their_tree_and_nothing_else() {
    let (_dir, db) = db();
    let t = tree(&db, NS, "a");
    let orphan = put(&db, NS, b"orphan", &[]);
    db.create_image(
        NS,
        Image::new(
            "docker.io/library/a:1",
            Descriptor::new("x", t.index.clone(), 1),
        ),
    )
    .unwrap();
    let r = gc(&db);
    assert_eq!((r.content_removed, r.bytes_freed), (1, 6));
    assert!(!has(&db, NS, &orphan));
    assert!(t.all().iter().all(|d| has(&db, NS, d)));
    db.delete_image(NS, "docker.io/library/a:1").unwrap();
    let r = gc(&db);
    assert_eq!((r.content_removed, r.bytes_freed), (5, t.bytes));
    assert!(db.local_content().blobs().unwrap().is_empty());
}

#[test]
fn bare_gc_ref_content_label_is_an_edge() {
    let (_dir, db) = db();
    let child = put(&db, NS, b"child", &[]);
    let parent = put(
        &db,
        NS,
        b"parent",
        &[("containerd.io/gc.ref.content", child.to_string())],
    );
    // A label that only shares the prefix is not an edge.
    let not_child = put(&db, NS, b"not child", &[]);
    put(
        &db,
        NS,
        b"root",
        &[
            ("containerd.io/gc.root", "x".into()),
            ("containerd.io/gc.ref.contentx", not_child.to_string()),
            ("containerd.io/gc.ref.content.p", parent.to_string()),
        ],
    );
    gc(&db);
    assert!(has(&db, NS, &child) && has(&db, NS, &parent));
    assert!(!has(&db, NS, &not_child));
}

#[test]
fn gc_root_label_keeps_content_until_removed() {
    let (_dir, db) = db();
    let d = put(
        &db,
        NS,
        b"pinned",
        &[("containerd.io/gc.root", "2026".into())],
    );
    assert_eq!(gc(&db).content_removed, 0);
    let store = db.content_store(NS);
    let mut info = store.info(&d).unwrap();
    info.labels.clear();
    store
        .update(info, &["labels.containerd.io/gc.root"])
        .unwrap();
    assert_eq!(gc(&db).content_removed, 1);
    assert!(!has(&db, NS, &d));
}

#[test]
fn lease_resources_are_roots_until_the_lease_goes() {
    let (_dir, db) = db();
    db.create_lease(NS, "pull", Labels::new()).unwrap();
    let store = db.content_store(NS).with_lease("pull");
    let desc = Descriptor::new("x", Digest::of(b"leased"), 6);
    crate::content::write_blob(&store, "r", &b"leased"[..], &desc, Labels::new()).unwrap();
    assert_eq!(
        db.lease_resources(NS, "pull").unwrap(),
        vec![Resource::content(&desc.digest)]
    );
    assert_eq!(gc(&db).content_removed, 0);
    db.delete_lease(NS, "pull").unwrap();
    assert_eq!(gc(&db).content_removed, 1);
}

#[test]
fn expired_leases_are_dropped_and_stop_holding() {
    let (_dir, db) = db();
    let past: Labels = [(
        crate::metadata::leases::LABEL_EXPIRE.to_string(),
        "2001-01-01T00:00:00Z".to_string(),
    )]
    .into();
    db.create_lease(NS, "old", past).unwrap();
    db.create_lease(NS, "new", [expire_label(Duration::from_secs(3600))].into())
        .unwrap();
    let old = put(&db, NS, b"old", &[]);
    let new = put(&db, NS, b"new", &[]);
    db.add_lease_resource(NS, "old", &Resource::content(&old))
        .unwrap();
    db.add_lease_resource(NS, "new", &Resource::content(&new))
        .unwrap();
    let r = gc(&db);
    assert_eq!((r.leases_removed, r.content_removed), (1, 1));
    assert!(!has(&db, NS, &old) && has(&db, NS, &new));
    let ids: Vec<_> = db.leases(NS).unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(ids, ["new"]);
}

#[test]
fn namespaces_are_collected_separately_but_share_bytes() {
    let (_dir, db) = db();
    let d = put(&db, NS, b"both", &[]);
    put(&db, "k8s.io", b"both", &[]);
    db.create_image(
        "k8s.io",
        Image::new("i", Descriptor::new("x", d.clone(), 4)),
    )
    .unwrap();
    let r = gc(&db);
    assert_eq!((r.content_removed, r.bytes_freed), (1, 0));
    assert!(!has(&db, NS, &d) && has(&db, "k8s.io", &d));
    assert!(db.local_content().blob_size(&d).unwrap().is_some());
}

/// (key, parent, labels) of a test snapshot.
type SnapSpec<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, String)]);

/// Snapshots in memory, refusing to remove one that still has children.
struct MemSnapshots {
    nodes: Mutex<Vec<SnapshotNode>>,
    removed: Mutex<Vec<String>>,
}

impl MemSnapshots {
    fn new(nodes: &[SnapSpec<'_>]) -> Self {
        let nodes = nodes
            .iter()
            .map(|(key, parent, labels)| SnapshotNode {
                namespace: NS.to_string(),
                key: key.to_string(),
                parent: parent.map(str::to_string),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            })
            .collect();
        MemSnapshots {
            nodes: Mutex::new(nodes),
            removed: Mutex::new(Vec::new()),
        }
    }

    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<_> = self.nodes.lock().iter().map(|n| n.key.clone()).collect();
        keys.sort();
        keys
    }
}

impl SnapshotCollector for MemSnapshots {
    fn snapshotter(&self) -> &str {
        "mem"
    }

    fn snapshots(&self) -> Result<Vec<SnapshotNode>> {
        Ok(self.nodes.lock().clone())
    }

    fn remove(&self, namespace: &str, key: &str) -> Result<u64> {
        let mut nodes = self.nodes.lock();
        if nodes.iter().any(|n| n.parent.as_deref() == Some(key)) {
            return Err(Error::FailedPrecondition(format!("{key} has children")));
        }
        nodes.retain(|n| !(n.namespace == namespace && n.key == key));
        self.removed.lock().push(key.to_string());
        Ok(10)
    }
}

#[test]
fn snapshot_edges_roots_and_children_first_removal() {
    let (_dir, db) = db();
    let kept_by_snapshot = put(&db, NS, b"kept by a snapshot label", &[]);
    let config = put(
        &db,
        NS,
        b"config",
        &[
            ("containerd.io/gc.root", "x".into()),
            ("containerd.io/gc.ref.snapshot.mem", "top".into()),
        ],
    );
    db.create_lease(NS, "unpack", Labels::new()).unwrap();
    db.add_lease_resource(NS, "unpack", &Resource::snapshot("mem", "active"))
        .unwrap();
    // A label naming another snapshotter's snapshot does not keep ours.
    put(
        &db,
        NS,
        b"other",
        &[
            ("containerd.io/gc.root", "x".into()),
            ("containerd.io/gc.ref.snapshot.other", "orphan-top".into()),
        ],
    );
    let snaps = MemSnapshots::new(&[
        ("base", None, &[]),
        ("mid", Some("base"), &[]),
        ("top", Some("mid"), &[]),
        ("active", Some("top"), &[]),
        ("pinned", None, &[("containerd.io/gc.root", "x".into())]),
        (
            "labelled",
            None,
            &[
                ("containerd.io/gc.root", "x".into()),
                (
                    "containerd.io/gc.ref.content.x",
                    kept_by_snapshot.to_string(),
                ),
            ],
        ),
        ("orphan-base", None, &[]),
        ("orphan-mid", Some("orphan-base"), &[]),
        ("orphan-top", Some("orphan-mid"), &[]),
    ]);
    let r = db.garbage_collect(&[&snaps]).unwrap();
    assert_eq!((r.snapshots_removed, r.bytes_freed), (3, 30));
    assert_eq!(
        *snaps.removed.lock(),
        ["orphan-top", "orphan-mid", "orphan-base"]
    );
    assert_eq!(
        snaps.keys(),
        ["active", "base", "labelled", "mid", "pinned", "top"]
    );
    assert!(has(&db, NS, &kept_by_snapshot) && has(&db, NS, &config));
    // Without the lease the active snapshot goes; without the config's root
    // label, the whole chain follows.
    db.delete_lease(NS, "unpack").unwrap();
    assert_eq!(db.garbage_collect(&[&snaps]).unwrap().snapshots_removed, 1);
    db.content_store(NS).delete(&config).unwrap();
    assert_eq!(db.garbage_collect(&[&snaps]).unwrap().snapshots_removed, 3);
    assert_eq!(snaps.keys(), ["labelled", "pinned"]);
}

#[test]
fn an_ingest_under_a_live_lease_survives_gc_and_resumes() {
    let (_dir, db) = db();
    db.create_lease(NS, "pull", [expire_label(Duration::from_secs(3600))].into())
        .unwrap();
    let store = db.content_store(NS).with_lease("pull");
    let data = b"a layer that arrives in two parts";
    let desc = Descriptor::new("x", Digest::of(data), data.len() as u64);
    let mut w = store.writer("layer", Some(&desc)).unwrap();
    w.write_all(&data[..10]).unwrap();
    drop(w);
    // An ingest nobody holds, and one only an open writer holds.
    let plain = db.content_store(NS);
    let mut stray = plain.writer("stray", None).unwrap();
    stray.write_all(b"xx").unwrap();
    drop(stray);
    let mut open = plain.writer("open", None).unwrap();
    open.write_all(b"yy").unwrap();
    let r = gc(&db);
    assert_eq!((r.ingests_removed, r.bytes_freed), (1, 2));
    let mut refs: Vec<_> = plain
        .list_statuses(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|s| s.reference)
        .collect();
    refs.sort();
    assert_eq!(refs, ["layer", "open"]);
    drop(open);
    let mut w = store.writer("layer", Some(&desc)).unwrap();
    assert_eq!(w.status().unwrap().offset, 10);
    w.write_all(&data[10..]).unwrap();
    w.commit(desc.size, None, Labels::new()).unwrap();
    assert_eq!(
        db.lease_resources(NS, "pull").unwrap(),
        vec![Resource::content(&desc.digest)]
    );
    // The lease gone, the open writer closed: everything goes.
    db.delete_lease(NS, "pull").unwrap();
    let r = gc(&db);
    assert_eq!((r.content_removed, r.ingests_removed), (1, 1));
}

#[test]
fn crash_a_writer_dropped_without_commit_is_cleaned_after_reopen() {
    let (dir, db) = db();
    let mut w = db.content_store(NS).writer("crashed", None).unwrap();
    w.write_all(b"half a blob").unwrap();
    drop(w);
    drop(db);
    let db = Db::open(dir.path()).unwrap();
    let r = gc(&db);
    assert_eq!(r.ingests_removed, 1);
    assert!(db.local_content().ingests().unwrap().is_empty());
}

#[test]
fn crash_ingest_cut_or_grown_behind_the_stores_back() {
    let (dir, db) = db();
    let data = b"0123456789abcdefghij";
    let desc = Descriptor::new("x", Digest::of(data), data.len() as u64);
    let store = db.content_store(NS);
    let ingest_data = |reference: &str| {
        let backend = format!("{NS}/{reference}");
        dir.path()
            .join("content/ingest")
            .join(Digest::of(backend.as_bytes()).hex())
            .join("data")
    };
    // Cut: the writer resumes from what is left and still commits the right blob.
    let mut w = store.writer("cut", Some(&desc)).unwrap();
    w.write_all(&data[..15]).unwrap();
    drop(w);
    std::fs::OpenOptions::new()
        .write(true)
        .open(ingest_data("cut"))
        .unwrap()
        .set_len(4)
        .unwrap();
    let mut w = Db::open(dir.path())
        .unwrap()
        .content_store(NS)
        .writer("cut", Some(&desc))
        .unwrap();
    assert_eq!(w.status().unwrap().offset, 4);
    w.write_all(&data[4..]).unwrap();
    w.commit(desc.size, None, Labels::new()).unwrap();
    assert!(has(&db, NS, &desc.digest));

    // Grown with garbage within the expected size: the digest check refuses it
    // and discards the ingest, so the retry starts from zero.
    let other = b"ABCDEFGHIJ";
    let odesc = Descriptor::new("x", Digest::of(other), other.len() as u64);
    let mut w = store.writer("grown", Some(&odesc)).unwrap();
    w.write_all(&other[..3]).unwrap();
    drop(w);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(ingest_data("grown"))
        .unwrap();
    f.write_all(b"zzz").unwrap();
    drop(f);
    let mut w = store.writer("grown", Some(&odesc)).unwrap();
    assert_eq!(w.status().unwrap().offset, 6);
    w.write_all(&other[6..]).unwrap();
    let err = w.commit(odesc.size, None, Labels::new()).unwrap_err();
    assert!(err.to_string().contains(&odesc.digest.to_string()), "{err}");
    let mut w = store.writer("grown", Some(&odesc)).unwrap();
    assert_eq!(w.status().unwrap().offset, 0);
    w.write_all(other).unwrap();
    w.commit(odesc.size, None, Labels::new()).unwrap();
    assert_eq!(gc(&db).ingests_removed, 0);
}

#[test]
fn crash_a_row_without_a_blob_is_dropped() {
    let (dir, db) = db();
    let d = put(&db, NS, b"lost", &[]);
    std::fs::remove_file(db.local_content().blob_path(&d)).unwrap();
    drop(db);
    let db = Db::open(dir.path()).unwrap();
    let r = gc(&db);
    assert_eq!((r.dangling_rows_removed, r.content_removed), (1, 0));
    assert!(!has(&db, NS, &d));
    // The same bytes can come back.
    assert_eq!(put(&db, NS, b"lost", &[]), d);
}

#[test]
fn crash_a_blob_without_a_row_is_freed_unless_adopted() {
    let (dir, db) = db();
    let stray = Digest::of(b"stray bytes");
    let adopted = Digest::of(b"adopted");
    for (d, data) in [(&stray, &b"stray bytes"[..]), (&adopted, &b"adopted"[..])] {
        std::fs::write(db.local_content().blob_path(d), data).unwrap();
    }
    drop(db);
    let db = Db::open(dir.path()).unwrap();
    // A writer that asks for bytes already on disk takes them as they are.
    let desc = Descriptor::new("x", adopted.clone(), 7);
    assert!(matches!(
        db.content_store(NS).writer("a", Some(&desc)),
        Err(ContentError::AlreadyExists(_))
    ));
    db.create_image(NS, Image::new("keep", desc)).unwrap();
    let r = gc(&db);
    assert_eq!(r.bytes_freed, 11);
    assert_eq!(db.local_content().blob_size(&stray).unwrap(), None);
    assert!(has(&db, NS, &adopted));
}
