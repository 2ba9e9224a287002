//! Registry secrets never reach a log, the database or any file under the
//! root. One root is pulled into through every way credentials reach hoist:
//! a CRI `AuthConfig` (username/password, and the base64 `auth` field),
//! `hoist pull --user` through the daemon and on its own, and `hoist pull`
//! with a `DOCKER_CONFIG`; each against an htpasswd registry (basic auth)
//! and against a bearer-token front (which hands out a token). Every line
//! hoist logged at debug, and every byte of every file under the root
//! (the database and its journal included), is then searched for the
//! passwords, their base64 `user:password` forms and the token.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::proxy::{Proxy, TOKEN};
use common::*;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A secret to look for, under a name that says which one it is.
struct Needle {
    name: String,
    bytes: Vec<u8>,
}

/// The needles for one `user`/`password` pair: the password itself, the
/// base64 `user:password` that `Basic` and docker's `auth` carry, and the
/// base64 of the password alone.
fn needles_for(user: &str, password: &str) -> Vec<Needle> {
    vec![
        Needle {
            name: format!("password of {user}"),
            bytes: password.as_bytes().to_vec(),
        },
        Needle {
            name: format!("base64 {user}:password"),
            bytes: BASE64.encode(format!("{user}:{password}")).into_bytes(),
        },
        Needle {
            name: format!("base64 password of {user}"),
            bytes: BASE64.encode(password).into_bytes(),
        },
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file under `root` (symlinks are not followed; sockets and
/// the like are not opened), with its bytes.
fn files_under(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading a directory under the root") {
            let path = entry.expect("a directory entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat under the root");
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() {
                // A file may go away while a daemon runs (an ingest, a
                // journal): what is gone holds nothing.
                if let Ok(bytes) = std::fs::read(&path) {
                    out.push((path, bytes));
                }
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("reading a symlink");
                out.push((path, target.into_os_string().into_encoded_bytes()));
            }
        }
    }
    out
}

/// Each (where, which secret) found: in the named texts and under `root`.
fn leaks(root: &Path, texts: &[(String, Vec<u8>)], needles: &[Needle]) -> Vec<String> {
    let mut found = Vec::new();
    let files = files_under(root)
        .into_iter()
        .map(|(p, b)| (p.display().to_string(), b));
    for (place, bytes) in texts.iter().cloned().chain(files) {
        for n in needles {
            if contains(&bytes, &n.bytes) {
                found.push(format!("{} in {place}", n.name));
            }
        }
    }
    found
}

struct Serve {
    child: tokio::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Serve {
    /// `hoist serve` on `root` at debug, its log in `log`, with no
    /// snapshots socket, no containerd and no docker config of its own.
    async fn start(root: &Path, dir: &Path, docker_config: &Path) -> Serve {
        let socket = dir.join("hoist.sock");
        let log = dir.join("serve.log");
        let config = dir.join("serve.toml");
        std::fs::write(
            &config,
            "log_format = \"text\"\nsnapshotter_socket = \"\"\n\
             [registry]\nconfig_path = \"/nonexistent\"\n[containerd]\naddress = \"\"\n",
        )
        .expect("writing the daemon's config");
        let stderr = std::fs::File::create(&log).expect("creating the daemon's log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--root")
            .arg(root)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .env("HOIST_LOG", "debug")
            .env("DOCKER_CONFIG", docker_config)
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("starting hoist serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Serve { child, socket, log }
    }

    async fn client(&self) -> ImageServiceClient<tonic::transport::Channel> {
        ImageServiceClient::new(
            hoist::grpc_unix::connect(&self.socket)
                .await
                .expect("connecting to the daemon"),
        )
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the daemon stops on SIGTERM")
            .expect("waiting for the daemon");
        assert!(status.success(), "daemon exited with {status}");
    }
}

fn cri_pull(image: &str, auth: Option<AuthConfig>) -> PullImageRequest {
    PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth,
        sandbox_config: None,
    }
}

/// `hoist pull` on `root` at debug with `args`, its DOCKER_CONFIG set to
/// `docker_config`; returns its stdout and stderr together, after checking
/// it succeeded.
async fn cli_pull(root: &Path, docker_config: &Path, args: &[&str]) -> Vec<u8> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(root)
        .arg("pull")
        .args(args)
        .env("HOIST_LOG", "debug")
        .env("DOCKER_CONFIG", docker_config)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running hoist pull");
    let mut text = out.stdout;
    text.extend_from_slice(&out.stderr);
    assert!(
        out.status.success(),
        "hoist pull {args:?}: {}",
        String::from_utf8_lossy(&text)
    );
    text
}

fn random_hex() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    format!(
        "{:016x}",
        (nanos as u64) ^ (u64::from(std::process::id()) << 40)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_the_database_or_the_root_as_root() {
    require_root!();
    let hex = random_hex();
    let (user, password) = ("alice", format!("s3cr3t-{hex}"));
    let (bearer_user, bearer_password) = ("bob", format!("b34r3r-{hex}"));
    let mut needles = needles_for(user, &password);
    needles.extend(needles_for(bearer_user, &bearer_password));
    needles.push(Needle {
        name: "bearer token".into(),
        bytes: TOKEN.as_bytes().to_vec(),
    });

    // The htpasswd registry, and an open one behind the bearer front.
    let basic = Registry::start_with_auth(Some((user, &password))).with_push_auth(user, &password);
    let open = Registry::start();
    let proxy = Proxy::start(open.addr.clone()).await;
    proxy.require_bearer(bearer_user, &bearer_password);
    let repos = [
        "cri-basic",
        "cri-auth",
        "cli-daemon",
        "cli-user",
        "cli-config",
    ];
    for (i, repo) in repos.iter().enumerate() {
        for (seed, reg) in [(70, &basic), (80, &open)] {
            push_image(
                reg,
                &format!("sec/{repo}"),
                Some("1"),
                &[random_layer(seed + i as u8, 1000)],
                ("linux", host_arch()),
                false,
            )
            .await;
        }
    }
    let hosts = [
        (basic.addr.clone(), user, password.clone()),
        (proxy.addr.clone(), bearer_user, bearer_password.clone()),
    ];

    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let no_docker = dir.path().join("no-docker");
    let docker = dir.path().join("docker");
    std::fs::create_dir_all(&no_docker).expect("creating an empty docker config dir");
    std::fs::create_dir_all(&docker).expect("creating the docker config dir");
    let auths: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|(host, u, p)| {
            (
                host.clone(),
                serde_json::json!({"auth": BASE64.encode(format!("{u}:{p}"))}),
            )
        })
        .collect();
    std::fs::write(
        docker.join("config.json"),
        serde_json::json!({ "auths": auths }).to_string(),
    )
    .expect("writing config.json");

    let mut texts: Vec<(String, Vec<u8>)> = Vec::new();

    // (1) Through the daemon's CRI socket.
    let daemon = Serve::start(&root, dir.path(), &no_docker).await;
    let mut cri = daemon.client().await;
    for (host, u, p) in &hosts {
        // Without credentials the registry refuses: what follows pulls
        // only because the secrets were sent.
        let refused = cri
            .pull_image(cri_pull(&format!("{host}/sec/cri-basic:1"), None))
            .await;
        assert!(refused.is_err(), "{host} let an anonymous pull through");
        let fields = AuthConfig {
            username: u.to_string(),
            password: p.clone(),
            ..Default::default()
        };
        let encoded = AuthConfig {
            auth: BASE64.encode(format!("{u}:{p}")),
            ..Default::default()
        };
        for (repo, auth) in [("cri-basic", fields), ("cri-auth", encoded)] {
            let pulled = cri
                .pull_image(cri_pull(&format!("{host}/sec/{repo}:1"), Some(auth)))
                .await
                .unwrap_or_else(|e| panic!("CRI pull of {host}/sec/{repo}:1: {e}"))
                .into_inner();
            assert!(!pulled.image_ref.is_empty(), "{host}/sec/{repo}:1");
        }
        // (2a) `hoist pull --user` on the root the daemon holds goes
        // through the daemon.
        let out = cli_pull(
            &root,
            &no_docker,
            &[
                "--user",
                &format!("{u}:{p}"),
                &format!("{host}/sec/cli-daemon:1"),
            ],
        )
        .await;
        texts.push((format!("hoist pull --user via the daemon from {host}"), out));
    }
    // Searched while the daemon runs, its journal not yet folded in.
    let running = leaks(&root, &texts, &needles);
    assert!(running.is_empty(), "secrets leaked: {running:#?}");
    let daemon_log = daemon.log.clone();
    daemon.stop().await;
    let log = std::fs::read(&daemon_log).expect("reading the daemon's log");
    assert!(
        contains(&log, b"DEBUG"),
        "the daemon logged nothing at debug: {}",
        String::from_utf8_lossy(&log)
    );
    texts.push(("the daemon's log".into(), log));

    // (2b) `hoist pull --user` and (3) `hoist pull` with a DOCKER_CONFIG,
    // on the root with no daemon.
    for (host, u, p) in &hosts {
        let out = cli_pull(
            &root,
            &no_docker,
            &[
                "--user",
                &format!("{u}:{p}"),
                &format!("{host}/sec/cli-user:1"),
            ],
        )
        .await;
        texts.push((format!("hoist pull --user from {host}"), out));
        let out = cli_pull(&root, &docker, &[&format!("{host}/sec/cli-config:1")]).await;
        texts.push((format!("hoist pull with DOCKER_CONFIG from {host}"), out));
    }
    assert!(
        proxy.token_requests() >= 4,
        "the bearer front handed out {} tokens",
        proxy.token_requests()
    );
    for (place, text) in &texts {
        assert!(!text.is_empty(), "{place} printed nothing");
    }

    // The database and its journals are among the files searched.
    let files = files_under(&root);
    assert!(
        files.iter().any(|(p, _)| p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("meta.db"))),
        "no database under {}",
        root.display()
    );
    let found = leaks(&root, &texts, &needles);
    assert!(found.is_empty(), "secrets leaked: {found:#?}");

    // The search finds a secret where there is one: deep under the root,
    // and in a log.
    let planted = root.join("content").join("planted-by-the-test");
    std::fs::create_dir_all(root.join("content")).expect("creating a directory under the root");
    std::fs::write(&planted, format!("x{password}y")).expect("planting a secret");
    let found = leaks(&root, &[], &needles);
    assert_eq!(
        found,
        vec![format!("password of {user} in {}", planted.display())],
        "the search missed a planted secret"
    );
    std::fs::remove_file(&planted).expect("removing the planted secret");
    let line = format!(
        "authorization: Basic {} then Bearer {TOKEN}\n",
        BASE64.encode(format!("{bearer_user}:{bearer_password}"))
    );
    let found = leaks(&root, &[("a log".into(), line.into_bytes())], &needles);
    for want in [
        format!("base64 {bearer_user}:password in a log"),
        "bearer token in a log".to_string(),
    ] {
        assert!(found.contains(&want), "the search missed {want}: {found:?}");
    }
}
