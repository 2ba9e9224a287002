//! The conformance suite every snapshotter passes. Mount checks need root;
//! the suites that run them are named `*_as_root`.

use super::{Error, Kind, Snapshots, Snapshotter};
use crate::filters::Filter;
use crate::metadata::{Db, Labels};
use crate::mount::TempMount;
use std::sync::Arc;

pub struct Harness {
    pub db: Arc<Db>,
    pub snapshots: Snapshots,
    pub guard: tempfile::TempDir,
}

/// A fresh root with `backend`'s snapshotter in the default namespace.
pub fn harness(backend: Box<dyn super::Backend>) -> Option<Harness> {
    let guard = tempfile::tempdir().ok()?;
    let db = Db::open(guard.path()).ok()?;
    let root = super::SnapshotRoot::new(db.clone(), backend).ok()?;
    Some(Harness {
        snapshots: root.namespace(crate::metadata::NAMESPACE_DEFAULT),
        db,
        guard,
    })
}

fn write(s: &Snapshots, key: &str, name: &str, data: &str) {
    let (fs, _) = s.apply_dirs(key).unwrap();
    std::fs::write(fs.join(name), data).unwrap();
}

fn read_through(h: &Harness, key: &str, name: &str) -> Option<String> {
    let mounts = h.snapshots.mounts(key).unwrap();
    let m = TempMount::new(&h.guard.path().join("mnt"), &mounts).unwrap();
    std::fs::read_to_string(m.path().join(name)).ok()
}

/// base <- top, each with one file.
fn chain(s: &Snapshots) {
    s.prepare("a1", None, Labels::new()).unwrap();
    write(s, "a1", "base.txt", "base");
    s.commit("base", "a1", Labels::new()).unwrap();
    s.prepare("a2", Some("base"), Labels::new()).unwrap();
    write(s, "a2", "top.txt", "top");
    s.commit("top", "a2", Labels::new()).unwrap();
}

pub fn lifecycle(h: Harness) {
    let s = &h.snapshots;
    let mounts = s
        .prepare("active", None, [("x".to_string(), "1".to_string())].into())
        .unwrap();
    assert_eq!(mounts.len(), 1);
    assert!(!mounts[0].is_readonly());
    let info = s.stat("active").unwrap();
    assert_eq!((info.kind, info.parent.as_deref()), (Kind::Active, None));
    assert_eq!(info.labels["x"], "1");
    write(s, "active", "f", "hello");
    assert!(s.usage("active").unwrap().inodes >= 2);
    s.commit("layer1", "active", Labels::new()).unwrap();
    assert!(matches!(s.stat("active"), Err(Error::NotFound(_))));
    let info = s.stat("layer1").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels["x"], "1", "labels survive a commit");
    let usage = s.usage("layer1").unwrap();
    assert!(usage.size > 0 && usage.inodes >= 2, "{usage:?}");
    s.prepare("child", Some("layer1"), Labels::new()).unwrap();
    assert_eq!(s.stat("child").unwrap().parent.as_deref(), Some("layer1"));
    let view = s.view("v", Some("layer1"), Labels::new()).unwrap();
    assert!(view.iter().all(|m| m.is_readonly()), "{view:?}");
    assert_eq!(s.stat("v").unwrap().kind, Kind::View);
}

