//! Crash consistency end to end, as root, with the `failpoints` feature
//! (`cargo test --features failpoints --test crash`): `hoist pull` (and the
//! collection of `hoist rmi`) stopped at every failpoint by an injected
//! error or by SIGKILL, `hoist pull` killed at random moments, and the
//! daemon killed at random moments of CRI PullImage and RemoveImage. After
//! each: `hoist check` is clean (at most after `hoist gc`), the image pulls
//! again and its mounted tree equals a reference pull's entry for entry, and
//! once the crashed pulls' leases are gone (as their expiry would end them)
//! GC leaves the root empty.
//!
//! `HOIST_CRASH_KILLS`: how many random kills must have interrupted work
//! (left an ingest, a pull lease or an active snapshot) per scenario;
//! 30 by default, 200 in hack/crash-torture. `HOIST_CRASH_SEED` replays the
//! random delays of a run, which prints its seed.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::tree::full_tree;
use common::*;
use daemon::{Daemon, spec};
use hoist::failpoint::{ENV, POINTS};
use hoist::metadata::{Db, NAMESPACE_CRI, NAMESPACE_DEFAULT};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{PullImageRequest, RemoveImageRequest};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const SIGKILL: i32 = 9;

/// This run's hoist: a link to the binary cargo built for it, since a
/// build without failpoints (another `cargo test` on the tree) replaces
/// the one under target/ in place. Fails unless its failpoints work.
fn hoist_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Links of earlier runs keep their binaries alive; one per run.
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let pid = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("crash-hoist-"));
            if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_file(&path);
            }
        }
        let bin = dir.join(format!("crash-hoist-{}", std::process::id()));
        let _ = std::fs::remove_file(&bin);
        std::fs::hard_link(env!("CARGO_BIN_EXE_hoist"), &bin).unwrap();
        let sanity = tempfile::tempdir().unwrap();
        let out = Command::new(&bin)
            .arg("--root")
            .arg(sanity.path())
            .arg("gc")
            .env(ENV, "gc-mark=error")
            .output()
            .unwrap();
        assert!(
            text(&out).contains("failpoint gc-mark"),
            "{} has no failpoints: build it with --features failpoints",
            env!("CARGO_BIN_EXE_hoist")
        );
        bin
    })
}

fn hoist_cmd(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(hoist_bin());
    cmd.arg("--root").arg(root).args(args).env_remove(ENV);
    cmd
}

