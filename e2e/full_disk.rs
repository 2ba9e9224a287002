//! A full disk, as root: hoist's root on a small filesystem of its own (a
//! loop-mounted file, ext4, and xfs where xfsprogs is installed) with a
//! ballast file leaving too little room for an image, pulled two ways:
//! one whose layer download fills the disk, and one whose blobs fit but
//! whose unpack does not. Each pull must fail naming what it was writing
//! and `No space left on device`, record no image, leave an image pulled
//! before mountable and the root checking clean; and once the ballast is
//! gone, the same pull must resume rather than start over.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use hoist::digest::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// What the ballast leaves free: less than either image needs.
const LEFT_FREE: u64 = 40 * MIB;
/// A layer of incompressible bytes: its download alone does not fit.
const RANDOM_LAYER: usize = 48 << 20;
/// Zeros that compress to almost nothing and unpack to more than is free.
const ZEROS: usize = 64 << 20;

/// A filesystem in a file, loop-mounted at `mnt` until dropped.
struct Fs {
    mnt: PathBuf,
    _dir: common::mounts::TempRoot,
}

impl Fs {
    /// `None` (saying why) when this machine cannot make one of `kind`,
    /// unless it is `required`.
    fn make(kind: &str, size: u64, required: bool) -> Option<Fs> {
        let mkfs = format!("mkfs.{kind}");
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(&mkfs).exists());
        if !found {
            assert!(!required, "{mkfs} is needed (apt-get install e2fsprogs)");
            eprintln!("skipped: {mkfs} is not installed (apt-get install xfsprogs)");
            return None;
        }
        let dir = common::mounts::TempRoot::new();
        let image = dir.path().join(format!("{kind}.img"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let args: &[&str] = match kind {
            // No blocks reserved for root: hoist runs as root, and the
            // ballast is measured against what root may use.
            "ext4" => &["-q", "-F", "-m", "0"],
            _ => &["-q", "-f"],
        };
        run(Command::new(&mkfs).args(args).arg(&image));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        Some(Fs { mnt, _dir: dir })
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        st.blocks_available() * st.fragment_size()
    }

    /// Fills the filesystem until `left` bytes are free.
    fn ballast(&self, left: u64) -> PathBuf {
        let path = self.mnt.join("ballast");
        let file = std::fs::File::create(&path).unwrap();
        let size = self.free().saturating_sub(left);
        nix::fcntl::posix_fallocate(&file, 0, size as i64).unwrap();
        file.sync_all().unwrap();
        path
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        // Lazily, so that a view a failed test left mounted does not keep
        // the loop device (or the test's temporary directory) around.
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pull(root: &Path, reference: &str) -> (bool, String) {
    hoist_cli(
        root,
        &[
            "pull",
            "--hosts-dir",
            "/nonexistent",
            "--snapshotter",
            "overlayfs",
            reference,
        ],
    )
}

/// Pushes a one-layer image; returns the layer's digest.
async fn push(reg: &Registry, repo: &str, layer: &[u8], media_type: &str) -> Digest {
    let desc = reg.push_blob(repo, layer, media_type).await;
    let config = serde_json::json!({
        "architecture": host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id(layer).to_string()]},
    });
    push_manifest_over(
        reg,
        repo,
        Some("1"),
        false,
        &config,
        std::slice::from_ref(&desc),
    )
    .await;
    desc.digest
}

/// The registry's answers to GETs of `digest` (status, bytes sent) among
/// the access log lines after the first `skip`.
fn blob_gets(log: &str, skip: usize, digest: &Digest) -> Vec<(u16, u64)> {
    let needle = format!("/blobs/{digest} ");
    log.lines()
        .skip(skip)
        .filter(|l| l.contains("\"GET ") && l.contains(&needle))
        .filter_map(|l| {
            // `... "GET /v2/... HTTP/1.1" 206 1234 "referer" "agent"`
            let rest = l.split("HTTP/1.1\" ").nth(1)?;
            let mut fields = rest.split_whitespace();
            let status = fields.next()?.parse().ok()?;
            let bytes = fields.next()?.parse().unwrap_or(0);
            Some((status, bytes))
        })
        .collect()
}

/// Which way the disk fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    /// The layer's download does not fit.
    Download,
    /// The blobs fit; the unpacked tree does not.
    Unpack,
}

