//! Fetch from a real registry: references, platforms, GC labels, shared
//! blobs, resume with Range, faults between hoist and the registry, damaged
//! blobs, and the `hoist` command line.

mod common;

use common::proxy::{Fault, Proxy};
use common::*;
use hoist::content::Store;
use hoist::filters::Filter;
use hoist::metadata::Db;
use hoist::pull::progress::{Progress, State};
use hoist::pull::{PullOptions, Puller};
use hoist::remote::{RangedFetch, RegistryClient, RemoteOptions};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

const NS: &str = "default";

fn puller(root: &std::path::Path, timeout: Duration) -> Arc<Puller> {
    puller_with(root, timeout, RangedFetch::default())
}

fn puller_with(root: &std::path::Path, timeout: Duration, ranged: RangedFetch) -> Arc<Puller> {
    let db = Db::open(root).unwrap();
    let remote = RemoteOptions {
        progress_timeout: timeout,
        attempts: 4,
        ranged,
        ..Default::default()
    };
    Puller::new(db, RegistryClient::new(remote), 3, None)
}

/// A gzip layer of `size` pseudo-random (so barely compressible) bytes.
/// Pulls with default options and no progress display.
async fn pull(p: &Arc<Puller>, reference: &str) -> hoist::pull::Result<hoist::pull::Pulled> {
    p.pull(NS, reference, &PullOptions::default(), &Progress::default())
        .await
}

fn digests_in(db: &Arc<Db>) -> Vec<String> {
    let mut out = Vec::new();
    db.content_store(NS)
        .walk(&Filter::default(), &mut |i| {
            out.push(i.digest.to_string());
            Ok(())
        })
        .unwrap();
    out.sort();
    out
}

/// After a failed pull and GC, nothing of it remains.
fn assert_no_trace(db: &Arc<Db>) {
    db.garbage_collect(&[]).unwrap();
    assert!(digests_in(db).is_empty(), "{:?}", digests_in(db));
    assert!(db.local_content().blobs().unwrap().is_empty());
    assert!(db.local_content().ingests().unwrap().is_empty());
    assert!(db.leases(NS).unwrap().is_empty());
}

