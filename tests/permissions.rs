//! Who may reach what under a hoist root. Snapshots hold setuid binaries
//! and device nodes from images, and blobs may be private layers: other
//! users may pass through the root (0711) to nothing below it, and open
//! nothing in it. Fresh roots are made so by the library, the command line
//! and the daemon alike; a root an older hoist left open is tightened.

use hoist::metadata::Db;
use hoist::snapshot::Snapshotter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every path under `root` a user who is neither owner nor group can reach
/// by name: the entries of each directory they may traverse (o+x), from
/// the root down.
fn reachable_by_others(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if mode(&dir) & 0o001 == 0 {
            continue;
        }
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                dirs.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

/// Others reach the names in the root and nothing deeper, and can neither
/// read, write nor enter any of them; the pieces have their exact modes.
fn assert_private(root: &Path) {
    assert_eq!(mode(root), 0o711, "{}", root.display());
    for path in reachable_by_others(root) {
        assert_eq!(path.parent(), Some(root), "others reach {}", path.display());
        let m = mode(&path);
        assert_eq!(m & 0o077, 0, "{} is {m:04o}", path.display());
    }
    assert_eq!(mode(&root.join("content")), 0o700, "content");
    // A root that never had a snapshot has no snapshots directory yet.
    let snapshotters: Vec<PathBuf> = match std::fs::read_dir(root.join("snapshots")) {
        Ok(dir) => {
            assert_eq!(mode(&root.join("snapshots")), 0o700, "snapshots");
            dir.map(|e| e.unwrap().path()).collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{e}"),
    };
    for snapshotter in snapshotters {
        assert_eq!(mode(&snapshotter), 0o700, "{}", snapshotter.display());
        for s in std::fs::read_dir(&snapshotter).unwrap() {
            let s = s.unwrap().path();
            assert_eq!(mode(&s), 0o700, "{}", s.display());
        }
    }
    assert!(root.join("meta.db").exists());
    for f in [
        "meta.db",
        "meta.db-wal",
        "meta.db-shm",
        "hoist.lock",
        "gc.lock",
    ] {
        let path = root.join(f);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{f}");
        }
    }
}

fn hoist(root: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("HOIST_LOG", "warn")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_root_made_by_the_library_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let db = Db::open(&root).unwrap();
    let snapshots = hoist::snapshot::open(&db, Some("native"))
        .unwrap()
        .namespace("default");
    snapshots.prepare("a", None, Default::default()).unwrap();
    snapshots.commit("base", "a", Default::default()).unwrap();
    snapshots
        .prepare("b", Some("base"), Default::default())
        .unwrap();
    // SQLite made these after hoist made the database; they took its mode.
    for f in ["meta.db-wal", "meta.db-shm"] {
        assert!(root.join(f).exists(), "{f}");
    }
    assert_private(&root);
    // The tree itself is the image's: 0755 unless a layer says otherwise.
    let (fs, _) = snapshots.apply_dirs("b").unwrap();
    assert_eq!(mode(&fs), 0o755);
}

#[test]
fn a_root_made_by_the_command_line_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for args in [&["images"][..], &["snapshots", "ls"], &["content", "ls"]] {
        let (ok, text) = hoist(&root, args);
        assert!(ok, "{args:?}: {text}");
    }
    // Listing made no snapshotter: the root's backend is chosen by the
    // first snapshot, not by a look.
    assert!(!root.join("snapshots").exists());
    assert_private(&root);
}

#[test]
fn a_root_made_by_the_daemon_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let socket = dir.path().join("hoist.sock");
    let config = dir.path().join("config.toml");
    // Its own sockets only: no containerd, no snapshotter socket in /run.
    std::fs::write(
        &config,
        "log_format = \"text\"\nsnapshotter_socket = \"\"\n[containerd]\naddress = \"\"\n",
    )
    .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(&root)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .args(["--snapshotter", "native", "--hosts-dir", "/nonexistent"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline || daemon.try_wait().unwrap().is_some() {
            let _ = daemon.kill();
            panic!("the daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Checked while it runs: the WAL files exist now.
    let checked = std::panic::catch_unwind(|| assert_private(&root));
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = daemon.wait();
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn an_open_root_is_tightened_saying_so_once_per_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let db = Db::open(&root).unwrap();
    let snapshots = hoist::snapshot::open(&db, Some("native")).unwrap();
    snapshots
        .namespace("default")
        .prepare("a", None, Default::default())
        .unwrap();
    drop(snapshots);
    drop(db);
    // As an older hoist under umask 022 left it.
    let loose = [
        ("", 0o755),
        ("content", 0o755),
        ("snapshots", 0o755),
        ("snapshots/native", 0o755),
        ("meta.db", 0o644),
    ];
    for (p, m) in loose {
        let path = root.join(p);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let (ok, text) = hoist(&root, &["snapshots", "ls"]);
    assert!(ok, "{text}");
    let said: Vec<&str> = text.lines().filter(|l| l.contains("tightened")).collect();
    assert_eq!(said.len(), loose.len(), "{text}");
    for (p, _) in loose {
        let path = root.join(p);
        let path = path.display().to_string();
        let path = path.trim_end_matches('/');
        assert!(
            said.iter().any(|l| l.contains(&format!("path={path} "))),
            "{path}: {text}"
        );
    }
    assert_private(&root);
    let (ok, text) = hoist(&root, &["snapshots", "ls"]);
    assert!(ok && !text.contains("tightened"), "{text}");
}
