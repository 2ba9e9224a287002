//! What `tests/check.rs` cannot reach through a pull: snapshot records
//! edited into shapes no snapshotter makes, and content whose rows alone
//! are lost.

use super::*;
use crate::content::write_blob;
use crate::descriptor::Descriptor;
use crate::metadata::NAMESPACE_DEFAULT as NS;
use crate::snapshot::Snapshotter;
use serde_json::json;

const IMAGE: &str = "example.com/app:1";

struct Root {
    _dir: tempfile::TempDir,
    db: Arc<Db>,
    snapshots: Arc<SnapshotRoot>,
    manifest: Descriptor,
    config: Descriptor,
    chain: String,
}

/// A root holding one unpacked single-layer image, as a pull leaves it.
fn root() -> Root {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let snapshots = crate::snapshot::open(&db, Some("native")).unwrap();
    let store = db.content_store(NS);
    let layer_bytes = b"not really a tar".to_vec();
    let layer = Descriptor::new(images::OCI_LAYER, Digest::of(&layer_bytes), 16);
    write_blob(&store, "l", &layer_bytes[..], &layer, Labels::new()).unwrap();
    let chain = layer.digest.to_string();
    let ns = snapshots.namespace(NS);
    ns.prepare("unpacking", None, Labels::new()).unwrap();
    ns.commit(&chain, "unpacking", Labels::new()).unwrap();
    let config_bytes = json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [chain]},
    })
    .to_string();
    let config = Descriptor::new(
        images::OCI_CONFIG,
        Digest::of(config_bytes.as_bytes()),
        config_bytes.len() as u64,
    );
    let labels: Labels = [(format!("{LABEL_REF_SNAPSHOT}native"), chain.clone())].into();
    write_blob(&store, "c", config_bytes.as_bytes(), &config, labels).unwrap();
    let manifest_bytes = json!({
        "schemaVersion": 2, "mediaType": images::OCI_MANIFEST,
        "config": config, "layers": [layer],
    })
    .to_string();
    let manifest = Descriptor::new(
        images::OCI_MANIFEST,
        Digest::of(manifest_bytes.as_bytes()),
        manifest_bytes.len() as u64,
    );
    let labels = images::gc_child_labels(images::Kind::Manifest, &[config.clone(), layer]);
    write_blob(&store, "m", manifest_bytes.as_bytes(), &manifest, labels).unwrap();
    db.put_image(NS, Image::new(IMAGE, manifest.clone()))
        .unwrap();
    Root {
        _dir: dir,
        db,
        snapshots,
        manifest,
        config,
        chain,
    }
}

fn full(r: &Root) -> Report {
    let opts = Options {
        verify_digests: true,
        progress: None,
    };
    check(&r.db, std::slice::from_ref(&r.snapshots), &opts).unwrap()
}

fn lines(findings: &[Finding]) -> Vec<String> {
    findings.iter().map(ToString::to_string).collect()
}

/// Edits the database behind hoist's back, as damage would.
fn sql(r: &Root, statement: &str) {
    let conn = rusqlite::Connection::open(r.db.root().join("meta.db")).unwrap();
    conn.pragma_update(None, "foreign_keys", "ON").unwrap();
    conn.execute_batch(statement).unwrap();
}

#[test]
fn a_fresh_root_is_clean() {
    let r = root();
    let report = full(&r);
    assert!(report.is_clean(), "{:?}", lines(&report.findings));
    assert_eq!(report.stats.blobs, 3);
    assert_eq!(report.stats.snapshots, 1);
    assert!(
        report.summary().ends_with(": clean"),
        "{}",
        report.summary()
    );
}

