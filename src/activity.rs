//! What the daemon is doing, for whoever asks: an event bus (image records,
//! pulls, garbage collections) and the pulls in flight with their live
//! progress. The CRI service and hoist's API both pull through
//! [`Activity::pull`], so `hoist ps` and `hoist events` see kubelet's pulls
//! as they see their own.

use crate::digest::Digest;
use crate::metadata::gc::GcReport;
use crate::metadata::{Change, Db};
use crate::pull::progress::{Entry, Progress};
use crate::pull::{PullOptions, Pulled, Puller};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it loses its place.
const BACKLOG: usize = 1024;

#[derive(Debug, Clone)]
pub struct Event {
    pub time: SystemTime,
    /// Empty for a garbage collection, which spans every namespace.
    pub namespace: String,
    pub kind: EventKind,
}

#[derive(Debug, Clone)]
pub enum EventKind {
    ImageCreated {
        name: String,
        digest: Digest,
    },
    ImageUpdated {
        name: String,
        digest: Digest,
    },
    ImageRemoved {
        name: String,
    },
    PullStarted {
        id: u64,
        reference: String,
    },
    PullFinished {
        id: u64,
        reference: String,
        digest: Digest,
        elapsed: Duration,
    },
    PullFailed {
        id: u64,
        reference: String,
        error: String,
        elapsed: Duration,
    },
    Collected(GcReport),
}

/// A pull in flight.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub id: u64,
    pub namespace: String,
    pub reference: String,
    pub started: SystemTime,
    pub elapsed: Duration,
    pub progress: Vec<Entry>,
}

struct Tracked {
    namespace: String,
    reference: String,
    started: SystemTime,
    clock: Instant,
    progress: Arc<Progress>,
}

pub struct Activity {
    events: broadcast::Sender<Event>,
    pulls: Mutex<BTreeMap<u64, Tracked>>,
    next_id: AtomicU64,
    /// Counts image record changes, so caches of image lists know when
    /// another caller (hoist's API, say) changed them.
    image_changes: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            events: broadcast::channel(BACKLOG).0,
            pulls: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            image_changes: AtomicU64::new(0),
        })
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn publish(&self, namespace: &str, kind: EventKind) {
        // No subscriber is no error: nobody is listening.
        let _ = self.events.send(Event {
            time: SystemTime::now(),
            namespace: namespace.to_string(),
            kind,
        });
    }

    /// How many image records have changed through the watched `Db`.
    pub fn image_changes(&self) -> u64 {
        self.image_changes.load(Ordering::Acquire)
    }

    /// Publishes the changes made through `db` (image records, garbage
    /// collections), whoever makes them; false if `db` has a watcher.
    pub fn watch(self: &Arc<Self>, db: &Db) -> bool {
        let me = self.clone();
        db.watch(Box::new(move |change| me.changed(change)))
    }

    fn changed(&self, change: Change) {
        let (namespace, kind) = match change {
            Change::ImageCreated {
                namespace,
                name,
                target,
            } => (
                namespace,
                EventKind::ImageCreated {
                    name,
                    digest: target,
                },
            ),
            Change::ImageUpdated {
                namespace,
                name,
                target,
            } => (
                namespace,
                EventKind::ImageUpdated {
                    name,
                    digest: target,
                },
            ),
            Change::ImageRemoved { namespace, name } => {
                (namespace, EventKind::ImageRemoved { name })
            }
            Change::Collected(report) => (String::new(), EventKind::Collected(report)),
        };
        if matches!(
            kind,
            EventKind::ImageCreated { .. }
                | EventKind::ImageUpdated { .. }
                | EventKind::ImageRemoved { .. }
        ) {
            self.image_changes.fetch_add(1, Ordering::AcqRel);
        }
        self.publish(&namespace, kind);
    }

    /// The pulls in flight (in `namespace`, or all), oldest first.
    pub fn in_flight(&self, namespace: Option<&str>) -> Vec<InFlight> {
        self.pulls
            .lock()
            .iter()
            .filter(|(_, t)| namespace.is_none_or(|ns| ns == t.namespace))
            .map(|(id, t)| InFlight {
                id: *id,
                namespace: t.namespace.clone(),
                reference: t.reference.clone(),
                started: t.started,
                elapsed: t.clock.elapsed(),
                progress: t.progress.snapshot(),
            })
            .collect()
    }

    /// [`Puller::pull`], listed in flight with `progress` while it runs,
    /// with its start and its end (finished, failed or cancelled) published.
    pub async fn pull(
        &self,
        puller: &Arc<Puller>,
        namespace: &str,
        reference: &str,
        options: &PullOptions,
        progress: Arc<Progress>,
    ) -> crate::pull::Result<Pulled> {
        // A reference that does not parse is no pull.
        let name = crate::reference::Reference::parse(reference)?.to_string();
        let tracking = self.track(namespace, name, progress.clone());
        let result = puller.pull(namespace, reference, options, &progress).await;
        tracking.end(&result);
        result
    }

    fn track(&self, namespace: &str, reference: String, progress: Arc<Progress>) -> Tracking<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let clock = Instant::now();
        self.pulls.lock().insert(
            id,
            Tracked {
                namespace: namespace.to_string(),
                reference: reference.clone(),
                started: SystemTime::now(),
                clock,
                progress,
            },
        );
        self.publish(
            namespace,
            EventKind::PullStarted {
                id,
                reference: reference.clone(),
            },
        );
        Tracking {
            activity: self,
            id,
            namespace: namespace.to_string(),
            reference,
            clock,
            ended: false,
        }
    }
}

