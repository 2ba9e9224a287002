//! `hoist check [--repair]`: the root's fsck on the command line. One line
//! per finding and a summary; with `--repair`, one line per thing done and
//! the summary of a check after it. Re-hashing every blob shows a progress
//! bar on a terminal.

use anyhow::Result;
use hoist::check::{self, HashProgress, Options};
use hoist::metadata::Db;
use hoist::root::human_size;
use parking_lot::Mutex;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Checks (and with `repair`, repairs) the root; whether it is clean at the end.
pub fn run(db: &Arc<Db>, repair: bool) -> Result<bool> {
    let roots = hoist::snapshot::open_existing(db)?;
    let bar = std::io::stderr().is_terminal().then(Bar::default);
    let options = Options {
        verify_digests: true,
        progress: bar.as_ref().map(|b| b as &dyn HashProgress),
    };
    let report = check::check(db, &roots, &options)?;
    let mut out = std::io::stdout().lock();
    for f in &report.findings {
        writeln!(out, "{f}")?;
    }
    writeln!(out, "{}", report.summary())?;
    if !repair || report.is_clean() {
        return Ok(report.is_clean());
    }
    let done = check::repair(db, &roots, &report)?;
    for action in &done.actions {
        writeln!(out, "{action}")?;
    }
    let gc = &done.collected;
    writeln!(
        out,
        "collected garbage: removed {} blobs, {} snapshots, {} ingests, {} leases, {} dangling rows; freed {}",
        gc.content_removed,
        gc.snapshots_removed,
        gc.ingests_removed,
        gc.leases_removed,
        gc.dangling_rows_removed,
        human_size(gc.bytes_freed)
    )?;
    for f in &done.after.findings {
        writeln!(out, "left: {f}")?;
    }
    writeln!(out, "after repair: {}", done.after.summary())?;
    Ok(done.after.is_clean())
}

/// A one-line bar on stderr, redrawn at most ten times a second by
/// whichever hashing thread gets there.
#[derive(Default)]
struct Bar {
    total: AtomicU64,
    done: AtomicU64,
    drawn: Mutex<Option<Instant>>,
}

impl Bar {
    fn draw(&self) {
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed).max(1),
        );
        let width = 30usize;
        let filled = ((done.min(total) as f64 / total as f64) * width as f64) as usize;
        eprint!(
            "\r\x1b[Kverifying blobs [{}{}] {} / {} ({}%)",
            "=".repeat(filled),
            " ".repeat(width - filled),
            human_size(done),
            human_size(total),
            done.min(total) * 100 / total
        );
    }
}

impl HashProgress for Bar {
    fn start(&self, _blobs: usize, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
        self.draw();
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        // Another thread drawing now is as good as this one drawing.
        let Some(mut drawn) = self.drawn.try_lock() else {
            return;
        };
        if drawn.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            *drawn = Some(Instant::now());
            self.draw();
        }
    }

    fn finish(&self) {
        eprint!("\r\x1b[K");
    }
}
