//! `hoist pull`'s live display in a real terminal: tmux runs the pull in a
//! pane of a given width, a layer held at the fault proxy keeps the display
//! redrawing (and lets a test resize the pane mid-pull), and the pane's
//! text shows what a user would see.

mod common;

use common::proxy::{Fault, Proxy};
use common::{Pushed, Registry, host_arch, push_image, random_layer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of its own (its own socket, no configuration) holding one
/// pane.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, width: usize, command: &str) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let (w, h) = (width.to_string(), "40".to_string());
        let out = tmux.run(&["new-session", "-d", "-x", &w, "-y", &h, command]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-f")
            .arg("/dev/null")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux must be installed (apt-get install tmux)")
    }

    /// The pane and its history, wrapped lines joined: a line longer than
    /// the pane is one that wrapped.
    fn capture(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-J", "-S", "-", "-E", "-"]);
        assert!(out.status.success(), "tmux capture-pane: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn resize(&self, width: usize) {
        let out = self.run(&["resize-window", "-x", &width.to_string()]);
        assert!(out.status.success(), "tmux resize-window: {out:?}");
    }

    /// The capture once `ready` holds for it; fails with the last one after
    /// a minute.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let screen = self.capture();
            if ready(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "never {what}:\n{screen}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// `layer-sha256:<12 hex>`: how the display names a descriptor.
fn short(kind: &str, digest: &hoist::digest::Digest) -> String {
    format!("{kind}-sha256:{}", &digest.hex()[..12])
}

/// What the display shows for this image: one key per line.
fn keys(img: &Pushed) -> Vec<String> {
    let mut keys = vec![
        short("manifest", &img.manifest.digest),
        short("config", &img.config.digest),
        short("unpack", &img.config.digest),
    ];
    keys.extend(img.layers.iter().map(|l| short("layer", &l.digest)));
    keys
}

/// Lines the pane prints before the pull, so that the display starts
/// below the top: rows a narrowing pushes up then go to tmux's history
/// (tmux keeps the bottom of the screen in place), and a redraw must climb
/// exactly the rows the old frame takes, neither into these lines nor
/// short of its first row.
const ABOVE: usize = 18;

/// Everything the pane printed before the pull, each line once; then the
/// display, down to the one `elapsed` line (a live frame's own, or the
/// summary's after the final frame): exactly one line per key and for the
/// reference, none wider than `width`. `Err` says what is wrong.
fn check_display(
    screen: &str,
    width: usize,
    reference: &str,
    keys: &[String],
) -> Result<(), String> {
    let lines: Vec<&str> = screen.lines().collect();
    for i in 0..ABOVE {
        if lines.get(i) != Some(&format!("shell-line-{i}").as_str()) {
            return Err(format!("line {i} is not the shell's {i}th"));
        }
    }
    let elapsed: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("elapsed:"))
        .collect();
    let [end] = elapsed[..] else {
        return Err(format!("{} elapsed lines", elapsed.len()));
    };
    let Some(display) = lines.get(ABOVE..end) else {
        return Err("elapsed above the display".into());
    };
    if display.len() != keys.len() + 1 {
        return Err(format!(
            "{} lines above elapsed, not {}",
            display.len(),
            keys.len() + 1
        ));
    }
    if let Some(long) = display.iter().find(|l| l.chars().count() > width) {
        return Err(format!("wider than {width}: {long:?}"));
    }
    for key in keys.iter().map(String::as_str).chain([reference]) {
        let n = display.iter().filter(|l| l.starts_with(key)).count();
        if n != 1 {
            return Err(format!("{n} lines of {key}"));
        }
    }
    Ok(())
}

/// The bar of a layer's line: what is between its pipes.
fn bars<'a>(screen: &'a str, img: &Pushed) -> Vec<&'a str> {
    let layer = short("layer", &img.layers[0].digest);
    screen
        .lines()
        .filter(|l| l.starts_with(&layer))
        .filter_map(|l| l.split('|').nth(1))
        .collect()
}

