//! The proxy's rules over a real store (the native backend, so no mounts):
//! what containerd sees, remote snapshots, ownership, holds and GC. The
//! same paths over the socket, with overlay mounts, are in
//! `e2e/containerd_snapshots.rs`.

use super::*;
use crate::metadata::leases::Resource;

struct Fixture {
    db: Arc<Db>,
    root: Arc<SnapshotRoot>,
    proxy: SnapshotProxy,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("db");
    let root = crate::snapshot::open(&db, Some("native")).expect("snapshotter");
    let proxy = SnapshotProxy::new(db.clone(), &root).expect("proxy");
    Fixture {
        db,
        root,
        proxy,
        _dir: dir,
    }
}

impl Fixture {
    /// hoist's own handle on `k8s.io`, as its unpacks use it.
    fn hoist(&self) -> Snapshots {
        self.root.namespace(NAMESPACE_CRI)
    }

    /// A layer as hoist's unpack commits it: named by a chain ID.
    fn hoist_layer(&self, seed: &str, parent: Option<&str>) -> String {
        let name = Digest::of(seed.as_bytes()).to_string();
        let key = format!("extract-{seed}");
        let s = self.hoist();
        s.prepare(&key, parent, Labels::new()).expect("prepare");
        let (fs, _) = s.apply_dirs(&key).expect("apply dirs");
        std::fs::write(fs.join(seed), seed).expect("write");
        s.commit(&name, &key, Labels::new()).expect("commit");
        name
    }

    /// Stands for an image of hoist's that keeps `layer`.
    fn keep_as_image(&self, layer: &str) {
        self.db
            .create_lease(NAMESPACE_CRI, "image", Labels::new())
            .expect("lease");
        let res = Resource::snapshot(self.root.name(), layer);
        self.db
            .add_lease_resource(NAMESPACE_CRI, "image", &res)
            .expect("hold");
    }

    fn remove_image(&self) {
        self.db
            .delete_lease(NAMESPACE_CRI, "image")
            .expect("delete lease");
    }

    fn exists(&self, key: &str) -> bool {
        match self.hoist().stat(key) {
            Ok(_) => true,
            Err(Error::NotFound(_)) => false,
            Err(e) => panic!("stat {key}: {e}"),
        }
    }

