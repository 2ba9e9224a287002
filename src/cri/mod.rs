//! The CRI v1 ImageService: a thin façade over the pull pipeline, image
//! records and garbage collection, in containerd's `k8s.io` namespace.

pub mod containerd;
pub mod errors;
pub mod records;
pub mod server;

use crate::activity::Activity;
use crate::metadata::{Db, NAMESPACE_CRI};
use crate::pull::progress::Progress;
use crate::pull::{PullOptions, Puller};
use crate::remote::Credentials;
use crate::snapshot::SnapshotRoot;
use errors::{ambiguous, internal, invalid, pull_status, record_status};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::*;
use parking_lot::Mutex;
use records::{ImageGroup, find, groups};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tonic::{Request, Response, Status};

type PullFuture = Shared<BoxFuture<'static, Result<String, Status>>>;

/// Pulls of one PullImage when removals of the image keep overlapping them.
const PULL_ATTEMPTS: usize = 3;

/// Pulls in flight by [`flight_key`].
type Flights = Mutex<HashMap<String, PullFuture>>;

/// A generation, the image groups read at it, and the count of image
/// changes (`Activity::image_changes`) they were read at.
type GroupCache = Mutex<(u64, Option<Arc<Vec<ImageGroup>>>, u64)>;

pub struct Service {
    puller: Arc<Puller>,
    db: Arc<Db>,
    snapshots: Arc<SnapshotRoot>,
    /// Normalised names of images that are never garbage: `pinned_images`.
    pinned: HashSet<String>,
    /// Identical pulls in flight share one.
    inflight: Arc<Flights>,
    /// The image groups as last read, with a generation that every pull
    /// and removal bumps, and the count of image changes of `activity`
    /// (which hoist's API makes too): a read that raced a change is not kept.
    cache: Arc<GroupCache>,
    /// Where pulls are listed in flight and announced.
    activity: Arc<Activity>,
    /// Where pulled images are published so that pods can run them.
    containerd: Option<Arc<containerd::Containerd>>,
}

impl Service {
    pub fn new(
        puller: Arc<Puller>,
        snapshots: Arc<SnapshotRoot>,
        pinned: &[String],
    ) -> Result<Self, crate::reference::ReferenceError> {
        let pinned = pinned
            .iter()
            .map(|p| crate::reference::Reference::parse(p).map(|r| r.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Service {
            db: puller.db().clone(),
            puller,
            snapshots,
            pinned,
            inflight: Arc::default(),
            cache: Arc::default(),
            activity: Activity::new(),
            containerd: None,
        })
    }

    /// Lists pulls in `activity` and reads image changes made elsewhere
    /// (through the `Db` it watches) from it.
    pub fn with_activity(mut self, activity: Arc<Activity>) -> Self {
        self.activity = activity;
        self
    }

    /// Publishes every CRI pull (and removal) to containerd as well.
    pub fn with_containerd(mut self, containerd: Arc<containerd::Containerd>) -> Self {
        self.containerd = Some(containerd);
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Arc<Db>) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(internal)
    }

    async fn groups(&self) -> Result<Arc<Vec<ImageGroup>>, Status> {
        let changes = self.activity.image_changes();
        let generation = {
            let cache = self.cache.lock();
            if let Some(g) = &cache.1
                && cache.2 == changes
            {
                return Ok(g.clone());
            }
            cache.0
        };
        let g = Arc::new(self.blocking(groups).await?.map_err(internal)?);
        let mut cache = self.cache.lock();
        if cache.0 == generation && self.activity.image_changes() == changes {
            cache.1 = Some(g.clone());
            cache.2 = changes;
        }
        Ok(g)
    }

    fn invalidate(&self) {
        invalidate(&self.cache);
    }

    fn to_cri(&self, g: &ImageGroup) -> Image {
        let pinned = g.names.iter().any(|n| self.pinned.contains(n));
        g.to_cri(pinned)
    }
}

fn invalidate(cache: &GroupCache) {
    let mut c = cache.lock();
    c.0 += 1;
    c.1 = None;
}

