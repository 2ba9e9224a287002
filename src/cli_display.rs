//! The `hoist pull` progress display: one line per descriptor, redrawn in
//! place and fitted to the terminal's size, or plain lines, one per state
//! change, when stdout is not a terminal.
//!
//! Whoever feeds a `Progress` (a pull in this process, or events streamed
//! from the daemon) makes it with [`new_progress`] and, on a terminal, draws
//! it with [`Live::start`] until [`Live::finish`]; [`summary`] is the line
//! that follows either.

use hoist::pull::progress::{Entry, Progress, State};
use hoist::root::human_size;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// Columns assumed when stdout reports no size.
const FALLBACK_WIDTH: usize = 80;
/// The longest state name, `downloading`, so the bars line up.
const STATE_WIDTH: usize = 11;
const MAX_BAR: usize = 40;
/// Below this a bar says too little to be worth its columns.
const MIN_BAR: usize = 10;
/// Hex digits a digest keeps on screen, as docker shortens ids.
const SHORT_HEX: usize = 12;
const FRAME: Duration = Duration::from_millis(100);

/// The progress of a pull: on a terminal it is drawn by [`Live`]; otherwise
/// it prints one complete line per state change.
pub fn new_progress(tty: bool) -> Progress {
    if tty {
        return Progress::default();
    }
    Progress::new(Some(Box::new(|e: &Entry| {
        // One write per line, so lines from concurrent downloads never mix; a
        // closed stdout (`| head`) must not panic the pull.
        let line = format!("{}: {}\n", e.key, e.state.as_str());
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    })))
}

/// `elapsed: 1.2s`, then (tab-separated) the total of every descriptor but
/// the unpack line, `total: 3.4 MiB`, and its rate, `(2.8 MiB/s)`.
pub fn summary(progress: &Progress) -> String {
    let elapsed = progress.started().elapsed().as_secs_f64();
    let total: u64 = progress
        .snapshot()
        .iter()
        .filter(|e| !e.key.starts_with("unpack-"))
        .map(|e| e.total)
        .sum();
    format!(
        "elapsed: {elapsed:.1}s\ttotal: {}\t({}/s)",
        human_size(total),
        human_size((total as f64 / elapsed.max(0.001)) as u64)
    )
}

/// A `Progress` being redrawn on the terminal.
pub struct Live {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Live {
    pub fn start(progress: Arc<Progress>) -> Live {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            draw_until(&progress, async {
                // A dropped `Live` stops the display too.
                let _ = stopped.await;
            })
            .await;
        });
        Live { stop, task }
    }

    /// Draws the final frame (every entry, no elapsed line) and returns once
    /// it is written, so what is printed next follows it.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Redraws `progress` every frame and at once on a resize until `stop`
/// completes, then draws the final frame.
pub async fn draw_until(progress: &Progress, stop: impl Future<Output = ()>) {
    let mut screen = Screen::default();
    // Without the signal the size is still read every frame, a tick later.
    let mut winch = signal(SignalKind::window_change()).ok();
    tokio::pin!(stop);
    loop {
        screen.draw(progress, true);
        let signal_gone = tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(FRAME) => false,
            got = async {
                match winch.as_mut() {
                    Some(w) => w.recv().await,
                    None => std::future::pending().await,
                }
            } => got.is_none(),
        };
        if signal_gone {
            winch = None;
        }
    }
    screen.draw(progress, false);
}

/// The terminal's (columns, rows) from TIOCGWINSZ on stdout; 80 columns and
/// unknown (0) rows when it reports none.
fn terminal_size() -> (usize, usize) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points at a live one for the whole call.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if rc != 0 || ws.ws_col == 0 {
        return (FALLBACK_WIDTH, 0);
    }
    (usize::from(ws.ws_col), usize::from(ws.ws_row))
}

/// What the previous frame left on the terminal.
#[derive(Default)]
struct Screen {
    /// The characters of each line drawn, to count the rows they take now.
    drawn: Vec<usize>,
}

impl Screen {
    fn draw(&mut self, progress: &Progress, running: bool) {
        let entries = progress.snapshot();
        let size = terminal_size();
        let lines = frame_lines(&entries, progress.started().elapsed(), size, running);
        let out = self.replace(&lines, size.0);
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }

