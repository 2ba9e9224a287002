//! hoist's CRI socket against a real grpc-go client, the one kubelet and
//! crictl 1.26-1.30 are built on.
//!
//! Those clients dial the bare socket path through a custom dialer, so
//! grpc-go sends the path itself as the HTTP/2 `:authority`, which is not
//! a valid URI authority. The Go client in `e2e/go/cri-client` connects the
//! same way and makes every RPC of a pull-inspect-remove cycle over one
//! connection; these tests drive it with protobuf-encoded `k8s_cri::v1`
//! requests and check the decoded answers.
//!
//! Building the client needs Debian's `golang-go` and
//! `golang-google-grpc-dev` (GOPATH mode, no network).

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use daemon::{Daemon, spec};
use k8s_cri::v1::*;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const GRPC_SOURCES: &str = "/usr/share/gocode/src/google.golang.org/grpc";
const INSTALL_HINT: &str = "apt-get install golang-go golang-google-grpc-dev";

/// Builds `e2e/go/cri-client` into `out` and returns the binary's path.
/// Fails (never skips) when Go or grpc-go's sources are missing.
fn build_go_client(out: &Path) -> PathBuf {
    assert!(
        Path::new(GRPC_SOURCES).is_dir(),
        "grpc-go sources missing at {GRPC_SOURCES}: {INSTALL_HINT}"
    );
    let bin = out.join("cri-client");
    // The build cache outlives the test (under cargo's target dir), so
    // later runs build in a moment; the binary is the test's own.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-build-cache");
    let result = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(".")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/go/cri-client"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", &cache)
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .output();
    let output = match result {
        Ok(o) => o,
        Err(e) => panic!("cannot run `go` ({e}): {INSTALL_HINT}"),
    };
    assert!(
        output.status.success(),
        "go build of e2e/go/cri-client failed ({INSTALL_HINT}?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    bin
}

/// One RPC for the Go client: full method name and encoded request.
fn call(method: &str, request: &impl Message) -> (String, Vec<u8>) {
    (
        format!("/runtime.v1.ImageService/{method}"),
        request.encode_to_vec(),
    )
}

/// What one run of the Go client answered.
struct Answers {
    /// Per request, the encoded response or the gRPC error.
    replies: Vec<Result<Vec<u8>, String>>,
    /// The addresses its dialer was asked to open, one per connection.
    dials: Vec<String>,
    stderr: String,
}

/// Runs the Go client in `cwd` against `target`, sending `calls` in order
/// over its one connection.
fn run_go_client(bin: &Path, cwd: &Path, target: &str, calls: &[(String, Vec<u8>)]) -> Answers {
    let mut child = Command::new(bin)
        .arg(target)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the Go client");
    let mut input = String::new();
    for (method, request) in calls {
        input.push_str(&format!("{method} {}\n", B64.encode(request)));
    }
    child
        .stdin
        .take()
        .expect("the Go client's stdin is piped")
        .write_all(input.as_bytes())
        .expect("writing the Go client's requests");
    let output = child.wait_with_output().expect("waiting for the Go client");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "the Go client failed ({}):\n{stderr}",
        output.status
    );
    let replies = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            if let Some(b64) = line.strip_prefix("OK ") {
                Ok(B64.decode(b64.trim()).expect("the Go client's base64"))
            } else if let Some(err) = line.strip_prefix("ERR ") {
                Err(err.to_string())
            } else {
                panic!("unexpected line from the Go client: {line:?}\n{stderr}")
            }
        })
        .collect::<Vec<_>>();
    let dials = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("dial "))
        .map(str::to_string)
        .collect();
    Answers {
        replies,
        dials,
        stderr,
    }
}