/// A pull listed in flight; dropped unended, it was cancelled.
struct Tracking<'a> {
    activity: &'a Activity,
    id: u64,
    namespace: String,
    reference: String,
    clock: Instant,
    ended: bool,
}

impl Tracking<'_> {
    fn end(mut self, result: &crate::pull::Result<Pulled>) {
        self.ended = true;
        let (id, reference, elapsed) = (self.id, self.reference.clone(), self.clock.elapsed());
        let kind = match result {
            Ok(pulled) => EventKind::PullFinished {
                id,
                reference,
                digest: pulled.target.digest.clone(),
                elapsed,
            },
            Err(e) => EventKind::PullFailed {
                id,
                reference,
                error: crate::error_chain(e),
                elapsed,
            },
        };
        self.activity.publish(&self.namespace, kind);
    }
}

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        self.activity.pulls.lock().remove(&self.id);
        if !self.ended {
            self.activity.publish(
                &self.namespace,
                EventKind::PullFailed {
                    id: self.id,
                    reference: self.reference.clone(),
                    error: "cancelled".to_string(),
                    elapsed: self.clock.elapsed(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::progress::State;

    fn image_digest() -> Digest {
        Digest::of(b"manifest")
    }

    #[test]
    fn db_changes_become_events_and_bump_the_image_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let activity = Activity::new();
        assert!(activity.watch(&db));
        assert!(!activity.watch(&db), "one watcher per db");
        let mut events = activity.subscribe();
        let target =
            crate::descriptor::Descriptor::new(crate::images::OCI_MANIFEST, image_digest(), 8);
        let image = crate::metadata::images::Image::new("docker.io/library/a:1", target);
        db.put_image("default", image.clone()).expect("create");
        db.put_image("default", image).expect("update");
        db.delete_image("default", "docker.io/library/a:1")
            .expect("delete");
        assert_eq!(activity.image_changes(), 3);
        db.garbage_collect(&[]).expect("gc");
        assert_eq!(activity.image_changes(), 3, "a GC changes no image");

        let kinds: Vec<(String, EventKind)> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| (e.namespace, e.kind))
            .collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        assert!(
            matches!(&kinds[0], (ns, EventKind::ImageCreated { name, digest })
            if ns == "default" && name == "docker.io/library/a:1" && *digest == image_digest())
        );
        assert!(matches!(&kinds[1].1, EventKind::ImageUpdated { .. }));
        assert!(
            matches!(&kinds[2].1, EventKind::ImageRemoved { name } if name == "docker.io/library/a:1")
        );
        assert!(matches!(&kinds[3], (ns, EventKind::Collected(_)) if ns.is_empty()));
    }

    #[test]
    fn a_tracked_pull_is_in_flight_until_it_ends_and_a_dropped_one_was_cancelled() {
        let activity = Activity::new();
        let mut events = activity.subscribe();
        let progress = Arc::new(Progress::default());
        progress.set("layer-sha256:aa", State::Downloading, 100);
        progress.advance("layer-sha256:aa", 40);
        let tracking = activity.track("k8s.io", "docker.io/library/a:1".into(), progress);
        assert!(activity.in_flight(Some("default")).is_empty());
        let flying = activity.in_flight(Some("k8s.io"));
        assert_eq!(flying.len(), 1);
        assert_eq!(flying[0].reference, "docker.io/library/a:1");
        assert_eq!(flying[0].progress[0].offset, 40);
        assert_eq!(activity.in_flight(None).len(), 1);
        tracking.end(&Err(crate::pull::Error::Internal("boom".into())));
        assert!(activity.in_flight(None).is_empty());

        let dropped = activity.track("default", "docker.io/library/b:1".into(), Arc::default());
        assert_eq!(activity.in_flight(None).len(), 1);
        drop(dropped);
        assert!(activity.in_flight(None).is_empty());

        let kinds: Vec<EventKind> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        assert!(matches!(&kinds[0], EventKind::PullStarted { id: 1, .. }));
        assert!(
            matches!(&kinds[1], EventKind::PullFailed { id: 1, error, .. } if error.contains("boom"))
        );
        assert!(matches!(&kinds[2], EventKind::PullStarted { id: 2, .. }));
        assert!(
            matches!(&kinds[3], EventKind::PullFailed { id: 2, error, .. } if error == "cancelled")
        );
        assert_eq!(kinds.len(), 4);
    }
}