#[test]
fn snapshots_of_wrong_kind_on_uncommitted_parents_or_in_cycles_are_found_and_removed() {
    let r = root();
    let ns = r.snapshots.namespace(NS);
    ns.prepare("act", Some(&r.chain), Labels::new()).unwrap();
    ns.prepare("x", Some(&r.chain), Labels::new()).unwrap();
    ns.commit("child", "x", Labels::new()).unwrap();
    ns.prepare("grandchild", Some("child"), Labels::new())
        .unwrap();
    for (key, name) in [("w", "wk"), ("c1", "cyc1"), ("c2", "cyc2")] {
        ns.prepare(key, None, Labels::new()).unwrap();
        ns.commit(name, key, Labels::new()).unwrap();
    }
    sql(
        &r,
        "UPDATE snapshots SET parent = 'act' WHERE key = 'child';
         UPDATE snapshots SET kind = 'Bogus' WHERE key = 'wk';
         UPDATE snapshots SET parent = 'cyc2' WHERE key = 'cyc1';
         UPDATE snapshots SET parent = 'cyc1' WHERE key = 'cyc2';",
    );
    let report = full(&r);
    let s = |key: &str| format!("snapshot {key} in namespace default (native)");
    assert_eq!(
        lines(&report.findings),
        [
            format!(
                "{}: it is Committed, but its parent act is Active, not Committed",
                s("child")
            ),
            format!("{}: its chain of parents loops back to it", s("cyc1")),
            format!("{}: its chain of parents loops back to it", s("cyc2")),
            format!(
                "{}: its kind \"Bogus\" is none of View, Active and Committed",
                s("wk")
            ),
        ]
    );

    let repaired = repair(&r.db, std::slice::from_ref(&r.snapshots), &report).unwrap();
    let done = lines_of(&repaired.actions);
    assert!(
        done.contains(&format!(
            "removed {}: its parent child was removed",
            s("grandchild")
        )),
        "{done:?}"
    );
    assert!(repaired.after.is_clean(), "{:?}", repaired.after.findings);
    // The image's layer stays; what nothing keeps went with the collection.
    let left: Vec<String> = r
        .snapshots
        .records()
        .unwrap()
        .into_iter()
        .map(|rec| rec.key)
        .collect();
    assert_eq!(left, std::slice::from_ref(&r.chain));
}

fn lines_of(actions: &[Action]) -> Vec<String> {
    actions.iter().map(ToString::to_string).collect()
}

#[test]
fn content_whose_rows_are_lost_is_recorded_again_with_its_labels() {
    let r = root();
    let (m, c) = (r.manifest.digest.to_string(), r.config.digest.to_string());
    sql(
        &r,
        &format!("DELETE FROM content WHERE digest IN ('{m}', '{c}');"),
    );
    let report = full(&r);
    let blob = |d: &Digest| format!("blob {d} ({})", r.db.local_content().blob_path(d).display());
    let mut want = vec![
        format!("{}: no namespace records it", blob(&r.manifest.digest)),
        format!("{}: no namespace records it", blob(&r.config.digest)),
    ];
    want.sort();
    want.extend([
        format!("image {IMAGE} in namespace default: config {c} has a blob but no content row (referenced by {m})"),
        format!("image {IMAGE} in namespace default: manifest {m} has a blob but no content row"),
    ]);
    assert_eq!(lines(&report.findings), want);

    let repaired = repair(&r.db, std::slice::from_ref(&r.snapshots), &report).unwrap();
    let done = lines_of(&repaired.actions);
    assert!(
        done.contains(&format!(
            "recorded manifest {m} in namespace default again, for image {IMAGE}"
        )),
        "{done:?}"
    );
    assert!(repaired.after.is_clean(), "{:?}", repaired.after.findings);
    // The labels came back, so the collection kept the layer and the snapshot.
    let store = r.db.content_store(NS);
    let labels = crate::content::Store::info(&store, &r.manifest.digest)
        .unwrap()
        .labels;
    assert_eq!(labels["containerd.io/gc.ref.content.config"], c);
    let labels = crate::content::Store::info(&store, &r.config.digest)
        .unwrap()
        .labels;
    assert_eq!(labels["containerd.io/gc.ref.snapshot.native"], r.chain);
    assert_eq!(repaired.collected.content_removed, 0);
    assert_eq!(repaired.collected.snapshots_removed, 0);
}

#[test]
fn findings_read_as_one_line_each() {
    let f = Finding::LeaseExpired {
        namespace: "k8s.io".into(),
        lease: "pull-1".into(),
        expired_at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(86400),
    };
    assert_eq!(
        f.to_string(),
        "lease pull-1 in namespace k8s.io: it expired at 1970-01-02T00:00:00Z"
    );
    let done = Action::Fixed {
        done: "removed",
        finding: f,
    };
    assert_eq!(
        done.to_string(),
        "removed lease pull-1 in namespace k8s.io: it expired at 1970-01-02T00:00:00Z"
    );
}
