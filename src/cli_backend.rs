//! Where a command runs: on the root itself, or through the daemon that
//! holds it. Either way the command gets the same values (`hoist::api::ops`
//! on one side or the other) and prints them here, so its output does not
//! depend on whether a daemon runs.

use crate::cli_daemon::Daemon;
use crate::cli_pull;
use anyhow::{Context, Result, bail};
use hoist::api::ops::{self, MountOptions};
use hoist::metadata::Db;
use hoist::root::{LockError, RootLock, human_size};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub enum Backend {
    Root { db: Arc<Db>, _lock: RootLock },
    Daemon(Box<Daemon>),
}

impl Backend {
    /// The root, locked for a command (`collects`: one that collects
    /// garbage); or, with `daemon_answers`, the daemon that holds it.
    pub fn open(root: &Path, collects: bool, daemon_answers: bool) -> Result<Backend> {
        let lock = if collects {
            RootLock::collector(root)
        } else {
            RootLock::shared(root)
        };
        match lock {
            Ok(lock) => {
                let db = Db::open(root)
                    .with_context(|| format!("opening hoist root {}", root.display()))?;
                Ok(Backend::Root { db, _lock: lock })
            }
            Err(LockError::HeldByDaemon { socket, .. }) if daemon_answers => Ok(Backend::Daemon(
                Box::new(Daemon::connect(Path::new(&socket))?),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// The root's database, for the commands only the root answers.
    pub fn db(&self) -> Result<&Arc<Db>> {
        match self {
            Backend::Root { db, .. } => Ok(db),
            Backend::Daemon(_) => bail!("this command does not go through the daemon"),
        }
    }

    pub fn images(&mut self, namespace: &str, quiet: bool) -> Result<()> {
        let images = match self {
            Backend::Root { db, .. } => ops::list_images(db, namespace)?,
            Backend::Daemon(d) => d.list(namespace)?,
        };
        cli_pull::list_images(&images, quiet);
        Ok(())
    }

    /// Prints the names removed, what that freed, and fails naming those
    /// that were not there.
    pub fn rmi(&mut self, namespace: &str, references: &[String]) -> Result<()> {
        let removal = match self {
            Backend::Root { db, .. } => ops::remove_images(db, namespace, references)?,
            Backend::Daemon(d) => d.remove(namespace, references)?,
        };
        for name in &removal.removed {
            println!("{name}");
        }
        if let Some(report) = &removal.collected {
            eprintln!("freed {}", human_size(report.bytes_freed));
        }
        match removal.not_found.as_slice() {
            [] => Ok(()),
            [one] => bail!("image {one} not found"),
            many => bail!("images not found: {}", many.join(", ")),
        }
    }

    pub fn mount(&mut self, namespace: &str, mut options: MountOptions) -> Result<()> {
        // Relative to here, wherever the mount is made.
        options.dir = std::path::absolute(&options.dir)
            .with_context(|| format!("resolving {}", options.dir.display()))?;
        match self {
            Backend::Root { db, .. } => ops::mount(db, namespace, &options)?,
            Backend::Daemon(d) => d.mount(namespace, &options)?,
        };
        Ok(())
    }

    pub fn unmount(&mut self, namespace: &str, dir: &Path) -> Result<()> {
        let dir = ops::resolve(dir)?;
        let view_removed = match self {
            Backend::Root { db, .. } => ops::unmount(db, namespace, &dir)?,
            Backend::Daemon(d) => d.unmount(namespace, &dir)?,
        };
        if !view_removed {
            eprintln!(
                "{} was not mounted by hoist mount; unmounted only",
                dir.display()
            );
        }
        Ok(())
    }

    pub fn snapshots(&mut self, namespace: &str, snapshotter: Option<&str>) -> Result<()> {
        // Checked here, so both paths refuse a bad name alike (through
        // the daemon an empty one would mean every snapshotter).
        let snapshotter = snapshotter
            .map(hoist::snapshot::canonical_name)
            .transpose()?;
        let snapshots = match self {
            Backend::Root { db, .. } => ops::list_snapshots(db, namespace, snapshotter)?,
            Backend::Daemon(d) => d.snapshots(namespace, snapshotter)?,
        };
        println!(
            "{:<80}  {:<71}  {:<9}  SNAPSHOTTER",
            "KEY", "PARENT", "KIND"
        );
        for s in snapshots {
            println!(
                "{:<80}  {:<71}  {:<9}  {}",
                s.key, s.parent, s.kind, s.snapshotter
            );
        }
        Ok(())
    }

    pub fn content(&mut self, namespace: &str, quiet: bool, filters: &[String]) -> Result<()> {
        let blobs = match self {
            Backend::Root { db, .. } => ops::list_content(db, namespace, filters)?,
            Backend::Daemon(d) => d.content(namespace, filters)?,
        };
        if !quiet {
            println!("{:<71}  {:>10}  {:<16}  LABELS", "DIGEST", "SIZE", "AGE");
        }
        for blob in blobs {
            if quiet {
                println!("{}", blob.digest);
                continue;
            }
            let age = SystemTime::now()
                .duration_since(blob.created_at)
                .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
                .unwrap_or_else(|_| "0s".to_string());
            let labels: Vec<String> = blob
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let labels = match labels.is_empty() {
                true => "-".to_string(),
                false => labels.join(","),
            };
            println!(
                "{:<71}  {:>10}  {:<16}  {labels}",
                blob.digest,
                human_size(blob.size),
                age,
            );
        }
        Ok(())
    }

    pub fn gc(&mut self) -> Result<()> {
        let r = match self {
            Backend::Root { db, .. } => ops::collect(db)?,
            Backend::Daemon(d) => d.gc()?,
        };
        println!(
            "removed {} blobs, {} snapshots, {} ingests, {} leases; freed {} in {:.2?}",
            r.content_removed,
            r.snapshots_removed,
            r.ingests_removed,
            r.leases_removed,
            human_size(r.bytes_freed),
            r.duration
        );
        Ok(())
    }
}
