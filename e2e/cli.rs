//! The command line with and without a daemon: every command on a bare
//! root and through `hoist serve` on another root prints the same; `hoist
//! events` follows a CRI pull; `hoist ps` shows pulls in flight, kubelet's
//! and the command line's.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::proxy::{Fault, Proxy};
use common::*;
use daemon::{Daemon, spec};
use k8s_cri::v1::PullImageRequest;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq, Eq)]
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn hoist(root: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What may differ between two runs of one command: the directory each ran
/// in, timings and rates, and the order in which concurrent downloads
/// printed their lines (each line's own order stays).
fn normalize(text: &str, run: &Path) -> String {
    let text = text.replace(&run.display().to_string(), "<RUN>");
    let durations = regex::Regex::new(r"\b\d+(\.\d+)?(ns|µs|ms|s|m|h)\b").unwrap();
    let rates = regex::Regex::new(r"\([^()]*/s\)").unwrap();
    let text = rates.replace_all(&text, "(RATE)");
    let text = durations.replace_all(&text, "T");
    // An age ("9s", "1m 2s") padded to its column: one T, one gap.
    let ages = regex::Regex::new(r"\bT( T)*  +").unwrap();
    let text = ages.replace_all(&text, "T  ");
    let state = regex::Regex::new(
        r"^(\S+): (resolving|resolved|waiting|downloading|unpacking|done|exists|failed)$",
    )
    .unwrap();
    let (mut progress, rest): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| state.is_match(l));
    progress.sort_by_key(|l| l.split(": ").next().unwrap_or_default().to_string());
    progress.extend(rest);
    progress.join("\n")
}

/// The commands, in order, as (arguments, whether they must succeed).
fn script(reg: &Registry, run: &Path) -> Vec<(Vec<String>, bool)> {
    let app = format!("{}/cli/app:v1", reg.addr);
    let missing = format!("{}/cli/missing:1", reg.addr);
    let at = |p: &str| run.join(p).display().to_string();
    let c = |args: &[&str], ok: bool| (args.iter().map(|a| a.to_string()).collect(), ok);
    vec![
        c(&["pull", &app], true),
        c(&["pull", &missing], false),
        c(&["images"], true),
        c(&["images", "-q"], true),
        c(&["snapshots", "ls"], true),
        c(&["snapshots", "ls", "--snapshotter", "overlay"], true),
        c(&["snapshots", "ls", "--snapshotter", "zfs"], false),
        c(&["content", "ls"], true),
        c(
            &[
                "content",
                "ls",
                "-q",
                "digest==sha256:0",
                "digest~=^sha256:",
            ],
            true,
        ),
        c(&["content", "ls", "labels.\"unclosed"], false),
        c(&["mount", &app, &at("mnt")], true),
        c(&["unmount", &at("mnt")], true),
        c(&["unmount", &at("plain")], true),
        c(&["mount", &missing, &at("mnt2")], false),
        c(&["rmi", &app, &missing], false),
        c(&["images"], true),
        c(&["gc"], true),
    ]
}

