//! `hoist pull` and `hoist images`: the live progress display and the listing.

use anyhow::Result;
use hoist::content::Store;
use hoist::filters::Filter;
use hoist::metadata::Db;
use hoist::pull::progress::{Entry, Progress, State};
use hoist::pull::{PullOptions, Puller};
use hoist::remote::{RegistryClient, RemoteOptions};
use hoist::root::human_size;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

pub async fn run(
    db: Arc<Db>,
    namespace: &str,
    reference: &str,
    options: PullOptions,
    remote: RemoteOptions,
    max_concurrent_downloads: usize,
    snapshotter: Option<Arc<hoist::snapshot::SnapshotRoot>>,
) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let progress = Arc::new(if tty {
        Progress::default()
    } else {
        Progress::new(Some(Box::new(|e: &Entry| {
            println!("{}: {}", e.key, e.state.as_str());
        })))
    });
    let puller = Puller::new(
        db,
        RegistryClient::new(remote),
        max_concurrent_downloads,
        snapshotter,
    );
    let display = tty.then(|| {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut lines = 0;
            loop {
                lines = draw(&progress, lines, true);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let result = puller.pull(namespace, reference, &options, &progress).await;
    if let Some(d) = display {
        d.abort();
        let _ = d.await;
        draw(&progress, progress.snapshot().len() + 1, false);
    }
    let pulled = result?;
    let elapsed = progress.started().elapsed();
    // What was fetched or found: every descriptor, not the unpack line.
    let total: u64 = progress
        .snapshot()
        .iter()
        .filter(|e| !e.key.starts_with("unpack-"))
        .map(|e| e.total)
        .sum();
    println!(
        "elapsed: {:.1}s\ttotal: {}\t({}/s)",
        elapsed.as_secs_f64(),
        human_size(total),
        human_size((total as f64 / elapsed.as_secs_f64().max(0.001)) as u64)
    );
    for m in &pulled.manifests {
        if let Some(u) = &m.unpacked {
            let platform = m
                .platform
                .clone()
                .unwrap_or_else(hoist::images::platform::host);
            let platform = hoist::images::platform_string(&platform);
            let how = match (u.parallel, u.streamed) {
                (false, _) => String::new(),
                (true, 0) => " (layers applied in parallel)".to_string(),
                (true, n) => format!(
                    " (layers applied in parallel, {n} of {} as they downloaded)",
                    u.layers_applied
                ),
            };
            println!(
                "unpacking {platform} {}...done: {:.1?}{how}",
                m.manifest.digest, u.duration
            );
        }
    }
    println!("{} {}", pulled.name, pulled.target.digest);
    Ok(())
}

/// Redraws the progress table in place, with an `elapsed` line while the
/// pull runs; returns how many lines it drew.
fn draw(progress: &Progress, previous_lines: usize, running: bool) -> usize {
    let entries = progress.snapshot();
    let mut out = String::new();
    if previous_lines > 0 {
        out.push_str(&format!("\x1b[{previous_lines}A"));
    }
    for e in &entries {
        let bar = bar(e);
        let key = if e.key.len() > 80 {
            &e.key[..80]
        } else {
            &e.key
        };
        let sizes = if e.total > 0 {
            format!("{:>10}/{:<10}", human_size(e.offset), human_size(e.total))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "\x1b[2K{key:<80} {:<12}|{bar}| {sizes}\n",
            e.state.as_str(),
        ));
    }
    if running {
        out.push_str(&format!(
            "\x1b[2Kelapsed: {:.1}s\n",
            progress.started().elapsed().as_secs_f64()
        ));
    } else {
        out.push_str("\x1b[2K");
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    entries.len() + usize::from(running)
}

fn bar(e: &Entry) -> String {
    const WIDTH: usize = 30;
    let filled = match e.state {
        State::Done | State::Exists | State::Resolved => WIDTH,
        _ if e.total > 0 => ((e.offset.min(e.total) * WIDTH as u64) / e.total) as usize,
        _ => 0,
    };
    format!("{}{}", "+".repeat(filled), "-".repeat(WIDTH - filled))
}

pub fn list_images(db: &Arc<Db>, namespace: &str, quiet: bool) -> Result<()> {
    let images = db.list_images(namespace, &Filter::default())?;
    if !quiet {
        println!("{:<60}  {:<71}  {:>10}  PLATFORMS", "REF", "DIGEST", "SIZE");
    }
    let store = db.content_store(namespace);
    for image in images {
        if quiet {
            println!("{}", image.name);
            continue;
        }
        let (size, platforms) = image_size_and_platforms(&store, &image.target);
        println!(
            "{:<60}  {:<71}  {:>10}  {}",
            image.name,
            image.target.digest.to_string(),
            human_size(size),
            platforms.join(",")
        );
    }
    Ok(())
}

/// Size of what is stored for the image (manifests, configs, layers present),
/// and the platforms its index lists.
fn image_size_and_platforms(
    store: &hoist::metadata::ContentStore,
    target: &hoist::descriptor::Descriptor,
) -> (u64, Vec<String>) {
    use hoist::images::{self, Kind};
    let read = |d: &hoist::descriptor::Descriptor| -> Option<Vec<u8>> {
        let mut blob = store.reader_at(&d.digest).ok()?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut blob, &mut out).ok()?;
        Some(out)
    };
    let present =
        |d: &hoist::descriptor::Descriptor| store.info(&d.digest).map(|i| i.size).unwrap_or(0);
    let manifest_size = |d: &hoist::descriptor::Descriptor| -> u64 {
        let Some(body) = read(d) else { return 0 };
        let Ok(m) = images::parse_manifest(d, &body) else {
            return 0;
        };
        present(d) + present(&m.config) + m.layers.iter().map(present).sum::<u64>()
    };
    match images::kind(target) {
        Ok(Kind::Index) => {
            let Some(body) = read(target) else {
                return (0, Vec::new());
            };
            let Ok(index) = images::parse_index(target, &body) else {
                return (0, Vec::new());
            };
            let mut platforms = Vec::new();
            let mut size = present(target);
            for m in index
                .manifests
                .iter()
                .filter(|m| !images::is_attestation(m))
            {
                if let Some(p) = &m.platform {
                    platforms.push(images::platform_string(p));
                }
                size += manifest_size(m);
            }
            (size, platforms)
        }
        Ok(Kind::Manifest) => (manifest_size(target), Vec::new()),
        _ => (present(target), Vec::new()),
    }
}
