//! The CRI daemon end to end: Debian's docker-registry, `hoist serve` as a
//! subprocess with its own root and socket, and a tonic CRI client over the
//! socket driving every RPC.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::proxy::{Fault, Proxy};
use common::*;
use daemon::{Daemon, spec};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

async fn pull(c: &mut ImageServiceClient<Channel>, image: &str) -> Result<String, tonic::Status> {
    c.pull_image(PullImageRequest {
        image: spec(image),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

async fn status(
    c: &mut ImageServiceClient<Channel>,
    image: &str,
    verbose: bool,
) -> ImageStatusResponse {
    c.image_status(ImageStatusRequest {
        image: spec(image),
        verbose,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn list(c: &mut ImageServiceClient<Channel>, filter: Option<&str>) -> Vec<Image> {
    c.list_images(ListImagesRequest {
        filter: filter.map(|f| ImageFilter { image: spec(f) }),
    })
    .await
    .unwrap()
    .into_inner()
    .images
}

async fn fs_used(c: &mut ImageServiceClient<Channel>) -> (u64, u64, String) {
    let r = c
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let fs = &r.image_filesystems[0];
    (
        fs.used_bytes.as_ref().map(|v| v.value).unwrap_or(0),
        fs.inodes_used.as_ref().map(|v| v.value).unwrap_or(0),
        fs.fs_id
            .as_ref()
            .map(|f| f.mountpoint.clone())
            .unwrap_or_default(),
    )
}

/// An image whose config says `User: user`.
async fn push_user_image(reg: &Registry, repo: &str, tag: &str, user: &str, seed: u8) -> String {
    let layer = random_layer(seed, 2000);
    let l = reg
        .push_blob(repo, &layer, hoist::images::OCI_LAYER_GZIP)
        .await;
    let config = json!({
        "architecture": host_arch(), "os": "linux", "config": {"User": user},
        "rootfs": {"type": "layers", "diff_ids": [diff_id(&layer).to_string()]},
    });
    let (c, _) = push_manifest_over(reg, repo, Some(tag), false, &config, &[l]).await;
    c.digest.to_string()
}

#[tokio::test]
async fn every_rpc_over_the_socket_as_root() {
    require_root!();
    let reg = Registry::start();
    let img = push_image(
        &reg,
        "cri/app",
        Some("v1"),
        &[random_layer(1, 5000), random_layer(2, 3000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    reg.push_manifest(
        "cri/app",
        "latest",
        hoist::images::OCI_MANIFEST,
        &fetch_manifest(&reg, "cri/app", "v1").await,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let socket = dir.path().join("run/hoist.sock");
    let mut daemon = Daemon::start(&root, &socket, &[]);
    let mut c = daemon.client().await;

    // ImageFsInfo answers at once, with a real mount point.
    let (used0, _, mountpoint) = fs_used(&mut c).await;
    assert!(Path::new(&mountpoint).is_dir(), "{mountpoint}");

    let id = img.config.digest.to_string();
    let by_tag = format!("{}/cri/app:v1", reg.addr);
    assert_eq!(pull(&mut c, &by_tag).await.unwrap(), id);
    let by_digest = format!("{}/cri/app@{}", reg.addr, img.manifest.digest);
    assert_eq!(pull(&mut c, &by_digest).await.unwrap(), id);
    let untagged = format!("{}/cri/app", reg.addr);
    assert_eq!(pull(&mut c, &untagged).await.unwrap(), id);

    // Status by every form of name.
    let hex = id.trim_start_matches("sha256:").to_string();
    for q in [
        id.clone(),
        hex.clone(),
        by_tag.clone(),
        by_digest.clone(),
        untagged.clone(),
    ] {
        let s = status(&mut c, &q, false).await;
        let image = s.image.unwrap_or_else(|| panic!("no image for {q}"));
        assert_eq!(image.id, id, "{q}");
        assert!(image.repo_tags.contains(&by_tag), "{:?}", image.repo_tags);
        assert!(
            image.repo_tags.contains(&format!("{untagged}:latest")),
            "{:?}",
            image.repo_tags
        );
        assert!(
            image.repo_digests.contains(&by_digest),
            "{:?}",
            image.repo_digests
        );
        assert_eq!(
            image.size,
            img.config.size + img.layers.iter().map(|l| l.size).sum::<u64>()
        );
        assert_eq!(image.uid.map(|u| u.value), Some(1002));
    }
    assert!(
        status(&mut c, &format!("{}/cri/app:nope", reg.addr), false)
            .await
            .image
            .is_none()
    );
    let verbose = status(&mut c, &by_tag, true).await;
    let info: serde_json::Value = serde_json::from_str(&verbose.info["info"]).unwrap();
    assert!(
        info["chainID"].as_str().unwrap().starts_with("sha256:"),
        "{info}"
    );
    assert_eq!(info["imageSpec"]["config"]["User"], "1002");

    // The four User forms.
    let cases = [
        ("1002", Some(1002), ""),
        ("www-data", None, "www-data"),
        ("1003:1004", Some(1003), ""),
        ("www-data:1004", None, "www-data"),
    ];
    for (i, (user, uid, name)) in cases.iter().enumerate() {
        let tag = format!("u{i}");
        push_user_image(&reg, "cri/users", &tag, user, 10 + i as u8).await;
        let r = format!("{}/cri/users:{tag}", reg.addr);
        pull(&mut c, &r).await.unwrap();
        let image = status(&mut c, &r, false).await.image.unwrap();
        assert_eq!(image.uid.map(|u| u.value), *uid, "{user}");
        assert_eq!(image.username, *name, "{user}");
    }

    // List, and list with a filter.
    assert_eq!(list(&mut c, None).await.len(), 5);
    let only = list(&mut c, Some(&by_tag)).await;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].id, id);
    assert!(
        list(&mut c, Some("docker.io/library/absent:1"))
            .await
            .is_empty()
    );

    // A second tag of the same image adds a name and no content.
    reg.push_manifest(
        "cri/app",
        "v2",
        hoist::images::OCI_MANIFEST,
        &fetch_manifest(&reg, "cri/app", "v1").await,
    )
    .await;
    let (used1, inodes1, _) = fs_used(&mut c).await;
    assert!(used1 > used0);
    let v2 = format!("{}/cri/app:v2", reg.addr);
    assert_eq!(pull(&mut c, &v2).await.unwrap(), id);
    let (used2, inodes2, _) = fs_used(&mut c).await;
    assert_eq!(
        (used2, inodes2),
        (used1, inodes1),
        "no new content for a new tag"
    );
    assert!(
        status(&mut c, &id, false)
            .await
            .image
            .unwrap()
            .repo_tags
            .contains(&v2)
    );

    // Removing one tag removes the image under every name, and its content.
    c.remove_image(RemoveImageRequest { image: spec(&v2) })
        .await
        .unwrap();
    assert!(status(&mut c, &id, false).await.image.is_none());
    assert!(status(&mut c, &by_tag, false).await.image.is_none());
    c.remove_image(RemoveImageRequest { image: spec(&v2) })
        .await
        .unwrap();
    let (used3, _, _) = fs_used(&mut c).await;
    assert!(used3 < used2, "{used3} < {used2}");

    // Error codes.
    let err = pull(&mut c, "docker.io/Library/x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = pull(&mut c, &format!("{}/cri/none:1", reg.addr))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let err = pull(&mut c, &format!("127.0.0.1:{}/x:1", free_port()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().starts_with("RegistryUnavailable"),
        "{}",
        err.message()
    );

    // One log line per RPC, and no secret in any.
    let log = daemon.log();
    assert!(
        log.contains("rpc=\"PullImage\"") || log.contains("rpc=PullImage"),
        "{log}"
    );
    assert_eq!(daemon.stop(), Some(0), "SIGTERM exits 0");
}

async fn fetch_manifest(reg: &Registry, repo: &str, tag: &str) -> Vec<u8> {
    hoist::remote::install_tls_provider();
    reqwest::Client::new()
        .get(format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr))
        .header("accept", hoist::images::OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn twenty_concurrent_pulls_fetch_each_blob_once_as_root() {
    require_root!();
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let img = push_image(
        &reg,
        "cri/many",
        Some("1"),
        &[random_layer(3, 200_000), random_layer(4, 100_000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let daemon = Daemon::start(
        &dir.path().join("root"),
        &dir.path().join("hoist.sock"),
        &[],
    );
    let r = format!("{}/cri/many:1", proxy.addr);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = daemon.client().await;
        let r = r.clone();
        tasks.push(tokio::spawn(async move { pull(&mut c, &r).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), img.config.digest.to_string());
    }
    for blob in img.layers.iter().chain([&img.config]) {
        assert_eq!(
            proxy.blob_requests(&blob.digest).len(),
            1,
            "{}",
            blob.digest
        );
    }
}

#[tokio::test]
async fn restart_keeps_images_and_a_sigtermed_pull_resumes_as_root() {
    require_root!();
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let kept = push_image(
        &reg,
        "cri/kept",
        Some("1"),
        &[random_layer(5, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let slow = push_image(
        &reg,
        "cri/slow",
        Some("1"),
        &[random_layer(6, 300_000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let socket = dir.path().join("hoist.sock");
    let mut daemon = Daemon::start(&root, &socket, &[]);
    let mut c = daemon.client().await;
    pull(&mut c, &format!("{}/cri/kept:1", reg.addr))
        .await
        .unwrap();

    // While the daemon runs, commands it does not answer are turned away
    // from its root by name (e2e/cli.rs drives those it answers).
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(&root)
        .args(["check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&socket.display().to_string()), "{text}");
    // A second daemon on the same socket is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(dir.path().join("other-root"))
        .args(["serve", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another live process"));

    // A pull that trickles: stop the daemon in the middle of the layer.
    proxy.target(&slow.layers[0].digest);
    proxy.faults.lock().push(Fault::Trickle);
    let r = format!("{}/cri/slow:1", proxy.addr);
    let mut c2 = daemon.client().await;
    let pending = tokio::spawn(async move { pull(&mut c2, &r).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.blob_requests(&slow.layers[0].digest).is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(daemon.stop(), Some(0));
    assert!(pending.await.unwrap().is_err());

    // Restarted: the image is still there and mountable, and the pull resumes.
    let daemon = Daemon::start(&root, &socket, &[]);
    let mut c = daemon.client().await;
    let kept_ref = format!("{}/cri/kept:1", reg.addr);
    assert!(status(&mut c, &kept_ref, false).await.image.is_some());
    pull(&mut c, &format!("{}/cri/slow:1", proxy.addr))
        .await
        .unwrap();
    let reqs = proxy.blob_requests(&slow.layers[0].digest);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let resumed_at: u64 = reqs[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    assert!(
        resumed_at > 0,
        "the restarted pull resumed with Range: {reqs:?}"
    );
    drop(c);
    let mut daemon = daemon;
    assert_eq!(daemon.stop(), Some(0));
    let mnt = dir.path().join("mnt");
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(&daemon.root)
        .args(["-n", "k8s.io", "mount", &kept_ref])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mnt.join("data.bin").is_file());
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(&daemon.root)
        .args(["-n", "k8s.io", "unmount"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = kept;
}

/// An image of one empty layer (an empty tar: 1024 zero bytes) whose config
/// differs only by a nonce label, pushed byte for byte; returns its id.
async fn push_nonce_image(reg: &Registry, repo: &str, tag: &str, nonce: u32) -> String {
    let layer = reg
        .push_blob(repo, &[0u8; 1024], hoist::images::OCI_LAYER)
        .await;
    let config = format!(
        "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{{\"Labels\":{{\"nonce\":\"{nonce}\"}}}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[\"{}\"]}}}}",
        diff_id(&[0u8; 1024])
    );
    let config = reg
        .push_blob(repo, config.as_bytes(), hoist::images::OCI_CONFIG)
        .await;
    let manifest = json!({
        "schemaVersion": 2, "mediaType": hoist::images::OCI_MANIFEST,
        "config": config, "layers": [layer],
    });
    reg.push_manifest(
        repo,
        tag,
        hoist::images::OCI_MANIFEST,
        manifest.to_string().as_bytes(),
    )
    .await;
    config.digest.to_string()
}

#[tokio::test]
async fn truncated_image_ids_as_root() {
    require_root!();
    let reg = Registry::start();
    // These two nonces give config digests that agree in their first twelve
    // hex digits (4209349a68a2) and differ in the thirteenth.
    let twin_a = push_nonce_image(&reg, "cri/twins", "a", 552163).await;
    let twin_b = push_nonce_image(&reg, "cri/twins", "b", 8033312).await;
    assert_eq!(&twin_a[..19], "sha256:4209349a68a2", "{twin_a}");
    assert_eq!(&twin_b[..19], "sha256:4209349a68a2", "{twin_b}");
    assert_ne!(twin_a[..20], twin_b[..20]);
    let dir = common::mounts::TempRoot::new();
    let daemon = Daemon::start(
        &dir.path().join("root"),
        &dir.path().join("hoist.sock"),
        &[],
    );
    let mut c = daemon.client().await;
    for tag in ["a", "b"] {
        pull(&mut c, &format!("{}/cri/twins:{tag}", reg.addr))
            .await
            .unwrap();
    }
    let hex_a = twin_a.trim_start_matches("sha256:");
    let hex_b = twin_b.trim_start_matches("sha256:");

    // A unique prefix, bare or with its algorithm, is the image.
    for q in [&hex_a[..13], &twin_a[..20], &hex_a[..40]] {
        let image = status(&mut c, q, false).await.image;
        assert_eq!(image.map(|i| i.id).as_deref(), Some(twin_a.as_str()), "{q}");
    }
    assert_eq!(
        status(&mut c, &hex_b[..13], false)
            .await
            .image
            .map(|i| i.id),
        Some(twin_b.clone())
    );
    // Eleven digits are a name, and no image has it; nor any prefix.
    assert!(status(&mut c, &hex_a[..11], false).await.image.is_none());
    assert!(status(&mut c, "ffffffffffff", false).await.image.is_none());

    // The shared twelve digits name no one image: an error naming both.
    for q in [&hex_a[..12], &twin_a[..19]] {
        let err = c
            .image_status(ImageStatusRequest {
                image: spec(q),
                verbose: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{q}: {err:?}");
        assert!(
            err.message().contains(&twin_a) && err.message().contains(&twin_b),
            "{}",
            err.message()
        );
        let err = c
            .remove_image(RemoveImageRequest { image: spec(q) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{q}: {err:?}");
    }
    assert_eq!(list(&mut c, None).await.len(), 2, "nothing was removed");

    // Removal by a unique prefix; then the shorter prefix is unique too.
    c.remove_image(RemoveImageRequest {
        image: spec(&hex_a[..13]),
    })
    .await
    .unwrap();
    assert!(status(&mut c, &twin_a, false).await.image.is_none());
    assert_eq!(
        status(&mut c, &hex_a[..12], false)
            .await
            .image
            .map(|i| i.id),
        Some(twin_b.clone())
    );
    c.remove_image(RemoveImageRequest {
        image: spec(&twin_b[..19]),
    })
    .await
    .unwrap();
    assert!(list(&mut c, None).await.is_empty());
}