    /// The bytes that put `lines` where the previous frame was, at `width`.
    ///
    /// After a narrowing resize the terminal (tmux, VTE, kitty, iTerm2 and
    /// most others) re-wraps the old lines, so each takes as many rows as its
    /// characters need at the new width: the cursor goes up that many, not one
    /// per line. Each line is erased before it is written, and everything below
    /// the new frame afterwards, so no piece of an old frame stays. A terminal
    /// that cuts lines instead of re-wrapping them (xterm) loses a few rows
    /// above the display on such a resize, never shows a broken copy.
    fn replace(&mut self, lines: &[String], width: usize) -> String {
        let width = width.max(1);
        let rows: usize = self.drawn.iter().map(|&n| n.div_ceil(width).max(1)).sum();
        let mut out = String::new();
        if rows > 0 {
            out.push_str(&format!("\x1b[{rows}A"));
        }
        out.push('\r');
        for line in lines {
            // Erase first: erasing after a line that fills the width would
            // take its last character on some terminals.
            out.push_str("\x1b[2K");
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("\x1b[J");
        self.drawn = lines.iter().map(|l| l.chars().count()).collect();
        out
    }
}

/// The lines of one frame at (columns, rows), none longer than the columns.
///
/// While running, an `elapsed` line closes the frame, and a frame taller
/// than the screen folds its earliest finished entries into one line: rows
/// scrolled off the top can no longer be redrawn. The final frame, never
/// redrawn, shows every entry.
fn frame_lines(
    entries: &[Entry],
    elapsed: Duration,
    (width, height): (usize, usize),
    running: bool,
) -> Vec<String> {
    let layout = Layout::new(entries, width);
    let mut lines = Vec::with_capacity(entries.len() + 2);
    let mut hidden = vec![false; entries.len()];
    if running && height >= 3 && entries.len() + 2 > height {
        // One row for the cursor below the frame, one for elapsed, one for
        // the folded line.
        let fold = entries.len() + 3 - height;
        let finished = |e: &Entry| matches!(e.state, State::Done | State::Exists | State::Resolved);
        let mut done = 0;
        for (i, e) in entries.iter().enumerate() {
            if done < fold && finished(e) {
                hidden[i] = true;
                done += 1;
            }
        }
        // Not enough finished: the earliest of the rest go too.
        let mut more = fold - done;
        for h in hidden.iter_mut().filter(|h| !**h) {
            if more == 0 {
                break;
            }
            *h = true;
            more -= 1;
        }
        lines.push(cut(&format!("+{fold} more ({done} done)"), width));
    }
    lines.extend(
        entries
            .iter()
            .zip(&hidden)
            .filter(|(_, hidden)| !**hidden)
            .map(|(e, _)| layout.line(e)),
    );
    if running {
        lines.push(cut(
            &format!("elapsed: {:.1}s", elapsed.as_secs_f64()),
            width,
        ));
    }
    lines
}

/// The columns every line of a frame shares, so they line up:
/// `key  state  |bar|  offset/total`.
#[derive(Debug)]
struct Layout {
    width: usize,
    /// Characters of the key column.
    key: usize,
    /// Characters between the bar's pipes; 0 leaves the bar out.
    bar: usize,
    /// Whether the sizes are shown.
    sizes: bool,
}

impl Layout {
    /// As the width drops, the bar shrinks from 40 to 10 and then goes, then
    /// the sizes go, then the keys are cut; the state stays longest.
    fn new(entries: &[Entry], width: usize) -> Layout {
        // The reference line (no size) does not widen the key column: it
        // takes the columns the bar and sizes leave it.
        let sized = || entries.iter().filter(|e| e.total > 0);
        let key = sized()
            .map(|e| short_key(&e.key).chars().count())
            .max()
            .unwrap_or(0);
        let sizes = sized().map(|e| sizes(e).len()).max().unwrap_or(0);
        let base = key + 1 + STATE_WIDTH;
        let sizes_cols = if sizes > 0 { 1 + sizes } else { 0 };
        // " |" and "|" around the bar.
        let bar_room = width.saturating_sub(base + sizes_cols + 3);
        if bar_room >= MIN_BAR {
            Layout {
                width,
                key,
                bar: bar_room.min(MAX_BAR),
                sizes: sizes > 0,
            }
        } else {
            Layout {
                width,
                key: key.min(width.saturating_sub(1 + STATE_WIDTH)),
                bar: 0,
                sizes: sizes > 0 && base + sizes_cols <= width,
            }
        }
    }