fn run(root: &Path, args: &[&str], failpoints: Option<&str>) -> Output {
    let mut cmd = hoist_cmd(root, args);
    if let Some(f) = failpoints {
        cmd.env(ENV, f);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn ok(root: &Path, args: &[&str]) -> Result<String, String> {
    let out = run(root, args, None);
    match out.status.success() {
        true => Ok(text(&out)),
        false => Err(format!("hoist {args:?}: {}", text(&out))),
    }
}

/// The backends pulls here unpack into: erofs (a new root's default)
/// where the kernel mounts hoist's images, and overlayfs.
fn snapshotters() -> Vec<&'static str> {
    let probe = tempfile::tempdir().unwrap();
    match hoist::snapshot::erofs::supported(probe.path()) {
        Ok(()) => vec!["erofs", "overlayfs"],
        Err(why) => {
            assert!(!hoist::erofs::kernel_lists_features(), "{why}");
            vec!["overlayfs"]
        }
    }
}

/// A pull on the root into the default backend; the dominant layer comes
/// in ranged parts.
fn pull_args(r: &str) -> Vec<&str> {
    pull_args_into(r, snapshotters()[0])
}

fn pull_args_into<'a>(r: &'a str, snapshotter: &'a str) -> Vec<&'a str> {
    vec![
        "pull",
        "--hosts-dir",
        "/nonexistent",
        "--snapshotter",
        snapshotter,
        "--layer-part-size",
        "262144",
        r,
    ]
}

/// Four layers: metadata, whiteouts and links on small ones, and two of
/// incompressible data so that a pull takes long enough to be cut.
async fn push_test_image(reg: &Registry) -> String {
    use Entry::*;
    let layers = vec![
        gzip(&tar_layer(&[
            DirMeta("opt", 0o750, 1000, 1001),
            File("opt/a", b"a"),
            Dir("etc"),
            File("etc/a", b"a"),
            File("etc/b", b"b"),
            Dir("keep"),
            File("keep/f", b"f"),
        ])),
        random_layer(1, 768 << 10),
        gzip(&tar_layer(&[
            File("etc/.wh.a", b""),
            File("keep/.wh.f", b""),
            File("keep/g", b"g"),
            Symlink("new", "etc/b"),
            File("opt/b", b"b"),
            Hardlink("keep/h", "keep/g"),
        ])),
        random_layer(2, 2 << 20),
    ];
    push_image(
        reg,
        "crash/app",
        Some("1"),
        &layers,
        ("linux", host_arch()),
        false,
    )
    .await;
    format!("{}/crash/app:1", reg.addr)
}

fn mounted_tree(
    root: &Path,
    ns: &str,
    r: &str,
    mnt: &Path,
) -> Result<BTreeMap<String, String>, String> {
    let mnt_s = mnt.to_str().unwrap_or_default();
    ok(root, &["-n", ns, "mount", r, mnt_s])?;
    let tree = full_tree(mnt);
    ok(root, &["-n", ns, "unmount", mnt_s])?;
    Ok(tree)
}

/// The tree of a pull nothing interrupted.
fn reference_tree(root: &Path, r: &str) -> BTreeMap<String, String> {
    ok(root, &pull_args(r)).unwrap();
    let tree = mounted_tree(root, NAMESPACE_DEFAULT, r, &root.with_extension("mnt")).unwrap();
    assert!(
        tree.contains_key("opt/b") && tree.contains_key("new") && tree.contains_key("data.bin")
    );
    assert!(!tree.contains_key("etc/a") && !tree.contains_key("keep/f"));
    tree
}

/// What an interrupted operation left for its lease to hold.
#[derive(Debug, Default)]
struct Leftovers {
    ingests: usize,
    pull_leases: usize,
    active_snapshots: usize,
}

impl Leftovers {
    fn any(&self) -> bool {
        self.ingests + self.pull_leases + self.active_snapshots > 0
    }
}

/// A pull's lease is the one that expires: the snapshots API's never do.
fn pull_leases(db: &Db) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for ns in [NAMESPACE_DEFAULT, NAMESPACE_CRI] {
        for lease in db.leases(ns).unwrap() {
            if lease.expires_at().is_some() {
                out.push((ns, lease.id));
            }
        }
    }
    out
}

fn leftovers(root: &Path) -> Leftovers {
    let db = Db::open(root).unwrap();
    let active = hoist::snapshot::open_existing(&db)
        .unwrap()
        .iter()
        .flat_map(|r| r.records().unwrap())
        .filter(|r| r.kind == "Active")
        .count();
    Leftovers {
        ingests: db.local_content().ingests().unwrap().len(),
        pull_leases: pull_leases(&db).len(),
        active_snapshots: active,
    }
}

/// Ends every pull lease, as its expiry would.
fn expire_pull_leases(root: &Path) {
    let db = Db::open(root).unwrap();
    for (ns, id) in pull_leases(&db) {
        db.delete_lease(ns, &id).unwrap();
    }
}

