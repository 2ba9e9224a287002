//! Hostile images through the running daemon, as kubelet would meet them:
//! a PAX flood (48 x 1 MiB extended headers of 25,000 xattrs each) and a
//! directory chain 40,000 levels deep, pulled over the CRI socket. Each is
//! refused naming its layer, the daemon stays up within its memory bound,
//! and nothing is left once the daemon has collected. How long each refusal
//! took is printed (run with --nocapture), not asserted.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::hostile::{HostileLayer, deep_chain_layer, pax_flood_layer, push_hostile};
use common::*;
use daemon::{Daemon, spec};
use k8s_cri::v1::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn entries(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// The one snapshotter directory the daemon made (erofs where the kernel
/// has it, else overlayfs): the layer's tree was begun there.
fn daemon_backend(root: &Path) -> String {
    let made = entries(&root.join("snapshots"));
    assert_eq!(made.len(), 1, "{made:?}");
    made[0].to_string_lossy().into_owned()
}

async fn refused_by_the_daemon(name: &str, layer: &HostileLayer, entry: &str) {
    let reg = Registry::start();
    let repo = format!("hostile/{name}");
    let pushed = push_hostile(&reg, &repo, "1", layer).await;
    let digest = pushed.layers[0].digest.to_string();
    let image = format!("{}/{repo}:1", reg.addr);
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let mut daemon = Daemon::start(&root, &dir.path().join("hoist.sock"), &[]);
    let mut client = daemon.client().await;

    let started = Instant::now();
    let err = client
        .pull_image(PullImageRequest {
            image: spec(&image),
            ..Default::default()
        })
        .await
        .expect_err("a hostile layer must be refused");
    eprintln!(
        "{name}: {} MiB of tar refused by the daemon in {:?}",
        layer.tar_size >> 20,
        started.elapsed()
    );
    // The image is at fault, not hoist.
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let message = err.message();
    assert!(
        message.contains(&digest) && message.contains("refused") && message.contains(entry),
        "{}",
        &message[..message.len().min(2000)]
    );
    // The daemon is up, answers, and stayed within its bound.
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "{}",
        daemon.log()
    );
    client
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect("the daemon answers after the refusal");
    let rss = peak_rss_kib(daemon.child.id());
    eprintln!("{name}: daemon peak RSS {} MiB", rss >> 10);
    assert!(rss < 128 << 10, "peak RSS {rss} KiB");
    // A RemoveImage of the name collects: nothing of the refused pull is
    // left, once its own cleanup has finished.
    let backend = daemon_backend(&root);
    let trees = root.join("snapshots").join(backend);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        client
            .remove_image(RemoveImageRequest {
                image: spec(&image),
            })
            .await
            .unwrap();
        let left = entries(&trees);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop();
    // The refused layer's blob is not recorded: a collection on the bare
    // root leaves no content either.
    let gc = std::process::Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(&root)
        .arg("gc")
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(entries(&trees).is_empty());
    assert!(entries(&root.join("content/blobs/sha256")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pax_flood_is_refused_by_the_daemon_as_root() {
    require_root!();
    let layer = pax_flood_layer();
    refused_by_the_daemon("pax-flood", &layer, "tar entry \"f\" refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_chain_40000_deep_is_refused_by_the_daemon_as_root() {
    require_root!();
    let layer = deep_chain_layer(40_000);
    let entry = format!("tar entry \"{}\" refused", "a/".repeat(2048));
    refused_by_the_daemon("deep-chain", &layer, &entry).await;
}
