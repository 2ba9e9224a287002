//! The `hoist` command line: a thin layer over the library.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use hoist::metadata::NAMESPACE_DEFAULT;
use hoist::root::{default_root, validate_namespace};
use std::path::PathBuf;

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
    /// Namespace of images and content [default: default; events and ps: every namespace]
    #[arg(long, short = 'n', global = true, env = "HOIST_NAMESPACE")]
    namespace: Option<String>,
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
        /// erofs, overlayfs or native [default: the root's; for a new root erofs, else overlayfs, where the host supports it]
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
        /// erofs, overlayfs or native [default: the root's; for a new root erofs, else overlayfs, where the host supports it]
        #[arg(long)]
        snapshotter: Option<String>,
        /// Registry credentials, USER[:PASSWORD]
        #[arg(long, short)]
        user: Option<String>,
        // The daemon pulls with its own settings for these (hoist serve's
        // config), so they apply only on a root no daemon holds.
        #[command(flatten)]
        local: LocalPull,
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
        /// erofs, overlayfs or native [default: the one the image was unpacked with]
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
    /// Check the root: every blob re-hashed, rows against files, snapshots,
    /// images, leases, ingests; exit status 1 when anything is wrong
    Check {
        /// Put right what is wrong (removes what cannot be used), then collect garbage
        #[arg(long)]
        repair: bool,
    },
    /// Inspect the content store
    Content {
        #[command(subcommand)]
        command: ContentCommand,
    },
    /// Follow the daemon's events: images, pulls, garbage collections
    Events,
    /// List the daemon's pulls in flight (CRI clients' too)
    Ps,
    /// Print this build's version, and the daemon's when one runs
    Version,
}

/// Settings of a pull on the root itself.
#[derive(clap::Args)]
struct LocalPull {
    /// Directory of registry host configuration (containerd's hosts.toml layout) [default: /etc/hoist/certs.d]
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Use plain HTTP for the registry
    #[arg(long)]
    plain_http: bool,
    /// Give up when a download makes no progress for this long [default: 5m]
    #[arg(long, value_parser = humantime::parse_duration)]
    progress_timeout: Option<std::time::Duration>,
    /// Downloads that run at once [default: 3]
    #[arg(long)]
    max_concurrent_downloads: Option<usize>,
    /// Bytes per range request for a layer that dominates the image, fetched in parallel parts; 0 turns that off [default: 4194304]
    #[arg(long)]
    layer_part_size: Option<u64>,
    /// Range requests in flight for such a layer [default: 4]
    #[arg(long)]
    layer_parts_at_once: Option<usize>,
}

