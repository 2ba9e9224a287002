//! The `hoist` command line: a thin layer over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hoist::content::Store;
use hoist::filters::Filter;
use hoist::metadata::Db;
use hoist::root::{default_root, human_size, validate_namespace};
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Parser)]
#[command(
    name = "hoist",
    version,
    about = "A container image service for Kubernetes nodes"
)]
struct Cli {
    /// State directory [default: /var/lib/hoist as root, $XDG_DATA_HOME/hoist otherwise]
    #[arg(long, global = true, env = "HOIST_ROOT")]
    root: Option<PathBuf>,
    /// Namespace of images and content
    #[arg(long, short = 'n', global = true, default_value = hoist::metadata::NAMESPACE_DEFAULT, env = "HOIST_NAMESPACE")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Remove everything no image, lease or root label keeps alive
    Gc,
    /// Inspect the content store
    Content {
        #[command(subcommand)]
        command: ContentCommand,
    },
}

#[derive(Subcommand)]
enum ContentCommand {
    /// List blobs: digest, size, age and labels
    #[command(alias = "list")]
    Ls {
        /// Only print digests
        #[arg(long, short)]
        quiet: bool,
        /// containerd-style filters, e.g. 'labels."containerd.io/gc.root"'
        filters: Vec<String>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOIST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("hoist: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    validate_namespace(&cli.namespace)?;
    let root = cli.root.unwrap_or_else(default_root);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let db = Db::open(&root).with_context(|| format!("opening hoist root {}", root.display()))?;
    match cli.command {
        Command::Gc => {
            let r = db.garbage_collect(&[])?;
            println!(
                "removed {} blobs, {} snapshots, {} ingests, {} leases; freed {} in {:.2?}",
                r.content_removed,
                r.snapshots_removed,
                r.ingests_removed,
                r.leases_removed,
                human_size(r.bytes_freed),
                r.duration
            );
        }
        Command::Content {
            command: ContentCommand::Ls { quiet, filters },
        } => {
            let store = db.content_store(&cli.namespace);
            let filter = Filter::parse_all(&filters)?;
            let mut rows = Vec::new();
            store.walk(&filter, &mut |info| {
                rows.push(info);
                Ok(())
            })?;
            rows.sort_by_key(|info| info.created_at);
            if !quiet {
                println!("{:<71}  {:>10}  {:<16}  LABELS", "DIGEST", "SIZE", "AGE");
            }
            for info in rows {
                if quiet {
                    println!("{}", info.digest);
                    continue;
                }
                let age = SystemTime::now()
                    .duration_since(info.created_at)
                    .map(|d| {
                        humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                            .to_string()
                    })
                    .unwrap_or_else(|_| "0s".to_string());
                let labels: Vec<String> = info
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{:<71}  {:>10}  {:<16}  {}",
                    info.digest.to_string(),
                    human_size(info.size),
                    age,
                    if labels.is_empty() {
                        "-".to_string()
                    } else {
                        labels.join(",")
                    }
                );
            }
        }
    }
    Ok(())
}
