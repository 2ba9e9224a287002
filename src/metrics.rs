//! Prometheus metrics: one process-wide set that the pipeline updates with
//! one-line hooks, served as OpenMetrics text on `/metrics` by `hoist serve`
//! when `metrics_address` is set. Store usage is read at scrape time.
//!
//! The set is global rather than handed down: the hooks sit deep in the
//! pipeline (a blob's byte stream, a layer's apply on a blocking thread,
//! GC), and updating it costs a few atomics whether or not it is served.

use crate::metadata::Db;
use crate::snapshot::SnapshotRoot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// What a scrape is answered with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metrics_address {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    pulls: Family<OutcomeLabels, Counter>,
    pull_duration: HistogramFamily<OutcomeLabels>,
    pull_bytes: HistogramFamily<OutcomeLabels>,
    pulls_in_flight: Gauge,
    fetched_bytes: Family<HostLabels, Counter>,
    layers_applied: Counter,
    applied_bytes: Counter,
    apply_duration: Histogram,
    store_bytes: Family<StoreLabels, Gauge>,
    store_inodes: Family<StoreLabels, Gauge>,
    gc_runs: Counter,
    gc_freed_bytes: Counter,
    rpc_duration: HistogramFamily<RpcLabels>,
}

/// 0.1 s to about 7 min.
fn pull_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 13))
}

/// 1 KiB to 4 GiB.
fn pull_bytes() -> Histogram {
    Histogram::new(exponential_buckets(1024.0, 4.0, 12))
}

/// 1 ms to about 9 min: a PullImage lasts as long as its pull.
fn rpc_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut m = Metrics {
        registry: Registry::with_prefix("hoist"),
        pulls: Family::default(),
        pull_duration: Family::new_with_constructor(pull_seconds),
        pull_bytes: Family::new_with_constructor(pull_bytes),
        pulls_in_flight: Gauge::default(),
        fetched_bytes: Family::default(),
        layers_applied: Counter::default(),
        applied_bytes: Counter::default(),
        apply_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
        store_bytes: Family::default(),
        store_inodes: Family::default(),
        gc_runs: Counter::default(),
        gc_freed_bytes: Counter::default(),
        rpc_duration: Family::new_with_constructor(rpc_seconds),
    };
    // Metrics are handles on shared values: the registry gets clones.
    let r = &mut m.registry;
    r.register("pulls", "Pulls finished, by outcome", m.pulls.clone());
    r.register(
        "pull_duration_seconds",
        "How long pulls took, by outcome",
        m.pull_duration.clone(),
    );
    r.register(
        "pull_bytes",
        "Bytes a pull fetched from registries, by outcome",
        m.pull_bytes.clone(),
    );
    r.register(
        "pulls_in_flight",
        "Pulls running now",
        m.pulls_in_flight.clone(),
    );
    r.register(
        "fetched_bytes",
        "Bytes fetched from registries, by the host that sent them",
        m.fetched_bytes.clone(),
    );
    r.register(
        "layers_applied",
        "Layers applied into snapshots",
        m.layers_applied.clone(),
    );
    r.register(
        "applied_bytes",
        "Uncompressed layer bytes applied into snapshots",
        m.applied_bytes.clone(),
    );
    r.register(
        "layer_apply_duration_seconds",
        "How long each layer's apply took (a live apply includes waiting for its download)",
        m.apply_duration.clone(),
    );
    r.register(
        "store_bytes",
        "Bytes on disk in the content store and the snapshots, at scrape time",
        m.store_bytes.clone(),
    );
    r.register(
        "store_inodes",
        "Inodes in the content store and the snapshots, at scrape time",
        m.store_inodes.clone(),
    );
    r.register(
        "gc_runs",
        "Garbage collections completed",
        m.gc_runs.clone(),
    );
    r.register(
        "gc_freed_bytes",
        "Bytes garbage collection freed",
        m.gc_freed_bytes.clone(),
    );
    r.register(
        "cri_request_duration_seconds",
        "CRI RPC latency, by method and gRPC code",
        m.rpc_duration.clone(),
    );
    m
});

/// A pull being counted: in flight until [`PullTimer::finish`], or until
/// it is dropped unfinished (the pull was cancelled).
pub struct PullTimer {
    started: Instant,
    bytes: AtomicU64,
    done: bool,
}

pub fn pull_started() -> PullTimer {
    METRICS.pulls_in_flight.inc();
    PullTimer {
        started: Instant::now(),
        bytes: AtomicU64::new(0),
        done: false,
    }
}

impl PullTimer {
    /// Where the pull adds the bytes it fetches from registries.
    pub fn bytes(&self) -> &AtomicU64 {
        &self.bytes
    }

    /// `outcome` is `success` or the kind of failure.
    pub fn finish(mut self, outcome: &'static str) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &*METRICS;
        let labels = OutcomeLabels { outcome };
        m.pulls_in_flight.dec();
        m.pulls.get_or_create(&labels).inc();
        m.pull_duration
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        let bytes = self.bytes.load(Ordering::Relaxed);
        m.pull_bytes.get_or_create(&labels).observe(bytes as f64);
    }
}

impl Drop for PullTimer {
    fn drop(&mut self) {
        self.record("cancelled");
    }
}

/// The counter of bytes fetched from `url`'s host (`host[:port]`), to
/// count a response's chunks as they arrive.
pub fn fetched_from(url: &reqwest::Url) -> Counter {
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => String::new(),
    };
    METRICS
        .fetched_bytes
        .get_or_create_owned(&HostLabels { host })
}