pub fn errors(h: Harness) {
    let s = &h.snapshots;
    chain(s);
    assert!(matches!(
        s.prepare("a3", Some("nope"), Labels::new()),
        Err(Error::NotFound(_))
    ));
    s.prepare("a3", Some("top"), Labels::new()).unwrap();
    assert!(matches!(
        s.prepare("a3", None, Labels::new()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        s.prepare("a4", Some("a3"), Labels::new()),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.commit("top", "a3", Labels::new()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        s.commit("x", "top", Labels::new()),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.commit("x", "missing", Labels::new()),
        Err(Error::NotFound(_))
    ));
    let err = s.remove("top").unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("children"), "{err}");
    assert!(matches!(s.remove("missing"), Err(Error::NotFound(_))));
    assert!(matches!(
        s.prepare("", None, Labels::new()),
        Err(Error::InvalidArgument(_))
    ));
    s.remove("a3").unwrap();
    s.remove("top").unwrap();
    s.remove("base").unwrap();
    let mut left = 0;
    s.walk(&Filter::default(), &mut |_| {
        left += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(left, 0);
    let dirs: Vec<_> = std::fs::read_dir(s.root().path()).unwrap().collect();
    assert!(dirs.is_empty(), "{dirs:?}");
}

pub fn labels_and_walk(h: Harness) {
    let s = &h.snapshots;
    chain(s);
    let mut info = s.stat("top").unwrap();
    info.labels = [("containerd.io/gc.root".to_string(), "x".to_string())].into();
    s.update(info, &["labels.containerd.io/gc.root"]).unwrap();
    let mut seen = Vec::new();
    s.walk(
        &Filter::parse("labels.\"containerd.io/gc.root\"").unwrap(),
        &mut |i| {
            seen.push(i.name);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seen, ["top"]);
    let mut committed = 0;
    s.walk(&Filter::parse("kind==Committed").unwrap(), &mut |_| {
        committed += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(committed, 2);
}

pub fn gc_follows_parents_and_leases(h: Harness) {
    let s = &h.snapshots;
    chain(s);
    let root = s.root().clone();
    // Nothing refers to them: both go, children first.
    h.db.create_lease("default", "unpack", Labels::new())
        .unwrap();
    let leased = s.with_lease("unpack");
    leased.prepare("held", Some("top"), Labels::new()).unwrap();
    let r = h.db.garbage_collect(&[&*root]).unwrap();
    assert_eq!(
        r.snapshots_removed, 0,
        "the lease holds held, which holds its parents"
    );
    h.db.delete_lease("default", "unpack").unwrap();
    let r = h.db.garbage_collect(&[&*root]).unwrap();
    assert_eq!(r.snapshots_removed, 3);
    assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
    // A crash's half-built directory is swept too.
    std::fs::create_dir_all(root.path().join("new-99/fs")).unwrap();
    h.db.garbage_collect(&[&*root]).unwrap();
    assert!(!root.path().join("new-99").exists());
    // So is a snapshot a crash left between its row and its tree: its
    // lease would keep it for nothing, and `hoist check` would call it
    // missing.
    h.db.create_lease("default", "crashed", Labels::new())
        .unwrap();
    s.with_lease("crashed")
        .prepare("unbuilt", None, Labels::new())
        .unwrap();
    let id = root.records().unwrap()[0].id;
    std::fs::rename(root.dir(id), root.path().join(format!("new-{id}"))).unwrap();
    h.db.garbage_collect(&[&*root]).unwrap();
    assert!(matches!(s.stat("unbuilt"), Err(Error::NotFound(_))));
    assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
}

pub fn mounts_show_the_stack_as_root(h: Harness) {
    if !is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let s = &h.snapshots;
    chain(s);
    s.prepare("work", Some("top"), Labels::new()).unwrap();
    {
        let m = TempMount::new(&h.guard.path().join("mnt"), &s.mounts("work").unwrap()).unwrap();
        assert_eq!(
            std::fs::read_to_string(m.path().join("base.txt")).unwrap(),
            "base"
        );
        assert_eq!(
            std::fs::read_to_string(m.path().join("top.txt")).unwrap(),
            "top"
        );
        std::fs::write(m.path().join("new.txt"), "new").unwrap();
    }
    s.commit("third", "work", Labels::new()).unwrap();
    s.view("look", Some("third"), Labels::new()).unwrap();
    assert_eq!(read_through(&h, "look", "new.txt").as_deref(), Some("new"));
    assert_eq!(
        read_through(&h, "look", "base.txt").as_deref(),
        Some("base")
    );
    assert_eq!(read_through(&h, "third", "top.txt").as_deref(), Some("top"));
    let m = TempMount::new(&h.guard.path().join("mnt"), &s.mounts("look").unwrap()).unwrap();
    let err = std::fs::write(m.path().join("nope"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    drop(m);
    // The mount point is gone again.
    assert_eq!(
        std::fs::read_dir(h.guard.path().join("mnt"))
            .unwrap()
            .count(),
        0
    );
}

/// Deep enough that the lower directory list passes a page.
pub fn deep_chain_mounts_as_root(h: Harness) {
    if !is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let s = &h.snapshots;
    let mut parent: Option<String> = None;
    for i in 0..120 {
        let key = format!("k{i}");
        s.prepare(&key, parent.as_deref(), Labels::new()).unwrap();
        write(s, &key, &format!("f{i}"), &i.to_string());
        let name = format!("layer-{i}");
        s.commit(&name, &key, Labels::new()).unwrap();
        parent = Some(name);
    }
    s.view("deep", parent.as_deref(), Labels::new()).unwrap();
    let options: usize = s
        .mounts("deep")
        .unwrap()
        .iter()
        .map(|m| m.options.join(",").len())
        .sum();
    assert!(options > 4096 || s.name() == "native", "{options}");
    assert_eq!(read_through(&h, "deep", "f0").as_deref(), Some("0"));
    assert_eq!(read_through(&h, "deep", "f119").as_deref(), Some("119"));
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Expands to one `#[test]` per case. `$make` returns `None` where the
/// snapshotter cannot run (overlay without root); the test says so.
#[macro_export]
macro_rules! snapshotter_conformance {
    ($make:expr) => {
        $crate::snapshotter_conformance!(@cases $make; lifecycle, errors, labels_and_walk,
            gc_follows_parents_and_leases, mounts_show_the_stack_as_root, deep_chain_mounts_as_root);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let Some(h) = $make() else {
                    eprintln!("skipped: this snapshotter needs root and overlayfs");
                    return;
                };
                $crate::snapshot::testsuite::$case(h);
            }
        )*
    };
}

/// A backend test that cannot run here skips, saying why; where the
/// kernel lists what EROFS layers need and hoist runs as root, it fails
/// instead, so a broken backend cannot pass as an unsupported one.
pub fn skip_unless_required(backend: &str, why: &str) {
    let required = crate::erofs::kernel_lists_features() && nix::unistd::geteuid().is_root();
    assert!(
        !required,
        "the {backend} backend is unusable although the kernel lists device_table and chunked_file: {why}"
    );
    eprintln!("skipping {backend} tests: {why}");
}
