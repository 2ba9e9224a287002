//! `hoist serve` as a subprocess on its own root and socket, shared by the
//! suites that drive the daemon through its socket.
// Each suite uses a part of this.
#![allow(dead_code)]

use k8s_cri::v1::ImageSpec;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    /// containerd's snapshots API: each daemon has its own.
    pub snapshots_socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
}

/// What a test daemon is started with beyond its root and socket.
#[derive(Default)]
pub struct Options {
    /// The registry hosts directory (hosts.toml files).
    pub hosts_dir: Option<PathBuf>,
    /// containerd's socket, to publish pulls to.
    pub containerd: Option<PathBuf>,
    /// `host:port` for the metrics listener; none when unset.
    pub metrics_address: Option<String>,
    /// The hoist to run instead of the one cargo built for this test.
    pub binary: Option<PathBuf>,
}

impl Daemon {
    pub fn start(root: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        Self::start_with(root, socket, &Options::default(), extra)
    }

    pub fn start_with(root: &Path, socket: &Path, options: &Options, extra: &[&str]) -> Daemon {
        let log = root.with_extension("log");
        let snapshots_socket = root.with_extension("snapshots.sock");
        let hosts = options
            .hosts_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/nonexistent"));
        // No containerd unless the test brings its own: the machine's
        // would otherwise be asked.
        let containerd = options.containerd.clone().unwrap_or_default();
        std::fs::write(
            root.with_extension("toml"),
            format!(
                "max_concurrent_downloads = 3\npull_progress_timeout = \"30s\"\nlog_format = \"text\"\n\
                 snapshotter_socket = {:?}\nmetrics_address = {:?}\n\
                 [registry]\nconfig_path = {:?}\n[containerd]\naddress = {:?}\n",
                snapshots_socket.display().to_string(),
                options.metrics_address.clone().unwrap_or_default(),
                hosts.display().to_string(),
                containerd.display().to_string(),
            ),
        )
        .unwrap();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let binary = options
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hoist")));
        let child = Command::new(binary)
            .arg("--root")
            .arg(root)
            .arg("serve")
            .arg("--config")
            .arg(root.with_extension("toml"))
            .arg("--socket")
            .arg(socket)
            .args(extra)
            // HOIST_TEST_LOG=debug puts the daemon's debug lines in its log.
            .env(
                "HOIST_LOG",
                std::env::var("HOIST_TEST_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err()
            || std::os::unix::net::UnixStream::connect(&snapshots_socket).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon {
            child,
            socket: socket.to_path_buf(),
            snapshots_socket,
            root: root.to_path_buf(),
            log,
        }
    }

    /// SIGTERM, then wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().ok().and_then(|s| s.code())
    }

    pub async fn client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(hoist::grpc_unix::connect(&self.socket).await.unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}
