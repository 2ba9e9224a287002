//! The `hoist.v1.Hoist` service: the command line's calls, made by the
//! daemon on its own root. Served beside the CRI ImageService on the CRI
//! socket (see `cri::server::routes`).

use super::progress::{Forwarder, INTERVAL};
use super::{API_VERSION, CRI_API_VERSION, PullSummary, ops, v1};
use crate::activity::Activity;
use crate::cri::containerd::Containerd;
use crate::cri::errors::{api_pull_status, internal, invalid, ops_status};
use crate::metadata::{Db, NAMESPACE_CRI, NAMESPACE_DEFAULT};
use crate::pull::{PullOptions, Puller};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use v1::hoist_server::{Hoist, HoistServer};

/// Messages a slow client may leave unread before its stream waits.
const STREAM_BUFFER: usize = 64;

pub struct Api {
    puller: Arc<Puller>,
    activity: Arc<Activity>,
    /// Where a pull into `k8s.io` is published, as a CRI pull is.
    containerd: Option<Arc<Containerd>>,
}

impl Api {
    /// Pulls go through `puller` (the CRI service's, so both share one
    /// download limit and one download per blob), listed in `activity`.
    pub fn new(puller: Arc<Puller>, activity: Arc<Activity>) -> Self {
        Api {
            puller,
            activity,
            containerd: None,
        }
    }

    /// Publishes pulls into `k8s.io` to containerd, as the CRI service does.
    pub fn with_containerd(mut self, containerd: Arc<Containerd>) -> Self {
        self.containerd = Some(containerd);
        self
    }

    fn db(&self) -> &Arc<Db> {
        self.puller.db()
    }

    fn snapshotter(&self) -> &'static str {
        self.puller.snapshotter().map(|s| s.name()).unwrap_or("")
    }
}

/// The service, to add to a socket's routes.
pub fn service(api: Api) -> HoistServer<Api> {
    HoistServer::new(api)
}

/// A request's namespace: empty is the command line's.
fn namespace(ns: &str) -> Result<String, Status> {
    if ns.is_empty() {
        return Ok(NAMESPACE_DEFAULT.to_string());
    }
    crate::root::validate_namespace(ns).map_err(invalid)?;
    Ok(ns.to_string())
}

/// A namespace filter: empty is every namespace.
fn filter(ns: &str) -> Result<Option<String>, Status> {
    if ns.is_empty() {
        return Ok(None);
    }
    namespace(ns).map(Some)
}

fn absolute(dir: &str) -> Result<PathBuf, Status> {
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{} is not an absolute path",
            dir.display()
        )));
    }
    Ok(dir)
}

/// `overlay` is another name for `overlayfs`.
fn snapshotter_name(name: &str) -> &str {
    match name {
        "overlay" => "overlayfs",
        other => other,
    }
}

/// Runs an operation on a blocking thread, logging one line for the call.
async fn run<T: Send + 'static>(
    call: &'static str,
    f: impl FnOnce() -> ops::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let started = Instant::now();
    let result = match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| ops_status(&e)),
        Err(e) => Err(internal(e)),
    };
    log(call, started, result.as_ref().err());
    result
}

