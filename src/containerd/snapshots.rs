//! containerd's `containerd.services.snapshots.v1.Snapshots` over hoist's
//! snapshotter, in the CRI namespace `k8s.io` (whatever namespace the
//! client names: containerd's keys carry their own).
//!
//! Keys are used verbatim. containerd's metadata store names every backend
//! snapshot `<namespace>/<sequence>/<key>`, which never meets the chain IDs
//! (`sha256:<hex>`) hoist names its committed layers by; names of that form
//! are refused to clients, so a chain ID always means hoist's own layer.
//!
//! What a client sees: the snapshots it made through this API (*owned*) and
//! hoist's committed layers, each labelled `containerd.io/snapshot.ref=<its
//! chain ID>` so that containerd's remote-snapshot lookup finds it. hoist's
//! unpacks in progress and its views stay hidden: containerd's GC removes
//! every backend snapshot it does not know of.
//!
//! Ownership and holds are the resources of two leases that never expire,
//! which hoist's GC already treats as roots, which containerd never sees
//! (unlike a label, which containerd would copy into its own records and
//! could replace with an Update), and which the store adds in the same
//! transaction that makes, commits or finds the snapshot, so no collection
//! falls between the two:
//! - [`LEASE_OWNED`]: what Prepare, View and Commit made. Remove really
//!   removes it (containerd removes what it made itself).
//! - [`LEASE_HELD`]: hoist's layers containerd adopted: a Prepare or View
//!   labelled `containerd.io/snapshot.ref=<chain ID>` whose chain hoist holds
//!   committed on the requested parent is answered AlreadyExists, so
//!   containerd records the layer without fetching or applying it. Remove
//!   drops only the hold; hoist's GC removes the layer once neither an image
//!   of hoist's nor a hold keeps it.

use super::api::services::snapshots::v1 as pb;
use super::api::types::Mount as PbMount;
use crate::cri::errors::{internal, snapshot_status};
use crate::digest::Digest;
use crate::filters::{Adaptor, Filter};
use crate::metadata::gc::GcReport;
use crate::metadata::leases::Resource;
use crate::metadata::{Db, Labels, NAMESPACE_CRI};
use crate::mount::Mount;
use crate::snapshot::{Error, Info, Kind, Result, SnapshotRoot, Snapshots, Snapshotter, Usage};
use rusqlite::params;
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;
use tonic::{Request, Response, Status};

/// The label containerd puts on a layer's snapshot: its chain ID.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// The lease whose resources are the snapshots containerd made.
pub const LEASE_OWNED: &str = "hoist.io/containerd.owned";
/// The lease whose resources are hoist's layers containerd holds.
pub const LEASE_HELD: &str = "hoist.io/containerd.held";
/// Infos per List message, as containerd's own server sends them.
const LIST_BATCH: usize = 100;

/// The snapshots API's rules over hoist's store; every call blocks.
pub struct SnapshotProxy {
    db: Arc<Db>,
    all: Snapshots,
    owned: Snapshots,
    held: Snapshots,
}

/// Whether `name` is of the form hoist names its committed layers by.
fn is_chain_name(name: &str) -> bool {
    name.parse::<Digest>().is_ok()
}

fn refuse_chain_name(name: &str) -> Result<()> {
    if is_chain_name(name) {
        return Err(Error::InvalidArgument(format!(
            "{name:?}: names of the form sha256:<hex> are hoist's layers"
        )));
    }
    Ok(())
}

/// `info` as a client sees it: hoist's layers carry their chain ID label.
fn expose(mut info: Info, owned: bool) -> Info {
    if !owned && info.kind == Kind::Committed && is_chain_name(&info.name) {
        info.labels
            .entry(LABEL_SNAPSHOT_REF.to_string())
            .or_insert_with(|| info.name.clone());
    }
    info
}

/// The fields containerd's snapshot filters see: kinds in lower case, a
/// parent always present (empty for none), a label key may hold dots.
struct Fields<'a>(&'a Info);

impl Adaptor for Fields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let info = self.0;
        match path {
            [f] if f == "kind" => Some(info.kind.as_str().to_ascii_lowercase()),
            [f] if f == "name" => Some(info.name.clone()),
            [f] if f == "parent" => Some(info.parent.clone().unwrap_or_default()),
            [f, key @ ..] if f == "labels" && !key.is_empty() => {
                info.labels.get(&key.join(".")).cloned()
            }
            _ => None,
        }
    }
}