/// Nothing left: no blob, row, ingest, snapshot or stray directory.
fn assert_empty(root: &Path) -> Result<(), String> {
    let db = Db::open(root).unwrap();
    let blobs = db.local_content().blobs().unwrap();
    let ingests = db.local_content().ingests().unwrap();
    let mut snapshots = Vec::new();
    let mut orphans = Vec::new();
    for r in hoist::snapshot::open_existing(&db).unwrap() {
        snapshots.extend(r.records().unwrap());
        orphans.extend(r.orphan_dirs().unwrap());
    }
    let mut rows = 0;
    for ns in [NAMESPACE_DEFAULT, NAMESPACE_CRI] {
        use hoist::content::Store;
        db.content_store(ns)
            .walk(&Default::default(), &mut |_| {
                rows += 1;
                Ok(())
            })
            .unwrap();
    }
    match blobs.is_empty()
        && ingests.is_empty()
        && snapshots.is_empty()
        && orphans.is_empty()
        && rows == 0
    {
        true => Ok(()),
        false => Err(format!(
            "GC left {} blobs, {rows} content rows, {} ingests, snapshots {snapshots:?}, directories {orphans:?}",
            blobs.len(),
            ingests.len()
        )),
    }
}

/// What a recovery needed, and what the check found before `hoist gc`.
#[derive(Default)]
struct Recovery {
    findings: Vec<String>,
}

/// `hoist check` clean, or clean after `hoist gc`.
fn check_clean(root: &Path) -> Result<Recovery, String> {
    let out = run(root, &["check"], None);
    if out.status.success() {
        return Ok(Recovery::default());
    }
    let findings: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("checked "))
        .map(str::to_string)
        .collect();
    ok(root, &["gc"])?;
    ok(root, &["check"])
        .map_err(|e| format!("not clean after gc (before it: {findings:?}): {e}"))?;
    Ok(Recovery { findings })
}

/// After a crash of a command on the root: check, pull again, compare, and
/// once the leases are gone, remove the image and find the root empty.
fn recover_cli(
    root: &Path,
    r: &str,
    snapshotter: &str,
    expected: &BTreeMap<String, String>,
) -> Result<Recovery, String> {
    let recovery = check_clean(root)?;
    ok(root, &pull_args_into(r, snapshotter)).map_err(|e| format!("pull after the crash: {e}"))?;
    let tree = mounted_tree(root, NAMESPACE_DEFAULT, r, &root.with_extension("mnt"))?;
    if &tree != expected {
        return Err(format!("tree differs: {}", diff(expected, &tree)));
    }
    expire_pull_leases(root);
    ok(root, &["rmi", r])?;
    assert_empty(root)?;
    Ok(recovery)
}

fn diff(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) -> String {
    let keys: HashSet<&String> = want.keys().chain(got.keys()).collect();
    let mut out: Vec<String> = keys
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .map(|k| format!("{k}: want {:?}, got {:?}", want.get(k), got.get(k)))
        .collect();
    out.sort();
    out.join("; ")
}

/// A check finding without the names of its objects: "blob: no namespace
/// records it", "snapshot: its directory * is missing".
fn finding_kind(line: &str) -> String {
    let what = line.split_whitespace().next().unwrap_or_default();
    let problem: Vec<&str> = line
        .rsplit(": ")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(
            |w| match w.contains(['/', ':']) || w.contains(char::is_numeric) {
                true => "*",
                false => w,
            },
        )
        .collect();
    format!("{what}: {}", problem.join(" "))
}

fn tally(findings: &mut BTreeMap<String, usize>, recovery: &Recovery) {
    for f in &recovery.findings {
        *findings.entry(finding_kind(f)).or_default() += 1;
    }
}

