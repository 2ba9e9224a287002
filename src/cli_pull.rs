//! `hoist pull` and `hoist images`: the pull (its display is in
//! `cli_display`), on the root or streamed from the daemon, and the listing.

use crate::cli_display;
use anyhow::Result;
use hoist::api::PullSummary;
use hoist::api::ops::ImageSummary;
use hoist::metadata::Db;
use hoist::pull::progress::Progress;
use hoist::pull::{PullOptions, Puller};
use hoist::remote::{RegistryClient, RemoteOptions};
use hoist::root::human_size;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;

/// A pull on the root itself.
pub async fn run(
    db: Arc<Db>,
    namespace: &str,
    reference: &str,
    options: PullOptions,
    remote: RemoteOptions,
    max_concurrent_downloads: usize,
    snapshotter: Option<Arc<hoist::snapshot::SnapshotRoot>>,
) -> Result<()> {
    let puller = Puller::new(
        db,
        RegistryClient::new(remote),
        max_concurrent_downloads,
        snapshotter,
    );
    show(|progress| async move {
        let pulled = puller
            .pull(namespace, reference, &options, &progress)
            .await?;
        Ok(PullSummary::from(&pulled))
    })
    .await
}

/// Runs `pull`, which reports to the progress it is given (a pull here, or
/// one the daemon streams), with the display on, then says what it made:
/// either kind of pull prints the same.
pub async fn show<F, Fut>(pull: F) -> Result<()>
where
    F: FnOnce(Arc<Progress>) -> Fut,
    Fut: Future<Output = Result<PullSummary>>,
{
    let tty = std::io::stdout().is_terminal();
    let progress = Arc::new(cli_display::new_progress(tty));
    let live = tty.then(|| cli_display::Live::start(progress.clone()));
    let result = pull(progress.clone()).await;
    if let Some(live) = live {
        live.finish().await;
    }
    // After a failure too: how long it ran and what it had to fetch.
    println!("{}", cli_display::summary(&progress));
    let pulled = result?;
    for u in &pulled.unpacked {
        let how = match (u.parallel, u.streamed) {
            (false, _) => String::new(),
            (true, 0) => " (layers applied in parallel)".to_string(),
            (true, n) => format!(
                " (layers applied in parallel, {n} of {} as they downloaded)",
                u.layers_applied
            ),
        };
        println!(
            "unpacking {} {}...done: {:.1?}{how}",
            u.platform, u.manifest, u.duration
        );
    }
    println!("{} {}", pulled.name, pulled.digest);
    Ok(())
}

pub fn list_images(images: &[ImageSummary], quiet: bool) {
    if !quiet {
        println!("{:<60}  {:<71}  {:>10}  PLATFORMS", "REF", "DIGEST", "SIZE");
    }
    for image in images {
        if quiet {
            println!("{}", image.name);
            continue;
        }
        println!(
            "{:<60}  {:<71}  {:>10}  {}",
            image.name,
            image.digest,
            human_size(image.size),
            image.platforms.join(",")
        );
    }
}
