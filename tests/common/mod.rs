//! Test harness: a real registry (Debian's `docker-registry`) on a free
//! loopback port with its own storage, images the tests build and push
//! themselves, and an HTTP fault proxy to stand between hoist and the registry.
#![allow(dead_code)]

pub mod hostile;
pub mod mounts;
pub mod proxy;
pub mod trap;
pub mod tree;

/// Ends a test that needs root (mounts, ownership, xattrs) early, saying
/// so, when it is not run as root; CI runs these as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// Whether the kernel lists what hoist's EROFS images need; if not, says
/// that `what` is skipped. Where it does, an erofs failure is a failure.
pub fn erofs_listed(what: &str) -> bool {
    if hoist::erofs::kernel_lists_features() {
        return true;
    }
    eprintln!(
        "skipping {what} on erofs: the kernel lists no EROFS device_table and chunked_file \
         (/sys/fs/erofs/features)"
    );
    false
}

/// The snapshotters to pull with: overlayfs, native, and erofs where the
/// kernel lists its features.
pub fn snapshotters(what: &str) -> Vec<&'static str> {
    let mut out = vec!["overlayfs", "native"];
    if erofs_listed(what) {
        out.push("erofs");
    }
    out
}

use hoist::descriptor::{Descriptor, Platform};
use hoist::digest::Digest;
use serde_json::json;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    pub addr: String,
    pub storage: PathBuf,
    auth: Option<(String, String)>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with_auth(None)
    }

    /// With `Some((user, password))`, the registry demands basic auth
    /// through its own htpasswd configuration.
    /// A registry whose access log (one combined-format line per request,
    /// with the client's User-Agent) is kept: see `access_log`.
    pub fn start_logged() -> Registry {
        Self::start_inner(None, true)
    }

    /// The access log of a registry from `start_logged`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn start_with_auth(basic: Option<(&str, &str)>) -> Registry {
        Self::start_inner(basic, false)
    }

    fn start_inner(basic: Option<(&str, &str)>, logged: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let port = free_port();
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, password)) = basic {
            let htpasswd = dir.path().join("htpasswd");
            let hash = bcrypt::hash(password, 4).unwrap();
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: hoist-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).unwrap();
        let access = if logged {
            Stdio::from(std::fs::File::create(dir.path().join("access.log")).unwrap())
        } else {
            Stdio::null()
        };
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(access)
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry must be installed (apt-get install docker-registry)");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            addr,
            storage,
            auth: None,
            child,
            _dir: dir,
        }
    }

    /// Where the registry keeps a blob's bytes, to damage them on purpose.
    pub fn blob_data_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Credentials the push helpers use against an htpasswd registry.
    pub fn with_push_auth(mut self, user: &str, password: &str) -> Self {
        self.auth = Some((user.to_string(), password.to_string()));
        self
    }

    fn http(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some((u, p)) = &self.auth {
            use base64::Engine;
            let v = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            headers.insert("authorization", format!("Basic {v}").parse().unwrap());
        }
        hoist::remote::install_tls_provider();
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap()
    }

    pub async fn push_blob(&self, repo: &str, data: &[u8], media_type: &str) -> Descriptor {
        let http = self.http();
        let digest = Digest::of(data);
        let start = http
            .post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(start.status(), 202, "starting upload");
        let location = start.headers()["location"].to_str().unwrap().to_string();
        let url = if location.starts_with("http") {
            location
        } else {
            format!("http://{}{location}", self.addr)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let done = http
            .put(format!("{url}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 201, "finishing upload");
        Descriptor::new(media_type, digest, data.len() as u64)
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Descriptor {
        let r = self
            .http()
            .put(format!(
                "http://{}/v2/{repo}/manifests/{reference}",
                self.addr
            ))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "pushing manifest: {}",
            r.text().await.unwrap_or_default()
        );
        Descriptor::new(media_type, Digest::of(body), body.len() as u64)
    }
}

/// One entry of a test layer.
pub enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    /// A directory with its own mode, uid and gid.
    DirMeta(&'a str, u32, u64, u64),
    Symlink(&'a str, &'a str),
    /// A hard link to `.1`, which may be in a lower layer.
    Hardlink(&'a str, &'a str),
}

/// An uncompressed tar of `entries`, in order.
pub fn tar_layer(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            Entry::File(path, data) => {
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                tar.append_data(&mut h, path, *data).unwrap();
            }
            Entry::Dir(path) => {
                h.set_size(0);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                tar.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Entry::DirMeta(path, mode, uid, gid) => {
                h.set_size(0);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_mtime(1_600_000_000);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                tar.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Entry::Symlink(path, target) => {
                h.set_size(0);
                h.set_mode(0o777);
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, path, target).unwrap();
            }
            Entry::Hardlink(path, target) => {
                h.set_size(0);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Link);
                tar.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    tar.into_inner().unwrap()
}

pub fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(raw).unwrap();
    gz.finish().unwrap()
}

/// A gzip-compressed tar with the given files.
pub fn gzip_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let entries: Vec<Entry<'_>> = files.iter().map(|(p, d)| Entry::File(p, d)).collect();
    gzip(&tar_layer(&entries))
}

/// The diff ID of a layer: the digest of its uncompressed bytes (a blob
/// that is not gzip, like an attestation, is its own diff).
pub fn diff_id(layer: &[u8]) -> Digest {
    let mut raw = Vec::new();
    match std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(layer), &mut raw) {
        Ok(_) => Digest::of(&raw),
        Err(_) => Digest::of(layer),
    }
}

