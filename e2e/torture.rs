//! The CRI socket under load, as root: 50 clients mix PullImage,
//! RemoveImage, ImageStatus, ListImages and ImageFsInfo over 10 images that
//! share base layers, while `hoist gc` runs through the daemon over and over.
//! No call may fail, but a pull that removals of its image kept overlapping
//! (Aborted); an image ImageStatus reports present must have every
//! layer's snapshot (asked of the daemon's snapshots API) unless a removal
//! of it overlapped the question; at the end every image present mounts
//! with its files, the daemon stops cleanly and `hoist check` is clean. The
//! daemon's peak RSS (VmHWM) is printed.
//!
//! `HOIST_TORTURE_SECS` sets how long the clients run: 10 s by default,
//! 60 s in hack/cri-torture.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::tree::full_tree;
use common::*;
use daemon::{Daemon, spec};
use hoist::containerd::api::services::snapshots::v1 as pb;
use hoist::digest::Digest;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use parking_lot::Mutex;
use pb::snapshots_client::SnapshotsClient;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

const CLIENTS: usize = 50;
const IMAGES: usize = 10;

/// `size` pseudo-random bytes.
fn noise(seed: u64, size: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Image {
    reference: String,
    id: String,
    chain: Vec<String>,
    /// path -> digest of the file each of its layers adds.
    files: BTreeMap<String, Digest>,
}

/// Ten images: a base layer they all share, one of two middle layers, and
/// a layer of their own.
async fn push_images(reg: &Registry) -> Vec<Image> {
    let base = noise(1, 512 << 10);
    let middles = [noise(2, 256 << 10), noise(3, 256 << 10)];
    let mut out = Vec::new();
    for i in 0..IMAGES {
        let own = noise(10 + i as u64, (32 << 10) + i);
        let middle = (format!("mid/{}", i % 2), &middles[i % 2]);
        let files = [
            ("base/data".to_string(), &base),
            middle,
            (format!("app/{i}"), &own),
        ];
        let layers: Vec<Vec<u8>> = files
            .iter()
            .map(|(path, data)| gzip_layer(&[(path.as_str(), data.as_slice())]))
            .collect();
        let tag = format!("t{i}");
        let pushed = push_image(
            reg,
            "torture/app",
            Some(&tag),
            &layers,
            ("linux", host_arch()),
            false,
        )
        .await;
        let diff_ids: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
        out.push(Image {
            reference: format!("{}/torture/app:{tag}", reg.addr),
            id: pushed.config.digest.to_string(),
            chain: hoist::images::chain_ids(&diff_ids)
                .iter()
                .map(ToString::to_string)
                .collect(),
            files: files
                .iter()
                .map(|(path, data)| (path.clone(), Digest::of(data)))
                .collect(),
        });
    }
    out
}

/// Removals of each image begun and finished, so that a check can tell
/// whether one overlapped it.
struct Removals {
    begun: Vec<AtomicU64>,
    done: Vec<AtomicU64>,
}

#[derive(Default)]
struct Tally {
    /// Calls made, by RPC.
    calls: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<Vec<String>>,
    /// Present images whose snapshots were all found.
    verified: AtomicU64,
    /// Present images not checked: a removal of theirs was in flight.
    overlapped: AtomicU64,
    collections: AtomicU64,
    /// Pulls aborted because removals of their image kept overlapping them.
    aborted: AtomicU64,
}

impl Tally {
    fn call(&self, rpc: &'static str) {
        *self.calls.lock().entry(rpc).or_default() += 1;
    }

    fn error(&self, what: String) {
        self.errors.lock().push(what);
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One client's calls until `until`.
async fn client(
    seed: u64,
    socket: std::path::PathBuf,
    snapshots_socket: std::path::PathBuf,
    images: Arc<Vec<Image>>,
    removals: Arc<Removals>,
    tally: Arc<Tally>,
    until: Instant,
) {
    let mut cri = ImageServiceClient::new(hoist::grpc_unix::connect(&socket).await.unwrap());
    let mut snaps =
        SnapshotsClient::new(hoist::grpc_unix::connect(&snapshots_socket).await.unwrap());
    let ids: HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
    let mut rng = Rng(seed | 1);
    while Instant::now() < until {
        let i = rng.below(IMAGES);
        let image = &images[i];
        let r = image.reference.as_str();
        match rng.below(20) {
            0..=5 => {
                tally.call("PullImage");
                let begun = removals.begun[i].load(Ordering::SeqCst);
                let quiet = begun == removals.done[i].load(Ordering::SeqCst);
                let pulled = cri
                    .pull_image(PullImageRequest {
                        image: spec(r),
                        ..Default::default()
                    })
                    .await;
                match pulled {
                    Ok(p) if p.get_ref().image_ref == image.id => {}
                    Ok(p) => tally.error(format!("PullImage {r}: id {}", p.get_ref().image_ref)),
                    // Expected only when removals of the image overlapped
                    // it (each pull they overlapped is tried again).
                    Err(e)
                        if e.code() == Code::Aborted
                            && (!quiet || removals.begun[i].load(Ordering::SeqCst) != begun) =>
                    {
                        tally.aborted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.error(format!("PullImage {r}: {e}")),
                }
            }
            6..=8 => {
                tally.call("RemoveImage");
                removals.begun[i].fetch_add(1, Ordering::SeqCst);
                let removed = cri
                    .remove_image(RemoveImageRequest { image: spec(r) })
                    .await;
                removals.done[i].fetch_add(1, Ordering::SeqCst);
                if let Err(e) = removed {
                    tally.error(format!("RemoveImage {r}: {e}"));
                }
            }
            9..=13 => {
                tally.call("ImageStatus");
                let begun = removals.begun[i].load(Ordering::SeqCst);
                let quiet = begun == removals.done[i].load(Ordering::SeqCst);
                let status = cri
                    .image_status(ImageStatusRequest {
                        image: spec(r),
                        verbose: false,
                    })
                    .await;
                let present = match status {
                    Ok(s) => s.into_inner().image,
                    Err(e) => {
                        tally.error(format!("ImageStatus {r}: {e}"));
                        continue;
                    }
                };
                let Some(present) = present else { continue };
                if present.id != image.id {
                    tally.error(format!("ImageStatus {r}: id {}", present.id));
                    continue;
                }
                let mut missing = Vec::new();
                for chain in &image.chain {
                    let stat = snaps
                        .stat(pb::StatSnapshotRequest {
                            key: chain.clone(),
                            ..Default::default()
                        })
                        .await;
                    match stat {
                        Ok(_) => {}
                        Err(e) if e.code() == Code::NotFound => missing.push(chain.clone()),
                        Err(e) => tally.error(format!("Stat {chain}: {e}")),
                    }
                }
                let overlapped = !quiet || removals.begun[i].load(Ordering::SeqCst) != begun;
                match (overlapped, missing.is_empty()) {
                    (true, _) => {
                        tally.overlapped.fetch_add(1, Ordering::Relaxed);
                    }
                    (false, true) => {
                        tally.verified.fetch_add(1, Ordering::Relaxed);
                    }
                    (false, false) => tally.error(format!(
                        "ImageStatus {r}: present, but its snapshots {missing:?} are not"
                    )),
                }
            }
            14..=16 => {
                tally.call("ListImages");
                match cri.list_images(ListImagesRequest { filter: None }).await {
                    Ok(l) => {
                        for listed in &l.get_ref().images {
                            if !ids.contains(listed.id.as_str()) {
                                tally.error(format!("ListImages: unknown id {}", listed.id));
                            }
                        }
                    }
                    Err(e) => tally.error(format!("ListImages: {e}")),
                }
            }
            _ => {
                tally.call("ImageFsInfo");
                match cri.image_fs_info(ImageFsInfoRequest {}).await {
                    Ok(f) if f.get_ref().image_filesystems.len() == 1 => {}
                    Ok(f) => tally.error(format!("ImageFsInfo: {:?}", f.get_ref())),
                    Err(e) => tally.error(format!("ImageFsInfo: {e}")),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cri_clients_with_gc_running_as_root() {
    require_root!();
    let secs: u64 = std::env::var("HOIST_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let reg = Registry::start();
    let images = Arc::new(push_images(&reg).await);
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let daemon = Daemon::start(&root, &dir.path().join("run/hoist.sock"), &[]);

    let until = Instant::now() + Duration::from_secs(secs);
    let removals = Arc::new(Removals {
        begun: (0..IMAGES).map(|_| AtomicU64::new(0)).collect(),
        done: (0..IMAGES).map(|_| AtomicU64::new(0)).collect(),
    });
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client(
                n as u64 + 1,
                daemon.socket.clone(),
                daemon.snapshots_socket.clone(),
                images.clone(),
                removals.clone(),
                tally.clone(),
                until,
            ))
        })
        .collect();
    // `hoist gc` through the daemon, again and again.
    let collector = {
        let (root, tally) = (root.clone(), tally.clone());
        tokio::task::spawn_blocking(move || {
            while Instant::now() < until {
                match hoist_cli(&root, &["gc"]) {
                    (true, _) => {
                        tally.collections.fetch_add(1, Ordering::Relaxed);
                    }
                    (false, text) => tally.error(format!("hoist gc: {text}")),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    for c in clients {
        c.await.unwrap();
    }
    collector.await.unwrap();
    let peak = peak_rss_kib(daemon.child.id());

    // Every image present mounts with its files.
    let mut cri = daemon.client().await;
    let mut present = 0;
    for (i, image) in images.iter().enumerate() {
        let status = cri
            .image_status(ImageStatusRequest {
                image: spec(&image.reference),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        if status.image.is_none() {
            continue;
        }
        present += 1;
        let mnt = dir.path().join(format!("mnt-{i}"));
        let mnt = mnt.to_str().unwrap();
        let (ok, text) = hoist_cli(&root, &["-n", "k8s.io", "mount", &image.reference, mnt]);
        assert!(ok, "{text}");
        let tree = full_tree(Path::new(mnt));
        let (ok, text) = hoist_cli(&root, &["-n", "k8s.io", "unmount", mnt]);
        assert!(ok, "{text}");
        for (path, digest) in &image.files {
            let entry = tree.get(path).map(String::as_str).unwrap_or_default();
            assert!(
                entry.starts_with(&format!("file:{digest} ")),
                "{}: {path} is {entry:?}",
                image.reference
            );
        }
    }
    let mut daemon = daemon;
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    let (clean, report) = hoist_cli(&root, &["check"]);
    let again = daemon.log().matches("pulling again").count();

    let calls = tally.calls.lock().clone();
    println!(
        "{CLIENTS} clients for {secs} s: calls {calls:?}; {} collections; {} statuses of present \
         images verified against the snapshots API ({} overlapped a removal); {present} images \
         present at the end; {again} pulls pulled again after a removal overlapped them, {} \
         aborted by overlapping removals (expected); daemon peak \
         RSS (VmHWM) {:.1} MiB",
        tally.collections.load(Ordering::Relaxed),
        tally.verified.load(Ordering::Relaxed),
        tally.overlapped.load(Ordering::Relaxed),
        tally.aborted.load(Ordering::Relaxed),
        peak as f64 / 1024.0
    );
    let errors = tally.errors.lock();
    assert!(
        errors.is_empty(),
        "{} unexpected errors:\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert!(clean, "{report}");
    assert!(
        tally.verified.load(Ordering::Relaxed) > 0,
        "no status was verified"
    );
    assert!(
        tally.collections.load(Ordering::Relaxed) > 0,
        "hoist gc never ran"
    );
    for rpc in [
        "PullImage",
        "RemoveImage",
        "ImageStatus",
        "ListImages",
        "ImageFsInfo",
    ] {
        assert!(
            calls.get(rpc).is_some_and(|n| *n > 0),
            "{rpc} was never called"
        );
    }
}