impl LocalPull {
    /// The first flag given, which a pull through the daemon cannot honour.
    fn given(&self) -> Option<&'static str> {
        [
            (self.hosts_dir.is_some(), "--hosts-dir"),
            (self.plain_http, "--plain-http"),
            (self.progress_timeout.is_some(), "--progress-timeout"),
            (
                self.max_concurrent_downloads.is_some(),
                "--max-concurrent-downloads",
            ),
            (self.layer_part_size.is_some(), "--layer-part-size"),
            (self.layer_parts_at_once.is_some(), "--layer-parts-at-once"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
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

mod cli_backend;
mod cli_check;
mod cli_daemon;
mod cli_display;
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

/// The error and its causes, as the daemon words its statuses too.
fn error_chain(e: &anyhow::Error) -> String {
    hoist::error_chain(e.as_ref())
}

fn run(cli: Cli) -> Result<()> {
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| NAMESPACE_DEFAULT.to_string());
    validate_namespace(&namespace)?;
    let root = cli.root.clone().unwrap_or_else(default_root);
    // Only a daemon answers these; a namespace given filters them.
    let only = cli.namespace.as_deref();
    match cli.command {
        Command::Version => return cli_daemon::version(&root),
        Command::Events => return cli_daemon::required(&root, "events")?.events(only),
        Command::Ps => return cli_daemon::required(&root, "ps")?.ps(only),
        _ => {}
    }
    // Collecting garbage takes the root from every other process: another
    // command's blob between its rename and its row, or its snapshot
    // directory before its record, would look like garbage.
    let collects = matches!(
        cli.command,
        Command::Rmi { .. } | Command::Gc | Command::Check { repair: true }
    );
    let daemon_answers = matches!(
        cli.command,
        Command::Pull { .. }
            | Command::Images { .. }
            | Command::Rmi { .. }
            | Command::Mount { .. }
            | Command::Unmount { .. }
            | Command::Gc
            | Command::Snapshots { .. }
            | Command::Content { .. }
    );
    let mut backend = cli_backend::Backend::open(&root, collects, daemon_answers)?;
    match cli.command {
        // Dispatched before a root is opened.
        Command::Serve { .. } | Command::Events | Command::Ps | Command::Version => {}
        Command::Pull {
            platforms,
            all_platforms,
            no_unpack,
            sequential_unpack,
            snapshotter,
            user,
            local,
            reference,
        } => {
            let db = match backend {
                cli_backend::Backend::Daemon(daemon) => {
                    if let Some(flag) = local.given() {
                        bail!(
                            "{flag} sets up a pull on a root no daemon holds; the daemon pulls with its own settings (hoist serve --config)"
                        );
                    }
                    let credentials = user.as_deref().map(|u| {
                        let (username, password) = u.split_once(':').unwrap_or((u, ""));
                        hoist::api::v1::Credentials {
                            username: username.to_string(),
                            password: password.to_string(),
                        }
                    });
                    return daemon.pull(hoist::api::v1::PullRequest {
                        namespace,
                        reference,
                        platforms,
                        all_platforms,
                        no_unpack,
                        sequential_unpack,
                        snapshotter: snapshotter.unwrap_or_default(),
                        credentials,
                    });
                }
                cli_backend::Backend::Root { ref db, .. } => db.clone(),
            };
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
            let ranged = hoist::remote::RangedFetch::default();
            let remote = hoist::remote::RemoteOptions {
                hosts: hoist::remote::HostsConfig::new(
                    Some(
                        local
                            .hosts_dir
                            .unwrap_or_else(|| hoist::config::DEFAULT_HOSTS_DIR.into()),
                    ),
                    local.plain_http,
                ),
                credentials: hoist::remote::CredentialSource {
                    explicit: None,
                    docker_config: docker_config_path(),
                },
                progress_timeout: local
                    .progress_timeout
                    .unwrap_or(std::time::Duration::from_secs(300)),
                ranged: hoist::remote::RangedFetch {
                    part_size: local.layer_part_size.unwrap_or(ranged.part_size),
                    parts_at_once: local.layer_parts_at_once.unwrap_or(ranged.parts_at_once),
                },
                ..Default::default()
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli_pull::run(
                db,
                &namespace,
                &reference,
                options,
                remote,
                local.max_concurrent_downloads.unwrap_or(3),
                snapshotter,
            ))?;
        }
        Command::Images { quiet } => backend.images(&namespace, quiet)?,
        Command::Rmi { references } => backend.rmi(&namespace, &references)?,
        Command::Mount {
            snapshotter,
            allow_suid_dev,
            platform,
            reference,
            dir,
        } => backend.mount(
            &namespace,
            hoist::api::ops::MountOptions {
                reference,
                dir,
                platform,
                snapshotter,
                allow_suid_dev,
            },
        )?,
        Command::Unmount { dir } => backend.unmount(&namespace, &dir)?,
        Command::Gc => backend.gc()?,
        Command::Check { repair } => {
            if !cli_check::run(backend.db()?, repair)? {
                std::process::exit(1);
            }
        }
        Command::Snapshots {
            command: SnapshotsCommand::Ls { snapshotter },
        } => backend.snapshots(&namespace, snapshotter.as_deref())?,
        Command::Content {
            command: ContentCommand::Ls { quiet, filters },
        } => backend.content(&namespace, quiet, &filters)?,
    }
    Ok(())
}
