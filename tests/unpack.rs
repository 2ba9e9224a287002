//! Unpack end to end, as root: pull a multi-layer image with whiteouts,
//! opaque directories and file/directory replacements from a real registry,
//! mount it with `hoist mount`, and compare the tree, with each snapshotter
//! (erofs where the kernel lists what its images need).

mod common;

use common::tree::full_tree;
use common::*;
use hoist::digest::Digest;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// path -> "file:<content>", "dir", "link:<target>".
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let ft = e.file_type().unwrap();
            let v = if ft.is_symlink() {
                format!("link:{}", std::fs::read_link(&path).unwrap().display())
            } else if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else {
                format!("file:{}", std::fs::read_to_string(&path).unwrap())
            };
            out.insert(rel, v);
        }
    }
    out
}

async fn push_layers(
    reg: &Registry,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
    diff_ids: &[Digest],
) {
    let mut descs = Vec::new();
    for l in layers {
        descs.push(reg.push_blob(repo, l, hoist::images::OCI_LAYER_GZIP).await);
    }
    let config = json!({
        "architecture": host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
    });
    push_manifest_over(reg, repo, Some(tag), false, &config, &descs).await;
}

fn layers() -> Vec<Vec<u8>> {
    use Entry::*;
    let base = tar_layer(&[
        Dir("etc"),
        File("etc/a", b"a"),
        File("etc/b", b"b"),
        Dir("dir"),
        File("dir/x", b"x"),
        File("dir/y", b"y"),
        File("rep", b"a file first"),
        Dir("rep2"),
        File("rep2/inside", b"gone later"),
        Dir("keep"),
        File("keep/f", b"kept"),
    ]);
    let top = tar_layer(&[
        File("etc/.wh.a", b""),
        File("dir/z", b"z"),
        // The opaque marker after a new entry: order must not matter.
        File("dir/.wh..wh..opq", b""),
        Dir("rep"),
        File("rep/inner", b"now a dir"),
        File("rep2", b"now a file"),
        Symlink("new", "etc/b"),
    ]);
    let third = tar_layer(&[File("keep/.wh.f", b""), File("keep/g", b"g")]);
    vec![gzip(&base), gzip(&top), gzip(&third)]
}

