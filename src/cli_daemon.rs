//! The command line through the daemon: hoist's API (`hoist.v1`) on the
//! socket the daemon wrote into the root's lock file, and the commands only
//! a daemon can answer (`events`, `ps`, the daemon's half of `version`).

use crate::cli_pull;
use anyhow::{Context, Result, anyhow, bail};
use hoist::api::ops::{BlobSummary, ImageSummary, MountOptions, Removal, SnapshotSummary};
use hoist::api::v1::{self, hoist_client::HoistClient};
use hoist::metadata::gc::GcReport;
use hoist::root::human_size;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tonic::transport::Channel;

/// The largest reply the command line takes from the daemon.
const MAX_REPLY: usize = 1 << 30;

pub struct Daemon {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
    client: HoistClient<Channel>,
}

impl Daemon {
    pub fn connect(socket: &Path) -> Result<Daemon> {
        let runtime = tokio::runtime::Runtime::new()?;
        let channel = runtime
            .block_on(hoist::grpc_unix::connect(socket))
            .with_context(|| format!("connecting to the hoist daemon on {}", socket.display()))?;
        Ok(Daemon {
            socket: socket.to_path_buf(),
            runtime,
            // Listings of a busy root (every blob with its labels) can be
            // far larger than tonic's 4 MiB default.
            client: HoistClient::new(channel).max_decoding_message_size(MAX_REPLY),
        })
    }

    /// A status as the command line reports it: the daemon's own statuses
    /// carry the message a command on a bare root prints; one that never
    /// reached it (a transport failure) names the daemon.
    fn failed(&self, status: tonic::Status) -> anyhow::Error {
        failed(&self.socket, status)
    }

    pub fn list(&mut self, namespace: &str) -> Result<Vec<ImageSummary>> {
        let request = v1::ListRequest {
            namespace: namespace.to_string(),
        };
        let response = self.runtime.block_on(self.client.list(request));
        let images = response.map_err(|s| self.failed(s))?.into_inner().images;
        Ok(images.into_iter().map(Into::into).collect())
    }

    pub fn remove(&mut self, namespace: &str, references: &[String]) -> Result<Removal> {
        let request = v1::RemoveRequest {
            namespace: namespace.to_string(),
            references: references.to_vec(),
        };
        let response = self.runtime.block_on(self.client.remove(request));
        Ok((&response.map_err(|s| self.failed(s))?.into_inner()).into())
    }

    pub fn mount(&mut self, namespace: &str, options: &MountOptions) -> Result<PathBuf> {
        let request = v1::MountRequest {
            namespace: namespace.to_string(),
            reference: options.reference.clone(),
            dir: options.dir.display().to_string(),
            platform: options.platform.clone().unwrap_or_default(),
            snapshotter: options.snapshotter.clone().unwrap_or_default(),
            allow_suid_dev: options.allow_suid_dev,
        };
        let response = self.runtime.block_on(self.client.mount(request));
        Ok(response
            .map_err(|s| self.failed(s))?
            .into_inner()
            .dir
            .into())
    }

    pub fn unmount(&mut self, namespace: &str, dir: &Path) -> Result<bool> {
        let request = v1::UnmountRequest {
            namespace: namespace.to_string(),
            dir: dir.display().to_string(),
        };
        let response = self.runtime.block_on(self.client.unmount(request));
        Ok(response
            .map_err(|s| self.failed(s))?
            .into_inner()
            .view_removed)
    }

    pub fn gc(&mut self) -> Result<GcReport> {
        let response = self.runtime.block_on(self.client.gc(v1::GcRequest {}));
        let stats = response.map_err(|s| self.failed(s))?.into_inner().stats;
        Ok(stats.as_ref().map(Into::into).unwrap_or_default())
    }

    pub fn snapshots(
        &mut self,
        namespace: &str,
        snapshotter: Option<&str>,
    ) -> Result<Vec<SnapshotSummary>> {
        let request = v1::SnapshotsRequest {
            namespace: namespace.to_string(),
            snapshotter: snapshotter.unwrap_or_default().to_string(),
        };
        let response = self.runtime.block_on(self.client.snapshots(request));
        let snapshots = response.map_err(|s| self.failed(s))?.into_inner().snapshots;
        Ok(snapshots.into_iter().map(Into::into).collect())
    }

    pub fn content(&mut self, namespace: &str, filters: &[String]) -> Result<Vec<BlobSummary>> {
        let request = v1::ContentRequest {
            namespace: namespace.to_string(),
            filters: filters.to_vec(),
        };
        let response = self.runtime.block_on(self.client.content(request));
        let blobs = response.map_err(|s| self.failed(s))?.into_inner().blobs;
        Ok(blobs.into_iter().map(Into::into).collect())
    }

