//! The daemon's configuration: a TOML file where every key is optional.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/hoist/config.toml";
pub const DEFAULT_SOCKET: &str = "/run/hoist/hoist.sock";
pub const DEFAULT_SNAPSHOTTER_SOCKET: &str = "/run/hoist/snapshotter.sock";
pub const DEFAULT_HOSTS_DIR: &str = "/etc/hoist/certs.d";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// containerd-style hosts.toml directory.
    pub config_path: Option<PathBuf>,
}

/// The containerd that runs pods from hoist's images.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Containerd {
    /// containerd's socket; every CRI pull and removal is published there.
    /// An empty path turns publishing off.
    pub address: Option<PathBuf>,
    /// The name containerd's configuration gives hoist's proxy snapshotter
    /// (`[proxy_plugins.<name>]`); hoist publishes only to a containerd
    /// whose CRI unpacks into it.
    pub snapshotter: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    /// Where containerd's snapshots API is served; empty turns it off.
    pub snapshotter_socket: Option<PathBuf>,
    pub snapshotter: Option<String>,
    #[serde(default)]
    pub registry: Registry,
    #[serde(default)]
    pub containerd: Containerd,
    pub max_concurrent_downloads: Option<usize>,
    /// A duration such as `5m` or `90s`.
    pub pull_progress_timeout: Option<String>,
    /// Bytes per range request when a layer that dominates its image is
    /// fetched in parallel parts; 0 turns that off.
    pub layer_part_size: Option<u64>,
    /// Range requests in flight for such a layer.
    pub layer_parts_at_once: Option<usize>,
    #[serde(default)]
    pub pinned_images: Vec<String>,
    pub log_format: Option<LogFormat>,
    /// `host:port` to serve Prometheus metrics on (`/metrics`); unset or
    /// empty serves none.
    pub metrics_address: Option<String>,
}

impl Config {
    /// Reads `path`; a missing file at the default path means all defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let config: Config = toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.progress_timeout().map_err(|message| Error::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    pub fn progress_timeout(&self) -> Result<Duration, String> {
        match &self.pull_progress_timeout {
            None => Ok(Duration::from_secs(300)),
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| format!("pull_progress_timeout {s:?}: {e}")),
        }
    }

    /// The socket for containerd's snapshots API, or `None` when the file
    /// turns it off with an empty path.
    pub fn snapshotter_socket(&self) -> Option<PathBuf> {
        match &self.snapshotter_socket {
            None => Some(PathBuf::from(DEFAULT_SNAPSHOTTER_SOCKET)),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
        }
    }

    /// Where to serve metrics, if anywhere.
    pub fn metrics_address(&self) -> Option<&str> {
        self.metrics_address.as_deref().filter(|a| !a.is_empty())
    }

    /// How dominant layers are fetched: the defaults, overridden by the file.
    pub fn ranged_fetch(&self) -> crate::remote::RangedFetch {
        let default = crate::remote::RangedFetch::default();
        crate::remote::RangedFetch {
            part_size: self.layer_part_size.unwrap_or(default.part_size),
            parts_at_once: self.layer_parts_at_once.unwrap_or(default.parts_at_once),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_optional_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert!(Config::load(&path, false).unwrap().root.is_none());
        assert!(Config::load(&path, true).is_err());
        std::fs::write(&path, "").unwrap();
        let c = Config::load(&path, true).unwrap();
        assert_eq!(c.progress_timeout().unwrap(), Duration::from_secs(300));
        assert_eq!(
            c.snapshotter_socket().as_deref(),
            Some(Path::new(DEFAULT_SNAPSHOTTER_SOCKET))
        );
        assert_eq!(c.metrics_address(), None);
        std::fs::write(
            &path,
            r#"
root = "/x"
socket = "/run/x.sock"
snapshotter_socket = "/run/x-snapshots.sock"
snapshotter = "native"
max_concurrent_downloads = 5
pull_progress_timeout = "90s"
layer_part_size = 8388608
pinned_images = ["registry.k8s.io/pause:3.10"]
log_format = "json"
metrics_address = "127.0.0.1:9464"
[registry]
config_path = "/etc/containerd/certs.d"
"#,
        )
        .unwrap();
        let c = Config::load(&path, true).unwrap();
        assert_eq!(c.progress_timeout().unwrap(), Duration::from_secs(90));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert_eq!(c.metrics_address(), Some("127.0.0.1:9464"));
        assert_eq!(
            c.snapshotter_socket().as_deref(),
            Some(Path::new("/run/x-snapshots.sock"))
        );
        let ranged = c.ranged_fetch();
        assert_eq!((ranged.part_size, ranged.parts_at_once), (8 << 20, 4));
        assert_eq!(
            c.registry.config_path.as_deref(),
            Some(Path::new("/etc/containerd/certs.d"))
        );
        std::fs::write(&path, "snapshotter_socket = \"\"\nmetrics_address = \"\"").unwrap();
        let c = Config::load(&path, true).unwrap();
        assert_eq!(c.snapshotter_socket(), None);
        assert_eq!(c.metrics_address(), None);
        std::fs::write(&path, "rot = 1").unwrap();
        let err = Config::load(&path, true).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("rot"), "{err}");
        std::fs::write(&path, "pull_progress_timeout = \"soon\"").unwrap();
        assert!(Config::load(&path, true).is_err());
    }
}