fn expected() -> BTreeMap<String, String> {
    [
        ("etc", "dir"),
        ("etc/b", "file:b"),
        ("dir", "dir"),
        ("dir/z", "file:z"),
        ("rep", "dir"),
        ("rep/inner", "file:now a dir"),
        ("rep2", "file:now a file"),
        ("keep", "dir"),
        ("keep/g", "file:g"),
        ("new", "link:etc/b"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn pull_mount_compare(snapshotter: &str) {
    let reg = Registry::start();
    let layers = layers();
    let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
    push_layers(&reg, "unpack/app", "1", &layers, &diffs).await;
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let r = format!("{}/unpack/app:1", reg.addr);
    let out = hoist_ok(
        &root,
        &[
            "pull",
            "--hosts-dir",
            "/nonexistent",
            "--snapshotter",
            snapshotter,
            &r,
        ],
    );
    assert!(out.contains("unpacking"), "{out}");
    let snaps = hoist_ok(&root, &["snapshots", "ls"]);
    let chain = hoist::images::chain_ids(&diffs);
    for c in &chain {
        assert!(snaps.contains(&c.to_string()), "{snaps}");
    }
    let mnt = dir.path().join("mnt");
    hoist_ok(&root, &["mount", &r, mnt.to_str().unwrap()]);
    let got = tree(&mnt);
    // GC while mounted keeps the view and its layers.
    hoist_ok(&root, &["gc"]);
    assert_eq!(tree(&mnt), got);
    hoist_ok(&root, &["unmount", mnt.to_str().unwrap()]);
    assert_eq!(got, expected(), "{snapshotter}");
    assert!(tree(&mnt).is_empty());
    // A second pull of the same image applies nothing.
    let out = hoist_ok(
        &root,
        &[
            "pull",
            "--hosts-dir",
            "/nonexistent",
            "--snapshotter",
            snapshotter,
            &r,
        ],
    );
    assert!(out.contains("exists"), "{out}");
    hoist_ok(&root, &["rmi", &r]);
    let snaps = hoist_ok(&root, &["snapshots", "ls"]);
    assert_eq!(snaps.lines().count(), 1, "only the header is left: {snaps}");
}

#[tokio::test]
async fn overlay_unpack_mount_as_root() {
    require_root!();
    pull_mount_compare("overlayfs").await;
}

#[tokio::test]
async fn native_unpack_mount_as_root() {
    require_root!();
    pull_mount_compare("native").await;
}

#[tokio::test]
async fn erofs_unpack_mount_as_root() {
    require_root!();
    if !erofs_listed("the unpack") {
        return;
    }
    pull_mount_compare("erofs").await;
}

#[tokio::test]
async fn a_wrong_diff_id_fails_and_leaves_no_snapshot_as_root() {
    require_root!();
    let reg = Registry::start();
    let layers = layers();
    let mut diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
    diffs[1] = Digest::of(b"not the layer");
    push_layers(&reg, "unpack/bad", "1", &layers, &diffs).await;
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let r = format!("{}/unpack/bad:1", reg.addr);
    for snapshotter in snapshotters("the wrong diff_id") {
        let (success, out) = hoist_cli(
            &root,
            &[
                "pull",
                "--hosts-dir",
                "/nonexistent",
                "--snapshotter",
                snapshotter,
                &r,
            ],
        );
        assert!(!success, "{out}");
        let layer = hoist::digest::Digest::of(&layers[1]);
        assert!(
            out.contains(&layer.to_string()) && out.contains("diff_id"),
            "{out}"
        );
        hoist_ok(&root, &["gc"]);
        let snaps = hoist_ok(&root, &["snapshots", "ls"]);
        assert_eq!(snaps.lines().count(), 1, "{snaps}");
        assert!(hoist_ok(&root, &["content", "ls", "-q"]).trim().is_empty());
    }
}

#[tokio::test]
async fn parallel_and_sequential_unpack_give_identical_trees_as_root() {
    require_root!();
    use Entry::*;
    let reg = Registry::start();
    let mut layers = layers();
    // Directories with their own metadata below, children added above
    // without listing them: the parallel path must rebase their metadata.
    layers.insert(
        0,
        gzip(&tar_layer(&[
            DirMeta("opt", 0o750, 1000, 1001),
            File("opt/a", b"a"),
            DirMeta("srv", 0o711, 0, 0),
            DirMeta("srv/data", 0o700, 33, 33),
        ])),
    );
    layers.push(gzip(&tar_layer(&[
        File("opt/b", b"b"),
        File("srv/data/x", b"x"),
        File("etc/c", b"c"),
    ])));
    let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
    push_layers(&reg, "unpack/same", "1", &layers, &diffs).await;
    let dir = common::mounts::TempRoot::new();
    let r = format!("{}/unpack/same:1", reg.addr);
    let mut runs = vec![
        ("overlayfs", "sequential", Some("--sequential-unpack")),
        ("overlayfs", "parallel", None),
    ];
    if erofs_listed("parallel and sequential unpacks") {
        runs.push(("erofs", "sequential", Some("--sequential-unpack")));
        runs.push(("erofs", "parallel", None));
    }
    let mut trees = Vec::new();
    for (snapshotter, how, extra) in runs {
        let name = format!("{snapshotter}-{how}");
        let root = dir.path().join(&name);
        let mut args = vec![
            "pull",
            "--hosts-dir",
            "/nonexistent",
            "--snapshotter",
            snapshotter,
        ];
        args.extend(extra);
        args.push(&r);
        let out = hoist_ok(&root, &args);
        assert_eq!(
            out.contains("applied in parallel"),
            extra.is_none(),
            "{name}: {out}"
        );
        let tree = mounted_tree(&root, &r, &dir.path().join(format!("mnt-{name}")));
        trees.push((name, tree));
    }
    let (first, reference) = &trees[0];
    assert!(
        reference["opt"].contains("mode=40750 uid=1000 gid=1001 mtime=1600000000000000000"),
        "{}",
        reference["opt"]
    );
    for (name, tree) in &trees[1..] {
        assert_eq!(tree, reference, "{name} against {first}");
    }
}

/// Pulls `r` into `root` with the library, unpacking on overlayfs.
async fn pull_with(
    root: &Path,
    r: &str,
    ranged: hoist::remote::RangedFetch,
    no_unpack: bool,
) -> hoist::pull::Result<Option<hoist::pull::unpack::Unpacked>> {
    use hoist::pull::{PullOptions, Puller, progress::Progress};
    let db = hoist::metadata::Db::open(root).unwrap();
    let snapshots = hoist::snapshot::open(&db, Some("overlayfs")).unwrap();
    let remote = hoist::remote::RemoteOptions {
        attempts: 4,
        ranged,
        ..Default::default()
    };
    let puller = Puller::new(
        db,
        hoist::remote::RegistryClient::new(remote),
        3,
        Some(snapshots),
    );
    let options = PullOptions {
        no_unpack,
        ..Default::default()
    };
    let pulled = puller
        .pull("default", r, &options, &Progress::default())
        .await?;
    Ok(pulled.manifests[0].unpacked.clone())
}

fn mounted_tree(root: &Path, r: &str, mnt: &Path) -> BTreeMap<String, String> {
    hoist_ok(root, &["mount", r, mnt.to_str().unwrap()]);
    let tree = full_tree(mnt);
    hoist_ok(root, &["unmount", mnt.to_str().unwrap()]);
    tree
}

/// Each layer of a fresh pull applies from its download as it happens and
/// is never read back from the store: through a dropped connection, a
/// registry that ignores Range, and a dominant layer fetched as parallel
/// parts. A layer that cannot apply without its lowers (a hard link into
/// one) drops its feed, still reaches the store, and applies from there;
/// blobs stored earlier apply from the store too. Every tree is the one a
/// sequential apply gives.
#[tokio::test]
async fn layers_stream_once_through_faults_and_parts_as_root() {
    require_root!();
    use common::proxy::{Fault, Proxy};
    use hoist::remote::RangedFetch;
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let mut layers = layers();
    layers.push(random_layer(11, 700_000));
    layers.push(gzip(&tar_layer(&[
        Entry::Hardlink("keep/g-again", "keep/g"),
        Entry::File("last", b"last"),
    ])));
    let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
    push_layers(&reg, "stream/app", "1", &layers, &diffs).await;
    let dir = common::mounts::TempRoot::new();
    let direct = format!("{}/stream/app:1", reg.addr);
    let seq = dir.path().join("sequential");
    let args = [
        "pull",
        "--hosts-dir",
        "/nonexistent",
        "--snapshotter",
        "overlayfs",
        "--sequential-unpack",
        &direct,
    ];
    hoist_ok(&seq, &args);
    let reference = mounted_tree(&seq, &direct, &dir.path().join("mnt-seq"));
    assert!(reference["data.bin"].contains(" size=700000 "));
    assert_eq!(reference["keep/g-again"], reference["keep/g"]);

    let r = format!("{}/stream/app:1", proxy.addr);
    proxy.target(&Digest::of(&layers[3]));
    let parts = RangedFetch {
        part_size: 64 << 10,
        parts_at_once: 3,
    };
    let one_stream = RangedFetch {
        part_size: 0,
        parts_at_once: 1,
    };
    // Faults pop from the end.
    let cases = [
        ("parts", parts, vec![Fault::DropMidBlob]),
        (
            "stream",
            one_stream,
            vec![Fault::IgnoreRange, Fault::DropMidBlob],
        ),
    ];
    for (name, ranged, faults) in cases {
        let root = dir.path().join(name);
        proxy.faults.lock().extend(faults);
        let u = pull_with(&root, &r, ranged, false).await.unwrap().unwrap();
        assert!(
            proxy.faults.lock().is_empty(),
            "{name}: every fault was hit"
        );
        assert!(u.parallel, "{name}");
        assert_eq!(u.layers_applied, layers.len(), "{name}");
        assert_eq!(u.streamed, layers.len() - 1, "{name}: {u:?}");
        let tree = mounted_tree(&root, &r, &dir.path().join(format!("mnt-{name}")));
        assert_eq!(tree, reference, "{name}");
    }

    // Fetched without unpacking first: the unpack reads the store.
    let root = dir.path().join("stored");
    assert!(pull_with(&root, &r, parts, true).await.unwrap().is_none());
    let u = pull_with(&root, &r, parts, false).await.unwrap().unwrap();
    assert_eq!((u.layers_applied, u.streamed), (layers.len(), 0));
    let tree = mounted_tree(&root, &r, &dir.path().join("mnt-stored"));
    assert_eq!(tree, reference);
}

/// A layer whose bytes do not match its digest fails the pull even though
/// its apply began before the digest could be checked: nothing of it is
/// committed, and GC leaves only the empty root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_layer_applied_as_it_downloads_leaves_nothing_as_root() {
    require_root!();
    let reg = Registry::start();
    let mut layers = layers();
    // Below the top layer, which applies (and is dropped) before it fails.
    layers.insert(2, random_layer(12, 300_000));
    let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
    push_layers(&reg, "stream/bad", "1", &layers, &diffs).await;
    // Same length, one byte changed in the middle of the big layer.
    let big = Digest::of(&layers[2]);
    let path = reg.blob_data_path(&big);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let r = format!("{}/stream/bad:1", reg.addr);
    let err = pull_with(&root, &r, hoist::remote::RangedFetch::default(), false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&big.to_string()), "{err}");
    // The failed pull removes its active snapshots itself, GC or not (the
    // last removals may still be running when the pull returns); layers it
    // committed stay for GC, as their lease is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let snaps = hoist_ok(&root, &["snapshots", "ls"]);
        if !snaps.contains("Active") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "left behind: {snaps}");
        // Asleep without blocking the runtime the cleanup tasks run on.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    hoist_ok(&root, &["gc"]);
    assert!(hoist_ok(&root, &["content", "ls", "-q"]).trim().is_empty());
    assert!(hoist_ok(&root, &["images", "-q"]).trim().is_empty());
}