    /// Pulls through the daemon, its streamed progress replayed into the
    /// display a pull on the root shows.
    pub fn pull(self, request: v1::PullRequest) -> Result<()> {
        let Daemon {
            socket,
            runtime,
            mut client,
        } = self;
        runtime.block_on(cli_pull::show(|progress| async move {
            let mut stream = client
                .pull(request)
                .await
                .map_err(|s| failed(&socket, s))?
                .into_inner();
            let mut done = None;
            while let Some(event) = stream.message().await.map_err(|s| failed(&socket, s))? {
                done = hoist::api::progress::replay(&progress, &event).or(done);
            }
            done.ok_or_else(|| {
                anyhow!(
                    "the hoist daemon on {} ended the pull without its result",
                    socket.display()
                )
            })
        }))
    }

    /// Prints one line per event until the daemon stops.
    pub fn events(mut self, namespace: Option<&str>) -> Result<()> {
        let request = v1::EventsRequest {
            namespace: namespace.unwrap_or_default().to_string(),
        };
        let socket = self.socket.clone();
        self.runtime.block_on(async {
            let mut stream = self
                .client
                .events(request)
                .await
                .map_err(|s| failed(&socket, s))?
                .into_inner();
            while let Some(event) = stream.message().await.map_err(|s| failed(&socket, s))? {
                if let Some(line) = event_line(&event) {
                    println!("{line}");
                }
            }
            Ok(())
        })
    }

    pub fn ps(&mut self, namespace: Option<&str>) -> Result<()> {
        let request = v1::PsRequest {
            namespace: namespace.unwrap_or_default().to_string(),
        };
        let response = self.runtime.block_on(self.client.ps(request));
        let pulls = response.map_err(|s| self.failed(s))?.into_inner().pulls;
        print!("{}", ps_table(&pulls));
        Ok(())
    }

    pub fn version(&mut self) -> Result<v1::VersionResponse> {
        let response = self
            .runtime
            .block_on(self.client.version(v1::VersionRequest {}));
        Ok(response.map_err(|s| self.failed(s))?.into_inner())
    }
}

fn failed(socket: &Path, status: tonic::Status) -> anyhow::Error {
    if std::error::Error::source(&status).is_some() {
        return anyhow!(
            "the hoist daemon on {}: {}",
            socket.display(),
            status.message()
        );
    }
    anyhow!("{}", status.message())
}

/// The daemon holding `root`, for a command only it can answer.
pub fn required(root: &Path, command: &str) -> Result<Daemon> {
    match hoist::root::daemon_socket(root)? {
        Some(socket) => Daemon::connect(&socket),
        None => bail!(
            "hoist {command} needs the hoist daemon, and none holds {} (start it with hoist serve)",
            root.display()
        ),
    }
}

pub fn version(root: &Path) -> Result<()> {
    println!("Client:\n  Version:  {}", env!("CARGO_PKG_VERSION"));
    let Some(socket) = hoist::root::daemon_socket(root)? else {
        println!("Daemon: none holds {}", root.display());
        return Ok(());
    };
    let v = Daemon::connect(&socket)?.version()?;
    println!(
        "Daemon:\n  Socket:   {}\n  Version:  {}\n  API:      {}\n  CRI API:  {}\n  Snapshotter: {}",
        socket.display(),
        v.version,
        v.api_version,
        v.cri_api_version,
        v.snapshotter
    );
    Ok(())
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    let t = t
        .and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_millis(t).to_string()
}

fn seconds(d: Option<&prost_types::Duration>) -> String {
    format!("{:.1}s", hoist::api::duration_from_wire(d).as_secs_f64())
}

/// `TIME  NAMESPACE  EVENT  WHAT`; `None` for a kind this build does not know.
fn event_line(e: &v1::Event) -> Option<String> {
    use v1::event::Kind;
    let (kind, what) = match e.kind.as_ref()? {
        Kind::ImageCreated(i) => ("image-created", format!("{} {}", i.name, i.digest)),
        Kind::ImageUpdated(i) => ("image-updated", format!("{} {}", i.name, i.digest)),
        Kind::ImageRemoved(i) => ("image-removed", i.name.clone()),
        Kind::PullStarted(p) => ("pull-started", format!("{} (pull {})", p.reference, p.id)),
        Kind::PullFinished(p) => (
            "pull-finished",
            format!(
                "{} {} in {} (pull {})",
                p.reference,
                p.digest,
                seconds(p.elapsed.as_ref()),
                p.id
            ),
        ),
        Kind::PullFailed(p) => (
            "pull-failed",
            format!(
                "{} after {} (pull {}): {}",
                p.reference,
                seconds(p.elapsed.as_ref()),
                p.id,
                p.error
            ),
        ),
        Kind::Gc(s) => (
            "gc",
            format!(
                "freed {}: {} blobs, {} snapshots, {} ingests, {} leases",
                human_size(s.bytes_freed),
                s.content_removed,
                s.snapshots_removed,
                s.ingests_removed,
                s.leases_removed
            ),
        ),
    };
    let namespace = if e.namespace.is_empty() {
        "-"
    } else {
        &e.namespace
    };
    Some(format!(
        "{}  {namespace:<10}  {kind:<13}  {what}",
        time(e.time.as_ref())
    ))
}