    /// One entry's line: never more characters than the width.
    fn line(&self, e: &Entry) -> String {
        let key = short_key(&e.key);
        let state = e.state.as_str();
        let mut line = if key.chars().count() > self.key && e.total == 0 {
            // The reference: its key and state alone.
            let room = self.width.saturating_sub(1 + state.len());
            format!("{} {state}", fit_key(&key, room))
        } else {
            let key = fit_key(&key, self.key);
            let mut line = format!("{key:<kw$} {state:<STATE_WIDTH$}", kw = self.key);
            if self.bar > 0 {
                line.push_str(&format!(" |{}|", bar(e, self.bar)));
            }
            if self.sizes && e.total > 0 {
                line.push(' ');
                line.push_str(&sizes(e));
            }
            line
        };
        line.truncate(line.trim_end().len());
        cut(line.trim_start(), self.width)
    }
}

fn sizes(e: &Entry) -> String {
    format!(
        "{}/{}",
        human_size(e.offset.min(e.total)),
        human_size(e.total)
    )
}

fn bar(e: &Entry, width: usize) -> String {
    let filled = match e.state {
        State::Done | State::Exists | State::Resolved => width,
        _ if e.total > 0 => {
            ((e.offset.min(e.total) as u128 * width as u128) / e.total as u128) as usize
        }
        _ => 0,
    };
    format!("{}{}", "+".repeat(filled), "-".repeat(width - filled))
}

/// The key with every digest cut to 12 hex digits:
/// `layer-sha256:0123456789ab`.
fn short_key(key: &str) -> String {
    const PREFIX: &str = "sha256:";
    let mut out = String::with_capacity(key.len());
    let mut rest = key;
    while let Some(at) = rest.find(PREFIX) {
        let (before, after) = rest.split_at(at + PREFIX.len());
        out.push_str(before);
        let hex = after
            .bytes()
            .take_while(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .count();
        let keep = if hex == 64 { SHORT_HEX } else { hex };
        out.push_str(&after[..keep]);
        rest = &after[hex..];
    }
    out.push_str(rest);
    out
}

/// `key` in at most `room` characters: without its algorithm
/// (`layer-0123456789ab`) if that is enough, else cut, with `~` where it was.
fn fit_key(key: &str, room: usize) -> String {
    if key.chars().count() <= room {
        return key.to_string();
    }
    let bare = key.replacen("sha256:", "", 1);
    if bare.chars().count() <= room {
        return bare;
    }
    match room {
        0 => String::new(),
        1 => cut(&bare, 1),
        _ => format!("{}~", cut(&bare, room - 1)),
    }
}

/// The first `width` characters of `s`: terminal columns, as the display
/// writes only ASCII (references and digests are ASCII).
fn cut(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn entry(key: &str, state: State, offset: u64, total: u64) -> Entry {
        Entry {
            key: key.to_string(),
            state,
            offset,
            total,
        }
    }

    /// What a pull of a two-platform index shows midway, with a long
    /// reference, every state and sizes from bytes to GiB.
    fn pull_entries() -> Vec<Entry> {
        vec![
            entry(
                &format!(
                    "registry.example.com:5000/some/deeply/nested/repository/name@sha256:{HEX}"
                ),
                State::Resolved,
                0,
                0,
            ),
            entry(&format!("index-sha256:{HEX}"), State::Exists, 1_534, 1_534),
            entry(&format!("manifest-sha256:{HEX}"), State::Done, 2_048, 2_048),
            entry(&format!("config-sha256:{HEX}"), State::Done, 7_301, 7_301),
            entry(
                &format!("layer-sha256:{HEX}"),
                State::Downloading,
                1_048_000,
                1_048_575,
            ),
            entry(&format!("layer-sha256:{HEX}"), State::Waiting, 0, 3 << 30),
            entry(&format!("layer-sha256:{HEX}"), State::Failed, 77, 999),
            entry(
                &format!("unpack-sha256:{HEX}"),
                State::Unpacking,
                512 << 20,
                3 << 30,
            ),
        ]
    }

    fn chars(s: &str) -> usize {
        s.chars().count()
    }

    #[test]
    fn digests_shorten_to_twelve_hex_digits() {
        assert_eq!(
            short_key(&format!("layer-sha256:{HEX}")),
            "layer-sha256:0123456789ab"
        );
        assert_eq!(
            short_key(&format!("example.com/app@sha256:{HEX}")),
            "example.com/app@sha256:0123456789ab"
        );
        // Not a digest: a port, a tag, a short hex run.
        assert_eq!(
            short_key("127.0.0.1:5000/app:deadbeef"),
            "127.0.0.1:5000/app:deadbeef"
        );
        assert_eq!(short_key("x-sha256:abc"), "x-sha256:abc");
    }

    #[test]
    fn no_line_is_wider_than_the_terminal_at_any_width() {
        let entries = pull_entries();
        for width in 1..=220 {
            for running in [true, false] {
                let lines = frame_lines(&entries, Duration::from_secs(3), (width, 0), running);
                assert_eq!(lines.len(), entries.len() + usize::from(running));
                for line in &lines {
                    assert!(chars(line) <= width, "{width}: {line:?}");
                    assert!(line.is_ascii(), "{line:?}");
                }
                // A descriptor line always names its state while the key
                // (at least one character of it) fits beside it.
                if width > 1 + STATE_WIDTH {
                    for (e, line) in entries.iter().zip(&lines) {
                        assert!(line.contains(e.state.as_str()), "{width}: {line:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_bar_gives_way_first_then_the_sizes_then_the_key() {
        let entries = pull_entries();
        let bar_of = |line: &str| line.split('|').nth(1).map(str::len);
        let mut previous_bar = usize::MAX;
        let mut saw = (false, false, false);
        for width in (1..=220).rev() {
            let lines = frame_lines(&entries, Duration::ZERO, (width, 0), false);
            let layer = &lines[4];
            let sizes = layer.contains("1023.4 KiB/1024.0 KiB");
            let key_whole = layer.starts_with("layer-sha256:0123456789ab ");
            match bar_of(layer) {
                Some(bar) => {
                    // The bar shrinks, never grows, as the width drops,
                    // and while it is there nothing else is cut.
                    assert!(bar <= previous_bar && (MIN_BAR..=MAX_BAR).contains(&bar));
                    assert!(sizes && key_whole, "{width}: {layer:?}");
                    previous_bar = bar;
                    saw.0 = true;
                }
                None if sizes => {
                    assert!(key_whole, "{width}: {layer:?}");
                    assert!(bar_of(&lines[5]).is_none(), "one layout per frame");
                    saw.1 = true;
                }
                None if key_whole => saw.2 = true,
                None => {
                    // Cut keys only once the sizes are gone.
                    assert!(width < 28 + 1 + STATE_WIDTH, "{width}: {layer:?}");
                }
            }
        }
        assert_eq!(saw, (true, true, true));
        assert_eq!(previous_bar, MIN_BAR);
    }

    #[test]
    fn lines_line_up_and_say_what_they_show() {
        let entries = pull_entries();
        let lines = frame_lines(&entries, Duration::from_millis(2_340), (140, 40), true);
        assert_eq!(
            lines[4],
            format!(
                "layer-sha256:0123456789ab    downloading |{}{}| 1023.4 KiB/1024.0 KiB",
                "+".repeat(39),
                "-"
            )
        );
        assert_eq!(
            lines[1],
            format!(
                "index-sha256:0123456789ab    exists      |{}| 1.5 KiB/1.5 KiB",
                "+".repeat(40)
            )
        );
        // The bars start in one column.
        let columns: Vec<usize> = lines[1..8]
            .iter()
            .map(|l| l.find('|').unwrap_or(0))
            .collect();
        assert!(columns.iter().all(|&c| c == 41), "{columns:?}");
        // The long reference keeps its name whole rather than a bar.
        assert_eq!(
            lines[0],
            "registry.example.com:5000/some/deeply/nested/repository/name@sha256:0123456789ab resolved"
        );
        assert_eq!(lines[8], "elapsed: 2.3s");
        // At 80 columns a bar is still there, shorter.
        let lines = frame_lines(&entries, Duration::ZERO, (80, 40), false);
        assert_eq!(
            lines[3],
            format!(
                "config-sha256:0123456789ab   done        |{}| 7.1 KiB/7.1 KiB",
                "+".repeat(15)
            )
        );
    }

    #[test]
    fn narrow_keys_drop_their_algorithm_then_are_cut() {
        assert_eq!(
            fit_key("layer-sha256:0123456789ab", 25),
            "layer-sha256:0123456789ab"
        );
        assert_eq!(
            fit_key("layer-sha256:0123456789ab", 20),
            "layer-0123456789ab"
        );
        assert_eq!(fit_key("layer-sha256:0123456789ab", 10), "layer-012~");
        assert_eq!(fit_key("layer-sha256:0123456789ab", 1), "l");
        assert_eq!(fit_key("layer-sha256:0123456789ab", 0), "");
        let e = entry(&format!("layer-sha256:{HEX}"), State::Done, 5, 5);
        let lines = frame_lines(std::slice::from_ref(&e), Duration::ZERO, (30, 0), false);
        assert_eq!(lines, ["layer-0123456789ab done"]);
    }

    #[test]
    fn a_frame_taller_than_the_screen_folds_its_finished_entries() {
        let mut entries = pull_entries();
        for i in 0..30 {
            entries.push(entry(&format!("layer-sha256:{i:064x}"), State::Done, 9, 9));
        }
        entries.push(entry(
            &format!("layer-sha256:{:064x}", 99),
            State::Downloading,
            1,
            9,
        ));
        for height in 3..=60 {
            let lines = frame_lines(&entries, Duration::ZERO, (120, height), true);
            assert!(lines.len() < height, "{height}: {} lines", lines.len());
            if entries.len() + 2 > height {
                assert!(
                    lines[0].starts_with('+') && lines[0].contains("more"),
                    "{}",
                    lines[0]
                );
                // Unfinished entries stay in view while finished ones can go.
                if height >= 8 {
                    for state in ["downloading", "waiting", "failed", "unpacking"] {
                        assert!(lines.iter().any(|l| l.contains(state)), "{height}: {state}");
                    }
                }
            } else {
                assert_eq!(lines.len(), entries.len() + 1);
            }
        }
        // The final frame is never redrawn: every entry.
        let last = frame_lines(&entries, Duration::ZERO, (120, 10), false);
        assert_eq!(last.len(), entries.len());
    }

    #[test]
    fn a_redraw_climbs_the_rows_the_old_lines_take_at_the_new_width() {
        let mut screen = Screen::default();
        let wide = vec!["x".repeat(100), "y".repeat(100), "elapsed".to_string()];
        let first = screen.replace(&wide, 120);
        assert!(
            first.starts_with("\r\x1b[2K"),
            "nothing above to climb: {first:?}"
        );
        // Same width: one row per line.
        let again = screen.replace(&wide, 120);
        assert!(again.starts_with("\x1b[3A\r"), "{again:?}");
        // Narrowed to 40: the 100-character lines re-wrapped to 3 rows each.
        let narrow = vec!["x".repeat(40), "y".repeat(40), "elapsed".to_string()];
        let shrunk = screen.replace(&wide, 40);
        assert!(shrunk.starts_with("\x1b[7A\r"), "{shrunk:?}");
        // Lines filling the width exactly take one row each.
        screen.replace(&narrow, 40);
        let redraw = screen.replace(&narrow, 40);
        assert!(redraw.starts_with("\x1b[3A\r"), "{redraw:?}");
        // Every line erased before it is written, the rest of the screen after.
        assert_eq!(redraw.matches("\x1b[2K").count(), 3);
        assert!(redraw.ends_with("elapsed\n\x1b[J"), "{redraw:?}");
    }

    #[test]
    fn the_summary_counts_descriptors_not_the_unpack_line() {
        let progress = Progress::default();
        progress.set("layer-sha256:aa", State::Done, 2048);
        progress.set("unpack-sha256:bb", State::Done, 2048);
        let s = summary(&progress);
        assert!(
            s.starts_with("elapsed: ") && s.contains("\ttotal: 2.0 KiB\t("),
            "{s}"
        );
    }
}