pub struct Pushed {
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Pushes `config` as an image config and a manifest over it and
/// `layers` (already pushed); returns (config, manifest).
pub async fn push_manifest_over(
    reg: &Registry,
    repo: &str,
    tag: Option<&str>,
    docker: bool,
    config: &serde_json::Value,
    layers: &[Descriptor],
) -> (Descriptor, Descriptor) {
    let (manifest_mt, config_mt) = if docker {
        (hoist::images::DOCKER_MANIFEST, hoist::images::DOCKER_CONFIG)
    } else {
        (hoist::images::OCI_MANIFEST, hoist::images::OCI_CONFIG)
    };
    let config = reg
        .push_blob(repo, config.to_string().as_bytes(), config_mt)
        .await;
    let manifest = json!({
        "schemaVersion": 2, "mediaType": manifest_mt,
        "config": config, "layers": layers,
    });
    let body = manifest.to_string();
    let digest = Digest::of(body.as_bytes()).to_string();
    let manifest = reg
        .push_manifest(repo, tag.unwrap_or(&digest), manifest_mt, body.as_bytes())
        .await;
    (config, manifest)
}

/// Pushes config + layers + manifest (OCI or Docker media types).
pub async fn push_image(
    reg: &Registry,
    repo: &str,
    tag: Option<&str>,
    layers: &[Vec<u8>],
    platform: (&str, &str),
    docker: bool,
) -> Pushed {
    let layer_mt = if docker {
        hoist::images::DOCKER_LAYER_GZIP
    } else {
        hoist::images::OCI_LAYER_GZIP
    };
    let mut pushed_layers = Vec::new();
    for l in layers {
        pushed_layers.push(reg.push_blob(repo, l, layer_mt).await);
    }
    let config = json!({
        "architecture": platform.1, "os": platform.0,
        "config": {"User": "1002"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| diff_id(l).to_string()).collect::<Vec<_>>()},
    });
    let (config, manifest) =
        push_manifest_over(reg, repo, tag, docker, &config, &pushed_layers).await;
    Pushed {
        manifest,
        config,
        layers: pushed_layers,
    }
}

/// Pushes an index over `manifests` plus an attestation manifest.
pub async fn push_index(
    reg: &Registry,
    repo: &str,
    tag: &str,
    manifests: &[(&Pushed, (&str, &str))],
) -> Descriptor {
    let mut entries: Vec<Descriptor> = manifests
        .iter()
        .map(|(p, (os, arch))| {
            let mut d = p.manifest.clone();
            d.platform = Some(Platform {
                architecture: arch.to_string(),
                os: os.to_string(),
                os_version: None,
                os_features: Vec::new(),
                variant: None,
            });
            d
        })
        .collect();
    let att = push_image(
        reg,
        repo,
        None,
        &[b"{\"provenance\":true}".to_vec()],
        ("unknown", "unknown"),
        false,
    )
    .await;
    let mut att_desc = att.manifest.clone();
    att_desc.platform = Some(Platform {
        architecture: "unknown".into(),
        os: "unknown".into(),
        os_version: None,
        os_features: Vec::new(),
        variant: None,
    });
    att_desc.annotations.insert(
        "vnd.docker.reference.type".into(),
        "attestation-manifest".into(),
    );
    entries.push(att_desc);
    push_index_of(reg, repo, tag, &entries).await
}

pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

pub fn other_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "amd64",
        _ => "arm64",
    }
}

/// A gzip layer of one file holding `size` pseudo-random (so barely
/// compressible) bytes.
pub fn random_layer(seed: u8, size: usize) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    gzip_layer(&[("data.bin", &data)])
}

/// Pushes an OCI index of exactly `entries`, as given (platforms or none).
pub async fn push_index_of(
    reg: &Registry,
    repo: &str,
    tag: &str,
    entries: &[Descriptor],
) -> Descriptor {
    let index =
        json!({"schemaVersion": 2, "mediaType": hoist::images::OCI_INDEX, "manifests": entries});
    reg.push_manifest(
        repo,
        tag,
        hoist::images::OCI_INDEX,
        index.to_string().as_bytes(),
    )
    .await
}

/// `desc` as an index entry for `os/arch`, or for no platform.
pub fn for_platform(desc: &Descriptor, platform: Option<(&str, &str)>) -> Descriptor {
    let mut d = desc.clone();
    d.platform = platform.map(|(os, arch)| Platform {
        architecture: arch.to_string(),
        os: os.to_string(),
        os_version: None,
        os_features: Vec::new(),
        variant: None,
    });
    d
}

/// (success, stdout + stderr) of `hoist --root ROOT ARGS`.
pub fn hoist_cli(root: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// stdout + stderr of `hoist --root ROOT ARGS`, which must succeed.
pub fn hoist_ok(root: &std::path::Path, args: &[&str]) -> String {
    let (success, text) = hoist_cli(root, args);
    assert!(success, "hoist {args:?}: {text}");
    text
}

/// A process's peak resident set (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}
