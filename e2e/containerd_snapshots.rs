//! containerd's snapshots API end to end: `hoist serve` as a subprocess, a
//! tonic client of the generated stubs on its `snapshotter_socket`, and
//! overlay mounts made from the mounts it answers. The remote-snapshot path
//! runs over layers hoist pulled itself through its CRI socket, as containerd
//! would meet them.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::*;
use daemon::{Daemon, spec};
use hoist::containerd::api::services::snapshots::v1 as pb;
use hoist::containerd::api::types::Mount as PbMount;
use hoist::mount::Mount;
use k8s_cri::v1::{PullImageRequest, RemoveImageRequest};
use pb::snapshots_client::SnapshotsClient;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tonic::Code;
use tonic::transport::Channel;

const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

async fn connect(socket: &Path) -> SnapshotsClient<Channel> {
    SnapshotsClient::new(hoist::grpc_unix::connect(socket).await.unwrap())
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn mounts(m: Vec<PbMount>) -> Vec<Mount> {
    m.into_iter()
        .map(|m| Mount {
            fstype: m.r#type,
            source: m.source,
            options: m.options,
        })
        .collect()
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        key: key.into(),
        parent: parent.into(),
        labels,
        ..Default::default()
    })
    .await
    .map(|r| mounts(r.into_inner().mounts))
}

async fn view(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Vec<Mount> {
    let r = c
        .view(pb::ViewSnapshotRequest {
            key: key.into(),
            parent: parent.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    mounts(r.into_inner().mounts)
}

async fn commit(
    c: &mut SnapshotsClient<Channel>,
    name: &str,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        name: name.into(),
        key: key.into(),
        labels,
        ..Default::default()
    })
    .await
    .map(drop)
}

async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        key: key.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().info.unwrap())
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        key: key.into(),
        ..Default::default()
    })
    .await
    .map(drop)
}

async fn cleanup(c: &mut SnapshotsClient<Channel>) {
    c.cleanup(pb::CleanupRequest::default()).await.unwrap();
}

async fn usage(c: &mut SnapshotsClient<Channel>, key: &str) -> pb::UsageResponse {
    c.usage(pb::UsageRequest {
        key: key.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn list(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<Vec<pb::Info>, tonic::Status> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            filters: filters.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.info);
    }
    Ok(out)
}

async fn names(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<String> {
    let mut n: Vec<String> = list(c, filters)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    n.sort();
    n
}

/// The filter containerd's metadata store sends after AlreadyExists: the
/// target bare, the parent quoted as Go's `%q` quotes it.
fn containerd_lookup(target: &str, parent: &str) -> String {
    format!(r#"labels."containerd.io/snapshot.ref"=={target},parent=={parent:?}"#)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("an error").code()
}

/// The value of overlay option `name` (`lowerdir`, `upperdir`, ...).
fn option<'a>(m: &'a Mount, name: &str) -> &'a str {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in {m:?}"))
}

/// The snapshot directory (`<root>/snapshots/overlayfs/<id>`) of a tree.
fn snapshot_dir(tree: &str) -> PathBuf {
    let p = Path::new(tree);
    assert!(p.is_absolute(), "{tree}");
    p.parent().unwrap().to_path_buf()
}

struct Mounted(PathBuf);

impl Mounted {
    fn new(dir: &Path, m: &[Mount]) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        hoist::mount::mount_all(m, dir).unwrap_or_else(|e| panic!("mount {m:?}: {e}"));
        Mounted(dir.to_path_buf())
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.0.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = hoist::mount::unmount_all(&self.0);
    }
}

