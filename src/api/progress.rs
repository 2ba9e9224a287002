//! A pull's progress across the socket. The daemon's side reports every
//! `set` of the pull's [`Progress`] in order, and every so often the bytes
//! that moved since; the command line replays them into a `Progress` of its
//! own, which then goes through the same states in the same order, so its
//! display (and its line per state change) is the one a local pull shows.

use super::{PullSummary, entry_from_wire, v1};
use crate::pull::progress::{Entry, Progress, State};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the bytes that moved are sent.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The daemon's side: the pull's progress and what was sent of it.
pub struct Forwarder {
    progress: Arc<Progress>,
    sets: mpsc::UnboundedReceiver<Entry>,
    /// Each line's state and bytes as the client has them.
    sent: HashMap<String, (State, u64)>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Self {
        let (tx, sets) = mpsc::unbounded_channel();
        let progress = Progress::observed(Box::new(move |e: &Entry| {
            // The receiver goes only with the forwarder, when no one is left
            // to tell.
            let _ = tx.send(e.clone());
        }));
        Forwarder {
            progress: Arc::new(progress),
            sets,
            sent: HashMap::new(),
        }
    }

    /// The progress the pull reports to.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// What to send now: the sets since the last call, in order, then the
    /// bytes that moved on lines whose state the client already has. A
    /// line whose state changed after its last set drained waits for that
    /// set, so the client never sees bytes of a state out of order.
    pub fn drain(&mut self) -> Vec<v1::PullEvent> {
        use v1::pull_event::Event;
        let mut out = Vec::new();
        while let Ok(e) = self.sets.try_recv() {
            self.sent.insert(e.key.clone(), (e.state, e.offset));
            out.push(v1::PullEvent {
                event: Some(Event::Set((&e).into())),
            });
        }
        for e in self.progress.snapshot() {
            match self.sent.get_mut(&e.key) {
                Some((state, offset)) if *state == e.state && *offset != e.offset => {
                    *offset = e.offset;
                    out.push(v1::PullEvent {
                        event: Some(Event::Advanced((&e).into())),
                    });
                }
                _ => {}
            }
        }
        out
    }
}

/// The command line's side: applies one event to `progress`; the pull's
/// summary once it is done. Lines in a state this build does not know are
/// left out.
pub fn replay(progress: &Progress, event: &v1::PullEvent) -> Option<PullSummary> {
    use v1::pull_event::Event;
    match event.event.as_ref()? {
        Event::Set(p) => {
            if let Some(e) = entry_from_wire(p) {
                progress.replay(&e);
            }
            None
        }
        Event::Advanced(p) => {
            progress.advance(&p.key, p.offset);
            None
        }
        Event::Done(done) => Some(done.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// A progress that records the lines its `on_change` would print.
    fn recording() -> (Progress, Arc<Mutex<Vec<String>>>) {
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let l = lines.clone();
        let p = Progress::new(Some(Box::new(move |e: &Entry| {
            l.lock().push(format!("{}: {}", e.key, e.state.as_str()));
        })));
        (p, lines)
    }

    fn table(p: &Progress) -> Vec<(String, State, u64, u64)> {
        p.snapshot()
            .into_iter()
            .map(|e| (e.key, e.state, e.offset, e.total))
            .collect()
    }

    #[test]
    fn a_replayed_pull_goes_through_the_same_states_and_bytes() {
        let (local, local_lines) = recording();
        let (mirror, mirror_lines) = recording();
        let mut forwarder = Forwarder::new();
        let remote = forwarder.progress();
        let ship = |f: &mut Forwarder| {
            let mut summary = None;
            for event in f.drain() {
                summary = replay(&mirror, &event).or(summary);
            }
            summary
        };
        // The same calls on a local progress and on the daemon's, with the
        // forwarder draining at awkward points in between.
        type Step = Box<dyn Fn(&Progress)>;
        let steps: Vec<Step> = vec![
            Box::new(|p| p.set("docker.io/library/a:1", State::Resolving, 0)),
            Box::new(|p| p.set("docker.io/library/a:1", State::Resolved, 0)),
            Box::new(|p| p.set("manifest-sha256:m", State::Exists, 500)),
            Box::new(|p| p.set("layer-sha256:l", State::Waiting, 1000)),
            Box::new(|p| p.set("layer-sha256:l", State::Downloading, 1000)),
            Box::new(|p| p.advance("layer-sha256:l", 300)),
            Box::new(|p| p.advance("layer-sha256:l", 600)),
            Box::new(|p| p.set("unpack-sha256:c", State::Unpacking, 1000)),
            Box::new(|p| p.advance("layer-sha256:l", 900)),
            Box::new(|p| p.set("layer-sha256:l", State::Failed, 1000)),
            Box::new(|p| p.set("layer-sha256:l", State::Downloading, 1000)),
            Box::new(|p| p.advance("layer-sha256:l", 1000)),
            Box::new(|p| p.set("layer-sha256:l", State::Done, 1000)),
            Box::new(|p| p.advance("unpack-sha256:c", 1000)),
            Box::new(|p| p.set("unpack-sha256:c", State::Done, 1000)),
        ];
        for (i, step) in steps.iter().enumerate() {
            step(&local);
            step(&remote);
            if i % 3 == 1 {
                assert!(ship(&mut forwarder).is_none());
            }
        }
        ship(&mut forwarder);
        assert_eq!(*mirror_lines.lock(), *local_lines.lock());
        assert!(
            local_lines
                .lock()
                .contains(&"layer-sha256:l: failed".into()),
            "the test exercises state changes: {:?}",
            local_lines.lock()
        );
        assert_eq!(table(&mirror), table(&local));

        // Bytes drained mid-state arrive as they moved.
        let (mirror, _) = recording();
        let mut forwarder = Forwarder::new();
        let remote = forwarder.progress();
        remote.set("layer-sha256:x", State::Downloading, 100);
        remote.advance("layer-sha256:x", 40);
        for event in forwarder.drain() {
            replay(&mirror, &event);
        }
        assert_eq!(mirror.snapshot()[0].offset, 40);
        assert!(forwarder.drain().is_empty(), "nothing moved since");
    }

    #[test]
    fn done_carries_the_summary() {
        let summary = PullSummary {
            name: "docker.io/library/a:1".into(),
            digest: "sha256:00".into(),
            unpacked: Vec::new(),
        };
        let event = v1::PullEvent {
            event: Some(v1::pull_event::Event::Done((&summary).into())),
        };
        assert_eq!(replay(&Progress::default(), &event), Some(summary));
    }
}
