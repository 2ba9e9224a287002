//! A layer's bytes handed to its apply as they arrive from the network, so a
//! layer streams once: network -> ingest, and at the same time -> decompress
//! -> tar apply. The feed holds at most `budget` bytes the apply has not read
//! yet; past that the download waits for the apply.
//!
//! The download side decides whether the feed goes live: it does only for a
//! blob it downloads from its first byte. A feed dropped before any data
//! tells the apply to read the stored blob instead.

use bytes::Bytes;
use std::io::{self, Read};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

/// Unread bytes a feed may hold before the download waits.
pub const FEED_BUDGET: usize = 4 << 20;

enum Message {
    /// The bytes, and the budget permits they hold.
    Data(Bytes, usize),
    /// Every byte was sent and the blob matched its digest in the store.
    Done,
    Failed(String),
}

/// The download's end of a feed.
pub struct FeedSender {
    tx: mpsc::UnboundedSender<Message>,
    budget: Arc<Semaphore>,
    capacity: usize,
}

/// The apply's end of a feed, before the download has said whether it is live.
pub struct FeedReceiver {
    rx: mpsc::UnboundedReceiver<Message>,
    budget: Arc<Semaphore>,
}

/// A live feed as `Read`, for the blocking apply thread.
pub struct FeedReader {
    rx: mpsc::UnboundedReceiver<Message>,
    budget: Arc<Semaphore>,
    current: Bytes,
    /// Budget permits `current` holds, given back once it is read.
    held: usize,
    done: bool,
    /// A failure that came before any data, for the first read.
    failed: Option<io::Error>,
}

/// A feed holding at most `budget` unread bytes (at least one chunk).
pub fn feed(budget: usize) -> (FeedSender, FeedReceiver) {
    let budget = budget.max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let budget_sem = Arc::new(Semaphore::new(budget));
    (
        FeedSender {
            tx,
            budget: budget_sem.clone(),
            // Permits are counted in u32.
            capacity: budget.min(u32::MAX as usize),
        },
        FeedReceiver {
            rx,
            budget: budget_sem,
        },
    )
}

impl FeedSender {
    /// Hands `chunk` to the apply once the budget has room; `false` when the
    /// apply has gone (it failed, or was dropped), and the feed is over.
    pub async fn send(&self, chunk: Bytes) -> bool {
        let permits = chunk.len().min(self.capacity);
        // The reader closes the budget when it goes, which ends this wait.
        let acquired = tokio::select! {
            permit = self.budget.acquire_many(permits as u32) => permit,
            _ = self.tx.closed() => return false,
        };
        match acquired {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        self.tx.send(Message::Data(chunk, permits)).is_ok()
    }

    pub fn done(self) {
        let _ = self.tx.send(Message::Done);
    }

    pub fn fail(self, why: String) {
        let _ = self.tx.send(Message::Failed(why));
    }
}

impl FeedReceiver {
    /// Waits for the download's verdict: a reader when the feed is live,
    /// `None` when the layer is to be read from the store.
    pub async fn start(mut self) -> Option<FeedReader> {
        let first = self.rx.recv().await?;
        let mut reader = FeedReader {
            rx: self.rx,
            budget: self.budget,
            current: Bytes::new(),
            held: 0,
            done: false,
            failed: None,
        };
        reader.failed = reader.accept(first);
        Some(reader)
    }
}

impl FeedReader {
    fn accept(&mut self, message: Message) -> Option<io::Error> {
        match message {
            Message::Data(b, permits) => {
                self.held = permits;
                self.current = b;
                None
            }
            Message::Done => {
                self.done = true;
                None
            }
            Message::Failed(why) => {
                self.done = true;
                Some(io::Error::other(why))
            }
        }
    }

    fn release(&mut self) {
        if self.held > 0 {
            self.budget.add_permits(self.held);
            self.held = 0;
        }
    }
}

impl Read for FeedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        while self.current.is_empty() {
            self.release();
            if self.done {
                return Ok(0);
            }
            let message = self.rx.blocking_recv().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the layer download stopped before its end",
                )
            })?;
            if let Some(e) = self.accept(message) {
                return Err(e);
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        if self.current.is_empty() {
            self.release();
        }
        Ok(n)
    }
}

impl Drop for FeedReader {
    fn drop(&mut self) {
        // A download waiting for room must not wait for a reader that is gone.
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(reader: FeedReader) -> io::Result<Vec<u8>> {
        tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn bytes_arrive_in_order_within_the_budget() {
        let (tx, rx) = feed(10);
        let sending = tokio::spawn(async move {
            for i in 0..50u8 {
                assert!(tx.send(Bytes::from(vec![i; 7])).await);
            }
            tx.done();
        });
        let reader = rx.start().await.expect("live");
        let got = read_all(reader).await.unwrap();
        sending.await.unwrap();
        let want: Vec<u8> = (0..50u8).flat_map(|i| vec![i; 7]).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_chunk_larger_than_the_budget_still_passes() {
        let (tx, rx) = feed(4);
        tokio::spawn(async move {
            assert!(tx.send(Bytes::from(vec![9u8; 100])).await);
            assert!(tx.send(Bytes::from(vec![8u8; 100])).await);
            tx.done();
        });
        let got = read_all(rx.start().await.expect("live")).await.unwrap();
        assert_eq!(got.len(), 200);
        assert_eq!(got[150], 8);
    }

    #[tokio::test]
    async fn a_feed_dropped_before_data_means_read_the_store() {
        let (tx, rx) = feed(16);
        drop(tx);
        assert!(rx.start().await.is_none());
    }

    #[tokio::test]
    async fn a_download_that_stops_is_an_error_for_the_apply() {
        let (tx, rx) = feed(16);
        assert!(tx.send(Bytes::from_static(b"abc")).await);
        drop(tx);
        let e = read_all(rx.start().await.expect("live")).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

        let (tx, rx) = feed(16);
        assert!(tx.send(Bytes::from_static(b"abc")).await);
        tx.fail("blob sha256:00: digest mismatch".into());
        let e = read_all(rx.start().await.expect("live")).await.unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");

        // A failure before any data is the first read's answer.
        let (tx, rx) = feed(16);
        tx.fail("registry unavailable".into());
        let e = read_all(rx.start().await.expect("live")).await.unwrap_err();
        assert!(e.to_string().contains("unavailable"), "{e}");
    }

    #[tokio::test]
    async fn a_download_blocked_on_a_gone_apply_is_released() {
        let (tx, rx) = feed(4);
        assert!(tx.send(Bytes::from_static(b"abcd")).await);
        let reader = rx.start().await.expect("live");
        // The budget is spent; the next send waits until the reader goes.
        let blocked = tokio::spawn(async move { tx.send(Bytes::from_static(b"efgh")).await });
        tokio::task::yield_now().await;
        drop(reader);
        assert!(!blocked.await.unwrap());
    }
}