#[tokio::test]
async fn every_command_prints_the_same_on_a_root_and_through_the_daemon_as_root() {
    require_root!();
    let reg = Registry::start();
    push_image(
        &reg,
        "cli/app",
        Some("v1"),
        &[random_layer(21, 5000), random_layer(22, 3000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let (bare, served) = (dir.path().join("bare"), dir.path().join("served"));
    for run in [&bare, &served] {
        std::fs::create_dir_all(run.join("plain")).unwrap();
    }
    let daemon = Daemon::start(&served.join("root"), &served.join("run/hoist.sock"), &[]);

    for (args, must_succeed) in script(&reg, &bare) {
        let served_args: Vec<String> = args
            .iter()
            .map(|a| a.replace(&bare.display().to_string(), &served.display().to_string()))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let served_args: Vec<&str> = served_args.iter().map(String::as_str).collect();
        let on_root = hoist(&bare.join("root"), &args);
        let through = hoist(&served.join("root"), &served_args);
        assert_eq!(
            on_root.ok, must_succeed,
            "{args:?} on the root: {on_root:?}"
        );
        assert_eq!(
            through.ok, must_succeed,
            "{args:?} through the daemon: {through:?}"
        );
        assert_eq!(
            normalize(&on_root.stdout, &bare),
            normalize(&through.stdout, &served),
            "stdout of {args:?}"
        );
        assert_eq!(
            normalize(&on_root.stderr, &bare),
            normalize(&through.stderr, &served),
            "stderr of {args:?}"
        );
        // What the outputs say, so that two empty outputs cannot pass.
        match (args[0], must_succeed) {
            ("pull", true) => {
                assert!(
                    on_root.stdout.contains(&format!("{} sha256:", args[1])),
                    "{on_root:?}"
                );
                assert!(on_root.stdout.contains("layer-sha256:"), "{on_root:?}");
            }
            ("mount", true) => {
                // The daemon made its mount where the command asked.
                for d in [args[2], served_args[2]] {
                    assert!(Path::new(d).join("data.bin").is_file(), "{d}");
                }
            }
            ("rmi", _) => {
                assert!(on_root.stdout.contains("cli/app:v1"), "{on_root:?}");
                assert!(on_root.stderr.contains("freed "), "{on_root:?}");
                assert!(
                    on_root.stderr.contains("cli/missing:1 not found"),
                    "{on_root:?}"
                );
            }
            ("pull" | "mount", false) => {
                assert!(on_root.stderr.contains("cli/missing"), "{on_root:?}")
            }
            ("unmount", _) if args[1].ends_with("plain") => {
                assert!(
                    on_root.stderr.contains("not mounted by hoist mount"),
                    "{on_root:?}"
                )
            }
            ("images", _) if args.len() == 2 => {
                assert_eq!(on_root.stdout.trim(), format!("{}/cli/app:v1", reg.addr));
            }
            ("images", _) => assert!(on_root.stdout.starts_with("REF "), "{on_root:?}"),
            ("gc", _) => assert!(on_root.stdout.starts_with("removed "), "{on_root:?}"),
            ("snapshots", true) => {
                assert!(on_root.stdout.starts_with("KEY "), "{on_root:?}");
                // The image's two layers; naming overlayfs lists them or,
                // on a root of another backend, none.
                let committed = on_root.stdout.matches(" Committed ").count();
                match args.len() {
                    2 => assert_eq!(committed, 2, "{on_root:?}"),
                    _ => assert!(committed == 2 || committed == 0, "{on_root:?}"),
                }
            }
            ("snapshots", false) => {
                assert!(
                    on_root.stderr.contains("unknown snapshotter"),
                    "{on_root:?}"
                )
            }
            ("content", true) if args.contains(&"-q") => {
                // Manifest, config and two layers: any filter may match.
                let digests = on_root.stdout.lines();
                assert_eq!(digests.filter(|l| l.starts_with("sha256:")).count(), 4);
            }
            ("content", true) => {
                assert!(on_root.stdout.starts_with("DIGEST "), "{on_root:?}");
                assert!(
                    on_root.stdout.contains("containerd.io/gc.ref"),
                    "{on_root:?}"
                );
            }
            ("content", false) => {
                assert!(on_root.stderr.contains("invalid filter"), "{on_root:?}")
            }
            _ => {}
        }
    }
    // Each of those went through the daemon: the root was its alone.
    let log = daemon.log();
    for call in [
        "Pull",
        "List",
        "Remove",
        "Mount",
        "Unmount",
        "Gc",
        "Snapshots",
        "Content",
    ] {
        assert!(log.contains(&format!("api=\"{call}\"")), "{call}: {log}");
    }
}

/// Lines a child prints on stdout, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads `rx` until a line satisfies `want`, collecting every line read.
fn wait_for(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    within: Duration,
    want: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = want(&line);
                seen.push(line);
                if found {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn events_follow_a_cri_pull_as_root() {
    require_root!();
    let reg = Registry::start();
    push_image(
        &reg,
        "cli/events",
        Some("1"),
        &[random_layer(23, 2000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let daemon = Daemon::start(&root, &dir.path().join("hoist.sock"), &[]);

    // Without a daemon there is nothing to follow, and no daemon version.
    let other = dir.path().join("other");
    let none = hoist(&other, &["events"]);
    assert!(
        !none.ok && none.stderr.contains("needs the hoist daemon"),
        "{none:?}"
    );
    let version = hoist(&other, &["version"]);
    assert!(
        version.ok && version.stdout.contains("Daemon: none holds"),
        "{version:?}"
    );
    assert!(!other.exists(), "asking made no root");
    let version = hoist(&root, &["version"]);
    let socket = daemon.socket.display().to_string();
    for want in [
        "Client:",
        &socket,
        "API:      hoist.v1",
        "CRI API:  v1",
        "Snapshotter: ",
    ] {
        assert!(version.stdout.contains(want), "{want}: {version:?}");
    }

    let mut events = Killed(
        Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--root")
            .arg(&root)
            .arg("events")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = lines(&mut events.0);
    let mut seen = Vec::new();
    // Once a collection shows, the stream is followed: nothing after it is missed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(hoist(&root, &["gc"]).ok);
        if wait_for(&rx, &mut seen, Duration::from_millis(500), |l| {
            l.contains("  gc  ")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no gc event: {seen:?}");
    }

    let reference = format!("{}/cli/events:1", reg.addr);
    let mut c = daemon.client().await;
    c.pull_image(PullImageRequest {
        image: spec(&reference),
        ..Default::default()
    })
    .await
    .unwrap();
    let finished = |l: &str| l.contains("pull-finished") && l.contains(&reference);
    assert!(
        wait_for(&rx, &mut seen, Duration::from_secs(20), finished),
        "{seen:?}"
    );
    let at = |what: &str| {
        seen.iter()
            .position(|l| l.contains(what) && l.contains(&reference) && l.contains("k8s.io"))
            .unwrap_or_else(|| panic!("no {what} for {reference} in k8s.io: {seen:?}"))
    };
    let (started, created, done) = (at("pull-started"), at("image-created"), at("pull-finished"));
    assert!(started < created && created < done, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_shows_pulls_in_flight_from_cri_and_the_command_line_as_root() {
    require_root!();
    let reg = Registry::start();
    let proxy = Proxy::start(reg.addr.clone()).await;
    let slow = push_image(
        &reg,
        "cli/slow",
        Some("1"),
        &[random_layer(24, 200_000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    // One byte a second: the layer stays in flight for the whole test.
    proxy.target(&slow.layers[0].digest);
    proxy.faults.lock().push(Fault::Trickle);
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    let daemon = Daemon::start(&root, &dir.path().join("hoist.sock"), &[]);
    let reference = format!("{}/cli/slow:1", proxy.addr);

    let mut c = daemon.client().await;
    let r = reference.clone();
    let _cri = tokio::spawn(async move {
        c.pull_image(PullImageRequest {
            image: spec(&r),
            ..Default::default()
        })
        .await
    });
    // The command line pulls the same image into its namespace; it waits
    // for the blob the CRI pull is downloading.
    let mut cli = Killed(
        Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--root")
            .arg(&root)
            .args(["pull", &reference])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("pull.err")).unwrap())
            .spawn()
            .unwrap(),
    );

    let layer = format!("layer-{}", slow.layers[0].digest);
    // A pull's own line; its lines (the reference's among them) are indented.
    let pulls = |table: &str| {
        table
            .lines()
            .filter(|l| !l.starts_with(' ') && l.contains(&reference))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let table = loop {
        let out = hoist(&root, &["ps"]);
        assert!(out.ok, "{out:?}");
        let both = pulls(&out.stdout) == 2;
        let downloading = out
            .stdout
            .lines()
            .any(|l| l.contains(&layer) && l.contains("downloading"));
        if both && downloading {
            break out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{}\nhoist pull ({:?}): {}\ndaemon: {}",
            out.stdout,
            cli.0.try_wait(),
            std::fs::read_to_string(dir.path().join("pull.err")).unwrap_or_default(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let pull_line = |ns: &str| {
        table
            .lines()
            .find(|l| !l.starts_with(' ') && l.split_whitespace().nth(1) == Some(ns))
            .unwrap_or_else(|| panic!("no pull in {ns}: {table}"))
    };
    assert!(pull_line("k8s.io").ends_with("/s"), "{table}");
    pull_line("default");

    // A namespace narrows it.
    let only = hoist(&root, &["-n", "k8s.io", "ps"]);
    assert_eq!(pulls(&only.stdout), 1, "{}", only.stdout);

    // The command line gone, its pull is cancelled and leaves the list.
    drop(cli);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = hoist(&root, &["ps"]);
        if pulls(&out.stdout) == 1 {
            assert!(
                hoist(&root, &["-n", "default", "ps"])
                    .stdout
                    .lines()
                    .count()
                    == 1
            );
            break;
        }
        assert!(Instant::now() < deadline, "{}", out.stdout);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
