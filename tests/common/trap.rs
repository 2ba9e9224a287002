//! A registry stand-in that refuses every request with a basic-auth
//! challenge and records the `Authorization` header of each, to show which
//! credentials a client offers it.

use parking_lot::Mutex;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Per request: its path and the `Authorization` header it carried.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

pub struct AuthTrap {
    pub addr: String,
    seen: Seen,
}

impl AuthTrap {
    pub async fn start() -> AuthTrap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen: Seen = Arc::default();
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let seen = s.clone();
                tokio::spawn(async move {
                    let Some(head) = super::proxy::read_head(&mut conn).await else {
                        return;
                    };
                    let path = head
                        .lines()
                        .next()
                        .and_then(|l| l.split(' ').nth(1))
                        .unwrap_or_default()
                        .to_string();
                    let auth = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("authorization")
                            .then(|| v.trim().to_string())
                    });
                    seen.lock().push((path, auth));
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"trap\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        AuthTrap { addr, seen }
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().len()
    }

    /// The `Authorization` headers it was sent.
    pub fn authorizations(&self) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .filter_map(|(_, a)| a.clone())
            .collect()
    }
}
