//! `hoist gc` (and `hoist rmi`) against another process writing the same
//! root: the collector waits until that process lets the root go, so a blob
//! it committed but has not recorded yet, and a snapshot directory it is
//! still building, are not taken for garbage. And it refuses a root a
//! daemon holds, naming the daemon's socket.
//!
//! The writer is this test binary run again (the ignored test below) with
//! the root in its environment: it holds the root as every command does,
//! says "ready", and finishes when told to.

use hoist::descriptor::Descriptor;
use hoist::digest::Digest;
use hoist::metadata::Db;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HELPER_ROOT: &str = "HOIST_TEST_WRITER_ROOT";
// Whole lines of their own are not to be had: the test harness prints the
// test's name and waits to end the line until the test ends.
const READY: &str = "<writer ready>";
const DONE: &str = "<writer done>";
const BLOB: &[u8] = b"a blob between its rename and its row";
/// A snapshot directory the writer is still building (its row id is far
/// beyond any the root has).
const BUILDING: &str = "snapshots/native/new-424242";

fn blob_path(root: &Path) -> PathBuf {
    root.join("content/blobs/sha256")
        .join(Digest::of(BLOB).hex())
}

/// The writer's half: what a `hoist pull` is doing when GC looks.
#[test]
#[ignore = "run by another_processes_writes_survive_gc as its writer process"]
fn writer_process() {
    let Some(root) = std::env::var_os(HELPER_ROOT).map(PathBuf::from) else {
        return;
    };
    let _lock = hoist::root::RootLock::shared(&root).unwrap();
    // A commit renames the blob into place before it records it, and a
    // snapshot is built under new-<id> before it is renamed to <id>.
    std::fs::write(blob_path(&root), BLOB).unwrap();
    std::fs::create_dir_all(root.join(BUILDING).join("fs")).unwrap();
    println!("{READY}");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert!(
        blob_path(&root).exists(),
        "GC removed the blob being committed"
    );
    assert!(
        root.join(BUILDING).exists(),
        "GC removed the snapshot being built"
    );
    // The commit records the blob, under a lease that keeps it.
    let db = Db::open(&root).unwrap();
    db.create_lease("default", "writer", Default::default())
        .unwrap();
    let store = db.content_store("default").with_lease("writer");
    let desc = Descriptor::new(
        "application/octet-stream",
        Digest::of(BLOB),
        BLOB.len() as u64,
    );
    hoist::content::write_blob(&store, "w", BLOB, &desc, Default::default()).unwrap();
    // The snapshot's build fails; its leftover is GC's to sweep.
    println!("{DONE}");
}

fn hoist(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hoist"));
    c.arg("--root").arg(root).args(args);
    c
}

#[test]
fn another_processes_writes_survive_gc() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // A root with a native snapshotter, as a pull leaves it.
    let db = Db::open(&root).unwrap();
    hoist::snapshot::open(&db, Some("native")).unwrap();
    drop(db);

    let mut writer = Command::new(std::env::current_exe().unwrap())
        .args(["writer_process", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(HELPER_ROOT, &root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(writer.stdout.take().unwrap());
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let heard = |marker: &str| loop {
        match said.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(marker) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    };
    if !heard(READY) {
        let _ = writer.kill();
        panic!("the writer never got ready");
    }

    let mut gc = hoist(&root, &["gc"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let early = gc.try_wait().unwrap();
    let (blob, building) = (blob_path(&root).exists(), root.join(BUILDING).exists());
    writer.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let done = heard(DONE);
    let writer_ok = writer.wait().unwrap().success();

    let deadline = Instant::now() + Duration::from_secs(30);
    while gc.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "gc never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gc_out = gc.wait_with_output().unwrap();
    let gc_text = String::from_utf8_lossy(&gc_out.stdout).to_string()
        + &String::from_utf8_lossy(&gc_out.stderr);

    assert!(
        early.is_none(),
        "gc ran while another process held the root: {gc_text}"
    );
    assert!(
        blob && building,
        "gc removed another process's work in progress"
    );
    assert!(writer_ok && done, "the writer failed");
    assert!(gc_out.status.success(), "{gc_text}");
    assert!(
        gc_text.contains("waiting"),
        "gc says why it waits: {gc_text}"
    );
    // The recorded blob stays; the abandoned directory is garbage now.
    assert!(blob_path(&root).exists());
    assert!(!root.join(BUILDING).exists());
}

/// Collecting commands never touch a root a daemon holds: they go to its
/// socket (here a dead one, so they fail naming it).
#[test]
fn gc_and_rmi_leave_a_root_a_daemon_holds_to_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon =
        hoist::root::RootLock::exclusive(dir.path(), Path::new("/run/hoist-test.sock")).unwrap();
    for args in [&["gc"][..], &["rmi", "example.com/x:1"][..]] {
        let out = hoist(dir.path(), args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(text.contains("/run/hoist-test.sock"), "{args:?}: {text}");
    }
    drop(daemon);
    let out = hoist(dir.path(), &["gc"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