fn log(call: &str, started: Instant, error: Option<&Status>) {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match error {
        None => tracing::info!(api = call, duration_ms = ms, "ok"),
        Some(s) => {
            tracing::warn!(api = call, duration_ms = ms, code = ?s.code(), error = s.message(), "failed")
        }
    }
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Hoist for Api {
    async fn version(
        &self,
        _request: Request<v1::VersionRequest>,
    ) -> Result<Response<v1::VersionResponse>, Status> {
        Ok(Response::new(v1::VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            cri_api_version: CRI_API_VERSION.to_string(),
            snapshotter: self.snapshotter().to_string(),
            api_version: API_VERSION.to_string(),
        }))
    }

    type PullStream = Stream<v1::PullEvent>;

    async fn pull(
        &self,
        request: Request<v1::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let req = request.into_inner();
        let namespace = namespace(&req.namespace)?;
        crate::reference::Reference::parse(&req.reference).map_err(invalid)?;
        let wanted = snapshotter_name(&req.snapshotter);
        if !req.no_unpack && !wanted.is_empty() && wanted != self.snapshotter() {
            return Err(Status::failed_precondition(format!(
                "the daemon unpacks with {}, not {wanted}",
                self.snapshotter()
            )));
        }
        let given = req.credentials.filter(|c| !c.username.is_empty());
        let credentials = match &given {
            Some(c) => Some(
                crate::remote::Credentials::from_fields(&c.username, &c.password, "", "", "")
                    .map_err(invalid)?,
            ),
            None => None,
        };
        // containerd is asked with the same credentials.
        let auth = given.map(|c| k8s_cri::v1::AuthConfig {
            username: c.username,
            password: c.password,
            ..Default::default()
        });
        let options = PullOptions {
            platforms: req
                .platforms
                .iter()
                .map(|p| crate::images::platform::parse(p))
                .collect::<Result<_, _>>()
                .map_err(invalid)?,
            all_platforms: req.all_platforms,
            credentials,
            no_unpack: req.no_unpack,
            sequential_unpack: req.sequential_unpack,
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (puller, activity) = (self.puller.clone(), self.activity.clone());
        // kubelet sees, and containerd can run, an image pulled into the
        // CRI namespace as a CRI pull would pull it (this host's platform,
        // unpacked), however it came.
        let as_cri = namespace == NAMESPACE_CRI
            && !options.no_unpack
            && !options.all_platforms
            && options.platforms.is_empty();
        let containerd = self.containerd.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (activity, puller, namespace, options) = (&activity, &puller, &namespace, &options);
            let (reference, tx, containerd, auth) = (&req.reference, &tx, &containerd, &auth);
            let last = crate::cri::again_while_removed(|| async move {
                let outcome =
                    forward_pull(activity, puller, namespace, reference, options, tx).await;
                // The client has gone: the pull was dropped.
                let Some(outcome) = outcome else {
                    return Ok(None);
                };
                let pulled = outcome?;
                if as_cri {
                    let (db, containerd) = (puller.db(), containerd.as_deref());
                    crate::cri::record_and_publish(db, containerd, &pulled, auth.clone()).await?;
                }
                Ok(Some(v1::PullEvent {
                    event: Some(v1::pull_event::Event::Done(
                        (&PullSummary::from(&pulled)).into(),
                    )),
                }))
            })
            .await;
            let Some(last) = last.transpose() else { return };
            log("Pull", started, last.as_ref().err());
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        let namespace = namespace(&request.into_inner().namespace)?;
        let db = self.db().clone();
        let images = run("List", move || ops::list_images(&db, &namespace)).await?;
        Ok(Response::new(v1::ListResponse {
            images: images.iter().map(Into::into).collect(),
        }))
    }

    async fn snapshots(
        &self,
        request: Request<v1::SnapshotsRequest>,
    ) -> Result<Response<v1::SnapshotsResponse>, Status> {
        let req = request.into_inner();
        let namespace = namespace(&req.namespace)?;
        let db = self.db().clone();
        let only = Some(req.snapshotter).filter(|s| !s.is_empty());
        let snapshots = run("Snapshots", move || {
            ops::list_snapshots(&db, &namespace, only.as_deref())
        })
        .await?;
        Ok(Response::new(v1::SnapshotsResponse {
            snapshots: snapshots.into_iter().map(Into::into).collect(),
        }))
    }

    async fn content(
        &self,
        request: Request<v1::ContentRequest>,
    ) -> Result<Response<v1::ContentResponse>, Status> {
        let req = request.into_inner();
        let namespace = namespace(&req.namespace)?;
        let db = self.db().clone();
        let blobs = run("Content", move || {
            ops::list_content(&db, &namespace, &req.filters)
        })
        .await?;
        Ok(Response::new(v1::ContentResponse {
            blobs: blobs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove(
        &self,
        request: Request<v1::RemoveRequest>,
    ) -> Result<Response<v1::RemoveResponse>, Status> {
        let req = request.into_inner();
        let namespace = namespace(&req.namespace)?;
        let db = self.db().clone();
        let removal = run("Remove", move || {
            ops::remove_images(&db, &namespace, &req.references)
        })
        .await?;
        Ok(Response::new((&removal).into()))
    }

    async fn mount(
        &self,
        request: Request<v1::MountRequest>,
    ) -> Result<Response<v1::MountResponse>, Status> {
        let req = request.into_inner();
        let namespace = namespace(&req.namespace)?;
        let options = ops::MountOptions {
            reference: req.reference,
            dir: absolute(&req.dir)?,
            platform: Some(req.platform).filter(|p| !p.is_empty()),
            snapshotter: Some(req.snapshotter).filter(|s| !s.is_empty()),
            allow_suid_dev: req.allow_suid_dev,
        };
        let db = self.db().clone();
        let dir = run("Mount", move || ops::mount(&db, &namespace, &options)).await?;
        Ok(Response::new(v1::MountResponse {
            dir: dir.display().to_string(),
        }))
    }

    async fn unmount(
        &self,
        request: Request<v1::UnmountRequest>,
    ) -> Result<Response<v1::UnmountResponse>, Status> {
        let req = request.into_inner();
        let namespace = namespace(&req.namespace)?;
        let dir = absolute(&req.dir)?;
        let db = self.db().clone();
        let view_removed = run("Unmount", move || ops::unmount(&db, &namespace, &dir)).await?;
        Ok(Response::new(v1::UnmountResponse { view_removed }))
    }

    async fn gc(
        &self,
        _request: Request<v1::GcRequest>,
    ) -> Result<Response<v1::GcResponse>, Status> {
        let db = self.db().clone();
        let report = run("Gc", move || ops::collect(&db)).await?;
        Ok(Response::new(v1::GcResponse {
            stats: Some((&report).into()),
        }))
    }

    type EventsStream = Stream<v1::Event>;

    async fn events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let only = filter(&request.into_inner().namespace)?;
        // Subscribed before the answer goes out: a client that has its
        // answer misses nothing that happens after.
        let mut events = self.activity.subscribe();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    () = tx.closed() => return,
                };
                let message = match event {
                    Ok(e) => {
                        let wanted = only
                            .as_deref()
                            .is_none_or(|ns| e.namespace.is_empty() || e.namespace == ns);
                        if !wanted {
                            continue;
                        }
                        Ok((&e).into())
                    }
                    // A gap would go unnoticed; the client has to ask again.
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(Status::resource_exhausted(
                        format!("the client fell {n} events behind; follow the events again"),
                    )),
                    // The daemon is stopping.
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let last = message.is_err();
                if tx.send(message).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ps(
        &self,
        request: Request<v1::PsRequest>,
    ) -> Result<Response<v1::PsResponse>, Status> {
        let only = filter(&request.into_inner().namespace)?;
        let pulls = self.activity.in_flight(only.as_deref());
        Ok(Response::new(v1::PsResponse {
            pulls: pulls.iter().map(Into::into).collect(),
        }))
    }
}

/// Runs the pull, streaming its progress to `tx`; the pull's outcome, or
/// `None` once the client has gone (which drops the pull, as Ctrl-C stops
/// a pull on a bare root; its lease keeps what it fetched).
async fn forward_pull(
    activity: &Activity,
    puller: &Arc<Puller>,
    namespace: &str,
    reference: &str,
    options: &PullOptions,
    tx: &mpsc::Sender<Result<v1::PullEvent, Status>>,
) -> Option<Result<crate::pull::Pulled, Status>> {
    let mut forwarder = Forwarder::new();
    let pull = activity.pull(puller, namespace, reference, options, forwarder.progress());
    tokio::pin!(pull);
    let mut tick = tokio::time::interval(INTERVAL);
    let result = loop {
        tokio::select! {
            r = &mut pull => break r,
            _ = tick.tick() => {
                for event in forwarder.drain() {
                    tx.send(Ok(event)).await.ok()?;
                }
            }
            () = tx.closed() => return None,
        }
    };
    for event in forwarder.drain() {
        tx.send(Ok(event)).await.ok()?;
    }
    Some(result.map_err(|e| api_pull_status(&e)))
}