/// Pulls, inspects, lists and removes an image through the Go client, with
/// `hoist serve` (root under `dir`) listening on `socket` and the client
/// dialing `target` from the working directory `cwd`.
async fn pull_inspect_remove_over_grpc_go(dir: &Path, socket: &Path, cwd: &Path, target: &str) {
    let bin = build_go_client(dir);
    let reg = Registry::start();
    let img = push_image(
        &reg,
        "compat/app",
        Some("v1"),
        &[random_layer(41, 4000), random_layer(42, 2500)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let daemon = Daemon::start(&dir.join("root"), socket, &[]);
    let id = img.config.digest.to_string();
    let by_tag = format!("{}/compat/app:v1", reg.addr);

    let calls = [
        call("ImageFsInfo", &ImageFsInfoRequest {}),
        call(
            "PullImage",
            &PullImageRequest {
                image: spec(&by_tag),
                ..Default::default()
            },
        ),
        call(
            "ImageStatus",
            &ImageStatusRequest {
                image: spec(&by_tag),
                verbose: false,
            },
        ),
        call("ListImages", &ListImagesRequest { filter: None }),
        call(
            "RemoveImage",
            &RemoveImageRequest {
                image: spec(&by_tag),
            },
        ),
        call(
            "ImageStatus",
            &ImageStatusRequest {
                image: spec(&by_tag),
                verbose: false,
            },
        ),
    ];
    let answers = run_go_client(&bin, cwd, target, &calls);
    let context = || {
        format!(
            "Go client stderr:\n{}\ndaemon log:\n{}",
            answers.stderr,
            daemon.log()
        )
    };
    assert_eq!(
        answers.replies.len(),
        calls.len(),
        "one answer per request; {}",
        context()
    );
    // Every RPC went over one connection to the path exactly as given: the
    // later requests carry the same :authority as the first, which grpc-go's
    // HPACK encoder sends as a reference to its dynamic table.
    assert_eq!(answers.dials, [target], "{}", context());
    let replies: Vec<&[u8]> = answers
        .replies
        .iter()
        .zip(&calls)
        .map(|(reply, (method, _))| match reply {
            Ok(bytes) => bytes.as_slice(),
            Err(e) => panic!(
                "{method} from grpc-go with :authority {target:?} failed: {e}\n{}",
                context()
            ),
        })
        .collect();

    let fs = ImageFsInfoResponse::decode(replies[0]).expect("ImageFsInfoResponse");
    let mountpoint = fs
        .image_filesystems
        .first()
        .and_then(|f| f.fs_id.as_ref())
        .map(|f| f.mountpoint.clone())
        .unwrap_or_default();
    assert!(Path::new(&mountpoint).is_dir(), "{fs:?}");

    let pulled = PullImageResponse::decode(replies[1]).expect("PullImageResponse");
    assert_eq!(pulled.image_ref, id);

    let status = ImageStatusResponse::decode(replies[2]).expect("ImageStatusResponse");
    let image = status.image.expect("the pulled image has a status");
    assert_eq!(image.id, id);
    assert_eq!(image.repo_tags, [by_tag.as_str()]);
    assert!(
        image
            .repo_digests
            .contains(&format!("{}/compat/app@{}", reg.addr, img.manifest.digest)),
        "{:?}",
        image.repo_digests
    );
    assert_eq!(
        image.size,
        img.config.size + img.layers.iter().map(|l| l.size).sum::<u64>()
    );

    let listed = ListImagesResponse::decode(replies[3]).expect("ListImagesResponse");
    assert_eq!(listed.images.len(), 1, "{listed:?}");
    assert_eq!(listed.images[0].id, id);
    assert_eq!(listed.images[0].repo_tags, [by_tag.as_str()]);

    RemoveImageResponse::decode(replies[4]).expect("RemoveImageResponse");
    let gone = ImageStatusResponse::decode(replies[5]).expect("ImageStatusResponse");
    assert!(gone.image.is_none(), "still there after removal: {gone:?}");
}

/// `./h.sock` is shorter than `localhost` and still no valid authority.
#[tokio::test]
async fn grpc_go_client_with_a_short_relative_socket_path_as_root() {
    require_root!();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("h.sock");
    let target = "./h.sock";
    assert!(target.len() < "localhost".len());
    pull_inspect_remove_over_grpc_go(dir.path(), &socket, dir.path(), target).await;
}

/// The usual case: a long absolute path, as in
/// `--image-service-endpoint unix:///run/hoist/hoist.sock`.
#[tokio::test]
async fn grpc_go_client_with_a_long_absolute_socket_path_as_root() {
    require_root!();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("run/hoist/image-service.sock");
    let target = socket.to_str().expect("a UTF-8 temp path").to_string();
    assert!(target.len() > "localhost".len());
    pull_inspect_remove_over_grpc_go(dir.path(), &socket, Path::new("/"), &target).await;
}
