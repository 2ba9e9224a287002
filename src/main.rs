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
    /// Serve the CRI ImageService on a unix socket (for kubelet and crictl)
    Serve {
        /// Config file (TOML; every key optional)
        #[arg(long, default_value = hoist::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Socket to listen on [default: /run/hoist/hoist.sock]
        #[arg(long)]
        socket: Option<PathBuf>,
        /// overlayfs or native [default: overlayfs where the host supports it]
        #[arg(long)]
        snapshotter: Option<String>,
        /// Registry host configuration directory [default: /etc/hoist/certs.d]
        #[arg(long)]
        hosts_dir: Option<PathBuf>,
        /// text or json
        #[arg(long)]
        log_format: Option<String>,
    },
    /// Fetch an image (index, manifests, config, layers) and record it
    Pull {
        /// Platform to fetch, os/arch[/variant] (repeatable) [default: this machine's]
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Fetch every platform of an index
        #[arg(long)]
        all_platforms: bool,
        /// Fetch only, do not unpack into snapshots
        #[arg(long)]
        no_unpack: bool,
        /// Apply layers one at a time even where they could apply in parallel
        #[arg(long)]
        sequential_unpack: bool,
        /// overlayfs or native [default: overlayfs where the host supports it]
        #[arg(long)]
        snapshotter: Option<String>,
        /// Directory of registry host configuration (containerd's hosts.toml layout)
        #[arg(long, default_value = "/etc/hoist/certs.d")]
        hosts_dir: PathBuf,
        /// Use plain HTTP for the registry
        #[arg(long)]
        plain_http: bool,
        /// Registry credentials, USER[:PASSWORD]
        #[arg(long, short)]
        user: Option<String>,
        /// Give up when a download makes no progress for this long
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        progress_timeout: std::time::Duration,
        /// Downloads that run at once
        #[arg(long, default_value_t = 3)]
        max_concurrent_downloads: usize,
        /// Bytes per range request for a layer that dominates the image, fetched in parallel parts; 0 turns that off
        #[arg(long, default_value_t = hoist::remote::RangedFetch::default().part_size)]
        layer_part_size: u64,
        /// Range requests in flight for such a layer
        #[arg(long, default_value_t = hoist::remote::RangedFetch::default().parts_at_once)]
        layer_parts_at_once: usize,
        reference: String,
    },
    /// List images: name, digest, size and platforms
    #[command(alias = "ls")]
    Images {
        #[arg(long, short)]
        quiet: bool,
    },
    /// Remove images by name, then collect garbage
    Rmi { references: Vec<String> },
    /// Mount a read-only view of an image's root filesystem at DIR (nosuid,nodev)
    Mount {
        /// overlayfs or native [default: the one the image was unpacked with]
        #[arg(long)]
        snapshotter: Option<String>,
        /// Mount without nosuid,nodev, so the image's setuid and setgid bits
        /// and device nodes work through the view (for anyone who can reach DIR)
        #[arg(long)]
        allow_suid_dev: bool,
        /// Platform of a multi-platform image [default: this machine's]
        #[arg(long)]
        platform: Option<String>,
        reference: String,
        dir: PathBuf,
    },
    /// Unmount DIR and remove the view `hoist mount` made for it
    Unmount { dir: PathBuf },
    /// Inspect snapshots
    Snapshots {
        #[command(subcommand)]
        command: SnapshotsCommand,
    },
    /// Remove everything no image, lease or root label keeps alive
    Gc,
    /// Inspect the content store
    Content {
        #[command(subcommand)]
        command: ContentCommand,
    },
}

#[derive(Subcommand)]
enum SnapshotsCommand {
    /// List snapshots: key, parent, kind
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        snapshotter: Option<String>,
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

mod cli_mount;
mod cli_pull;
mod cli_serve;

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub(crate) fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

fn init_logging(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOIST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { .. } => cli_serve::run(cli),
        _ => {
            init_logging(false, "warn");
            run(cli)
        }
    };
    if let Err(e) = result {
        eprintln!("hoist: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, skipping a cause its parent's message already
/// quotes (library errors name their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    validate_namespace(&cli.namespace)?;
    let root = cli.root.clone().unwrap_or_else(default_root);
    // Collecting garbage takes the root from every other process: another
    // command's blob between its rename and its row, or its snapshot
    // directory before its record, would look like garbage.
    let _lock = match cli.command {
        Command::Rmi { .. } | Command::Gc => hoist::root::RootLock::collector(&root)?,
        _ => hoist::root::RootLock::shared(&root)?,
    };
    let db = Db::open(&root).with_context(|| format!("opening hoist root {}", root.display()))?;
    match cli.command {
        // Dispatched to cli_serve by main before a root is opened.
        Command::Serve { .. } => {}
        Command::Pull {
            platforms,
            all_platforms,
            no_unpack,
            sequential_unpack,
            snapshotter,
            hosts_dir,
            plain_http,
            user,
            progress_timeout,
            max_concurrent_downloads,
            layer_part_size,
            layer_parts_at_once,
            reference,
        } => {
            let options = hoist::pull::PullOptions {
                platforms: platforms
                    .iter()
                    .map(|p| hoist::images::platform::parse(p))
                    .collect::<Result<_, _>>()?,
                all_platforms,
                credentials: user
                    .as_deref()
                    .map(hoist::remote::Credentials::from_user_flag),
                no_unpack,
                sequential_unpack,
            };
            let snapshotter = if no_unpack {
                None
            } else {
                Some(hoist::snapshot::open(&db, snapshotter.as_deref())?)
            };
            let remote = hoist::remote::RemoteOptions {
                hosts: hoist::remote::HostsConfig::new(Some(hosts_dir), plain_http),
                credentials: hoist::remote::CredentialSource {
                    explicit: None,
                    docker_config: docker_config_path(),
                },
                progress_timeout,
                ranged: hoist::remote::RangedFetch {
                    part_size: layer_part_size,
                    parts_at_once: layer_parts_at_once,
                },
                ..Default::default()
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli_pull::run(
                db,
                &cli.namespace,
                &reference,
                options,
                remote,
                max_concurrent_downloads,
                snapshotter,
            ))?;
        }
        Command::Images { quiet } => cli_pull::list_images(&db, &cli.namespace, quiet)?,
        Command::Rmi { references } => {
            for r in &references {
                let name = hoist::reference::Reference::parse(r)?.to_string();
                db.delete_image(&cli.namespace, &name)
                    .with_context(|| format!("removing {r}"))?;
                println!("{name}");
            }
            let report = hoist::snapshot::garbage_collect(&db)?;
            eprintln!("freed {}", human_size(report.bytes_freed));
        }
        Command::Mount {
            snapshotter,
            allow_suid_dev,
            platform,
            reference,
            dir,
        } => cli_mount::mount(
            &db,
            &cli.namespace,
            snapshotter.as_deref(),
            platform.as_deref(),
            &reference,
            &dir,
            allow_suid_dev,
        )?,
        Command::Unmount { dir } => cli_mount::unmount(&db, &cli.namespace, &dir)?,
        Command::Snapshots {
            command: SnapshotsCommand::Ls { snapshotter },
        } => cli_mount::list_snapshots(&db, &cli.namespace, snapshotter.as_deref())?,
        Command::Gc => {
            let r = hoist::snapshot::garbage_collect(&db)?;
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