impl SnapshotProxy {
    pub fn new(db: Arc<Db>, root: &Arc<SnapshotRoot>) -> Result<Self> {
        // containerd mounts these paths from its own working directory.
        if !root.path().is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "snapshot root {} is not absolute",
                root.path().display()
            )));
        }
        for lease in [LEASE_OWNED, LEASE_HELD] {
            match db.create_lease(NAMESPACE_CRI, lease, Labels::new()) {
                Ok(_) | Err(crate::metadata::Error::AlreadyExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let all = root.namespace(NAMESPACE_CRI);
        Ok(SnapshotProxy {
            owned: all.with_lease(LEASE_OWNED),
            held: all.with_lease(LEASE_HELD),
            all,
            db,
        })
    }

    fn resource_kind(&self) -> String {
        Resource::snapshot(self.all.name(), "").kind
    }

    /// Whether `lease` has snapshot `key`.
    fn has(&self, lease: &str, key: &str) -> Result<bool> {
        let kind = self.resource_kind();
        self.db.transaction(|tx| {
            Ok(crate::metadata::exists(
                tx,
                "SELECT 1 FROM lease_resources
                 WHERE namespace = ?1 AND lease = ?2 AND kind = ?3 AND resource = ?4",
                params![NAMESPACE_CRI, lease, kind, key],
            )?)
        })
    }

    fn owned_keys(&self) -> Result<HashSet<String>> {
        let kind = self.resource_kind();
        Ok(self
            .db
            .lease_resources(NAMESPACE_CRI, LEASE_OWNED)?
            .into_iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.id)
            .collect())
    }

    /// `key` and whether containerd owns it; NotFound for what it cannot see.
    fn visible(&self, key: &str) -> Result<(Info, bool)> {
        let info = self.all.stat(key)?;
        let owned = self.has(LEASE_OWNED, key)?;
        if owned || info.kind == Kind::Committed {
            Ok((info, owned))
        } else {
            Err(Error::NotFound(key.to_string()))
        }
    }

    /// Prepare (`Active`) or View.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        refuse_chain_name(key)?;
        if let Some(target) = labels.get(LABEL_SNAPSHOT_REF)
            && self.adopt(target, parent)?
        {
            return Err(Error::AlreadyExists(format!("target snapshot {target:?}")));
        }
        match kind {
            Kind::View => self.owned.view(key, parent, labels),
            Kind::Active | Kind::Committed => self.owned.prepare(key, parent, labels),
        }
    }

    /// Holds hoist's layer `target` for containerd if it is committed on
    /// `parent`; false if hoist has no such layer.
    fn adopt(&self, target: &str, parent: Option<&str>) -> Result<bool> {
        if !is_chain_name(target) {
            return Ok(false);
        }
        match self.all.stat(target) {
            Ok(info) if info.kind == Kind::Committed && info.parent.as_deref() == parent => {
                // False if GC took it since the stat: then it is prepared anew.
                self.held.hold_committed(target)
            }
            Ok(_) | Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        refuse_chain_name(name)?;
        if !self.has(LEASE_OWNED, key)? {
            let (info, _) = self.visible(key)?;
            return Err(Error::FailedPrecondition(format!(
                "cannot commit {key:?}: it is {}, not Active",
                info.kind.as_str()
            )));
        }
        self.owned.commit(name, key, labels)
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        if self.has(LEASE_OWNED, key)? {
            self.all.remove(key)?;
            let res = Resource::snapshot(self.all.name(), key);
            return Ok(self
                .db
                .remove_lease_resource(NAMESPACE_CRI, LEASE_OWNED, &res)?);
        }
        self.visible(key)?;
        // hoist's layer: containerd lets go of it; hoist's GC decides when
        // it goes (and containerd's GC removing a layer it never held is a
        // no-op, not an error it would stop on).
        let res = Resource::snapshot(self.all.name(), key);
        Ok(self
            .db
            .remove_lease_resource(NAMESPACE_CRI, LEASE_HELD, &res)?)
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let (info, owned) = self.visible(key)?;
        Ok(expose(info, owned))
    }

    pub fn update(&self, info: Info, fieldpaths: &[&str]) -> Result<Info> {
        let (_, owned) = self.visible(&info.name)?;
        Ok(expose(self.all.update(info, fieldpaths)?, owned))
    }

    pub fn usage(&self, key: &str) -> Result<Usage> {
        self.visible(key)?;
        self.all.usage(key)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.visible(key)?;
        self.all.mounts(key)
    }

    /// What matches any of `filters` (containerd's syntax), oldest first.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter =
            Filter::parse_all(filters).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let owned = self.owned_keys()?;
        let mut out = Vec::new();
        self.all.walk(&Filter::default(), &mut |info| {
            let is_owned = owned.contains(&info.name);
            if is_owned || info.kind == Kind::Committed {
                let info = expose(info, is_owned);
                if filter.matches(&Fields(&info)) {
                    out.push(info);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Drops holds and ownerships whose snapshot is gone (a crash between a
    /// removal and its lease update), then runs hoist's garbage collection:
    /// containerd calls this after its own GC removed snapshots.
    pub fn cleanup(&self) -> Result<GcReport> {
        let kind = self.resource_kind();
        let snapshotter = self.all.name().to_string();
        self.db.transaction(|tx| {
            tx.execute(
                "DELETE FROM lease_resources
                 WHERE namespace = ?1 AND lease IN (?2, ?3) AND kind = ?4
                   AND resource NOT IN
                       (SELECT key FROM snapshots WHERE snapshotter = ?5 AND namespace = ?1)",
                params![NAMESPACE_CRI, LEASE_OWNED, LEASE_HELD, kind, snapshotter],
            )
        })?;
        crate::snapshot::garbage_collect(&self.db)
    }
}

fn parent(p: &str) -> Option<&str> {
    (!p.is_empty()).then_some(p)
}

fn to_pb_mounts(mounts: Vec<Mount>) -> Vec<PbMount> {
    mounts
        .into_iter()
        .map(|m| PbMount {
            r#type: m.fstype,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn to_pb_info(info: Info) -> pb::Info {
    let kind = match info.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: kind as i32,
        created_at: Some(info.created_at.into()),
        updated_at: Some(info.updated_at.into()),
        labels: info.labels.into_iter().collect(),
    }
}

/// The tonic service: each RPC runs its [`SnapshotProxy`] call on a blocking
/// thread.
#[derive(Clone)]
pub struct Service {
    proxy: Arc<SnapshotProxy>,
}

/// The snapshots API's routes, for [`crate::cri::server::serve`].
pub fn routes(proxy: SnapshotProxy) -> tonic::service::Routes {
    tonic::service::Routes::new(
        super::api::services::snapshots::v1::snapshots_server::SnapshotsServer::new(Service::new(
            proxy,
        )),
    )
}

impl Service {
    pub fn new(proxy: SnapshotProxy) -> Self {
        Service {
            proxy: Arc::new(proxy),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        rpc: &'static str,
        key: &str,
        f: impl FnOnce(&SnapshotProxy) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let proxy = self.proxy.clone();
        let result = tokio::task::spawn_blocking(move || f(&proxy))
            .await
            .map_err(internal)?;
        result.map_err(|e| {
            let status = snapshot_status(&e);
            // NotFound and AlreadyExists are how containerd asks questions.
            match status.code() {
                tonic::Code::Internal | tonic::Code::Unknown => {
                    tracing::warn!(rpc, key, error = %e, "snapshot RPC failed")
                }
                code => tracing::debug!(rpc, key, ?code, error = %e, "snapshot RPC refused"),
            }
            status
        })
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .run("Prepare", &key, move |p| {
                let labels = r.labels.into_iter().collect();
                p.create(Kind::Active, &r.key, parent(&r.parent), labels)
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: to_pb_mounts(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .run("View", &key, move |p| {
                let labels = r.labels.into_iter().collect();
                p.create(Kind::View, &r.key, parent(&r.parent), labels)
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: to_pb_mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        let mounts = self.run("Mounts", &key, move |p| p.mounts(&k)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: to_pb_mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        self.run("Commit", &key, move |p| {
            p.commit(&r.name, &r.key, r.labels.into_iter().collect())
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        self.run("Remove", &key, move |p| p.remove(&k)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        let info = self.run("Stat", &key, move |p| p.stat(&k)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb_info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let info = self
            .run("Update", &key, move |p| {
                let info = r.info.ok_or_else(|| {
                    Error::InvalidArgument("an update needs the snapshot's info".to_string())
                })?;
                let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
                let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
                // Only the name and labels are read; the rest is immutable.
                let info = Info {
                    kind: Kind::Active,
                    name: info.name,
                    parent: None,
                    labels: info.labels.into_iter().collect(),
                    created_at: SystemTime::UNIX_EPOCH,
                    updated_at: SystemTime::UNIX_EPOCH,
                };
                p.update(info, &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb_info(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        let what = filters.join(" or ");
        let infos = self.run("List", &what, move |p| p.list(&filters)).await?;
        let mut batches = Vec::new();
        let mut infos = infos.into_iter().map(to_pb_info).peekable();
        while infos.peek().is_some() {
            let info = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        let usage = self.run("Usage", &key, move |p| p.usage(&k)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(usage.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(usage.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let report = self.run("Cleanup", "", |p| p.cleanup()).await?;
        tracing::info!(
            snapshots_removed = report.snapshots_removed,
            bytes_freed = report.bytes_freed,
            "containerd's cleanup ran hoist's garbage collection"
        );
        Ok(Response::new(()))
    }
}

#[cfg(test)]
#[path = "snapshots_tests.rs"]
mod tests;
