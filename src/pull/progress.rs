//! Progress of a pull, one entry per descriptor, as `ctr images pull` shows it.

use parking_lot::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Resolving,
    Resolved,
    Waiting,
    Downloading,
    Unpacking,
    Done,
    Exists,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Resolving => "resolving",
            State::Resolved => "resolved",
            State::Waiting => "waiting",
            State::Downloading => "downloading",
            State::Unpacking => "unpacking",
            State::Done => "done",
            State::Exists => "exists",
            State::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// `layer-sha256:…`, `manifest-sha256:…`, or the reference while resolving.
    pub key: String,
    pub state: State,
    pub offset: u64,
    pub total: u64,
}

/// Called with an entry whenever its state changes.
pub type OnChange = Box<dyn Fn(&Entry) + Send + Sync>;

pub struct Progress {
    started: Instant,
    entries: Mutex<Vec<Entry>>,
    /// Called on every state change, for line-by-line output without a terminal.
    on_change: Option<OnChange>,
    /// Called after every `set`, changed or not: see [`Progress::observed`].
    on_set: Option<OnChange>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new(None)
    }
}

impl Progress {
    pub fn new(on_change: Option<OnChange>) -> Self {
        Progress {
            started: Instant::now(),
            entries: Mutex::new(Vec::new()),
            on_change,
            on_set: None,
        }
    }

    /// A progress that calls `on_set` with the entry after every `set`,
    /// changed or not, in order: a copy in another process that [`replay`]s
    /// them (and `advance`s offsets) goes through the same state changes,
    /// so its `on_change` prints what this one's would.
    ///
    /// [`replay`]: Progress::replay
    pub fn observed(on_set: OnChange) -> Self {
        Progress {
            on_set: Some(on_set),
            ..Progress::default()
        }
    }

    /// Repeats a `set` that an [`observed`](Progress::observed) progress
    /// reported: its state and total as `set` does, then its offset.
    pub fn replay(&self, e: &Entry) {
        self.set(&e.key, e.state, e.total);
        if let Some(mine) = self.entries.lock().iter_mut().find(|m| m.key == e.key) {
            mine.offset = e.offset;
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn set(&self, key: &str, state: State, total: u64) {
        let mut entries = self.entries.lock();
        let entry = match entries.iter_mut().position(|e| e.key == key) {
            Some(i) => &mut entries[i],
            None => {
                entries.push(Entry {
                    key: key.to_string(),
                    state,
                    offset: 0,
                    total,
                });
                let last = entries.len() - 1;
                &mut entries[last]
            }
        };
        let changed = entry.state != state;
        entry.state = state;
        entry.total = total;
        if matches!(state, State::Done | State::Exists | State::Resolved) {
            entry.offset = total;
        }
        if changed && let Some(f) = &self.on_change {
            f(entry);
        }
        if let Some(f) = &self.on_set {
            f(entry);
        }
    }

    /// Moves an entry's offset; a waiting entry starts downloading.
    pub fn advance(&self, key: &str, offset: u64) {
        if let Some(e) = self.entries.lock().iter_mut().find(|e| e.key == key) {
            e.offset = offset;
            if e.state == State::Waiting {
                e.state = State::Downloading;
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Entry> {
        self.entries.lock().clone()
    }
}