#[tokio::test]
async fn every_failpoint_in_both_modes_recovers_as_root() {
    require_root!();
    let reg = Registry::start();
    let r = push_test_image(&reg).await;
    let dir = common::mounts::TempRoot::new();
    let expected = reference_tree(&dir.path().join("reference"), &r);
    let (mut tried, mut recovered) = (0, 0);
    let mut unreached = Vec::new();
    let mut failures = Vec::new();
    let mut findings = BTreeMap::new();
    // `abort@2`: the crash comes on the step's second pass (another blob
    // or layer went through it), where a step runs more than once.
    let backends = snapshotters();
    let mut cases = Vec::new();
    for (point, _) in POINTS {
        for mode in ["abort", "error", "abort@2"] {
            cases.extend(backends.iter().map(|b| (*point, mode, *b)));
        }
    }
    for (point, mode, snapshotter) in cases {
        let root = dir.path().join(format!("{point}-{mode}-{snapshotter}"));
        let pull = pull_args_into(&r, snapshotter);
        // GC runs in `hoist rmi`, of an image pulled first.
        let collects = point.starts_with("gc-");
        let faulted: Vec<&str> = if collects {
            ok(&root, &pull).unwrap();
            vec!["rmi", &r]
        } else {
            pull.clone()
        };
        let out = run(&root, &faulted, Some(&format!("{point}={mode}")));
        let killed = out.status.signal() == Some(SIGKILL);
        let injected = text(&out).contains(&format!("failpoint {point}"));
        let case = format!("{point}={mode} ({snapshotter})");
        match mode {
            "abort" if !killed => {
                failures.push(format!("{case}: not killed: {}", text(&out)));
                continue;
            }
            "error" if killed || !injected => {
                failures.push(format!("{case}: no injected error: {}", text(&out)));
                continue;
            }
            "abort@2" if !killed => {
                unreached.push(point.to_string());
                // It ran to the end; the root must be as good.
            }
            _ => tried += 1,
        }
        match recover_cli(&root, &r, snapshotter, &expected) {
            Ok(recovery) => {
                recovered += usize::from(killed || injected);
                tally(&mut findings, &recovery);
            }
            Err(e) => failures.push(format!("{case}: {e}")),
        }
        common::mounts::remove_tree(&root);
    }
    println!(
        "failpoints: {tried} crash points tried, {recovered} recovered; \
         findings before gc: {findings:?}; abort@2 never reached at {unreached:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(recovered, tried);
    // Every step that a pull passes more than once was reached twice.
    for p in [
        "ingest-write",
        "ingest-fsync",
        "snapshot-apply",
        "snapshot-commit",
    ] {
        assert!(!unreached.contains(&p.to_string()), "{p} was passed once");
    }
}

/// A xorshift generator: the delays of a run replay from its seed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("HOIST_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("HOIST_CRASH_SEED={seed}");
        Rng(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn kills_wanted() -> usize {
    std::env::var("HOIST_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

#[tokio::test]
async fn random_kills_of_hoist_pull_recover_as_root() {
    require_root!();
    let reg = Registry::start();
    let r = push_test_image(&reg).await;
    let dir = common::mounts::TempRoot::new();
    let expected = reference_tree(&dir.path().join("reference"), &r);
    let root = dir.path().join("root");
    let wanted = kills_wanted();
    let mut rng = Rng::from_env();
    // How long a whole pull takes here, from spawn to exit.
    let started = Instant::now();
    ok(&root, &pull_args(&r)).unwrap();
    let whole = started.elapsed();
    ok(&root, &["rmi", &r]).unwrap();
    assert_empty(&root).unwrap();

    let (mut counted, mut idle, mut finished) = (0, 0, 0);
    let mut findings = BTreeMap::new();
    while counted < wanted {
        assert!(
            counted + idle + finished < wanted * 10,
            "{counted} of {wanted} kills interrupted work ({idle} found nothing to leave, {finished} pulls finished first)"
        );
        let delay = whole.mul_f64(rng.unit());
        let mut child = hoist_cmd(&root, &pull_args(&r))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "an uninterrupted pull failed");
            finished += 1;
        } else {
            child.kill().unwrap();
            child.wait().unwrap();
            match leftovers(&root).any() {
                true => counted += 1,
                false => idle += 1,
            }
        }
        let recovery = recover_cli(&root, &r, snapshotters()[0], &expected)
            .unwrap_or_else(|e| panic!("after a kill at {delay:?}: {e}"));
        tally(&mut findings, &recovery);
    }
    println!(
        "hoist pull: {counted} kills left work behind and recovered ({idle} more left nothing, \
         {finished} pulls finished first; a pull takes {whole:?}); findings before gc: {findings:?}"
    );
}

async fn cri_pull(c: &mut ImageServiceClient<Channel>, r: &str) -> Result<String, tonic::Status> {
    c.pull_image(PullImageRequest {
        image: spec(r),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

async fn cri_remove(c: &mut ImageServiceClient<Channel>, r: &str) -> Result<(), tonic::Status> {
    c.remove_image(RemoveImageRequest { image: spec(r) })
        .await
        .map(drop)
}

/// The daemon on this run's hoist.
fn start_daemon(root: &Path, socket: &Path) -> Daemon {
    let options = daemon::Options {
        binary: Some(hoist_bin().to_path_buf()),
        ..Default::default()
    };
    Daemon::start_with(root, socket, &options, &[])
}

/// The daemon's namespace, its tree compared through `hoist mount`, which
/// the daemon answers.
fn daemon_tree(root: &Path, r: &str) -> Result<BTreeMap<String, String>, String> {
    mounted_tree(root, NAMESPACE_CRI, r, &root.with_extension("mnt"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_of_the_daemon_in_cri_pull_and_remove_recover_as_root() {
    require_root!();
    let reg = Registry::start();
    let r = push_test_image(&reg).await;
    let dir = common::mounts::TempRoot::new();
    let expected = reference_tree(&dir.path().join("reference"), &r);
    let root = dir.path().join("root");
    let socket: PathBuf = dir.path().join("run/hoist.sock");
    let wanted = kills_wanted();
    let mut rng = Rng::from_env();
    let mut daemon = start_daemon(&root, &socket);

    // How long one remove-and-pull cycle takes here.
    let mut c = daemon.client().await;
    cri_pull(&mut c, &r).await.unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        cri_remove(&mut c, &r).await.unwrap();
        cri_pull(&mut c, &r).await.unwrap();
    }
    let cycle = started.elapsed() / 3;

    let (mut counted, mut idle) = (0, 0);
    let mut findings = BTreeMap::new();
    while counted < wanted {
        assert!(
            counted + idle < wanted * 10,
            "{counted} of {wanted} kills interrupted work ({idle} found nothing to leave)"
        );
        let mut c = daemon.client().await;
        let target = r.clone();
        let cycling = tokio::spawn(async move {
            while cri_remove(&mut c, &target).await.is_ok()
                && cri_pull(&mut c, &target).await.is_ok()
            {}
        });
        let delay = cycle.mul_f64(rng.unit());
        tokio::time::sleep(delay).await;
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(30), cycling).await;
        match leftovers(&root).any() {
            true => counted += 1,
            false => idle += 1,
        }
        let recovery =
            check_clean(&root).unwrap_or_else(|e| panic!("after a kill at {delay:?}: {e}"));
        tally(&mut findings, &recovery);
        expire_pull_leases(&root);
        daemon = start_daemon(&root, &socket);
        let mut c = daemon.client().await;
        cri_pull(&mut c, &r)
            .await
            .unwrap_or_else(|e| panic!("pull after a kill at {delay:?}: {e}: {}", daemon.log()));
        let tree = daemon_tree(&root, &r).unwrap();
        assert_eq!(
            tree,
            expected,
            "after a kill at {delay:?}: {}",
            diff(&expected, &tree)
        );
    }
    // Everything goes once the image does.
    cri_remove(&mut daemon.client().await, &r).await.unwrap();
    assert_eq!(daemon.stop(), Some(0));
    expire_pull_leases(&root);
    ok(&root, &["gc"]).unwrap();
    assert_empty(&root).unwrap();
    println!(
        "daemon: {counted} kills left work behind and recovered ({idle} more left nothing; \
         a remove-and-pull cycle takes {cycle:?}); findings before gc: {findings:?}"
    );
}