/// One layer applied: its uncompressed bytes and how long the apply took.
pub fn layer_applied(bytes: u64, took: Duration) {
    let m = &*METRICS;
    m.layers_applied.inc();
    m.applied_bytes.inc_by(bytes);
    m.apply_duration.observe(took.as_secs_f64());
}

/// One garbage collection completed.
pub fn gc_done(bytes_freed: u64) {
    METRICS.gc_runs.inc();
    METRICS.gc_freed_bytes.inc_by(bytes_freed);
}

/// One CRI RPC answered with `code` after `took`.
pub fn rpc_done(method: &str, code: tonic::Code, took: Duration) {
    let labels = RpcLabels {
        method: method.to_string(),
        code: code_name(code),
    };
    METRICS
        .rpc_duration
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
}

/// gRPC's own names for its codes, as Prometheus users know them.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The kind of a pull's failure, as its outcome label.
pub fn pull_outcome(e: &crate::pull::Error) -> &'static str {
    use crate::pull::Error as P;
    use crate::remote::Error as R;
    match e {
        P::Reference(_) => "invalid_reference",
        P::Remote(R::NotFound { .. }) => "not_found",
        P::Image(crate::images::Error::NoMatchingPlatform { .. }) => "not_found",
        P::Remote(R::Denied { .. } | R::Credentials(_)) => "denied",
        P::Remote(R::Unavailable { .. }) => "unavailable",
        P::Remote(R::NoProgress { .. }) => "timeout",
        P::Remote(R::Protocol { .. }) | P::Image(_) => "bad_image",
        P::Remote(R::Hosts(_) | R::Tls(_)) => "configuration",
        P::Remote(R::Content(_))
        | P::Content(_)
        | P::Metadata(_)
        | P::Snapshot(_)
        | P::Apply(_)
        | P::Internal(_) => "error",
    }
}

/// Sets the store gauges from the database and the disk; a store that
/// cannot be read shows no value rather than a stale one.
fn collect_store(db: &Db, snapshots: &SnapshotRoot) {
    let content = db
        .local_content()
        .blobs()
        .map(|blobs| (blobs.iter().map(|(_, size)| size).sum(), blobs.len() as u64))
        .map_err(|e| e.to_string());
    let layers = snapshots
        .total_usage()
        .map(|u| (u.size, u.inodes))
        .map_err(|e| e.to_string());
    let m = &*METRICS;
    for (store, usage) in [("content", content), ("snapshots", layers)] {
        let labels = StoreLabels { store };
        match usage {
            Ok((bytes, inodes)) => {
                let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                m.store_bytes.get_or_create(&labels).set(gauge(bytes));
                m.store_inodes.get_or_create(&labels).set(gauge(inodes));
            }
            Err(error) => {
                tracing::warn!(store, %error, "metrics: reading store usage");
                m.store_bytes.remove(&labels);
                m.store_inodes.remove(&labels);
            }
        }
    }
}

/// Every metric as OpenMetrics text, store usage read first (off the
/// async runtime: it walks the database and active snapshots).
pub async fn render(db: Arc<Db>, snapshots: Arc<SnapshotRoot>) -> String {
    if let Err(e) = tokio::task::spawn_blocking(move || collect_store(&db, &snapshots)).await {
        tracing::warn!(error = %e, "metrics: store usage");
    }
    let mut text = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry) {
        tracing::warn!(error = %e, "metrics: encoding");
    }
    text
}

/// Binds `address` (`host:port`); a bad address fails the daemon's start.
pub async fn bind(address: &str) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind {
            address: address.to_string(),
            source,
        })
}

/// Answers `GET /metrics` on `listener` until the runtime ends; other
/// paths get 404. HTTP/1 only, as Prometheus scrapes.
pub async fn serve(listener: tokio::net::TcpListener, db: Arc<Db>, snapshots: Arc<SnapshotRoot>) {
    use hyper::{Method, Request, Response, StatusCode, body::Incoming};
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds, say: wait instead of spinning.
                tracing::warn!(error = %e, "metrics: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (db, snapshots) = (db.clone(), snapshots.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (db, snapshots) = (db.clone(), snapshots.clone());
                async move {
                    let mut response = Response::new(String::new());
                    if request.uri().path() != "/metrics" {
                        *response.status_mut() = StatusCode::NOT_FOUND;
                    } else if request.method() != Method::GET && request.method() != Method::HEAD {
                        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                    } else {
                        *response.body_mut() = render(db, snapshots).await;
                        response.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(CONTENT_TYPE),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // With a timer, hyper drops a client that is slow to send its
            // request head.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics: connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_show_in_the_exposition() {
        let pull = pull_started();
        pull.bytes().fetch_add(4096, Ordering::Relaxed);
        pull.finish("success");
        drop(pull_started());
        let url = reqwest::Url::parse("http://registry.test:5000/v2/").expect("a valid URL");
        fetched_from(&url).inc_by(10);
        layer_applied(100, Duration::from_millis(5));
        gc_done(7);
        rpc_done("PullImage", tonic::Code::NotFound, Duration::from_millis(3));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &METRICS.registry).expect("encodes");
        for line in [
            "hoist_pulls_total{outcome=\"success\"}",
            "hoist_pulls_total{outcome=\"cancelled\"}",
            "hoist_fetched_bytes_total{host=\"registry.test:5000\"}",
            "hoist_pull_bytes_count{outcome=\"success\"}",
            "hoist_cri_request_duration_seconds_count{method=\"PullImage\",code=\"NotFound\"}",
            "hoist_layers_applied_total",
            "hoist_gc_freed_bytes_total",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