/// Runs one RPC's work and logs one line with its outcome and duration
/// (and never a secret: only the image name is logged).
async fn logged<T>(
    rpc: &str,
    image: &str,
    work: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let result = work.await;
    let code = result
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    crate::metrics::rpc_done(rpc, code, started.elapsed());
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match &result {
        Ok(_) => tracing::info!(rpc, image, duration_ms = ms, "ok"),
        Err(s) => {
            tracing::warn!(rpc, image, duration_ms = ms, code = ?s.code(), error = s.message(), "failed")
        }
    }
    result
}

fn credentials(auth: Option<AuthConfig>) -> Result<Option<Credentials>, Status> {
    let Some(a) = auth else { return Ok(None) };
    let c = Credentials::from_fields(
        &a.username,
        &a.password,
        &a.auth,
        &a.identity_token,
        &a.registry_token,
    )
    .map_err(invalid)?
    .only_for_server_address(&a.server_address);
    Ok((c != Credentials::Anonymous).then_some(c))
}

/// Pulls of one reference share a flight only with the same credentials.
fn flight_key(reference: &str, auth: &Option<AuthConfig>) -> String {
    let secret = auth
        .as_ref()
        .map(|a| {
            crate::digest::Digest::of(
                format!(
                    "{}\0{}\0{}\0{}\0{}",
                    a.username, a.password, a.auth, a.identity_token, a.registry_token
                )
                .as_bytes(),
            )
            .to_string()
        })
        .unwrap_or_default();
    format!("{reference}\0{secret}")
}

/// Joins the pull in flight under `key`, or starts `pull` as one. The pull
/// runs as its own task: callers that go away do not stall it (it holds blob
/// and chain locks), and daemon shutdown still cancels it. Its waiters get
/// its result, or `Internal` if it panicked.
fn join_flight<F>(
    inflight: &Arc<Flights>,
    cache: &Arc<GroupCache>,
    key: String,
    pull: impl FnOnce() -> F,
) -> PullFuture
where
    F: std::future::Future<Output = Result<String, Status>> + Send + 'static,
{
    let mut flights = inflight.lock();
    if let Some(flight) = flights.get(&key) {
        return flight.clone();
    }
    let pull = pull();
    let (task_inflight, task_cache, task_key) = (inflight.clone(), cache.clone(), key.clone());
    let task = tokio::spawn(async move {
        // Made in the task, not captured by it: a task refused at shutdown
        // is dropped inside `spawn`, while this thread holds `inflight`.
        let _landed = Landed {
            inflight: task_inflight,
            cache: task_cache,
            key: task_key,
        };
        pull.await
    });
    let flight = async move { task.await.map_err(internal)? }
        .boxed()
        .shared();
    flights.insert(key, flight.clone());
    flight
}

/// Ends a flight however its pull ends (done, failed, panicked, cancelled):
/// the key is freed for the next pull, and the image list is read afresh.
struct Landed {
    inflight: Arc<Flights>,
    cache: Arc<GroupCache>,
    key: String,
}

impl Drop for Landed {
    fn drop(&mut self) {
        self.inflight.lock().remove(&self.key);
        invalidate(&self.cache);
    }
}