/// Images that share their base layers, pulled at once by one daemon's
/// puller: neither waits on the other for good (each unpack gives up a
/// layer's lock once it is committed), each shared layer is committed once,
/// and both trees are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_sharing_a_base_commit_it_once_as_root() {
    require_root!();
    use hoist::pull::{PullOptions, Puller, progress::Progress};
    let reg = Registry::start();
    let base = layers();
    for (i, name) in ["one", "two"].iter().enumerate() {
        let mut layers = base.clone();
        layers.push(random_layer(20 + i as u8, 200_000));
        layers.push(gzip(&tar_layer(&[Entry::File(name, name.as_bytes())])));
        let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
        push_layers(&reg, &format!("shared/{name}"), "1", &layers, &diffs).await;
    }
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let db = hoist::metadata::Db::open(&root).unwrap();
    let snapshots = hoist::snapshot::open(&db, Some("overlayfs")).unwrap();
    let client = hoist::remote::RegistryClient::new(Default::default());
    let puller = Puller::new(db, client, 3, Some(snapshots));
    let refs: Vec<String> = ["one", "two"]
        .iter()
        .map(|n| format!("{}/shared/{n}:1", reg.addr))
        .collect();
    let pulls = refs.iter().map(|r| {
        let puller = puller.clone();
        async move {
            puller
                .pull("default", r, &PullOptions::default(), &Progress::default())
                .await
        }
    });
    let pulled = futures_util::future::try_join_all(pulls).await.unwrap();
    let applied: usize = pulled
        .iter()
        .map(|p| p.manifests[0].unpacked.as_ref().unwrap().layers_applied)
        .sum();
    // Three shared layers once, two of each image's own.
    assert_eq!(applied, base.len() + 2 + 2);
    drop(pulled);
    drop(puller);
    for (r, name) in refs.iter().zip(["one", "two"]) {
        let tree = mounted_tree(&root, r, &dir.path().join(format!("mnt-{name}")));
        assert!(tree[name].contains(" size=3 "), "{name}: {tree:?}");
        assert!(tree.contains_key("data.bin") && tree.contains_key("keep/g"));
    }
    hoist_ok(&root, &["gc"]);
    let snaps = hoist_ok(&root, &["snapshots", "ls"]);
    // The shared three, then two of each image's own; all committed.
    assert_eq!(snaps.lines().count(), 1 + base.len() + 4, "{snaps}");
}