async fn full_disk(kind: &str, case: Case) {
    let Some(fs) = Fs::make(kind, 320 * MIB, kind == "ext4") else {
        return;
    };
    let reg = Registry::start_logged();
    push(
        &reg,
        "fulldisk/small",
        &gzip_layer(&[("hello.txt", b"still here")]),
        hoist::images::OCI_LAYER_GZIP,
    )
    .await;
    let layer = match case {
        Case::Download => {
            // Incompressible bytes, sent as an uncompressed tar: the blob is
            // as large as what it unpacks to.
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let bytes: Vec<u8> = (0..RANDOM_LAYER)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let tar = tar_layer(&[Entry::File("random.bin", &bytes)]);
            push(&reg, "fulldisk/big", &tar, hoist::images::OCI_LAYER).await
        }
        Case::Unpack => {
            let zeros = gzip_layer(&[("zeros.bin", &vec![0u8; ZEROS])]);
            assert!(zeros.len() < 1 << 20, "zeros compress");
            push(&reg, "fulldisk/big", &zeros, hoist::images::OCI_LAYER_GZIP).await
        }
    };
    let root = fs.mnt.join("root");
    let small = format!("{}/fulldisk/small:1", reg.addr);
    let big = format!("{}/fulldisk/big:1", reg.addr);
    let (pulled, text) = pull(&root, &small);
    assert!(pulled, "{text}");

    let ballast = fs.ballast(LEFT_FREE);
    let (pulled, text) = pull(&root, &big);
    assert!(!pulled, "{kind} {case:?}: the pull cannot fit: {text}");
    assert!(
        text.contains("No space left on device"),
        "{kind} {case:?}: ENOSPC said as such: {text}"
    );
    let error = text
        .lines()
        .find(|l| l.starts_with("hoist: "))
        .unwrap_or_default();
    eprintln!("{kind} {case:?}: {error}");
    // What was being written: the layer, in a file under the root.
    assert!(
        error.contains(&layer.to_string()) && error.contains(&root.display().to_string()),
        "{kind} {case:?}: the error names the layer and the path: {error}"
    );
    match case {
        Case::Download => assert!(
            error.contains("writing ingest") || error.contains("applying layer"),
            "{kind}: {error}"
        ),
        Case::Unpack => assert!(
            error.contains(&format!("applying layer {layer} into {}", root.display())),
            "{kind}: {error}"
        ),
    }

    // Nothing half-recorded; what was there before is whole.
    let images = hoist_ok(&root, &["images", "-q"]);
    assert!(images.contains(&small), "{images}");
    assert!(!images.contains(&big), "{kind} {case:?}: {images}");
    let view = common::mounts::TempRoot::new();
    let view_dir = view.path().join("small");
    let mount_small = || {
        let (mounted, text) = hoist_cli(&root, &["mount", &small, view_dir.to_str().unwrap()]);
        if mounted {
            let hello = std::fs::read_to_string(view_dir.join("hello.txt"));
            hoist_ok(&root, &["unmount", view_dir.to_str().unwrap()]);
            assert_eq!(hello.ok().as_deref(), Some("still here"), "{kind} {case:?}");
        }
        (mounted, text)
    };
    // A view needs a directory under the root: where the filesystem keeps
    // no reserve for root (xfs), that waits for space, and says why.
    let (mounted_full, text) = mount_small();
    assert!(
        mounted_full || text.contains("No space left on device"),
        "{kind} {case:?}: {text}"
    );
    let (clean, report) = hoist_cli(&root, &["check"]);
    assert!(clean, "{kind} {case:?}: check after the failure: {report}");

    // Room again: the other image mounts, and the same pull picks up where
    // it stopped.
    std::fs::remove_file(&ballast).unwrap();
    if !mounted_full {
        let (mounted, text) = mount_small();
        assert!(mounted, "{kind} {case:?}: {text}");
    }
    let before = reg.access_log().lines().count();
    let (pulled, text) = pull(&root, &big);
    assert!(pulled, "{kind} {case:?}: after freeing space: {text}");
    let gets = blob_gets(&reg.access_log(), before, &layer);
    match case {
        Case::Download => {
            let fetched: u64 = gets.iter().map(|(_, n)| n).sum();
            assert!(
                !gets.is_empty() && gets.iter().all(|(status, _)| *status == 206),
                "{kind}: the download resumed with a range: {gets:?}"
            );
            assert!(
                fetched < RANDOM_LAYER as u64,
                "{kind}: {fetched} bytes fetched again of a {RANDOM_LAYER}-byte layer"
            );
        }
        Case::Unpack => assert!(
            gets.is_empty(),
            "{kind}: the stored layer is not fetched again: {gets:?}"
        ),
    }
    let images = hoist_ok(&root, &["images", "-q"]);
    assert!(images.contains(&big), "{images}");
    let (clean, report) = hoist_cli(&root, &["check"]);
    assert!(clean, "{kind} {case:?}: check after the retry: {report}");
}

#[tokio::test]
async fn ext4_a_download_that_fills_the_disk_as_root() {
    require_root!();
    full_disk("ext4", Case::Download).await;
}

#[tokio::test]
async fn ext4_an_unpack_that_fills_the_disk_as_root() {
    require_root!();
    full_disk("ext4", Case::Unpack).await;
}

#[tokio::test]
async fn xfs_a_download_that_fills_the_disk_as_root() {
    require_root!();
    full_disk("xfs", Case::Download).await;
}

#[tokio::test]
async fn xfs_an_unpack_that_fills_the_disk_as_root() {
    require_root!();
    full_disk("xfs", Case::Unpack).await;
}