#[tokio::test]
async fn multi_platform_index_by_tag_digest_and_untagged() {
    let reg = Registry::start();
    let host = push_image(
        &reg,
        "multi/app",
        None,
        &[random_layer(1, 3000), random_layer(2, 5000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let other = push_image(
        &reg,
        "multi/app",
        None,
        &[random_layer(3, 4000)],
        ("linux", other_arch()),
        true,
    )
    .await;
    let index = push_index(
        &reg,
        "multi/app",
        "v1",
        &[
            (&host, ("linux", host_arch())),
            (&other, ("linux", other_arch())),
        ],
    )
    .await;
    push_index(
        &reg,
        "multi/app",
        "latest",
        &[(&host, ("linux", host_arch()))],
    )
    .await;

    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(30));
    let progress = Progress::default();
    let r = format!("{}/multi/app:v1", reg.addr);
    let pulled = p
        .pull(NS, &r, &PullOptions::default(), &progress)
        .await
        .unwrap();
    assert_eq!(pulled.target.digest, index.digest);
    assert_eq!(pulled.name, format!("{}/multi/app:v1", reg.addr));
    assert_eq!(pulled.manifests.len(), 1);
    assert_eq!(pulled.manifests[0].manifest.digest, host.manifest.digest);
    let db = p.db();
    let mut want: Vec<String> = [
        &index,
        &host.manifest,
        &host.config,
        &host.layers[0],
        &host.layers[1],
    ]
    .iter()
    .map(|d| d.digest.to_string())
    .collect();
    want.sort();
    assert_eq!(digests_in(db), want, "only this platform, no attestation");

    // GC labels as containerd writes them.
    let store = db.content_store(NS);
    let idx = store.info(&index.digest).unwrap().labels;
    assert_eq!(
        idx["containerd.io/gc.ref.content.m.0"],
        host.manifest.digest.to_string()
    );
    assert_eq!(
        idx[&format!("containerd.io/distribution.source.{}", reg.addr)],
        "multi/app"
    );
    let m = store.info(&host.manifest.digest).unwrap().labels;
    assert_eq!(
        m["containerd.io/gc.ref.content.config"],
        host.config.digest.to_string()
    );
    assert_eq!(
        m["containerd.io/gc.ref.content.l.0"],
        host.layers[0].digest.to_string()
    );
    assert_eq!(
        m["containerd.io/gc.ref.content.l.1"],
        host.layers[1].digest.to_string()
    );
    let l = store.info(&host.layers[1].digest).unwrap().labels;
    assert_eq!(
        l[&format!("containerd.io/distribution.source.{}", reg.addr)],
        "multi/app"
    );
    assert!(
        db.leases(NS).unwrap().is_empty(),
        "the pull lease is released"
    );

    // Every platform, then by digest, then untagged (latest).
    let all = PullOptions {
        all_platforms: true,
        ..Default::default()
    };
    let pulled = p.pull(NS, &r, &all, &progress).await.unwrap();
    assert_eq!(pulled.manifests.len(), 2);
    assert!(store.info(&other.layers[0].digest).is_ok());
    let by_digest = format!("{}/multi/app@{}", reg.addr, index.digest);
    let pulled = p
        .pull(NS, &by_digest, &PullOptions::default(), &progress)
        .await
        .unwrap();
    assert_eq!(pulled.name, by_digest);
    let pulled = p
        .pull(
            NS,
            &format!("{}/multi/app", reg.addr),
            &PullOptions::default(),
            &progress,
        )
        .await
        .unwrap();
    assert_eq!(pulled.name, format!("{}/multi/app:latest", reg.addr));
    let platform = hoist::images::platform::parse(&format!("linux/{}", other_arch())).unwrap();
    let only_other = PullOptions {
        platforms: vec![platform],
        ..Default::default()
    };
    let pulled = p.pull(NS, &r, &only_other, &progress).await.unwrap();
    assert_eq!(pulled.manifests[0].manifest.digest, other.manifest.digest);
    let missing = hoist::images::platform::parse("linux/s390x").unwrap();
    let err = p
        .pull(
            NS,
            &r,
            &PullOptions {
                platforms: vec![missing],
                ..Default::default()
            },
            &progress,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("linux/s390x"), "{err}");

    // Removing every name lets GC take everything.
    for image in db.list_images(NS, &Filter::default()).unwrap() {
        db.delete_image(NS, &image.name).unwrap();
    }
    assert_no_trace(db);
}

#[tokio::test]
async fn a_blob_shared_by_two_images_is_fetched_once() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let shared = random_layer(7, 20_000);
    let a = push_image(
        &reg,
        "shared/a",
        Some("1"),
        &[shared.clone(), random_layer(8, 100)],
        ("linux", host_arch()),
        false,
    )
    .await;
    push_image(
        &reg,
        "shared/b",
        Some("1"),
        &[shared, random_layer(9, 100)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(30));
    let (pa, pb) = (Progress::default(), Progress::default());
    let (ra, rb) = (
        format!("{}/shared/a:1", proxy.addr),
        format!("{}/shared/b:1", proxy.addr),
    );
    let opts = PullOptions::default();
    let (x, y) = tokio::join!(p.pull(NS, &ra, &opts, &pa), p.pull(NS, &rb, &opts, &pb));
    x.unwrap();
    y.unwrap();
    assert_eq!(proxy.blob_requests(&a.layers[0].digest).len(), 1);
    let states: Vec<State> = [&pa, &pb]
        .iter()
        .filter_map(|p| {
            p.snapshot()
                .into_iter()
                .find(|e| e.key == format!("layer-{}", a.layers[0].digest))
                .map(|e| e.state)
        })
        .collect();
    assert!(
        states.contains(&State::Exists) && states.contains(&State::Done),
        "{states:?}"
    );
}

#[tokio::test]
async fn interrupted_blob_resumes_with_range() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let img = push_image(
        &reg,
        "resume/app",
        Some("1"),
        &[random_layer(5, 200_000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(30));
    proxy.target(&img.layers[0].digest);
    proxy.faults.lock().push(Fault::DropMidBlob);
    let r = format!("{}/resume/app:1", proxy.addr);
    pull(&p, &r).await.unwrap();
    let reqs = proxy.blob_requests(&img.layers[0].digest);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    let half = img.layers[0].size / 2;
    assert_eq!(
        reqs[1].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert!(p.db().content_store(NS).info(&img.layers[0].digest).is_ok());
}

#[tokio::test]
async fn a_dominant_layer_is_fetched_in_parallel_parts() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let img = push_image(
        &reg,
        "parts/app",
        Some("1"),
        &[random_layer(9, 3000), random_layer(10, 600_000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let big = img.layers[1].clone();
    let part = 64 << 10;
    let ranged = RangedFetch {
        part_size: part,
        parts_at_once: 3,
    };
    let r = format!("{}/parts/app:1", proxy.addr);
    proxy.target(&big.digest);
    // The first part is cut off halfway and resumes within its range.
    proxy.faults.lock().push(Fault::DropMidBlob);
    let dir = common::mounts::TempRoot::new();
    let p = puller_with(dir.path(), Duration::from_secs(30), ranged);
    pull(&p, &r).await.unwrap();
    let mut blob = p.db().content_store(NS).reader_at(&big.digest).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut blob, &mut got).unwrap();
    assert_eq!(hoist::digest::Digest::of(&got), big.digest);
    // Every part once, by a bounded range (the last open-ended), plus the
    // resume of the cut part inside its own range.
    let mut asked: Vec<String> = proxy
        .blob_requests(&big.digest)
        .into_iter()
        .map(|r| r.range.unwrap_or_default())
        .collect();
    asked.sort();
    let parts = big.size.div_ceil(part);
    let mut want: Vec<String> = (0..parts)
        .map(|i| match i + 1 == parts {
            true => format!("bytes={}-", i * part),
            false => format!("bytes={}-{}", i * part, (i + 1) * part - 1),
        })
        .collect();
    want.push(format!("bytes={}-{}", part / 2, part - 1));
    want.sort();
    assert_eq!(asked, want);
    // The small layer is not split.
    let small = proxy.blob_requests(&img.layers[0].digest);
    assert_eq!(small.len(), 1);
    assert_eq!(small[0].range, None);

    // A registry that answers a later part with the whole blob: only the
    // part is taken from it.
    proxy.seen.lock().clear();
    proxy
        .faults
        .lock()
        .extend([Fault::IgnoreRange, Fault::Pass]);
    let dir = common::mounts::TempRoot::new();
    let p = puller_with(dir.path(), Duration::from_secs(30), ranged);
    pull(&p, &r).await.unwrap();
    assert!(proxy.faults.lock().is_empty());
    assert!(p.db().content_store(NS).info(&big.digest).is_ok());
    assert_eq!(proxy.blob_requests(&big.digest).len() as u64, parts);

    // A registry that ignores the first part's range: one stream instead.
    proxy.seen.lock().clear();
    proxy.faults.lock().push(Fault::IgnoreRange);
    let dir = common::mounts::TempRoot::new();
    let p = puller_with(dir.path(), Duration::from_secs(30), ranged);
    pull(&p, &r).await.unwrap();
    assert!(p.db().content_store(NS).info(&big.digest).is_ok());
    assert_eq!(proxy.blob_requests(&big.digest).len(), 1);
}

#[tokio::test]
async fn resumes_an_ingest_left_by_an_earlier_process() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let data = random_layer(6, 100_000);
    let img = push_image(
        &reg,
        "resume/old",
        Some("1"),
        std::slice::from_ref(&data),
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    {
        // An earlier pull wrote a third of the layer, then died.
        let db = Db::open(dir.path()).unwrap();
        let key = format!("layer-{}", img.layers[0].digest);
        let mut w = db
            .content_store(NS)
            .writer(&key, Some(&img.layers[0]))
            .unwrap();
        w.write_all(&data[..30_000]).unwrap();
    }
    let p = puller(dir.path(), Duration::from_secs(30));
    pull(&p, &format!("{}/resume/old:1", proxy.addr))
        .await
        .unwrap();
    let reqs = proxy.blob_requests(&img.layers[0].digest);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=30000-"));
}

#[tokio::test]
async fn faults_are_retried_until_the_blob_arrives() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let img = push_image(
        &reg,
        "faults/app",
        Some("1"),
        &[random_layer(4, 50_000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    proxy.target(&img.layers[0].digest);
    // A 500, a 429 with Retry-After, a connection dropped mid-blob, and a
    // resume whose Range is ignored (200 with the whole blob). Faults pop
    // from the end.
    proxy.faults.lock().extend([
        Fault::IgnoreRange,
        Fault::DropMidBlob,
        Fault::TooManyRequests,
        Fault::ServerError,
    ]);
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(30));
    pull(&p, &format!("{}/faults/app:1", proxy.addr))
        .await
        .unwrap();
    let store = p.db().content_store(NS);
    let mut blob = store.reader_at(&img.layers[0].digest).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut blob, &mut got).unwrap();
    assert_eq!(hoist::digest::Digest::of(&got), img.layers[0].digest);
    assert!(proxy.faults.lock().is_empty(), "every fault was hit");
    let reqs = proxy.blob_requests(&img.layers[0].digest);
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    assert!(
        reqs[3].range.is_some(),
        "the resume asked for a range: {reqs:?}"
    );
}

#[tokio::test]
async fn a_trickle_trips_the_progress_timeout_and_leaves_no_trace() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    push_image(
        &reg,
        "slow/app",
        Some("1"),
        &[random_layer(3, 10_000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    proxy.faults.lock().extend([Fault::Trickle, Fault::Trickle]);
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_millis(400));
    let err = pull(&p, &format!("{}/slow/app:1", proxy.addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no progress"), "{err}");
    assert_no_trace(p.db());
}

#[tokio::test]
async fn damaged_or_missing_blobs_fail_naming_the_digest() {
    let reg = Registry::start();
    let wrong = push_image(
        &reg,
        "bad/wrong",
        Some("1"),
        &[random_layer(11, 5000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let short = push_image(
        &reg,
        "bad/short",
        Some("1"),
        &[random_layer(12, 5000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let missing = push_image(
        &reg,
        "bad/missing",
        Some("1"),
        &[random_layer(13, 5000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    // Same length, other bytes.
    let path = reg.blob_data_path(&wrong.layers[0].digest);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let path = reg.blob_data_path(&short.layers[0].digest);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    std::fs::remove_file(reg.blob_data_path(&missing.layers[0].digest)).unwrap();

    for (repo, digest) in [
        ("bad/wrong", &wrong.layers[0].digest),
        ("bad/short", &short.layers[0].digest),
        ("bad/missing", &missing.layers[0].digest),
    ] {
        let dir = common::mounts::TempRoot::new();
        let p = puller(dir.path(), Duration::from_secs(10));
        let err = pull(&p, &format!("{}/{repo}:1", reg.addr))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(&digest.to_string()),
            "{repo}: {err}"
        );
        assert!(
            p.db()
                .list_images(NS, &Filter::default())
                .unwrap()
                .is_empty()
        );
        assert_no_trace(p.db());
    }
}

#[tokio::test]
async fn unknown_references_and_media_types_are_named() {
    let reg = Registry::start();
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(10));
    let err = pull(&p, &format!("{}/nothing/here:1", reg.addr))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            hoist::pull::Error::Remote(hoist::remote::Error::NotFound { .. })
        ),
        "{err}"
    );
    let err = p
        .pull(
            NS,
            "docker.io/Library/case",
            &PullOptions::default(),
            &Progress::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, hoist::pull::Error::Reference(_)), "{err}");
    // A manifest whose layer has a media type hoist does not know.
    let blob = reg
        .push_blob("odd/app", b"weird", "application/x-weird")
        .await;
    let config = serde_json::json!({});
    push_manifest_over(&reg, "odd/app", Some("1"), false, &config, &[blob]).await;
    let err = pull(&p, &format!("{}/odd/app:1", reg.addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("application/x-weird"), "{err}");
    assert_no_trace(p.db());
}

#[tokio::test]
async fn command_line_pull_images_rmi() {
    let reg = Registry::start();
    let img = push_image(
        &reg,
        "cli/app",
        Some("2"),
        &[random_layer(21, 1000)],
        ("linux", host_arch()),
        true,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let hoist = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--root")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "hoist {args:?}: {text}");
        text
    };
    let r = format!("{}/cli/app:2", reg.addr);
    let out = hoist(&["pull", "--hosts-dir", "/nonexistent", &r]);
    assert!(
        out.contains(&format!("layer-{}: done", img.layers[0].digest)),
        "{out}"
    );
    assert!(out.contains(&img.manifest.digest.to_string()), "{out}");
    let out = hoist(&["images"]);
    assert!(
        out.contains(&r) && out.contains(&img.manifest.digest.to_string()),
        "{out}"
    );
    let out = hoist(&["content", "ls", "-q"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    hoist(&["rmi", &r]);
    assert!(hoist(&["content", "ls", "-q"]).trim().is_empty());
    assert!(hoist(&["images", "-q"]).trim().is_empty());
}

#[tokio::test]
async fn basic_auth_with_the_registrys_htpasswd() {
    let reg =
        Registry::start_with_auth(Some(("alice", "s3cret"))).with_push_auth("alice", "s3cret");
    push_image(
        &reg,
        "private/app",
        Some("1"),
        &[random_layer(31, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let r = format!("{}/private/app:1", reg.addr);
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(10));
    let err = pull(&p, &r).await.unwrap_err();
    assert!(
        matches!(
            err,
            hoist::pull::Error::Remote(hoist::remote::Error::Denied { .. })
        ),
        "{err}"
    );
    let wrong = PullOptions {
        credentials: Some(hoist::remote::Credentials::from_user_flag("alice:nope")),
        ..Default::default()
    };
    let err = p
        .pull(NS, &r, &wrong, &Progress::default())
        .await
        .unwrap_err();
    assert!(
        !format!("{err} {err:?}").contains("nope"),
        "no secret in errors: {err:?}"
    );
    let right = PullOptions {
        credentials: Some(hoist::remote::Credentials::from_user_flag("alice:s3cret")),
        ..Default::default()
    };
    p.pull(NS, &r, &right, &Progress::default()).await.unwrap();
}

#[tokio::test]
async fn bearer_token_challenge_with_a_cached_token() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    push_image(
        &reg,
        "tok/app",
        Some("1"),
        &[random_layer(41, 1000), random_layer(42, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    proxy.require_bearer("bob", "pw");
    let r = format!("{}/tok/app:1", proxy.addr);
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(10));
    let err = pull(&p, &r).await.unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");
    let creds = PullOptions {
        credentials: Some(hoist::remote::Credentials::from_user_flag("bob:pw")),
        ..Default::default()
    };
    let before = proxy.token_requests();
    p.pull(NS, &r, &creds, &Progress::default()).await.unwrap();
    // One token serves the manifest, the config and both layers.
    assert_eq!(proxy.token_requests() - before, 1);
}

#[tokio::test]
async fn gzip_zstd_and_uncompressed_layers_are_fetched() {
    let reg = Registry::start();
    let mut layers = Vec::new();
    for (i, mt) in [
        hoist::images::OCI_LAYER_GZIP,
        hoist::images::OCI_LAYER_ZSTD,
        hoist::images::OCI_LAYER,
    ]
    .iter()
    .enumerate()
    {
        layers.push(
            reg.push_blob("mixed/app", &random_layer(50 + i as u8, 2000), mt)
                .await,
        );
    }
    let config = serde_json::json!({"os": "linux"});
    push_manifest_over(&reg, "mixed/app", Some("1"), false, &config, &layers).await;
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(10));
    let pulled = pull(&p, &format!("{}/mixed/app:1", reg.addr))
        .await
        .unwrap();
    assert_eq!(pulled.manifests[0].layers.len(), 3);
    for l in &layers {
        assert_eq!(
            p.db().content_store(NS).info(&l.digest).unwrap().size,
            l.size
        );
    }
}

#[tokio::test]
async fn platforms_pulled_one_after_another_all_survive_gc() {
    let reg = Registry::start();
    let host = push_image(
        &reg,
        "plat/app",
        None,
        &[random_layer(61, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let other = push_image(
        &reg,
        "plat/app",
        None,
        &[random_layer(62, 1000)],
        ("linux", other_arch()),
        false,
    )
    .await;
    push_index(
        &reg,
        "plat/app",
        "1",
        &[
            (&host, ("linux", host_arch())),
            (&other, ("linux", other_arch())),
        ],
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(10));
    let r = format!("{}/plat/app:1", reg.addr);
    let other_platform =
        hoist::images::platform::parse(&format!("linux/{}", other_arch())).unwrap();
    let first = PullOptions {
        platforms: vec![other_platform],
        ..Default::default()
    };
    p.pull(NS, &r, &first, &Progress::default()).await.unwrap();
    pull(&p, &r).await.unwrap();
    p.db().garbage_collect(&[]).unwrap();
    let store = p.db().content_store(NS);
    for d in [
        &host.manifest,
        &host.layers[0],
        &other.manifest,
        &other.layers[0],
    ] {
        assert!(store.info(&d.digest).is_ok(), "{} was collected", d.digest);
    }
}

/// A puller whose hosts come from `hosts_dir` and whose fallback
/// credentials from a docker `config.json`, if given.
fn puller_with_hosts(
    root: &std::path::Path,
    hosts_dir: &std::path::Path,
    docker_config: Option<std::path::PathBuf>,
) -> Arc<Puller> {
    let db = Db::open(root).unwrap();
    let remote = RemoteOptions {
        hosts: hoist::remote::HostsConfig::new(Some(hosts_dir.to_path_buf()), false),
        credentials: hoist::remote::CredentialSource {
            explicit: None,
            docker_config,
        },
        progress_timeout: Duration::from_secs(10),
        attempts: 2,
        ..Default::default()
    };
    Puller::new(db, RegistryClient::new(remote), 3, None)
}

#[tokio::test]
async fn credentials_go_only_to_the_host_their_server_address_names() {
    let reg =
        Registry::start_with_auth(Some(("alice", "s3cret"))).with_push_auth("alice", "s3cret");
    let img = push_image(
        &reg,
        "private/app",
        Some("1"),
        &[random_layer(51, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    // A mirror on another port that asks every client for a password.
    let mirror = common::trap::AuthTrap::start().await;
    let hosts = common::mounts::TempRoot::new();
    std::fs::create_dir_all(hosts.path().join(&reg.addr)).unwrap();
    std::fs::write(
        hosts.path().join(&reg.addr).join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr, mirror.addr
        ),
    )
    .unwrap();
    let r = format!("{}/private/app:1", reg.addr);
    let alice = || hoist::remote::Credentials::from_user_flag("alice:s3cret");

    // Scoped to the upstream (as kubelet's server_address does): the mirror
    // is asked anonymously, the upstream gets them.
    let dir = common::mounts::TempRoot::new();
    let p = puller_with_hosts(dir.path(), hosts.path(), None);
    let scoped = PullOptions {
        credentials: Some(alice().only_for_server_address(&format!("https://{}/v1/", reg.addr))),
        ..Default::default()
    };
    let pulled = p.pull(NS, &r, &scoped, &Progress::default()).await.unwrap();
    assert_eq!(pulled.manifests[0].manifest.digest, img.manifest.digest);
    assert!(mirror.requests() > 0, "the mirror was tried first");
    assert_eq!(mirror.authorizations(), Vec::<String>::new());

    // Scoped to the mirror: the upstream gets nothing and refuses.
    let dir = common::mounts::TempRoot::new();
    let p = puller_with_hosts(dir.path(), hosts.path(), None);
    let elsewhere = PullOptions {
        credentials: Some(alice().only_for_server_address(&format!("http://{}", mirror.addr))),
        ..Default::default()
    };
    let err = p
        .pull(NS, &r, &elsewhere, &Progress::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");
    assert_eq!(mirror.authorizations().len(), 1, "the mirror got its own");

    // A docker config.json entry for the upstream is not the mirror's either.
    let auth_dir = common::mounts::TempRoot::new();
    let config = auth_dir.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"auths": {{"{}": {{"username": "alice", "password": "s3cret"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let dir = common::mounts::TempRoot::new();
    let p = puller_with_hosts(dir.path(), hosts.path(), Some(config));
    pull(&p, &r).await.unwrap();
    assert_eq!(mirror.authorizations().len(), 1);

    // Without a server address they are for every host, mirrors included,
    // as containerd does.
    let dir = common::mounts::TempRoot::new();
    let p = puller_with_hosts(dir.path(), hosts.path(), None);
    let everywhere = PullOptions {
        credentials: Some(alice().only_for_server_address("")),
        ..Default::default()
    };
    p.pull(NS, &r, &everywhere, &Progress::default())
        .await
        .unwrap();
    assert!(mirror.authorizations().len() > 1);
    assert!(mirror.authorizations()[1].starts_with("Basic "));
}

#[tokio::test]
async fn index_entries_without_a_platform_come_last_and_configs_are_checked() {
    let reg = Registry::start();
    let repo = "plain/app";
    let native = push_image(
        &reg,
        repo,
        None,
        &[random_layer(61, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let unlabelled = push_image(
        &reg,
        repo,
        None,
        &[random_layer(62, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let foreign = push_image(
        &reg,
        repo,
        None,
        &[random_layer(63, 1000)],
        ("linux", other_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(10));
    let host = Some(("linux", host_arch()));
    let other = Some(("linux", other_arch()));

    // An entry without a platform passes, but one that matches comes first,
    // wherever it stands in the index.
    push_index_of(
        &reg,
        repo,
        "both",
        &[
            for_platform(&unlabelled.manifest, None),
            for_platform(&foreign.manifest, other),
            for_platform(&native.manifest, host),
        ],
    )
    .await;
    let pulled = pull(&p, &format!("{}/{repo}:both", reg.addr))
        .await
        .unwrap();
    assert_eq!(pulled.manifests.len(), 1);
    assert_eq!(pulled.manifests[0].manifest.digest, native.manifest.digest);

    // With no match by platform, the entry without one is taken.
    push_index_of(
        &reg,
        repo,
        "unlabelled",
        &[
            for_platform(&foreign.manifest, other),
            for_platform(&unlabelled.manifest, None),
        ],
    )
    .await;
    let pulled = pull(&p, &format!("{}/{repo}:unlabelled", reg.addr))
        .await
        .unwrap();
    assert_eq!(
        pulled.manifests[0].manifest.digest,
        unlabelled.manifest.digest
    );

    // Its config must then be for this platform: a foreign one fails,
    // naming the manifest, its config and both platforms, before any layer
    // is fetched.
    let claims = [
        (
            "wrong-unlabelled",
            vec![for_platform(&foreign.manifest, None)],
        ),
        ("wrong-claim", vec![for_platform(&foreign.manifest, host)]),
    ];
    for (tag, entries) in claims {
        push_index_of(&reg, repo, tag, &entries).await;
        let err = pull(&p, &format!("{}/{repo}:{tag}", reg.addr))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                hoist::pull::Error::Image(hoist::images::Error::ConfigPlatformMismatch { .. })
            ),
            "{tag}: {err:?}"
        );
        let message = err.to_string();
        for part in [
            foreign.manifest.digest.to_string(),
            foreign.config.digest.to_string(),
            format!("linux/{}", host_arch()),
            format!("linux/{}", other_arch()),
        ] {
            assert!(message.contains(&part), "{tag}: {part} not in {message}");
        }
        assert!(
            p.db()
                .content_store(NS)
                .info(&foreign.layers[0].digest)
                .is_err(),
            "{tag}: no layer of the foreign image is fetched"
        );
    }
}

/// A body that reads both as a manifest and as an index (CVE-2021-41190)
/// is refused, naming its digest, whether the registry serves it or the
/// store already holds it; nothing of it is kept and no image is recorded.
#[tokio::test]
async fn ambiguous_manifests_and_indexes_are_refused() {
    use hoist::images::{OCI_INDEX, OCI_MANIFEST};
    use serde_json::json;
    let reg = Registry::start();
    let repo = "ambiguous/app";
    let img = push_image(
        &reg,
        repo,
        None,
        &[random_layer(71, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let other = push_image(
        &reg,
        repo,
        None,
        &[random_layer(72, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    // The registry refuses to store such documents, so the proxy serves
    // them in its place; everything they point at is in the registry.
    let proxy = Proxy::start(reg.addr.clone()).await;
    let entry = for_platform(&other.manifest, Some(("linux", host_arch())));
    let cases = [
        // A manifest that lists another image's manifest too.
        (
            "manifest-with-manifests",
            OCI_MANIFEST,
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                   "config": img.config, "layers": img.layers, "manifests": [entry]}),
        ),
        // An index that has another image's config and layers too.
        (
            "index-with-layers",
            OCI_INDEX,
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry],
                   "config": img.config, "layers": img.layers}),
        ),
        // Served as an OCI manifest, declaring itself an index.
        (
            "declares-index",
            OCI_MANIFEST,
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
                   "config": img.config, "layers": img.layers}),
        ),
        // Both shapes, no mediaType, and a generic Content-Type: hoist
        // takes it for an index.
        (
            "undeclared",
            "application/json",
            json!({"schemaVersion": 2, "config": img.config, "layers": img.layers,
                   "manifests": [entry]}),
        ),
    ];
    let refused = |tag: &str, digest: &hoist::digest::Digest, err: hoist::pull::Error| {
        assert!(
            matches!(
                err,
                hoist::pull::Error::Image(hoist::images::Error::MediaTypeMismatch { .. })
            ),
            "{tag}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&digest.to_string()), "{tag}: {message}");
    };
    for (tag, content_type, body) in &cases {
        let body = body.to_string();
        let digest = hoist::digest::Digest::of(body.as_bytes());
        for object in [tag.to_string(), digest.to_string()] {
            proxy.serve_document(
                &format!("/v2/{repo}/manifests/{object}"),
                content_type,
                &body,
            );
        }
        let dir = common::mounts::TempRoot::new();
        let p = puller(dir.path(), Duration::from_secs(10));
        let err = pull(&p, &format!("{}/{repo}:{tag}", proxy.addr))
            .await
            .unwrap_err();
        refused(tag, &digest, err);
        assert!(
            p.db()
                .list_images(NS, &Filter::default())
                .unwrap()
                .is_empty(),
            "{tag}: no image is recorded"
        );
        assert_no_trace(p.db());
    }

    // Already in the store (put there before hoist checked), it is
    // refused as it is read back.
    let (tag, media_type, body) = &cases[0];
    let body = body.to_string();
    let desc = hoist::descriptor::Descriptor::new(
        *media_type,
        hoist::digest::Digest::of(body.as_bytes()),
        body.len() as u64,
    );
    let dir = common::mounts::TempRoot::new();
    let p = puller(dir.path(), Duration::from_secs(10));
    let store = p.db().content_store(NS);
    hoist::content::write_blob(&store, "seed", body.as_bytes(), &desc, Default::default()).unwrap();
    let progress = Progress::default();
    let err = p
        .pull(
            NS,
            &format!("{}/{repo}:{tag}", proxy.addr),
            &PullOptions::default(),
            &progress,
        )
        .await
        .unwrap_err();
    let key = format!("manifest-{}", desc.digest);
    assert_eq!(
        progress
            .snapshot()
            .into_iter()
            .find(|e| e.key == key)
            .map(|e| e.state),
        Some(State::Exists),
        "the manifest came from the store"
    );
    refused("stored", &desc.digest, err);
    assert!(
        p.db()
            .list_images(NS, &Filter::default())
            .unwrap()
            .is_empty()
    );
    assert_no_trace(p.db());
}