/// The per-mount options of the mount on `target`, from mountinfo.
fn mount_options(target: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = target.display().to_string();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(target.as_str()))
        .and_then(|l| l.split(' ').nth(5))
        .map(|o| o.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// `hoist mount` shows an image nosuid,nodev, so its setuid binaries and
/// device nodes give nobody anything, unless asked with --allow-suid-dev.
#[tokio::test]
async fn hoist_mount_is_nosuid_nodev_unless_asked_as_root() {
    require_root!();
    let reg = Registry::start();
    let layers = layers();
    let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
    push_layers(&reg, "unpack/suid", "1", &layers, &diffs).await;
    let r = format!("{}/unpack/suid:1", reg.addr);
    for snapshotter in ["overlayfs", "native"] {
        let dir = common::mounts::TempRoot::new();
        let root = dir.path().join("root");
        let pull = ["pull", "--hosts-dir", "/nonexistent", "--snapshotter"];
        hoist_ok(&root, &[&pull[..], &[snapshotter, &r]].concat());
        let mnt = dir.path().join("mnt");
        let mnt_s = mnt.to_str().unwrap();
        for (extra, hardened) in [(&[][..], true), (&["--allow-suid-dev"][..], false)] {
            hoist_ok(&root, &[&["mount"][..], extra, &[&r, mnt_s]].concat());
            let options = mount_options(&mnt.canonicalize().unwrap());
            hoist_ok(&root, &["unmount", mnt_s]);
            for flag in ["nosuid", "nodev"] {
                assert_eq!(
                    options.iter().any(|o| o == flag),
                    hardened,
                    "{snapshotter} {extra:?}: {options:?}"
                );
            }
            assert!(options.iter().any(|o| o == "ro"), "{options:?}");
        }
    }
}