/// Pulls an image of three layers through the proxy into a tmux pane
/// `width` columns wide, holding the second layer until the display has
/// been drawn live for a while; `mid_pull` runs meanwhile. Returns the pane
/// once the pull has exited, after checking the final frame and summary at
/// `final_width`.
async fn pull_in_tmux(
    width: usize,
    final_width: usize,
    mid_pull: impl FnOnce(&Tmux, &dyn Fn(&str, usize) -> Result<(), String>),
) -> (String, Pushed) {
    let reg = Registry::start();
    let layers: Vec<Vec<u8>> = (0..3u8).map(|i| random_layer(40 + i, 300_000)).collect();
    let img = push_image(
        &reg,
        "display/app",
        Some("1"),
        &layers,
        ("linux", host_arch()),
        false,
    )
    .await;
    let proxy = Proxy::start(reg.addr.clone()).await;
    proxy.target(&img.layers[1].digest);
    proxy.faults.lock().push(Fault::Hold);
    let dir = common::mounts::TempRoot::new();
    let reference = format!("{}/display/app:1", proxy.addr);
    // The pane stays after the pull so that its text can be read.
    let command = format!(
        "for i in $(seq 0 {}); do echo shell-line-$i; done; {} --root {} pull --hosts-dir /nonexistent --plain-http --layer-part-size 0 {reference}; echo hoist-exit=$?; sleep 600",
        ABOVE - 1,
        env!("CARGO_BIN_EXE_hoist"),
        dir.path().join("root").display(),
    );
    let tmux = Tmux::start(dir.path(), width, &command);
    let keys = keys(&img);
    let held = short("layer", &img.layers[1].digest);
    let check = |screen: &str, width: usize| check_display(screen, width, &reference, &keys);
    // Every descriptor on screen (the unpack line comes a little after the
    // layers) while the held layer is still being fetched.
    tmux.wait_for("a live frame with the held layer unfinished", |s| {
        s.lines()
            .any(|l| l.starts_with(&held) && !l.contains("done"))
            && check(s, width).is_ok()
    });
    // A few more frames redrawn over it.
    std::thread::sleep(Duration::from_millis(400));
    let screen = tmux.capture();
    if let Err(e) = check(&screen, width) {
        panic!("live at {width}: {e}:\n{screen}");
    }
    mid_pull(&tmux, &check);
    proxy.release();
    let screen = tmux.wait_for("the pull's end", |s| s.contains("hoist-exit="));
    assert!(screen.contains("hoist-exit=0"), "{screen}");
    if let Err(e) = check(&screen, final_width) {
        panic!("final frame at {final_width}: {e}:\n{screen}");
    }
    // The summary: totals, the unpack, the image.
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("elapsed:") && l.contains("total:")),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("unpacking ") && l.contains(&img.manifest.digest.to_string())),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l == format!("{reference} {}", img.manifest.digest)),
        "{screen}"
    );
    // Every descriptor finished, in its one line.
    for key in &keys {
        let line = screen.lines().find(|l| l.starts_with(key.as_str()));
        assert!(
            line.is_some_and(|l| l.contains(" done")),
            "{key}:\n{screen}"
        );
    }
    (screen, img)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_display_fits_80_columns() {
    let (screen, img) = pull_in_tmux(80, 80, |_, _| {}).await;
    // The bar stays, shortened, and full.
    let bars = bars(&screen, &img);
    assert!(
        bars.len() == 1 && (10..40).contains(&bars[0].len()) && bars[0].bytes().all(|b| b == b'+'),
        "{screen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_display_fits_200_columns() {
    let (screen, img) = pull_in_tmux(200, 200, |_, _| {}).await;
    assert_eq!(bars(&screen, &img), ["+".repeat(40)], "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_display_redraws_cleanly_when_resized() {
    pull_in_tmux(200, 100, |tmux, check| {
        // Narrower than the lines drawn: tmux re-wraps them, and the next
        // frame must replace every piece.
        tmux.resize(60);
        tmux.wait_for("a clean frame at 60 columns", |s| check(s, 60).is_ok());
        tmux.resize(100);
        tmux.wait_for("a clean frame at 100 columns", |s| check(s, 100).is_ok());
    })
    .await;
}