    fn names(&self, filters: &[String]) -> Vec<String> {
        self.proxy
            .list(filters)
            .expect("list")
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    fn resources(&self, lease: &str) -> Vec<String> {
        self.db
            .lease_resources(NAMESPACE_CRI, lease)
            .expect("resources")
            .into_iter()
            .map(|r| r.id)
            .collect()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The filter containerd's metadata store sends after an AlreadyExists:
/// the target unquoted, the parent as Go's `%q` writes it.
fn containerd_lookup(target: &str, parent: &str) -> Vec<String> {
    vec![format!(
        r#"labels."containerd.io/snapshot.ref"=={target},parent=={parent:?}"#
    )]
}

#[test]
fn hoist_layers_carry_their_chain_label_and_its_work_in_progress_stays_hidden() {
    let f = fixture();
    let c0 = f.hoist_layer("base", None);
    f.hoist()
        .prepare("extract-busy", Some(&c0), Labels::new())
        .expect("prepare");
    f.hoist()
        .view("hoist-mount", Some(&c0), Labels::new())
        .expect("view");

    assert_eq!(f.names(&[]), vec![c0.clone()]);
    let info = f.proxy.stat(&c0).expect("stat");
    assert_eq!(info.labels.get(LABEL_SNAPSHOT_REF), Some(&c0));
    assert_eq!((info.kind, info.parent), (Kind::Committed, None));
    // Synthesized, never stored.
    assert!(f.hoist().stat(&c0).expect("stat").labels.is_empty());

    for key in ["extract-busy", "hoist-mount"] {
        let not_found = |r: Result<()>| matches!(r, Err(Error::NotFound(_)));
        assert!(not_found(f.proxy.stat(key).map(drop)), "{key}");
        assert!(not_found(f.proxy.mounts(key).map(drop)), "{key}");
        assert!(not_found(f.proxy.usage(key).map(drop)), "{key}");
        assert!(not_found(f.proxy.remove(key)), "{key}");
        assert!(not_found(f.proxy.commit("k8s.io/9/x", key, Labels::new())));
        let info = Info {
            labels: labels(&[("a", "b")]),
            ..f.hoist().stat(key).expect("stat")
        };
        assert!(not_found(f.proxy.update(info, &[]).map(drop)), "{key}");
        assert!(f.exists(key), "{key} is hoist's and stays");
    }
    assert!(matches!(
        f.proxy.commit("k8s.io/9/x", &c0, Labels::new()),
        Err(Error::FailedPrecondition(_))
    ));

    // containerd may label a layer it uses; the chain label stays.
    let update = Info {
        labels: labels(&[("containerd.io/snapshot/x", "1")]),
        ..f.proxy.stat(&c0).expect("stat")
    };
    let updated = f
        .proxy
        .update(update, &["labels.containerd.io/snapshot/x"])
        .expect("update");
    assert_eq!(updated.labels.get(LABEL_SNAPSHOT_REF), Some(&c0));
    assert_eq!(
        updated
            .labels
            .get("containerd.io/snapshot/x")
            .map(String::as_str),
        Some("1")
    );
}

#[test]
fn a_prepare_naming_a_hoist_layer_adopts_it_until_containerd_removes_it() {
    let f = fixture();
    let c0 = f.hoist_layer("base", None);
    let c1 = f.hoist_layer("top", Some(&c0));
    f.keep_as_image(&c1);

    // Removing a layer containerd never held changes nothing.
    f.proxy.remove(&c1).expect("remove of an unheld layer");
    f.proxy.cleanup().expect("cleanup");
    assert!(f.exists(&c1));

    let ref_to = |target: &str| labels(&[(LABEL_SNAPSHOT_REF, target)]);
    let r = f
        .proxy
        .create(Kind::Active, "k8s.io/1/extract c0", None, ref_to(&c0));
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    assert_eq!(f.names(&containerd_lookup(&c0, "")), vec![c0.clone()]);
    let r = f
        .proxy
        .create(Kind::Active, "k8s.io/2/extract c1", Some(&c0), ref_to(&c1));
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    let found = f.proxy.list(&containerd_lookup(&c1, &c0)).expect("list");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, c1);
    assert_eq!(found[0].parent.as_deref(), Some(c0.as_str()));
    assert_eq!(found[0].labels.get(LABEL_SNAPSHOT_REF), Some(&c1));
    assert!(
        f.proxy
            .list(&containerd_lookup(&c1, ""))
            .expect("list")
            .is_empty()
    );
    let mut held = f.resources(LEASE_HELD);
    held.sort();
    let mut want = vec![c0.clone(), c1.clone()];
    want.sort();
    assert_eq!(held, want);

    // On another parent the layer is not hoist's: containerd applies it.
    f.proxy
        .create(Kind::Active, "k8s.io/3/extract c1", None, ref_to(&c1))
        .expect("a fresh snapshot to apply into");
    f.proxy.remove("k8s.io/3/extract c1").expect("remove");
    assert!(!f.exists("k8s.io/3/extract c1"));

    // A container's layer on top, then hoist's image goes.
    f.proxy
        .create(Kind::Active, "k8s.io/4/ctr", Some(&c1), Labels::new())
        .expect("container snapshot");
    f.remove_image();
    f.proxy.cleanup().expect("cleanup");
    assert!(f.exists(&c0) && f.exists(&c1) && f.exists("k8s.io/4/ctr"));

    f.proxy.remove("k8s.io/4/ctr").expect("remove container");
    assert!(!f.exists("k8s.io/4/ctr"));
    f.proxy.remove(&c1).expect("drop the hold");
    assert!(f.exists(&c1), "hoist's GC decides when the layer goes");
    f.proxy.cleanup().expect("cleanup");
    assert!(!f.exists(&c1));
    assert!(f.exists(&c0), "still held");
    f.proxy.remove(&c0).expect("drop the hold");
    f.proxy.cleanup().expect("cleanup");
    assert!(!f.exists(&c0));
    assert!(matches!(f.proxy.remove(&c0), Err(Error::NotFound(_))));
    assert!(f.resources(LEASE_HELD).is_empty());
    assert!(f.resources(LEASE_OWNED).is_empty());
}

#[test]
fn what_containerd_makes_is_kept_from_gc_until_it_removes_it() {
    let f = fixture();
    f.proxy
        .create(Kind::Active, "k8s.io/1/a", None, labels(&[("x", "1")]))
        .expect("prepare");
    f.proxy
        .commit("k8s.io/2/c", "k8s.io/1/a", labels(&[("l", "1")]))
        .expect("commit");
    f.proxy
        .create(Kind::View, "k8s.io/3/v", Some("k8s.io/2/c"), Labels::new())
        .expect("view");
    f.proxy
        .create(
            Kind::Active,
            "k8s.io/4/b",
            Some("k8s.io/2/c"),
            Labels::new(),
        )
        .expect("prepare");
    f.proxy.cleanup().expect("cleanup");
    for key in ["k8s.io/2/c", "k8s.io/3/v", "k8s.io/4/b"] {
        assert!(f.exists(key), "{key}");
    }
    let c = f.proxy.stat("k8s.io/2/c").expect("stat");
    assert_eq!(c.kind, Kind::Committed);
    assert_eq!(c.labels, labels(&[("l", "1")]));
    assert!(matches!(
        f.proxy.stat("k8s.io/1/a"),
        Err(Error::NotFound(_))
    ));

    let names = |filter: &str| {
        let mut n = f.names(&[filter.to_string()]);
        n.sort();
        n
    };
    assert_eq!(names("kind==view"), vec!["k8s.io/3/v"]);
    assert_eq!(
        names("parent==k8s.io/2/c"),
        vec!["k8s.io/3/v", "k8s.io/4/b"]
    );
    assert_eq!(names(r#"parent!="""#), vec!["k8s.io/3/v", "k8s.io/4/b"]);
    assert_eq!(names("name==k8s.io/2/c,labels.l==1"), vec!["k8s.io/2/c"]);
    assert!(names("name==k8s.io/2/c,labels.l==2").is_empty());
    assert!(matches!(
        f.proxy.list(&[r#"labels."open"#.to_string()]),
        Err(Error::InvalidArgument(_))
    ));

    assert!(matches!(
        f.proxy.remove("k8s.io/2/c"),
        Err(Error::FailedPrecondition(_))
    ));
    for key in ["k8s.io/3/v", "k8s.io/4/b", "k8s.io/2/c"] {
        f.proxy.remove(key).expect("remove");
        assert!(!f.exists(key), "{key}");
    }
    assert!(f.resources(LEASE_OWNED).is_empty());
}

#[test]
fn names_of_hoist_layers_are_refused() {
    let f = fixture();
    let chain = Digest::of(b"x").to_string();
    assert!(matches!(
        f.proxy.create(Kind::Active, &chain, None, Labels::new()),
        Err(Error::InvalidArgument(_))
    ));
    f.proxy
        .create(Kind::Active, "k8s.io/1/a", None, Labels::new())
        .expect("prepare");
    assert!(matches!(
        f.proxy.commit(&chain, "k8s.io/1/a", Labels::new()),
        Err(Error::InvalidArgument(_))
    ));
    assert!(!f.exists(&chain));
}

#[test]
fn cleanup_forgets_snapshots_that_are_gone() {
    let f = fixture();
    f.proxy
        .create(Kind::Active, "k8s.io/1/a", None, Labels::new())
        .expect("prepare");
    f.proxy
        .create(Kind::Active, "k8s.io/2/b", None, Labels::new())
        .expect("prepare");
    // As a crash between the removal and the lease update leaves it.
    f.hoist().remove("k8s.io/1/a").expect("remove");
    assert_eq!(f.resources(LEASE_OWNED).len(), 2);
    f.proxy.cleanup().expect("cleanup");
    assert_eq!(f.resources(LEASE_OWNED), vec!["k8s.io/2/b"]);
    assert!(f.exists("k8s.io/2/b"));
}

#[test]
fn filters_see_fields_as_containerd_names_them() {
    let info = |parent: Option<&str>| Info {
        kind: Kind::Committed,
        name: "sha256:aa".into(),
        parent: parent.map(str::to_string),
        labels: labels(&[(LABEL_SNAPSHOT_REF, "sha256:aa"), ("a.b", "c")]),
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
    };
    let cases = [
        (
            r#"labels."containerd.io/snapshot.ref"==sha256:aa,parent=="""#,
            None,
            true,
        ),
        (
            r#"labels."containerd.io/snapshot.ref"==sha256:aa,parent=="""#,
            Some("p"),
            false,
        ),
        (r#"parent=="sha256:p""#, Some("sha256:p"), true),
        (r#"parent!="""#, None, false),
        ("kind==committed", None, true),
        ("kind==Committed", None, false),
        ("labels.a.b==c", None, true),
        ("labels", None, false),
        ("name==sha256:aa", None, true),
    ];
    for (filter, parent, want) in cases {
        let f = Filter::parse(filter).expect("filter");
        assert_eq!(
            f.matches(&Fields(&info(parent))),
            want,
            "{filter} {parent:?}"
        );
    }
}