#[tonic::async_trait]
impl ImageService for Service {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let query = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .unwrap_or_default();
        logged("ListImages", &query, async {
            let groups = self.groups().await?;
            let images = if query.is_empty() {
                groups.iter().map(|g| self.to_cri(g)).collect()
            } else {
                find(&groups, &query)
                    .map_err(|e| ambiguous(&e))?
                    .map(|g| vec![self.to_cri(g)])
                    .unwrap_or_default()
            };
            Ok(Response::new(ListImagesResponse { images }))
        })
        .await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let req = request.into_inner();
        let query = req.image.map(|s| s.image).unwrap_or_default();
        logged("ImageStatus", &query, async {
            let groups = self.groups().await?;
            // A missing image is an empty answer; an ambiguous id prefix is
            // an error, since it names no one image.
            let Some(group) = find(&groups, &query).map_err(|e| ambiguous(&e))?.cloned() else {
                return Ok(Response::new(ImageStatusResponse::default()));
            };
            let image = self.to_cri(&group);
            let mut info = HashMap::new();
            if req.verbose {
                let verbose = self
                    .blocking(move |db| records::verbose_info(db, &group))
                    .await?
                    .map_err(internal)?;
                info.insert("info".to_string(), verbose);
            }
            Ok(Response::new(ImageStatusResponse {
                image: Some(image),
                info,
            }))
        })
        .await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let req = request.into_inner();
        let name = req
            .image
            .as_ref()
            .map(|s| s.image.clone())
            .unwrap_or_default();
        logged("PullImage", &name, async {
            let reference = crate::reference::Reference::parse(&name)
                .map_err(invalid)?
                .to_string();
            let key = flight_key(&reference, &req.auth);
            let forwarded = (
                req.image.clone(),
                req.auth.clone(),
                req.sandbox_config.clone(),
            );
            let credentials = credentials(req.auth)?;
            let (puller, activity) = (self.puller.clone(), self.activity.clone());
            let flight = join_flight(&self.inflight, &self.cache, key, move || async move {
                let options = PullOptions {
                    credentials,
                    ..Default::default()
                };
                let (puller, activity, reference, options) =
                    (&puller, &activity, &reference, &options);
                again_while_removed(|| async move {
                    let progress = Arc::new(Progress::default());
                    let pulled = activity
                        .pull(puller, NAMESPACE_CRI, reference, options, progress)
                        .await
                        .map_err(|e| pull_status(&e))?;
                    record_pulled(puller.db(), pulled).await
                })
                .await
            });
            let image_ref = flight.await?;
            if let (Some(containerd), (Some(spec), auth, sandbox)) = (&self.containerd, forwarded) {
                containerd.publish(spec, auth, sandbox, &image_ref).await?;
            }
            Ok(Response::new(PullImageResponse { image_ref }))
        })
        .await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let query = request
            .into_inner()
            .image
            .map(|s| s.image)
            .unwrap_or_default();
        logged("RemoveImage", &query, async {
            let groups = self.groups().await?;
            if let Some(group) = find(&groups, &query).map_err(|e| ambiguous(&e))?.cloned() {
                // containerd first: its record goes, and with it (once its
                // GC runs) its hold on hoist's layers.
                if let Some(containerd) = &self.containerd {
                    containerd.remove(std::slice::from_ref(&group.id)).await?;
                }
                self.invalidate();
                self.blocking(move |db| -> Result<(), Status> {
                    for name in &group.names {
                        match db.delete_image(NAMESPACE_CRI, name) {
                            Ok(()) | Err(crate::metadata::Error::NotFound(_)) => {}
                            Err(e) => return Err(internal(e)),
                        }
                    }
                    crate::snapshot::garbage_collect(db).map_err(internal)?;
                    Ok(())
                })
                .await??;
                self.invalidate();
            }
            Ok(Response::new(RemoveImageResponse {}))
        })
        .await
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let snapshots = self.snapshots.clone();
        logged("ImageFsInfo", "", async {
            let usage = self
                .blocking(move |db| records::filesystem_usage(db, &snapshots))
                .await?
                .map_err(internal)?;
            let timestamp = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0);
            let fs = FilesystemUsage {
                timestamp,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: self.snapshots.path().display().to_string(),
                }),
                used_bytes: Some(UInt64Value { value: usage.size }),
                inodes_used: Some(UInt64Value {
                    value: usage.inodes,
                }),
            };
            Ok(Response::new(ImageFsInfoResponse {
                image_filesystems: vec![fs],
                container_filesystems: Vec::new(),
            }))
        })
        .await
    }
}