/// Each pull (its bytes, rate and time so far), then each of its lines.
fn ps_table(pulls: &[v1::PullInFlight]) -> String {
    let mut out = format!(
        "{:<5}  {:<10}  {:<60}  {:>8}  {:>23}  RATE\n",
        "ID", "NAMESPACE", "REFERENCE", "ELAPSED", "BYTES"
    );
    for p in pulls {
        let elapsed = hoist::api::duration_from_wire(p.elapsed.as_ref());
        // What is fetched, as the pull's own summary counts: not the unpack line.
        let fetched = p.progress.iter().filter(|e| !e.key.starts_with("unpack-"));
        let (done, total) = fetched.fold((0u64, 0u64), |(d, t), e| {
            (d.saturating_add(e.offset), t.saturating_add(e.total))
        });
        let rate = done as f64 / elapsed.max(Duration::from_millis(1)).as_secs_f64();
        out.push_str(&format!(
            "{:<5}  {:<10}  {:<60}  {:>8}  {:>23}  {}/s\n",
            p.id,
            p.namespace,
            p.reference,
            seconds(p.elapsed.as_ref()),
            format!("{}/{}", human_size(done), human_size(total)),
            human_size(rate as u64)
        ));
        for e in &p.progress {
            let state = hoist::api::state_from_wire(e.state).map_or("?", |s| s.as_str());
            out.push_str(&format!(
                "       {:<80}  {:<11}  {}/{}\n",
                e.key,
                state,
                human_size(e.offset),
                human_size(e.total)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_line_naming_its_kind_namespace_and_subject() {
        let e = v1::Event {
            time: Some(SystemTime::UNIX_EPOCH.into()),
            namespace: "k8s.io".into(),
            kind: Some(v1::event::Kind::PullFinished(v1::PullFinished {
                id: 7,
                reference: "docker.io/library/a:1".into(),
                digest: "sha256:00".into(),
                elapsed: Some(hoist::api::duration_to_wire(Duration::from_millis(1500))),
            })),
        };
        let line = event_line(&e).unwrap_or_default();
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z  k8s.io      pull-finished  docker.io/library/a:1 sha256:00 in 1.5s (pull 7)"
        );
        let gc = v1::Event {
            time: None,
            namespace: String::new(),
            kind: Some(v1::event::Kind::Gc(v1::GcStats {
                bytes_freed: 2048,
                content_removed: 3,
                ..Default::default()
            })),
        };
        let line = event_line(&gc).unwrap_or_default();
        assert!(line.contains("  -  "), "{line}");
        assert!(
            line.ends_with(
                "gc             freed 2.0 KiB: 3 blobs, 0 snapshots, 0 ingests, 0 leases"
            ),
            "{line}"
        );
        assert_eq!(event_line(&v1::Event::default()), None);
    }

    #[test]
    fn ps_shows_each_pull_with_its_bytes_and_rate_then_its_lines() {
        let pull = v1::PullInFlight {
            id: 3,
            namespace: "k8s.io".into(),
            reference: "docker.io/library/a:1".into(),
            started: None,
            elapsed: Some(hoist::api::duration_to_wire(Duration::from_secs(2))),
            progress: vec![
                v1::Progress {
                    key: "layer-sha256:aa".into(),
                    state: v1::State::Downloading.into(),
                    offset: 2048,
                    total: 4096,
                },
                v1::Progress {
                    key: "unpack-sha256:cc".into(),
                    state: v1::State::Unpacking.into(),
                    offset: 0,
                    total: 4096,
                },
            ],
        };
        let table = ps_table(&[pull]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("ID "), "{table}");
        assert!(lines[1].starts_with("3 "), "{table}");
        assert!(
            lines[1].contains("2.0 KiB/4.0 KiB"),
            "the unpack line is no fetch: {table}"
        );
        assert!(lines[1].ends_with("1.0 KiB/s"), "{table}");
        assert!(lines[2].contains("layer-sha256:aa") && lines[2].contains("downloading"));
        assert!(lines[3].contains("unpacking"), "{table}");
    }
}
