//! Garbage collection against an unpack that reuses a committed chain: a
//! RemoveImage (delete, then GC) of one image races the unpack of another
//! image with the same layers. Whenever that unpack succeeds, every
//! snapshot of its chain exists; none is swept between the unpack finding
//! it committed and its lease holding it. No registry: the blobs go
//! straight into the content store.

use hoist::descriptor::Descriptor;
use hoist::digest::Digest;
use hoist::metadata::images::Image;
use hoist::metadata::{Db, Labels};
use hoist::pull::progress::Progress;
use hoist::pull::{Puller, unpack};
use hoist::snapshot::{Kind, SnapshotRoot, Snapshotter};
use std::sync::Arc;
use std::time::Duration;

const NS: &str = "default";

fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, path, *data).unwrap();
    }
    tar.into_inner().unwrap()
}

fn put(
    store: &hoist::metadata::ContentStore,
    media: &str,
    data: &[u8],
    labels: Labels,
) -> Descriptor {
    let desc = Descriptor::new(media, Digest::of(data), data.len() as u64);
    hoist::content::write_blob(store, "put", data, &desc, labels).unwrap();
    desc
}

struct Fixture {
    db: Arc<Db>,
    root: Arc<SnapshotRoot>,
    puller: Arc<Puller>,
    layers: Vec<Descriptor>,
    chain: Vec<Digest>,
    /// Two configs over the same layers: two images sharing one chain.
    configs: [Vec<u8>; 2],
}

fn fixture(dir: &std::path::Path, snapshotter: &str) -> Fixture {
    let db = Db::open(dir).unwrap();
    let root = hoist::snapshot::open(&db, Some(snapshotter)).unwrap();
    let puller = Puller::new(
        db.clone(),
        hoist::remote::RegistryClient::new(Default::default()),
        3,
        Some(root.clone()),
    );
    let raw = [
        tar(&[("base", b"base")]),
        tar(&[("middle", b"middle")]),
        tar(&[("top", b"top")]),
    ];
    // The layer blobs stay whatever GC does: only snapshots are at stake.
    let keep: Labels = [("containerd.io/gc.root".to_string(), "test".to_string())].into();
    let store = db.content_store(NS);
    let layers: Vec<Descriptor> = raw
        .iter()
        .map(|l| put(&store, hoist::images::OCI_LAYER, l, keep.clone()))
        .collect();
    let diff_ids: Vec<Digest> = raw.iter().map(|l| Digest::of(l)).collect();
    let chain = hoist::images::chain_ids(&diff_ids);
    let config = |author: &str| {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "author": author,
            "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
        }))
        .unwrap()
    };
    Fixture {
        db,
        root,
        puller,
        layers,
        chain,
        configs: [config("a"), config("b")],
    }
}

/// Stores `config` under `lease`, as a pull does before it plans.
fn store_config(f: &Fixture, config: &[u8], lease: &str) -> Descriptor {
    let store = f.db.content_store(NS).with_lease(lease);
    put(&store, hoist::images::OCI_CONFIG, config, Labels::new())
}

/// Unpacks the image of the stored `config` under `lease`, as a pull does
/// once its blobs are in.
async fn unpack_under(
    f: &Fixture,
    config: &Descriptor,
    lease: &str,
) -> hoist::pull::Result<unpack::Unpacked> {
    let store = f.db.content_store(NS).with_lease(lease);
    let snapshots = f.root.namespace(NS).with_lease(lease);
    let plan = unpack::plan(&f.puller, &store, &snapshots, config, &f.layers, false).await?;
    let (stored, arrivals) = unpack::arrivals(f.layers.len());
    stored.send_replace(vec![true; f.layers.len()]);
    let feeds = f.layers.iter().map(|_| None).collect();
    unpack::unpack(
        plan,
        &store,
        &snapshots,
        config,
        arrivals,
        feeds,
        &Progress::default(),
    )
    .await
}

fn gc(db: &Arc<Db>) {
    hoist::snapshot::garbage_collect(db).unwrap();
}

/// A spread of delays (0 to `max` microseconds) from `i`, so the races
/// meet at many points.
fn jitter(i: u64, salt: u64, max: u64) -> Duration {
    let x = (i.wrapping_add(salt))
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Duration::from_micros((x >> 33) % (max + 1))
}

async fn race(snapshotter: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), snapshotter);
    let snapshots = f.root.namespace(NS);
    let (mut reused, mut reapplied) = (0, 0);
    for i in 0..150u64 {
        // Image A, unpacked; its pull's lease is gone, the image holds it.
        let lease_a = format!("a-{i}");
        f.db.create_lease(NS, &lease_a, Labels::new()).unwrap();
        let config_a = store_config(&f, &f.configs[0], &lease_a);
        unpack_under(&f, &config_a, &lease_a).await.unwrap();
        f.db.put_image(NS, Image::new("a", config_a)).unwrap();
        f.db.delete_lease(NS, &lease_a).unwrap();

        // RemoveImage of A (and its GC) against B's unpack.
        let lease_b = format!("b-{i}");
        f.db.create_lease(NS, &lease_b, Labels::new()).unwrap();
        let config_b = store_config(&f, &f.configs[1], &lease_b);
        let db = f.db.clone();
        let wait = jitter(i, 1, 3000);
        let removal = tokio::task::spawn_blocking(move || {
            std::thread::sleep(wait);
            db.delete_image(NS, "a").unwrap();
            gc(&db);
        });
        tokio::time::sleep(jitter(i, 2, 3000)).await;
        let b = unpack_under(&f, &config_b, &lease_b).await;
        removal.await.unwrap();
        if let Ok(unpacked) = &b {
            for c in &f.chain {
                let kind = snapshots.stat(&c.to_string()).map(|info| info.kind);
                assert!(
                    matches!(kind, Ok(Kind::Committed)),
                    "iteration {i}: B unpacked ({} layers applied) but snapshot {c} is {kind:?}",
                    unpacked.layers_applied
                );
            }
            match unpacked.layers_applied {
                0 => reused += 1,
                _ => reapplied += 1,
            }
        }
        // The next round starts from nothing but the layer blobs.
        f.db.delete_lease(NS, &lease_b).unwrap();
        gc(&f.db);
        let mut left = 0;
        snapshots
            .walk(&Default::default(), &mut |_| {
                left += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(left, 0, "iteration {i}");
    }
    // Both orders happened: the race was run, not just one side of it.
    assert!(
        reused > 0 && reapplied > 0,
        "{snapshotter}: B reused the chain {reused} times, applied it again {reapplied} times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_never_sweeps_a_chain_an_unpack_reuses() {
    race("native").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_never_sweeps_a_chain_a_parallel_unpack_reuses_as_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    race("overlayfs").await;
}
