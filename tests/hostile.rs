//! Hostile layers pulled end to end from a real registry, as root, with
//! each snapshotter (erofs, which indexes instead of applying, where the
//! kernel lists what its images need): each pull is refused with an error naming the layer
//! and the entry, and leaves no snapshot, tree or blob behind. How long
//! each refusal took is printed (run with --nocapture), not asserted.

mod common;

use common::hostile::{HostileLayer, deep_chain_layer, pax_flood_layer, push_hostile};
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Pulls `r` into `root` with the library, as the daemon does.
async fn pull(root: &Path, r: &str, snapshotter: &str) -> hoist::pull::Result<()> {
    use hoist::pull::{PullOptions, Puller, progress::Progress};
    let db = hoist::metadata::Db::open(root).unwrap();
    let snapshots = hoist::snapshot::open(&db, Some(snapshotter)).unwrap();
    let client = hoist::remote::RegistryClient::new(Default::default());
    let puller = Puller::new(db, client, 3, Some(snapshots));
    puller
        .pull("default", r, &PullOptions::default(), &Progress::default())
        .await
        .map(drop)
}

async fn refused_leaving_nothing(name: &str, layer: &HostileLayer, entry: &str) {
    let reg = Registry::start();
    let repo = format!("hostile/{name}");
    let pushed = push_hostile(&reg, &repo, "1", layer).await;
    let digest = pushed.layers[0].digest.to_string();
    let r = format!("{}/{repo}:1", reg.addr);
    let dir = common::mounts::TempRoot::new();
    for snapshotter in snapshotters(name) {
        let root = dir.path().join(snapshotter);
        let start = Instant::now();
        let err = pull(&root, &r, snapshotter).await.unwrap_err().to_string();
        eprintln!(
            "{name}: {} MiB of tar in a {} KiB blob refused on {snapshotter} in {:?}",
            layer.tar_size >> 20,
            layer.blob.len() >> 10,
            start.elapsed()
        );
        assert!(
            err.contains(&digest) && err.contains("refused") && err.contains(entry),
            "{}",
            &err[..err.len().min(2000)]
        );
        // The failed pull removes its active snapshot itself; the last
        // removal may still be running when the pull returns.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let snaps = hoist_ok(&root, &["snapshots", "ls"]);
            if !snaps.contains("Active") {
                break;
            }
            assert!(Instant::now() < deadline, "left behind: {snaps}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        hoist_ok(&root, &["gc"]);
        let trees = root.join("snapshots").join(snapshotter);
        let left: Vec<_> = std::fs::read_dir(&trees)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{snapshotter}: left behind {left:?}");
        assert!(hoist_ok(&root, &["content", "ls", "-q"]).trim().is_empty());
    }
}

/// 48 PAX headers of 25,000 xattrs each: refused at its one file, whose
/// xattr names would not fit what Linux keeps for a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pax_flood_is_refused_and_leaves_nothing_as_root() {
    require_root!();
    let layer = pax_flood_layer();
    refused_leaving_nothing("pax-flood", &layer, "tar entry \"f\" refused").await;
}

/// A directory chain 40,000 levels deep: refused at the first level whose
/// path is longer than PATH_MAX allows, long before the chain's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_chain_40000_deep_is_refused_and_leaves_nothing_as_root() {
    require_root!();
    let layer = deep_chain_layer(40_000);
    let entry = format!("tar entry \"{}\" refused", "a/".repeat(2048));
    refused_leaving_nothing("deep-chain", &layer, &entry).await;
}
