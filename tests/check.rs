//! `hoist check [--repair]` on a root a real pull made: clean at first;
//! then damaged one way at a time, which it names in one exact line each
//! and exits 1 for; then `--repair`, after which it checks clean again.

mod common;
#[path = "../e2e/daemon.rs"]
mod daemon;

use common::*;
use hoist::digest::Digest;
use hoist::metadata::Db;
use std::path::{Path, PathBuf};
use std::process::Command;

const NS: &str = "default";

/// (exit status, stdout, stderr) of `hoist --root ROOT ARGS`.
fn hoist(root: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Blobs are read-only; damage needs them writable (for anyone but root).
fn writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// A root holding one two-layer image, pulled with the native snapshotter
/// (which needs no root), and what a test needs to name its parts.
struct Pulled {
    _reg: Registry,
    _dir: common::mounts::TempRoot,
    root: PathBuf,
    name: String,
    manifest: Digest,
    layers: Vec<Digest>,
    chain: Vec<Digest>,
}

impl Pulled {
    async fn new() -> Pulled {
        let reg = Registry::start();
        let layers = [random_layer(1, 3000), random_layer(2, 2000)];
        let pushed = push_image(
            &reg,
            "check/app",
            Some("1"),
            &layers,
            ("linux", host_arch()),
            false,
        )
        .await;
        let dir = common::mounts::TempRoot::new();
        let root = dir.path().join("root");
        let name = format!("{}/check/app:1", reg.addr);
        let (code, out, err) = hoist(
            &root,
            &[
                "pull",
                "--hosts-dir",
                "/nonexistent",
                "--snapshotter",
                "native",
                &name,
            ],
        );
        assert_eq!(code, 0, "pull: {out}{err}");
        let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
        Pulled {
            _reg: reg,
            _dir: dir,
            root,
            name,
            manifest: pushed.manifest.digest,
            layers: pushed.layers.into_iter().map(|l| l.digest).collect(),
            chain: hoist::images::chain_ids(&diffs),
        }
    }

    fn blob(&self, digest: &Digest) -> PathBuf {
        self.root.join("content/blobs/sha256").join(digest.hex())
    }

    fn blob_subject(&self, digest: &Digest) -> String {
        format!("blob {digest} ({})", self.blob(digest).display())
    }

    /// The directory of the snapshot named `key`.
    fn snapshot_dir(&self, key: &Digest) -> PathBuf {
        let id: i64 = self
            .db_conn()
            .query_row(
                "SELECT id FROM snapshots WHERE key = ?1",
                [key.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        self.root.join("snapshots/native").join(id.to_string())
    }

    fn db_conn(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.root.join("meta.db")).unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        conn
    }

    fn snapshot_subject(&self, key: &Digest) -> String {
        format!("snapshot {key} in namespace {NS} (native)")
    }

    /// `hoist check` finds exactly `expected` (in its order) and exits 1;
    /// `--repair` says it did `done` (among the rest) and exits 0; a check
    /// after that is clean.
    fn damaged(&self, expected: &[String], done: &[String]) {
        let (code, out, err) = hoist(&self.root, &["check"]);
        let mut lines: Vec<&str> = out.lines().collect();
        let summary = lines.pop().unwrap_or_default();
        assert_eq!(lines, expected, "{out}{err}");
        let n = expected.len();
        let problems = if n == 1 {
            "1 problem".to_string()
        } else {
            format!("{n} problems")
        };
        assert!(summary.ends_with(&format!(": {problems}")), "{summary}");
        assert_eq!(code, 1, "{out}{err}");

        let (code, out, err) = hoist(&self.root, &["check", "--repair"]);
        assert_eq!(code, 0, "repair: {out}{err}");
        for line in done {
            assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
        }
        assert!(
            out.trim_end().ends_with(": clean"),
            "repair ends clean:\n{out}"
        );
        self.clean();
    }

    fn clean(&self) {
        let (code, out, err) = hoist(&self.root, &["check"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("digests verified"), "{out}");
        assert!(out.trim_end().ends_with(": clean"), "{out}");
    }

    fn images(&self) -> String {
        let (code, out, err) = hoist(&self.root, &["images", "-q"]);
        assert_eq!(code, 0, "{err}");
        out
    }
}

#[tokio::test]
async fn a_pulled_root_checks_clean() {
    let p = Pulled::new().await;
    p.clean();
    let (_, out, _) = hoist(&p.root, &["check"]);
    assert!(
        out.starts_with("checked 4 blobs ") && out.contains("2 snapshots, 1 image, 0 leases"),
        "{out}"
    );
}

#[tokio::test]
async fn a_truncated_blob() {
    let p = Pulled::new().await;
    let layer = &p.layers[1];
    let path = p.blob(layer);
    writable(&path);
    let size = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(size - 10).unwrap();
    let finding = format!(
        "{}: {} bytes on disk, {size} recorded",
        p.blob_subject(layer),
        size - 10
    );
    p.damaged(
        std::slice::from_ref(&finding),
        &[
            format!("removed {finding}"),
            format!(
                "removed image {} in namespace {NS}: layer {layer} is missing (referenced by {})",
                p.name, p.manifest
            ),
        ],
    );
    assert!(
        !p.images().contains(&p.name),
        "the image needs pulling again"
    );
}

#[tokio::test]
async fn a_flipped_byte() {
    let p = Pulled::new().await;
    let layer = &p.layers[0];
    let path = p.blob(layer);
    writable(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let finding = format!(
        "{}: its bytes hash to {}",
        p.blob_subject(layer),
        Digest::of(&bytes)
    );
    p.damaged(
        std::slice::from_ref(&finding),
        &[format!("removed {finding}")],
    );
}

#[tokio::test]
async fn a_deleted_blob() {
    let p = Pulled::new().await;
    let layer = &p.layers[1];
    std::fs::remove_file(p.blob(layer)).unwrap();
    let row = format!("content row {layer} in namespace {NS}: its blob is missing");
    p.damaged(
        &[
            row.clone(),
            format!(
                "image {} in namespace {NS}: layer {layer} is missing (referenced by {})",
                p.name, p.manifest
            ),
        ],
        &[format!("dropped {row}")],
    );
}

#[tokio::test]
async fn a_stray_blob() {
    let p = Pulled::new().await;
    let stray = b"nobody recorded this";
    let digest = Digest::of(stray);
    std::fs::write(p.blob(&digest), stray).unwrap();
    let finding = format!("{}: no namespace records it", p.blob_subject(&digest));
    p.damaged(
        std::slice::from_ref(&finding),
        &[format!("removed {finding}")],
    );
    assert!(!p.blob(&digest).exists());
    assert!(p.images().contains(&p.name), "the image is untouched");
}

#[tokio::test]
async fn a_deleted_snapshot_directory() {
    let p = Pulled::new().await;
    let top = &p.chain[1];
    let dir = p.snapshot_dir(top);
    std::fs::remove_dir_all(&dir).unwrap();
    let finding = format!(
        "{}: its directory {} is missing",
        p.snapshot_subject(top),
        dir.display()
    );
    p.damaged(
        std::slice::from_ref(&finding),
        &[format!("removed {finding}")],
    );
}

#[tokio::test]
async fn an_orphan_snapshot_directory() {
    let p = Pulled::new().await;
    let dir = p.root.join("snapshots/native/999");
    std::fs::create_dir_all(dir.join("fs/etc")).unwrap();
    let finding = format!("snapshot directory {}: no snapshot owns it", dir.display());
    p.damaged(
        std::slice::from_ref(&finding),
        &[format!("removed {finding}")],
    );
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_deleted_parent_snapshot_row() {
    let p = Pulled::new().await;
    let (base, top) = (&p.chain[0], &p.chain[1]);
    let base_dir = p.snapshot_dir(base);
    p.db_conn()
        .execute("DELETE FROM snapshots WHERE key = ?1", [base.to_string()])
        .unwrap();
    let missing = format!(
        "{}: its parent {base} does not exist",
        p.snapshot_subject(top)
    );
    let orphan = format!(
        "snapshot directory {}: no snapshot owns it",
        base_dir.display()
    );
    p.damaged(
        &[orphan.clone(), missing.clone()],
        &[format!("removed {missing}"), format!("removed {orphan}")],
    );
}

#[tokio::test]
async fn an_expired_lease() {
    let p = Pulled::new().await;
    let db = Db::open(&p.root).unwrap();
    let expiry = hoist::metadata::leases::expire_label(std::time::Duration::from_secs(3600));
    db.create_lease(NS, "held-for-an-hour", [expiry].into())
        .unwrap();
    drop(db);
    p.clean();
    p.db_conn()
        .execute(
            "UPDATE lease_labels SET value = '2000-01-01T00:00:00Z' WHERE owner = 'held-for-an-hour'",
            [],
        )
        .unwrap();
    let finding =
        format!("lease held-for-an-hour in namespace {NS}: it expired at 2000-01-01T00:00:00Z");
    p.damaged(
        std::slice::from_ref(&finding),
        &[format!("removed {finding}")],
    );
}

#[tokio::test]
async fn old_ingests() {
    use hoist::content::Store;
    use std::io::Write;
    let p = Pulled::new().await;
    let db = Db::open(&p.root).unwrap();
    // A download no lease holds, and one whose lease ran out.
    let mut w = db.content_store(NS).writer("unheld", None).unwrap();
    w.write_all(b"partial").unwrap();
    drop(w);
    let expired = [(
        hoist::metadata::leases::LABEL_EXPIRE.to_string(),
        "2000-01-01T00:00:00Z".to_string(),
    )];
    db.create_lease(NS, "ran-out", expired.into()).unwrap();
    let mut w = db
        .content_store(NS)
        .with_lease("ran-out")
        .writer("outlived", None)
        .unwrap();
    w.write_all(b"partial too").unwrap();
    drop(w);
    let ingest = |r: &str| {
        let dir = db
            .local_content()
            .ingests()
            .unwrap()
            .into_iter()
            .find(|i| i.reference == format!("{NS}/{r}"))
            .unwrap()
            .dir;
        format!("ingest {NS}/{r} ({})", dir.display())
    };
    let lease = format!("lease ran-out in namespace {NS}: it expired at 2000-01-01T00:00:00Z");
    let outlived = format!(
        "{}: its lease ran-out expired at 2000-01-01T00:00:00Z",
        ingest("outlived")
    );
    let unheld = format!("{}: no lease holds it", ingest("unheld"));
    drop(db);
    p.damaged(
        &[lease.clone(), outlived.clone(), unheld.clone()],
        &[
            format!("removed {lease}"),
            format!("removed {outlived}"),
            format!("removed {unheld}"),
        ],
    );
}

#[tokio::test]
async fn the_daemon_checks_the_root_as_it_starts() {
    let p = Pulled::new().await;
    let socket = p._dir.path().join("hoist.sock");
    // The log of one start and stop of the daemon.
    let serve = || {
        let mut d = daemon::Daemon::start(&p.root, &socket, &["--snapshotter", "native"]);
        d.stop();
        let log = d.log();
        std::fs::remove_file(&d.log).unwrap();
        log
    };
    let summaries = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("checked "))
            .map(str::to_string)
            .collect()
    };

    let log = serve();
    let summary = summaries(&log);
    assert_eq!(summary.len(), 1, "one summary line: {log}");
    assert!(
        summary[0].contains(" INFO ")
            && summary[0].contains("sizes only")
            && summary[0].ends_with("2 snapshots, 1 image, 0 leases, 0 ingests: clean"),
        "{log}"
    );

    let stray = b"left by someone";
    let digest = Digest::of(stray);
    std::fs::write(p.blob(&digest), stray).unwrap();
    let finding = format!("{}: no namespace records it", p.blob_subject(&digest));
    let log = serve();
    let warned = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.ends_with(&finding))
        .count();
    assert_eq!(warned, 1, "the finding, at warn: {log}");
    let summary = summaries(&log);
    assert_eq!(summary.len(), 1, "one summary line: {log}");
    assert!(
        summary[0].contains(" WARN ")
            && summary[0].contains("checked 5 blobs")
            && summary[0].contains(": 1 problem;"),
        "{log}"
    );
}