fn start(dir: &Path) -> Daemon {
    Daemon::start(
        &dir.join("root"),
        &dir.join("hoist.sock"),
        &["--snapshotter", "overlayfs"],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_lifecycle_over_the_socket_as_root() {
    require_root!();
    let dir = common::mounts::TempRoot::new();
    let d = start(dir.path());
    let mode = std::fs::metadata(&d.snapshots_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = connect(&d.snapshots_socket).await;
    let snapshots = d.root.join("snapshots/overlayfs");

    // A layer applied through the mounts it is given, then committed.
    let m = prepare(&mut c, "k8s.io/1/base", "", labels(&[("a", "1")]))
        .await
        .unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].fstype, "bind");
    let base_dir = snapshot_dir(&m[0].source);
    assert!(base_dir.starts_with(&snapshots), "{base_dir:?}");
    {
        let mnt = Mounted::new(&dir.path().join("mnt-base"), &m);
        std::fs::write(mnt.0.join("base.txt"), "base").unwrap();
    }
    let active = stat(&mut c, "k8s.io/1/base").await.unwrap();
    assert_eq!(active.kind, pb::Kind::Active as i32);
    commit(
        &mut c,
        "k8s.io/2/base",
        "k8s.io/1/base",
        labels(&[("a", "1")]),
    )
    .await
    .unwrap();
    let base = stat(&mut c, "k8s.io/2/base").await.unwrap();
    assert_eq!(base.kind, pb::Kind::Committed as i32);
    assert_eq!(
        (base.parent.as_str(), base.labels.clone()),
        ("", labels(&[("a", "1")]))
    );
    assert!(base.created_at.is_some() && base.updated_at.is_some());
    assert_eq!(code(stat(&mut c, "k8s.io/1/base").await), Code::NotFound);

    // A writable layer on top: an overlay with absolute directories.
    let m = prepare(&mut c, "k8s.io/3/rw", "k8s.io/2/base", HashMap::new())
        .await
        .unwrap();
    assert_eq!((m.len(), m[0].fstype.as_str()), (1, "overlay"));
    assert_eq!(
        Path::new(option(&m[0], "lowerdir")),
        base_dir.join("fs").as_path()
    );
    let upper = option(&m[0], "upperdir").to_string();
    let rw_dir = snapshot_dir(&upper);
    assert!(rw_dir.starts_with(&snapshots));
    assert!(Path::new(option(&m[0], "workdir")).starts_with(&rw_dir));
    {
        let mnt = Mounted::new(&dir.path().join("mnt-rw"), &m);
        assert_eq!(mnt.read("base.txt"), "base");
        std::fs::write(mnt.0.join("top.txt"), "top").unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(Path::new(&upper).join("top.txt")).unwrap(),
        "top"
    );
    let again = c
        .mounts(pb::MountsRequest {
            key: "k8s.io/3/rw".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts(again), m);
    let u = usage(&mut c, "k8s.io/3/rw").await;
    assert!(u.size > 0 && u.inodes >= 2, "{u:?}");
    commit(&mut c, "k8s.io/4/top", "k8s.io/3/rw", HashMap::new())
        .await
        .unwrap();
    let u = usage(&mut c, "k8s.io/4/top").await;
    assert!(u.size > 0 && u.inodes >= 2, "{u:?}");

    // A view of both layers is read-only.
    let m = view(&mut c, "k8s.io/5/view", "k8s.io/4/top").await;
    {
        let mnt = Mounted::new(&dir.path().join("mnt-view"), &m);
        assert_eq!(
            (mnt.read("base.txt"), mnt.read("top.txt")),
            ("base".into(), "top".into())
        );
        assert!(std::fs::write(mnt.0.join("new.txt"), "x").is_err());
    }

    // Labels change; nothing else may.
    let updated = c
        .update(pb::UpdateSnapshotRequest {
            info: Some(pb::Info {
                name: "k8s.io/4/top".into(),
                labels: labels(&[("b", "2"), ("c", "3")]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.b".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels, labels(&[("b", "2")]));
    let time = |t: Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos));
    assert!(time(updated.updated_at) > time(updated.created_at));
    let parent_change = c
        .update(pb::UpdateSnapshotRequest {
            info: Some(pb::Info {
                name: "k8s.io/4/top".into(),
                parent: "elsewhere".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(parent_change), Code::InvalidArgument);
    assert_eq!(
        stat(&mut c, "k8s.io/4/top").await.unwrap().labels,
        labels(&[("b", "2")])
    );

    // Lists in containerd's filter syntax.
    assert_eq!(
        names(&mut c, &[]).await,
        vec!["k8s.io/2/base", "k8s.io/4/top", "k8s.io/5/view"]
    );
    assert_eq!(names(&mut c, &["kind==view"]).await, vec!["k8s.io/5/view"]);
    assert_eq!(
        names(&mut c, &[r#"parent=="k8s.io/2/base""#]).await,
        vec!["k8s.io/4/top"]
    );
    assert_eq!(
        names(&mut c, &["kind==committed,labels.b==2"]).await,
        vec!["k8s.io/4/top"]
    );
    assert_eq!(
        names(&mut c, &["labels.a", "kind==view"]).await,
        vec!["k8s.io/2/base", "k8s.io/5/view"]
    );
    assert!(names(&mut c, &["labels.b==3"]).await.is_empty());
    assert_eq!(
        code(list(&mut c, &[r#"labels."open"#]).await),
        Code::InvalidArgument
    );

    // containerd's errdefs codes.
    let dup = prepare(&mut c, "k8s.io/5/view", "", HashMap::new()).await;
    assert_eq!(code(dup), Code::AlreadyExists);
    let orphan = prepare(&mut c, "k8s.io/6/x", "k8s.io/404", HashMap::new()).await;
    assert_eq!(code(orphan), Code::NotFound);
    let on_active = commit(&mut c, "k8s.io/7/x", "k8s.io/5/view", HashMap::new()).await;
    assert_eq!(code(on_active), Code::FailedPrecondition);
    assert_eq!(
        code(remove(&mut c, "k8s.io/2/base").await),
        Code::FailedPrecondition
    );
    let chain_name = hoist::digest::Digest::of(b"x").to_string();
    let reserved = prepare(&mut c, &chain_name, "", HashMap::new()).await;
    assert_eq!(code(reserved), Code::InvalidArgument);

    // Removal really removes what the client made, children first.
    for key in ["k8s.io/5/view", "k8s.io/4/top", "k8s.io/2/base"] {
        remove(&mut c, key).await.unwrap();
        assert_eq!(code(stat(&mut c, key).await), Code::NotFound, "{key}");
    }
    assert!(!rw_dir.exists() && !base_dir.exists());
    assert_eq!(code(remove(&mut c, "k8s.io/2/base").await), Code::NotFound);
    cleanup(&mut c).await;
    assert!(names(&mut c, &[]).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn hoist_pulled_layers_serve_as_remote_snapshots_as_root() {
    require_root!();
    let reg = Registry::start();
    let layers = [
        gzip_layer(&[("base.txt", b"base")]),
        gzip_layer(&[("top.txt", b"top")]),
    ];
    push_image(
        &reg,
        "snap/app",
        Some("v1"),
        &layers,
        ("linux", host_arch()),
        false,
    )
    .await;
    let chain = hoist::images::chain_ids(&[diff_id(&layers[0]), diff_id(&layers[1])]);
    let (c0, c1) = (chain[0].to_string(), chain[1].to_string());

    let dir = common::mounts::TempRoot::new();
    let d = start(dir.path());
    let image = format!("{}/snap/app:v1", reg.addr);
    let mut cri = d.client().await;
    cri.pull_image(PullImageRequest {
        image: spec(&image),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = connect(&d.snapshots_socket).await;

    // hoist's layers show with the label containerd looks them up by.
    let info = stat(&mut c, &c1).await.unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(info.parent, c0);
    assert_eq!(info.labels.get(SNAPSHOT_REF), Some(&c1));

    // containerd's unpack of the same image: each Prepare is answered
    // AlreadyExists, and its lookup finds the layer on the right parent.
    let ref_to = |target: &str| {
        labels(&[
            (SNAPSHOT_REF, target),
            ("containerd.io/snapshot/cri.image-ref", image.as_str()),
        ])
    };
    let first = prepare(
        &mut c,
        &format!("k8s.io/10/extract-1 {c0}"),
        "",
        ref_to(&c0),
    )
    .await;
    assert_eq!(code(first), Code::AlreadyExists);
    let found = list(&mut c, &[&containerd_lookup(&c0, "")]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].name.as_str(), found[0].parent.as_str()),
        (c0.as_str(), "")
    );
    assert_eq!(found[0].labels.get(SNAPSHOT_REF), Some(&c0));
    let second = prepare(
        &mut c,
        &format!("k8s.io/11/extract-2 {c1}"),
        &c0,
        ref_to(&c1),
    )
    .await;
    assert_eq!(code(second), Code::AlreadyExists);
    let found = list(&mut c, &[&containerd_lookup(&c1, &c0)]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].name.as_str(), found[0].parent.as_str()),
        (c1.as_str(), c0.as_str())
    );
    assert!(
        list(&mut c, &[&containerd_lookup(&c1, "")])
            .await
            .unwrap()
            .is_empty()
    );

    // A container's writable layer on top: hoist's directories as lowers.
    let m = prepare(&mut c, "k8s.io/12/ctr", &c1, HashMap::new())
        .await
        .unwrap();
    assert_eq!((m.len(), m[0].fstype.as_str()), (1, "overlay"));
    let lowers: Vec<PathBuf> = option(&m[0], "lowerdir")
        .split(':')
        .map(PathBuf::from)
        .collect();
    assert_eq!(lowers.len(), 2);
    let snapshots = d.root.join("snapshots/overlayfs");
    for l in &lowers {
        assert!(l.is_absolute() && l.starts_with(&snapshots), "{l:?}");
    }
    assert!(lowers[0].join("top.txt").is_file() && lowers[1].join("base.txt").is_file());
    let ctr_dir = snapshot_dir(option(&m[0], "upperdir"));
    {
        let mnt = Mounted::new(&dir.path().join("rootfs"), &m);
        assert_eq!(
            (mnt.read("base.txt"), mnt.read("top.txt")),
            ("base".into(), "top".into())
        );
        std::fs::write(mnt.0.join("log"), "written by the container").unwrap();
    }

    // hoist removes the image; containerd's holds keep the layers.
    cri.remove_image(RemoveImageRequest {
        image: spec(&image),
    })
    .await
    .unwrap();
    cleanup(&mut c).await;
    for (layer, dir) in [(&c0, &lowers[1]), (&c1, &lowers[0])] {
        assert!(stat(&mut c, layer).await.is_ok(), "{layer}");
        assert!(dir.is_dir(), "{dir:?}");
    }

    // containerd removes what it made, then lets go of the layers.
    remove(&mut c, "k8s.io/12/ctr").await.unwrap();
    assert!(!ctr_dir.exists());
    remove(&mut c, &c1).await.unwrap();
    assert!(
        stat(&mut c, &c1).await.is_ok(),
        "hoist's GC decides when it goes"
    );
    cleanup(&mut c).await;
    assert_eq!(code(stat(&mut c, &c1).await), Code::NotFound);
    assert!(!lowers[0].exists());
    assert!(lowers[1].is_dir(), "the base layer is still held");
    remove(&mut c, &c0).await.unwrap();
    cleanup(&mut c).await;
    assert_eq!(code(stat(&mut c, &c0).await), Code::NotFound);
    assert!(!lowers[1].exists());
    assert!(names(&mut c, &[]).await.is_empty());
}
