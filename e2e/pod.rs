//! A node end to end: kubelet's image half on hoist, its runtime half on
//! containerd (Debian's containerd and runc) configured from
//! `deploy/containerd/config-v2.toml`, with hoist as containerd's
//! snapshotter. Over CRI, as kubelet does it: PullImage through hoist,
//! RunPodSandbox, CreateContainer, StartContainer and ExecSync on
//! containerd, then teardown and RemoveImage through hoist. The images
//! (busybox from Debian's busybox-static, a pause image from catatonit) are
//! built and pushed by the test.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::*;
use daemon::{Daemon, Options, spec};
use hoist::containerd::api::services::snapshots::v1 as pb;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A private containerd on a temporary root, state and socket.
struct Containerd {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl Containerd {
    /// `deploy/containerd/config-v2.toml` with its node paths moved under
    /// `dir`: every line the test rewrites must be there, so the file the
    /// test runs is the file a node gets.
    fn start(dir: &Path, hoist_snapshots: &Path, hosts: &Path, sandbox_image: &str) -> Containerd {
        let deploy = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/containerd/config-v2.toml"
        );
        let mut config = std::fs::read_to_string(deploy).expect("reading the deploy config");
        let (root, state, socket) = (dir.join("root"), dir.join("state"), dir.join("c.sock"));
        for (from, to) in [
            (
                "root = \"/var/lib/containerd\"".to_string(),
                format!("root = {:?}", root.display().to_string()),
            ),
            (
                "state = \"/run/containerd\"".to_string(),
                format!("state = {:?}", state.display().to_string()),
            ),
            (
                "address = \"/run/containerd/containerd.sock\"".to_string(),
                format!("address = {:?}", socket.display().to_string()),
            ),
            (
                "address = \"/run/hoist/snapshotter.sock\"".to_string(),
                format!("address = {:?}", hoist_snapshots.display().to_string()),
            ),
            (
                "sandbox_image = \"registry.k8s.io/pause:3.10\"".to_string(),
                format!("sandbox_image = {sandbox_image:?}"),
            ),
            (
                "config_path = \"/etc/hoist/certs.d\"".to_string(),
                format!("config_path = {:?}", hosts.display().to_string()),
            ),
            // This machine's root lacks CAP_SYS_RESOURCE.
            (
                "restrict_oom_score_adj = false".to_string(),
                "restrict_oom_score_adj = true".to_string(),
            ),
        ] {
            assert!(config.contains(&from), "{deploy} lacks `{from}`");
            config = config.replace(&from, &to);
        }
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("containerd.toml");
        std::fs::write(&file, config).unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("containerd must be installed (apt-get install containerd runc)");
        let c = Containerd {
            child,
            socket,
            root,
            state,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&c.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(hoist::grpc_unix::connect(&self.socket).await.unwrap())
    }

    async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(hoist::grpc_unix::connect(&self.socket).await.unwrap())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims and the mounts they made outlive a killed containerd.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("containerd-shim.*{}", self.state.display()))
            .status();
        unmount_under(&self.state);
        unmount_under(&self.root);
    }
}

/// Lazily unmounts everything mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|t| t.starts_with(&prefix))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A single-layer-per-entry image whose config runs `entrypoint`.
async fn push_runnable(
    reg: &Registry,
    repo: &str,
    layers: &[Vec<u8>],
    entrypoint: &[&str],
) -> Pushed {
    let mut pushed = Vec::new();
    for l in layers {
        pushed.push(reg.push_blob(repo, l, hoist::images::OCI_LAYER_GZIP).await);
    }
    let config = json!({
        "architecture": host_arch(), "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| diff_id(l).to_string()).collect::<Vec<_>>()},
    });
    let (config, manifest) =
        push_manifest_over(reg, repo, Some("1"), false, &config, &pushed).await;
    Pushed {
        manifest,
        config,
        layers: pushed,
    }
}

/// One file with its mode, in a gzip layer.
fn executable_layer(path: &str, source: &str) -> Vec<u8> {
    let data = std::fs::read(source)
        .unwrap_or_else(|e| panic!("{source}: {e} (apt-get install busybox-static catatonit)"));
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, &data[..]).unwrap();
    gzip(&tar.into_inner().unwrap())
}