/// Runs `pull_and_record` again, a few times at most, while removals that
/// overlap it take what it fetched before it is recorded (its record then
/// fails `Aborted`: see `record_status`).
pub async fn again_while_removed<T, F>(mut pull_and_record: impl FnMut() -> F) -> Result<T, Status>
where
    F: std::future::Future<Output = Result<T, Status>>,
{
    let mut attempt = 1;
    loop {
        match pull_and_record().await {
            Err(s) if s.code() == tonic::Code::Aborted && attempt < PULL_ATTEMPTS => {
                tracing::info!(error = s.message(), attempt, "pulling again");
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Records a pulled image's CRI names and labels (off the async runtime);
/// its id.
async fn record_pulled(db: &Arc<Db>, pulled: crate::pull::Pulled) -> Result<String, Status> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || records::record(&db, &pulled))
        .await
        .map_err(internal)?
        .map_err(|e| record_status(&e))
}

/// Makes an image pulled into `k8s.io` some other way than CRI (through
/// hoist's own API, `hoist -n k8s.io pull`) what a CRI pull makes it: its
/// names and labels recorded, so kubelet sees it, and containerd told, so
/// pods can run it. Returns the image id.
pub async fn record_and_publish(
    db: &Arc<Db>,
    containerd: Option<&containerd::Containerd>,
    pulled: &crate::pull::Pulled,
    auth: Option<AuthConfig>,
) -> Result<String, Status> {
    let id = record_pulled(db, pulled.clone()).await?;
    if let Some(containerd) = containerd {
        let spec = ImageSpec {
            image: pulled.name.clone(),
            ..Default::default()
        };
        containerd.publish(spec, auth, None, &id).await?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn images_changed_by_another_caller_are_listed_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let snapshots = crate::snapshot::open(&db, Some("native")).expect("snapshots");
        let client = crate::remote::RegistryClient::new(Default::default());
        let puller = Puller::new(db.clone(), client, 1, None);
        let activity = Activity::new();
        assert!(activity.watch(&db));
        let service = Service::new(puller, snapshots, &[])
            .expect("service")
            .with_activity(activity);
        let listed = || async {
            let r = service.list_images(Request::new(ListImagesRequest::default()));
            r.await.expect("list").into_inner().images.len()
        };
        assert_eq!(listed().await, 0);
        // Recorded as CRI records images, but not by the CRI service: hoist's
        // API in k8s.io, say. The cached empty list must not hide it.
        let target = crate::descriptor::Descriptor::new(
            crate::images::OCI_MANIFEST,
            crate::digest::Digest::of(b"m"),
            1,
        );
        let mut image = crate::metadata::images::Image::new("docker.io/library/a:1", target);
        image.labels.insert(
            records::LABEL_ID.to_string(),
            crate::digest::Digest::of(b"c").to_string(),
        );
        db.put_image(NAMESPACE_CRI, image).expect("image");
        assert_eq!(listed().await, 1);
        db.delete_image(NAMESPACE_CRI, "docker.io/library/a:1")
            .expect("delete");
        assert_eq!(listed().await, 0);
    }

    #[tokio::test]
    async fn a_panicking_pull_frees_its_key() {
        let inflight: Arc<Flights> = Arc::default();
        let cache: Arc<GroupCache> = Arc::default();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let first = join_flight(&inflight, &cache, "k".into(), || async move {
            if wait.await.is_ok() {
                panic!("a pull that panics");
            }
            Ok("sha256:never".to_string())
        });
        // A second caller joins the same flight; its own pull never starts.
        let second = join_flight(&inflight, &cache, "k".into(), || async {
            Ok("sha256:second".to_string())
        });
        assert_eq!(inflight.lock().len(), 1);
        let generation = cache.lock().0;
        go.send(()).expect("the pull waits for this");
        for waiter in [first, second] {
            let result = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("a waiter of a panicked pull must not hang");
            assert_eq!(result.map_err(|s| s.code()), Err(tonic::Code::Internal));
        }
        assert!(inflight.lock().is_empty(), "the key is freed");
        assert!(cache.lock().0 > generation, "the image list is read afresh");

        // The next pull of the same key starts anew.
        let again = join_flight(&inflight, &cache, "k".into(), || async {
            Ok("sha256:again".to_string())
        });
        assert_eq!(again.await.map_err(|s| s.code()), Ok("sha256:again".into()));
        assert!(inflight.lock().is_empty());
    }
}
