//! An HTTP/1.1 fault proxy: forwards GETs to the registry and injects one
//! fault per request as the test asks, recording every request it sees.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Send half of a blob body, then drop the connection.
    DropMidBlob,
    /// Answer 500.
    ServerError,
    /// Answer 429 with `Retry-After: 1`.
    TooManyRequests,
    /// Ignore `Range` and send the whole blob with 200.
    IgnoreRange,
    /// Send a blob body one byte per second.
    Trickle,
    /// Forward as asked (to aim the faults after it at later requests).
    Pass,
    /// Answer nothing until `Proxy::release`, then forward as asked.
    Hold,
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

pub struct Proxy {
    pub addr: String,
    /// Faults to apply, in order, to the next blob requests.
    pub faults: Arc<Mutex<Vec<Fault>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Only blob paths containing this get faults (all blobs when unset).
    only: Arc<Mutex<Option<String>>>,
    /// When set, the proxy is a bearer-token registry front: `/token` hands
    /// out a token for these basic credentials, everything else needs it.
    bearer: Arc<Mutex<Option<(String, String)>>>,
    canned: Canned,
    release: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Documents served in the registry's place: (path, content type, body).
type Canned = Arc<Mutex<Vec<(String, String, String)>>>;

pub const TOKEN: &str = "t0k3n-for-tests";

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let faults: Arc<Mutex<Vec<Fault>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let only: Arc<Mutex<Option<String>>> = Arc::default();
        let bearer: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let canned: Canned = Arc::default();
        let release = Arc::new(tokio::sync::watch::Sender::new(false));
        let r = release.clone();
        let (f, s, o, b) = (faults.clone(), seen.clone(), only.clone(), bearer.clone());
        let c = canned.clone();
        let me = addr.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let ctx = Ctx {
                    upstream: upstream.clone(),
                    me: me.clone(),
                    faults: f.clone(),
                    seen: s.clone(),
                    only: o.clone(),
                    bearer: b.clone(),
                    canned: c.clone(),
                    release: r.clone(),
                };
                tokio::spawn(serve(conn, ctx));
            }
        });
        Proxy {
            addr,
            faults,
            seen,
            only,
            bearer,
            canned,
            release,
        }
    }

    /// Lets every held request, and any later one, go on.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    /// Answers GETs of `path` (the query aside) with `body` as
    /// `content_type`, and its digest as `Docker-Content-Digest`, instead
    /// of asking the registry: for documents the registry refuses to store.
    pub fn serve_document(&self, path: &str, content_type: &str, body: &str) {
        self.canned
            .lock()
            .push((path.to_string(), content_type.to_string(), body.to_string()));
    }

    pub fn require_bearer(&self, user: &str, password: &str) {
        *self.bearer.lock() = Some((user.to_string(), password.to_string()));
    }

    pub fn token_requests(&self) -> usize {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.path.starts_with("/token"))
            .count()
    }

    /// Aims the faults at one blob.
    pub fn target(&self, digest: &hoist::digest::Digest) {
        *self.only.lock() = Some(digest.to_string());
    }

    pub fn blob_requests(&self, digest: &hoist::digest::Digest) -> Vec<Seen> {
        let needle = format!("/blobs/{digest}");
        self.seen
            .lock()
            .iter()
            .filter(|s| s.path.contains(&needle))
            .cloned()
            .collect()
    }
}

struct Ctx {
    upstream: String,
    me: String,
    faults: Arc<Mutex<Vec<Fault>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    only: Arc<Mutex<Option<String>>>,
    bearer: Arc<Mutex<Option<(String, String)>>>,
    canned: Canned,
    release: Arc<tokio::sync::watch::Sender<bool>>,
}

async fn reply(conn: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(msg.as_bytes()).await;
}

async fn serve(mut conn: TcpStream, ctx: Ctx) {
    let Ctx {
        upstream,
        me,
        faults,
        seen,
        only,
        bearer,
        canned,
        release,
    } = ctx;
    let Some(head) = read_head(&mut conn).await else {
        return;
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("GET").to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_lowercase(), v.trim().to_string()));
        }
    }
    let range = headers
        .iter()
        .find(|(k, _)| k == "range")
        .map(|(_, v)| v.clone());
    seen.lock().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    let bearer = bearer.lock().clone();
    if let Some((user, password)) = bearer {
        let auth = headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone());
        if path.starts_with("/token") {
            use base64::Engine;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            if auth.as_deref() == Some(want.as_str()) && path.contains("scope=repository") {
                let body = format!("{{\"token\":\"{TOKEN}\",\"expires_in\":300}}");
                reply(
                    &mut conn,
                    "200 OK",
                    "Content-Type: application/json\r\n",
                    &body,
                )
                .await;
            } else {
                reply(&mut conn, "401 Unauthorized", "", "").await;
            }
            return;
        }
        if auth.as_deref() != Some(format!("Bearer {TOKEN}").as_str()) {
            let repo = path
                .trim_start_matches("/v2/")
                .split("/manifests/")
                .next()
                .unwrap_or("");
            let repo = repo.split("/blobs/").next().unwrap_or(repo);
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"hoist-test\",scope=\"repository:{repo}:pull\"\r\n"
            );
            reply(&mut conn, "401 Unauthorized", &challenge, "").await;
            return;
        }
        headers.retain(|(k, _)| k != "authorization");
    }
    let document = canned
        .lock()
        .iter()
        .find(|(p, _, _)| path.split('?').next() == Some(p.as_str()))
        .map(|(_, mt, body)| (mt.clone(), body.clone()));
    if let Some((content_type, body)) = document {
        let digest = hoist::digest::Digest::of(body.as_bytes());
        let headers =
            format!("Content-Type: {content_type}\r\nDocker-Content-Digest: {digest}\r\n");
        reply(&mut conn, "200 OK", &headers, &body).await;
        return;
    }
    let is_blob = path.contains("/blobs/")
        && only
            .lock()
            .as_ref()
            .is_none_or(|d| path.contains(d.as_str()));
    let fault = if is_blob { faults.lock().pop() } else { None };
    if fault == Some(Fault::Hold) {
        let _ = release.subscribe().wait_for(|go| *go).await;
    }
    match fault {
        Some(Fault::ServerError) => {
            let _ = conn.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
            return;
        }
        Some(Fault::TooManyRequests) => {
            let _ = conn
                .write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
        _ => {}
    }
    hoist::remote::install_tls_provider();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .unwrap();
    let mut req = http.request(
        method.parse().unwrap_or(reqwest::Method::GET),
        format!("http://{upstream}{path}"),
    );
    for (k, v) in &headers {
        if k == "host" || k == "connection" || (k == "range" && fault == Some(Fault::IgnoreRange)) {
            continue;
        }
        req = req.header(k.as_str(), v.as_str());
    }
    let Ok(resp) = req.send().await else { return };
    let status = resp.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (k, v) in resp.headers() {
        if k == "connection" || k == "transfer-encoding" || k == "content-length" {
            continue;
        }
        out.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or("")));
    }
    let body = resp.bytes().await.unwrap_or_default();
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    if conn.write_all(out.as_bytes()).await.is_err() {
        return;
    }
    match fault {
        Some(Fault::DropMidBlob) => {
            let _ = conn.write_all(&body[..body.len() / 2]).await;
            let _ = conn.flush().await;
        }
        Some(Fault::Trickle) => {
            for b in body.iter() {
                if conn.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        _ => {
            let _ = conn.write_all(&body).await;
        }
    }
}

/// An HTTP/1.1 request's head, read a byte at a time so that nothing of
/// its body is consumed; None when the client goes away first.
pub async fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).to_string())
}