/// Snapshot directories hoist holds (committed or active), whichever
/// backend the daemon chose for its new root.
fn hoist_snapshot_dirs(root: &Path) -> Vec<PathBuf> {
    hoist::snapshot::NAMES
        .iter()
        .flat_map(|name| {
            std::fs::read_dir(root.join("snapshots").join(name))
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_else(|_| Vec::new())
        })
        .collect()
}

/// Requests for `digest`'s blob in the registry's access log, by client.
fn blob_gets(log: &str, digest: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
        .map(|l| l.rsplit('"').nth(1).unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_from_hoists_snapshots_as_root() {
    require_root!();
    let dir = common::mounts::TempRoot::new();
    let reg = Registry::start_logged();
    let busybox = push_runnable(
        &reg,
        "e2e/busybox",
        &[
            executable_layer("bin/busybox", "/bin/busybox"),
            gzip_layer(&[("etc/hoist-test", b"only in the image\n")]),
        ],
        &["/bin/busybox", "sleep", "3600"],
    )
    .await;
    let preloaded = push_runnable(
        &reg,
        "e2e/preloaded",
        &[
            executable_layer("bin/busybox", "/bin/busybox"),
            gzip_layer(&[("etc/preloaded", b"pulled by the command line\n")]),
        ],
        &["/bin/busybox", "sleep", "3600"],
    )
    .await;
    push_runnable(
        &reg,
        "e2e/pause",
        &[executable_layer("catatonit", "/usr/bin/catatonit")],
        &["/catatonit", "-P"],
    )
    .await;
    let image = format!("{}/e2e/busybox:1", reg.addr);
    let hosts = dir.path().join("certs.d");
    let host_dir = hosts.join(&reg.addr);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{0}\"\n[host.\"http://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr
        ),
    )
    .unwrap();

    let root = dir.path().join("hoist");
    let socket = dir.path().join("hoist.sock");
    let ctrd_dir = dir.path().join("containerd");
    let options = Options {
        hosts_dir: Some(hosts.clone()),
        containerd: Some(ctrd_dir.join("c.sock")),
        ..Default::default()
    };
    let mut hoist = Daemon::start_with(&root, &socket, &options, &[]);
    let containerd = Containerd::start(
        &ctrd_dir,
        &hoist.snapshots_socket,
        &hosts,
        &format!("{}/e2e/pause:1", reg.addr),
    );
    let mut runtime = containerd.runtime().await;
    let mut ctrd_images = containerd.images().await;

    // The pull, through hoist, published to containerd.
    let pulled = hoist
        .client()
        .await
        .pull_image(PullImageRequest {
            image: spec(&image),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}\n{}", hoist.log(), containerd.log()))
        .into_inner()
        .image_ref;
    assert_eq!(pulled, busybox.config.digest.to_string());
    let known = ctrd_images
        .image_status(ImageStatusRequest {
            image: spec(&pulled),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .expect("containerd knows the image hoist pulled");
    assert!(known.repo_tags.contains(&image), "{:?}", known.repo_tags);

    // An image preloaded into kubelet's namespace with the command line
    // (through the daemon) is a CRI image too: kubelet sees it, and
    // containerd knows it without a CRI pull.
    let preloaded_ref = format!("{}/e2e/preloaded:1", reg.addr);
    let (ok, text) = hoist_cli(&root, &["-n", "k8s.io", "pull", &preloaded_ref]);
    assert!(ok, "{text}\n{}\n{}", hoist.log(), containerd.log());
    let seen = hoist
        .client()
        .await
        .image_status(ImageStatusRequest {
            image: spec(&preloaded_ref),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .expect("kubelet sees the image the command line pulled");
    assert_eq!(seen.id, preloaded.config.digest.to_string());
    let known = ctrd_images
        .image_status(ImageStatusRequest {
            image: spec(&seen.id),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .expect("containerd knows the image the command line pulled");
    assert!(
        known.repo_tags.contains(&preloaded_ref),
        "{:?}",
        known.repo_tags
    );

    // A restart of hoist between pull and create.
    hoist.stop();
    drop(hoist);
    let hoist = Daemon::start_with(&root, &socket, &options, &[]);

    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "e2e".into(),
            uid: "e2e-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: dir.path().join("logs").display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    // containerd's connection to the restarted hoist comes back after
    // grpc-go's reconnect backoff; until then its calls fail Unavailable
    // and kubelet retries, as this does.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pod = loop {
        let run = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: String::new(),
            })
            .await;
        match run {
            Ok(r) => break r.into_inner().pod_sandbox_id,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(s) => panic!("{s:?}\n{}\n{}", containerd.log(), hoist.log()),
        }
    };
    let mut start = async |name: &str, image: &str| {
        let container = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: spec(image),
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_or_else(|s| panic!("{s:?}\n{}\n{}", containerd.log(), hoist.log()))
            .into_inner()
            .container_id;
        runtime
            .start_container(StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("{s:?}\n{}", containerd.log()));
        container
    };
    let container = start("busybox", &pulled).await;
    let second = start("preloaded", &preloaded_ref).await;
    let exec = |container: &str, cmd: &[&str]| ExecSyncRequest {
        container_id: container.to_string(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 10,
    };
    let read = runtime
        .exec_sync(exec(&second, &["/bin/busybox", "cat", "/etc/preloaded"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.stdout, b"pulled by the command line\n", "{read:?}");
    let exec = |cmd: &[&str]| exec(&container, cmd);
    let read = runtime
        .exec_sync(exec(&["/bin/busybox", "cat", "/etc/hoist-test"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        read.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(read.stdout, b"only in the image\n");
    let wrote = runtime
        .exec_sync(exec(&[
            "/bin/busybox",
            "sh",
            "-c",
            "echo written by the pod > /written && /bin/busybox cat /written",
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wrote.stdout, b"written by the pod\n");
    // The container's writable layer is under hoist's root.
    let uppers: Vec<PathBuf> = hoist_snapshot_dirs(&root)
        .into_iter()
        .map(|d| d.join("fs/written"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(uppers.len(), 1, "the written file in hoist's snapshots");
    // On a kernel that mounts them, the image's layers are indexed tars
    // under EROFS lowers.
    if hoist::erofs::kernel_lists_features() {
        let layers: Vec<PathBuf> = hoist_snapshot_dirs(&root)
            .into_iter()
            .filter(|d| d.join(hoist::archive::LAYER_IMAGE).is_file())
            .collect();
        assert!(layers.len() >= busybox.layers.len(), "{layers:?}");
    }

    // Each busybox layer came from the registry once, to hoist.
    let log = reg.access_log();
    for layer in &busybox.layers {
        let gets = blob_gets(&log, &layer.digest.to_string());
        assert_eq!(gets.len(), 1, "{} fetched {gets:?}", layer.digest);
        assert!(gets[0].starts_with("hoist/"), "fetched by {}", gets[0]);
    }
    // containerd's own snapshotter holds no layer.
    let own = containerd
        .root
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let own_layers = std::fs::read_dir(&own).map(|d| d.count()).unwrap_or(0);
    assert_eq!(own_layers, 0, "layers in {}", own.display());

    // Teardown as kubelet does it, then the images through hoist.
    for container in [container, second] {
        runtime
            .stop_container(StopContainerRequest {
                container_id: container.clone(),
                timeout: 1,
            })
            .await
            .unwrap();
        runtime
            .remove_container(RemoveContainerRequest {
                container_id: container,
            })
            .await
            .unwrap();
    }
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    for name in [&image, &preloaded_ref] {
        hoist
            .client()
            .await
            .remove_image(RemoveImageRequest { image: spec(name) })
            .await
            .unwrap();
    }
    let gone = ctrd_images
        .image_status(ImageStatusRequest {
            image: spec(&pulled),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.image.is_none(), "containerd still has the image");
    // The sandbox image is containerd's own; once it goes too, containerd's
    // GC releases its snapshots and hoist's store is empty.
    let pause = format!("{}/e2e/pause:1", reg.addr);
    ctrd_images
        .remove_image(RemoveImageRequest {
            image: spec(&pause),
        })
        .await
        .unwrap();
    let mut proxy = pb::snapshots_client::SnapshotsClient::new(
        hoist::grpc_unix::connect(&hoist.snapshots_socket)
            .await
            .unwrap(),
    );
    proxy
        .cleanup(pb::CleanupRequest {
            snapshotter: "hoist".into(),
        })
        .await
        .unwrap();
    let left = hoist_snapshot_dirs(&root);
    assert!(
        left.is_empty(),
        "hoist still holds {left:?}\n{}",
        hoist.log()
    );
}
