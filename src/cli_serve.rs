//! `hoist serve`: the CRI daemon's start-up, signals and shutdown.

use crate::{Cli, Command, docker_config_path, init_logging};
use anyhow::{Context, Result};
use hoist::config::{Config, DEFAULT_HOSTS_DIR, DEFAULT_SOCKET, LogFormat};
use hoist::cri::{Service, server};
use hoist::metadata::Db;
use hoist::pull::Puller;
use hoist::remote::{CredentialSource, HostsConfig, RegistryClient, RemoteOptions};
use hoist::root::{RootLock, default_root};
use std::path::PathBuf;

pub fn run(cli: Cli) -> Result<()> {
    let Command::Serve {
        config,
        socket,
        snapshotter,
        hosts_dir,
        log_format,
    } = cli.command
    else {
        anyhow::bail!("not a serve command");
    };
    let explicit = config != std::path::Path::new(hoist::config::DEFAULT_CONFIG);
    let file = Config::load(&config, explicit)?;
    let json = match log_format.as_deref() {
        Some("json") => true,
        Some("text") => false,
        Some(other) => anyhow::bail!("--log-format {other:?}: use text or json"),
        None => file.log_format == Some(LogFormat::Json),
    };
    init_logging(json, "info");
    let root = cli.root.or(file.root.clone()).unwrap_or_else(default_root);
    // Snapshot paths go to containerd, which mounts them from elsewhere.
    let root = std::path::absolute(&root).with_context(|| format!("root {}", root.display()))?;
    let socket = socket
        .or(file.socket.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let hosts_dir = hosts_dir
        .or(file.registry.config_path.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HOSTS_DIR));
    // Commands read it from the root lock and connect from anywhere.
    let socket =
        std::path::absolute(&socket).with_context(|| format!("socket {}", socket.display()))?;
    let progress_timeout = file.progress_timeout().map_err(anyhow::Error::msg)?;
    let _lock = RootLock::exclusive(&root, &socket)?;
    let db = Db::open(&root).with_context(|| format!("opening hoist root {}", root.display()))?;
    let snapshots =
        hoist::snapshot::open(&db, snapshotter.as_deref().or(file.snapshotter.as_deref()))?;
    // Before serving, while the root is still; sizes only, so it is quick.
    hoist::check::log_at_start(&db);
    let snapshot_proxy = match file.snapshotter_socket() {
        Some(path) => Some((
            path,
            hoist::containerd::snapshots::SnapshotProxy::new(db.clone(), &snapshots)?,
        )),
        None => None,
    };
    let remote = RemoteOptions {
        hosts: HostsConfig::new(Some(hosts_dir), false),
        credentials: CredentialSource {
            explicit: None,
            docker_config: docker_config_path(),
        },
        progress_timeout,
        ranged: file.ranged_fetch(),
        ..Default::default()
    };
    let metrics = file.metrics_address().map(|a| (a.to_string(), db.clone()));
    let puller = Puller::new(
        db,
        RegistryClient::new(remote),
        file.max_concurrent_downloads.unwrap_or(3),
        Some(snapshots.clone()),
    );
    // Pulls and image changes, whoever makes them, for `hoist events` and `hoist ps`.
    let activity = hoist::activity::Activity::new();
    activity.watch(puller.db());
    let mut api = hoist::api::server::Api::new(puller.clone(), activity.clone());
    let mut service =
        Service::new(puller, snapshots.clone(), &file.pinned_images)?.with_activity(activity);
    let containerd = file
        .containerd
        .address
        .clone()
        .unwrap_or_else(|| PathBuf::from(hoist::cri::containerd::DEFAULT_ADDRESS));
    if !containerd.as_os_str().is_empty() {
        let snapshotter = file.containerd.snapshotter.clone();
        let containerd = std::sync::Arc::new(hoist::cri::containerd::Containerd::new(
            containerd,
            snapshotter.unwrap_or_else(|| hoist::cri::containerd::DEFAULT_SNAPSHOTTER.into()),
        ));
        // CRI pulls, and pulls into k8s.io through hoist's own API, alike.
        api = api.with_containerd(containerd.clone());
        service = service.with_containerd(containerd);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        // Bound first: a bad address fails the start before any socket exists.
        if let Some((address, db)) = metrics {
            let listener = hoist::metrics::bind(&address).await?;
            tracing::info!(address, "serving metrics on /metrics");
            tokio::spawn(hoist::metrics::serve(listener, db, snapshots.clone()));
        }
        let listener = server::bind(&socket)?;
        let snapshot_proxy = match snapshot_proxy {
            Some((path, proxy)) => match server::bind(&path) {
                Ok(listener) => Some((path, proxy, listener)),
                Err(e) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(e).context("snapshotter_socket");
                }
            },
            None => None,
        };
        tracing::info!(root = %root.display(), snapshotter = snapshots.name(), "hoist daemon ready");
        // Both sockets stop accepting at once.
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let graceful = |mut stopping: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let snapshots_socket = snapshot_proxy.as_ref().map(|(path, ..)| path.clone());
        let cri = server::serve(
            server::routes(service, api),
            listener,
            &socket,
            graceful(stopping.clone()),
        );
        let snapshots_api = async {
            let Some((path, proxy, listener)) = snapshot_proxy else {
                return Ok(());
            };
            let routes = hoist::containerd::snapshots::routes(proxy);
            server::serve(routes, listener, &path, graceful(stopping)).await
        };
        let serving = async { tokio::try_join!(cri, snapshots_api).map(drop) };
        tokio::pin!(serving);
        tokio::select! {
            r = &mut serving => r?,
            () = shutdown_signal() => {
                // Stop accepting, let quick RPCs finish, then drop the rest:
                // a cancelled pull keeps its lease and ingests for a resume.
                let _ = stop.send(true);
                if tokio::time::timeout(SHUTDOWN_GRACE, &mut serving).await.is_err() {
                    tracing::info!("cancelling in-flight RPCs");
                }
                let _ = std::fs::remove_file(&socket);
                if let Some(path) = &snapshots_socket {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        tracing::info!("stopped");
        Ok::<_, anyhow::Error>(())
    });
    // Ends the tasks still running; blocking writers finish once their
    // channels close.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// How long quick RPCs get to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}
