//! The registry client: per-host HTTP clients from hosts.toml, the auth
//! handshake, retries with bounded backoff, manifest resolution and blob
//! requests (with `Range` for resume).

use super::auth::{Challenge, CredentialSource, Credentials, Secret, TokenCache, parse_challenge};
use super::hosts::{HostsConfig, RegistryHost};
use super::{Error, Result};
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::reference::Reference;
use parking_lot::Mutex;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RANGE, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Manifests are small; anything larger is refused rather than buffered.
pub const MAX_MANIFEST_SIZE: u64 = 8 << 20;

pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, \
application/json;q=0.5, */*;q=0.1";

#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub hosts: HostsConfig,
    pub credentials: CredentialSource,
    /// A request that moves no bytes for this long fails.
    pub progress_timeout: Duration,
    /// Attempts per request before giving up on 5xx, 429 and dropped connections.
    pub attempts: u32,
    /// How a layer that dominates its image is fetched in parallel parts.
    pub ranged: RangedFetch,
}

/// A layer that makes up most of its image's bytes is fetched as
/// consecutive parts of `part_size` bytes, `parts_at_once` requests in
/// flight, and handed on in order. It pays where one connection cannot fill
/// the link (per-connection throttling, long round trips); the parts wait in
/// memory, at most `part_size * parts_at_once` bytes per layer (a part
/// counts until it has been handed on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangedFetch {
    /// 0 turns ranged fetches off.
    pub part_size: u64,
    pub parts_at_once: usize,
}

impl Default for RangedFetch {
    fn default() -> Self {
        RangedFetch {
            part_size: 4 << 20,
            parts_at_once: 4,
        }
    }
}

impl RangedFetch {
    /// Whether a blob of `size` bytes, out of `total` for its image's
    /// layers, is fetched in parts: it dominates, and makes several parts.
    pub fn applies(&self, size: u64, total: u64) -> bool {
        self.part_size > 0
            && self.parts_at_once > 1
            && size >= self.part_size.saturating_mul(self.parts_at_once as u64)
            && size.saturating_mul(2) >= total
    }
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            hosts: HostsConfig::new(None, false),
            credentials: CredentialSource::default(),
            progress_timeout: Duration::from_secs(300),
            attempts: 6,
            ranged: RangedFetch::default(),
        }
    }
}

/// Shared by every pull: HTTP connection pools per TLS setting, and tokens.
pub struct RegistryClient {
    options: RemoteOptions,
    tokens: TokenCache,
    /// By TLS setting (skip_verify and the certificate paths).
    http: Mutex<HashMap<String, CachedHttp>>,
}

/// An HTTP client and the certificate files it was built from, as they
/// were when they were read.
struct CachedHttp {
    files: Vec<FileStamp>,
    client: reqwest::Client,
}

/// What tells that a file has changed: replaced (device, inode), written
/// (size, modification and change times).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl RegistryClient {
    pub fn new(options: RemoteOptions) -> Arc<Self> {
        Arc::new(RegistryClient {
            options,
            tokens: TokenCache::default(),
            http: Mutex::new(HashMap::new()),
        })
    }

    pub fn options(&self) -> &RemoteOptions {
        &self.options
    }

    /// A handle on one repository, with its hosts resolved. `credentials`,
    /// when given, replace the configured source; either way each host is
    /// given only the credentials meant for it.
    pub fn repository(
        self: &Arc<Self>,
        reference: &Reference,
        credentials: Option<&Credentials>,
    ) -> Result<Repository> {
        // The hosts themselves are read on first use, off the async runtime.
        HostsConfig::check_registry(reference.domain())?;
        let credentials = match credentials {
            Some(c) => CredentialSource {
                explicit: Some(c.clone()),
                docker_config: None,
            },
            None => self.options.credentials.clone(),
        };
        Ok(Repository {
            client: self.clone(),
            registry: reference.domain().to_string(),
            path: reference.path().to_string(),
            hosts: OnceCell::new(),
            credentials,
            authorization: Mutex::new(HashMap::new()),
        })
    }

    /// The HTTP client for `host`'s TLS settings: the cached one while its
    /// certificate files are unchanged, else one built from them anew.
    /// Reads files: call it off the async runtime.
    fn http_for(&self, host: &RegistryHost) -> Result<reqwest::Client> {
        let key = format!("{}|{:?}|{:?}", host.skip_verify, host.ca, host.client);
        let mut paths: Vec<(&Path, &str)> = host.ca.iter().map(|p| (p.as_path(), "CA ")).collect();
        if let Some((cert, cert_key)) = host.client.first() {
            paths.push((cert, ""));
            paths.extend(cert_key.as_deref().map(|k| (k, "")));
        }
        // Stamped before they are read: a file changed in between is read
        // again next time.
        let files = paths
            .iter()
            .map(|(path, what)| {
                FileStamp::of(path)
                    .map_err(|e| Error::Tls(format!("reading {what}{}: {e}", path.display())))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(c) = self.http.lock().get(&key)
            && c.files == files
        {
            return Ok(c.client.clone());
        }
        super::install_tls_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .user_agent(concat!("hoist/", env!("CARGO_PKG_VERSION")));
        if host.skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        for ca in &host.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| Error::Tls(format!("reading CA {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Error::Tls(format!("CA {}: {e}", ca.display())))?;
            builder = builder.tls_certs_merge([cert]);
        }
        if let Some((cert, key)) = host.client.first() {
            let mut pem = std::fs::read(cert)
                .map_err(|e| Error::Tls(format!("reading {}: {e}", cert.display())))?;
            if let Some(key) = key {
                pem.extend(
                    std::fs::read(key)
                        .map_err(|e| Error::Tls(format!("reading {}: {e}", key.display())))?,
                );
            }
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| Error::Tls(format!("client certificate {}: {e}", cert.display())))?;
            builder = builder.identity(identity);
        }
        let client = builder
            .build()
            .map_err(|e| Error::Tls(format!("building the HTTP client: {e}")))?;
        let cached = CachedHttp {
            files,
            client: client.clone(),
        };
        self.http.lock().insert(key, cached);
        Ok(client)
    }
}

/// Runs file reads (hosts.toml, certificates) on a blocking thread.
async fn off_runtime<T: Send + 'static>(
    registry: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels a blocking task.
            Err(e) => Err(Error::Unavailable {
                registry: registry.to_string(),
                message: format!("reading the host configuration: {e}"),
            }),
        },
    }
}

/// One host of a repository, and its HTTP client once it is contacted.
struct Host {
    config: RegistryHost,
    http: OnceCell<reqwest::Client>,
}

/// One repository at one registry, tried through its hosts in order.
pub struct Repository {
    client: Arc<RegistryClient>,
    registry: String,
    path: String,
    /// From hosts.toml, read at the first request.
    hosts: OnceCell<Vec<Host>>,
    /// Looked up per host contacted, so that a mirror never sees
    /// credentials meant for another host.
    credentials: CredentialSource,
    /// The Authorization header that worked last, per host.
    authorization: Mutex<HashMap<String, HeaderValue>>,
}

/// What a request is for, so errors can name it.
struct Target<'a> {
    what: &'a str,
    suffix: String,
}

impl Repository {
    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn options(&self) -> &RemoteOptions {
        &self.client.options
    }

    /// The hosts with `capability`, in the order to try them.
    async fn hosts(&self, capability: fn(&RegistryHost) -> bool) -> Result<Vec<&Host>> {
        let hosts = self
            .hosts
            .get_or_try_init(|| {
                let (config, registry) = (self.client.options.hosts.clone(), self.registry.clone());
                off_runtime(&self.registry, move || {
                    let hosts = config.hosts_for(&registry)?;
                    Ok(hosts
                        .into_iter()
                        .map(|config| Host {
                            config,
                            http: OnceCell::new(),
                        })
                        .collect())
                })
            })
            .await?;
        Ok(hosts.iter().filter(|h| capability(&h.config)).collect())
    }

    /// The HTTP client for `host`, built (or found unchanged) off the runtime.
    async fn http(&self, host: &Host) -> Result<reqwest::Client> {
        host.http
            .get_or_try_init(|| {
                let (client, config) = (self.client.clone(), host.config.clone());
                off_runtime(&self.registry, move || client.http_for(&config))
            })
            .await
            .cloned()
    }

    /// Resolves a tag or digest to the root descriptor of the image.
    pub async fn resolve(&self, reference: &Reference) -> Result<Descriptor> {
        let object = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let target = Target {
            what: &format!("manifest {reference}"),
            suffix: format!("/manifests/{object}"),
        };
        let hosts = self.hosts(|h| h.capabilities.resolve).await?;
        let response = self
            .first_answer(&hosts, Method::GET, &target, &[(ACCEPT, MANIFEST_ACCEPT)])
            .await?;
        let media_type = content_type(&response);
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let body = read_limited(response, target.what, &self.registry).await?;
        let actual = Digest::of(&body);
        // A digest reference is checked against the bytes, never the header.
        if let Some(want) = reference.digest() {
            if want != actual.to_string() {
                return Err(Error::Protocol {
                    registry: self.registry.clone(),
                    what: target.what.to_string(),
                    message: format!("content digest {actual} does not match {want}"),
                });
            }
        } else if let Some(h) = header_digest
            && h != actual
        {
            return Err(Error::Protocol {
                registry: self.registry.clone(),
                what: target.what.to_string(),
                message: format!("Docker-Content-Digest {h} does not match the content ({actual})"),
            });
        }
        let media_type = match media_type {
            Some(mt) if mt != "application/json" && mt != "text/plain" => mt,
            // Some registries answer with a generic type; the body says.
            _ => crate::images::sniff_media_type(&body).unwrap_or_default(),
        };
        Ok(Descriptor::new(media_type, actual, body.len() as u64))
    }

    /// Fetches and verifies a manifest or index.
    pub async fn fetch_manifest(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let what = format!("manifest {}", desc.digest);
        if desc.size > MAX_MANIFEST_SIZE {
            return Err(Error::Protocol {
                registry: self.registry.clone(),
                what,
                message: format!(
                    "{} bytes is larger than the {MAX_MANIFEST_SIZE} allowed",
                    desc.size
                ),
            });
        }
        let target = Target {
            what: &what,
            suffix: format!("/manifests/{}", desc.digest),
        };
        let hosts = self.hosts(|h| h.capabilities.pull).await?;
        let accept = desc.media_type.clone();
        let response = self
            .first_answer(&hosts, Method::GET, &target, &[(ACCEPT, &accept)])
            .await?;
        let body = read_limited(response, &what, &self.registry).await?;
        verify(&self.registry, desc, &body)?;
        Ok(body)
    }

    /// Starts a download of `range` of a blob. The answer is `206` when the
    /// registry honoured the range, `200` when it sends the whole blob.
    pub async fn blob(&self, desc: &Descriptor, range: std::ops::Range<u64>) -> Result<Response> {
        let what = format!("blob {}", desc.digest);
        let target = Target {
            what: &what,
            suffix: format!("/blobs/{}", desc.digest),
        };
        let header = if range.end < desc.size {
            format!("bytes={}-{}", range.start, range.end.saturating_sub(1))
        } else {
            format!("bytes={}-", range.start)
        };
        let headers: Vec<(reqwest::header::HeaderName, &str)> =
            if range.start > 0 || range.end < desc.size {
                vec![(RANGE, header.as_str())]
            } else {
                Vec::new()
            };
        let hosts = self.hosts(|h| h.capabilities.pull).await?;
        self.first_answer(&hosts, Method::GET, &target, &headers)
            .await
    }

    /// Tries each host in order; a 404 or an unreachable host moves on to the next.
    async fn first_answer(
        &self,
        hosts: &[&Host],
        method: Method,
        target: &Target<'_>,
        headers: &[(reqwest::header::HeaderName, &str)],
    ) -> Result<Response> {
        let mut last = None;
        for host in hosts {
            match self.send(host, method.clone(), target, headers).await {
                Ok(r) => return Ok(r),
                // Like containerd, any failure of a mirror moves on to the
                // next host; the last host's error is the one reported.
                Err(e) => {
                    tracing::debug!(host = %host.config.host, error = %e, "trying the next host");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable {
            registry: self.registry.clone(),
            message: format!("no host configured to serve {}", target.what),
        }))
    }

    /// One request to one host, with auth and retries.
    async fn send(
        &self,
        host: &Host,
        method: Method,
        target: &Target<'_>,
        headers: &[(reqwest::header::HeaderName, &str)],
    ) -> Result<Response> {
        let http = self.http(host).await?;
        let host = &host.config;
        let mut url = format!("{}/{}{}", host.base_url(), self.path, target.suffix);
        if let Some(q) = host.namespace_query(&self.registry) {
            url = format!("{url}?{q}");
        }
        let attempts = self.client.options.attempts.max(1);
        let timeout = self.client.options.progress_timeout;
        let mut authorized_once = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = http.request(method.clone(), &url);
            for (k, v) in &host.headers {
                request = request.header(k.as_str(), v.as_str());
            }
            for (k, v) in headers {
                request = request.header(k, *v);
            }
            if let Some(auth) = self.authorization.lock().get(&host.host) {
                request = request.header(AUTHORIZATION, auth.clone());
            }
            let unavailable = |message: String| Error::Unavailable {
                registry: format!("{}://{}", host.scheme, host.host),
                message: format!("{}: {message}", target.what),
            };
            let sent = tokio::time::timeout(timeout, request.send()).await;
            let response = match sent {
                Err(_) => {
                    return Err(Error::NoProgress {
                        what: format!("{} from {}", target.what, host.host),
                        timeout,
                    });
                }
                Ok(Err(e)) if attempt < attempts => {
                    tracing::info!(host = %host.host, error = %e, attempt, "request failed; retrying");
                    tokio::time::sleep(backoff(attempt, None)).await;
                    continue;
                }
                Ok(Err(e)) => return Err(unavailable(error_chain(&e))),
                Ok(Ok(r)) => r,
            };
            let status = response.status();
            match status {
                s if s.is_success() => return Ok(response),
                StatusCode::UNAUTHORIZED if !authorized_once => {
                    authorized_once = true;
                    let header = self.authorize(&http, host, &response).await?;
                    self.authorization.lock().insert(host.host.clone(), header);
                    attempt -= 1;
                    continue;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(Error::Denied {
                        registry: host.host.clone(),
                        what: target.what.to_string(),
                        message: error_detail(response).await,
                    });
                }
                StatusCode::NOT_FOUND => {
                    return Err(Error::NotFound {
                        registry: host.host.clone(),
                        what: target.what.to_string(),
                    });
                }
                s if (s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS)
                    && attempt < attempts =>
                {
                    let after = retry_after(&response);
                    tracing::info!(host = %host.host, %status, attempt, "retrying");
                    tokio::time::sleep(backoff(attempt, after)).await;
                }
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    return Err(unavailable(format!("{status} after {attempt} attempts")));
                }
                _ => {
                    return Err(Error::Protocol {
                        registry: host.host.clone(),
                        what: target.what.to_string(),
                        message: error_detail(response).await,
                    });
                }
            }
        }
    }

    /// Answers a 401 challenge with basic credentials or a bearer token.
    async fn authorize(
        &self,
        http: &reqwest::Client,
        host: &RegistryHost,
        response: &Response,
    ) -> Result<HeaderValue> {
        let challenge = response
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .next();
        let denied = |message: &str| Error::Denied {
            registry: host.host.clone(),
            what: format!("repository {}", self.path),
            message: message.to_string(),
        };
        let credentials = self.credentials_for(&host.host).await?;
        let value = match (challenge, &credentials) {
            (None, _) => return Err(denied("401 without a usable WWW-Authenticate challenge")),
            (Some(Challenge::Basic), Credentials::Basic { username, password }) => {
                use base64::Engine;
                let raw = format!("{username}:{}", password.expose());
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                )
            }
            (Some(Challenge::Basic), _) => {
                return Err(denied("the registry asks for a username and password"));
            }
            (Some(Challenge::Bearer { .. }), Credentials::RegistryToken(t)) => {
                format!("Bearer {}", t.expose())
            }
            (
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                }),
                creds,
            ) => {
                let service = service.unwrap_or_default();
                let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", self.path));
                let token: Secret = match self.client.tokens.get(&realm, &service, &scope, creds) {
                    Some(t) => t,
                    None => {
                        self.client
                            .tokens
                            .fetch(http, &realm, &service, &scope, creds)
                            .await?
                    }
                };
                format!("Bearer {}", token.expose())
            }
        };
        HeaderValue::from_str(&value).map_err(|_| denied("the token is not a valid header value"))
    }

    /// The credentials for one host, read off the async runtime (a docker
    /// `config.json` is a file).
    async fn credentials_for(&self, host: &str) -> Result<Credentials> {
        if self.credentials.explicit.is_some() || self.credentials.docker_config.is_none() {
            return self.credentials.for_host(host);
        }
        let (source, host) = (self.credentials.clone(), host.to_string());
        tokio::task::spawn_blocking(move || source.for_host(&host))
            .await
            .map_err(|e| Error::Credentials(format!("looking up credentials: {e}")))?
    }
}

fn content_type(response: &Response) -> Option<String> {
    let v = response.headers().get(CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or(v).trim().to_string())
}

fn retry_after(response: &Response) -> Option<Duration> {
    let v = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// 250 ms doubling to 8 s, or what `Retry-After` asks (at most 60 s).
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(d) => d.min(Duration::from_secs(60)),
        None => Duration::from_millis(250 << attempt.min(5)),
    }
}

/// reqwest hides the cause (connection refused, reset) in its source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn read_limited(mut response: Response, what: &str, registry: &str) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let from_host = crate::metrics::fetched_from(response.url());
    while let Some(chunk) = response.chunk().await.map_err(|e| Error::Unavailable {
        registry: registry.to_string(),
        message: format!("{what}: {}", error_chain(&e)),
    })? {
        from_host.inc_by(chunk.len() as u64);
        body.extend_from_slice(&chunk);
        if body.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(Error::Protocol {
                registry: registry.to_string(),
                what: what.to_string(),
                message: format!("larger than the {MAX_MANIFEST_SIZE} bytes allowed"),
            });
        }
    }
    Ok(body)
}

/// The status of a refused request, with what the registry said about it:
/// the `errors` of the distribution spec's error body, or the start of a
/// plain-text one.
async fn error_detail(mut response: Response) -> String {
    const LIMIT: usize = 4096;
    let status = response.status();
    let mut body = Vec::new();
    while body.len() < LIMIT {
        match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(LIMIT);
    match describe_error_body(&body) {
        Some(said) => format!("{status}: {said}"),
        None => status.to_string(),
    }
}

fn describe_error_body(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<Body>(body) {
        let said: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{} ({})", e.message, e.code),
                (true, false) => e.message.clone(),
                _ => e.code.clone(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        return (!said.is_empty()).then(|| said.join("; "));
    }
    let text = String::from_utf8_lossy(body);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    // An HTML error page says nothing a user can act on.
    (!line.starts_with('<')).then(|| line.chars().take(200).collect())
}

/// Checks fetched bytes against their descriptor.
pub fn verify(registry: &str, desc: &Descriptor, body: &[u8]) -> Result<()> {
    let actual = Digest::of(body);
    if body.len() as u64 != desc.size || actual != desc.digest {
        return Err(Error::Protocol {
            registry: registry.to_string(),
            what: format!("{} {}", desc.media_type, desc.digest),
            message: format!(
                "got {} bytes with digest {actual}, expected {} bytes",
                body.len(),
                desc.size
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::hosts::{Capabilities, Scheme};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A self-signed CA certificate (P-256), only ever parsed.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBhjCCAS2gAwIBAgIUKvdSGSvMbCw79vtJCo8aZQ0LJjYwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNaG9pc3QtdGVzdC1jYTAgFw0yNjEyMDIwNTE2MjZaGA8yMTI2
MTEwODA1MTYyNlowGDEWMBQGA1UEAwwNaG9pc3QtdGVzdC1jYTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABAyK75GMIUKGS5n9CpILoX6XzagE7UCf3PQLE4A/vcSf
0OdWFMGRyQxo95IbD4qA/vsbtihw1oQnkYLNXCAFAOujUzBRMB0GA1UdDgQWBBTC
oSoxP+5X00FCAretSn++R0/wXTAfBgNVHSMEGDAWgBTCoSoxP+5X00FCAretSn++
R0/wXTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIF0cKP6aCcpG
qG+wrsZhPTYEAC4hFMHE0/6GBBMp5/JcAiAFuRcemaCtX/nwgIx0FrQeawQsNEH3
VioRZxO8RaO7mA==
-----END CERTIFICATE-----
";

    /// Well-formed PEM around bytes that are no certificate.
    const BROKEN_PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    fn host_with_ca(ca: PathBuf) -> RegistryHost {
        RegistryHost {
            scheme: Scheme::Https,
            host: "127.0.0.1:1".to_string(),
            path: "/v2".to_string(),
            capabilities: Capabilities::ALL,
            skip_verify: false,
            ca: vec![ca],
            client: Vec::new(),
            headers: Vec::new(),
            is_mirror: false,
        }
    }

    /// The HTTP client for a host is kept while its certificate files stay
    /// as they were, and built again from them once they change.
    #[test]
    fn a_changed_ca_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let host = host_with_ca(ca.clone());
        let client = RegistryClient::new(RemoteOptions::default());

        std::fs::write(&ca, CA_PEM).unwrap();
        client.http_for(&host).unwrap();
        client.http_for(&host).unwrap();

        std::fs::write(&ca, BROKEN_PEM).unwrap();
        let err = client.http_for(&host).unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{err:?}");

        // Replaced (a new inode, as an atomic rename makes it) with a good
        // one again; the entry for these settings is replaced, not added.
        let new = dir.path().join("ca.pem.new");
        std::fs::write(&new, CA_PEM).unwrap();
        std::fs::rename(&new, &ca).unwrap();
        client.http_for(&host).unwrap();
        assert_eq!(client.http.lock().len(), 1);

        std::fs::remove_file(&ca).unwrap();
        let err = client.http_for(&host).unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
    }

    /// Runs a resolve against `127.0.0.1:1` with `config_dir` as the hosts
    /// directory on a current-thread runtime, while `fifo`, a file the
    /// resolve must read, has no writer. Says whether a timer on that same
    /// thread fired before the FIFO was given `contents`: it cannot if the
    /// read blocks the runtime's only thread.
    fn timer_fires_while_reading(config_dir: &Path, fifo: &Path, contents: &'static str) -> bool {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let written = Arc::new(AtomicBool::new(false));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let writer = {
            let (fifo, written) = (fifo.to_path_buf(), written.clone());
            std::thread::spawn(move || {
                // Released by the test, or in the end regardless: a runtime
                // stuck in the read cannot release it.
                let _ = released.recv_timeout(Duration::from_secs(5));
                written.store(true, Ordering::SeqCst);
                // Without blocking: give up if nobody ever opens the FIFO.
                for _ in 0..500 {
                    use std::os::unix::fs::OpenOptionsExt;
                    let opened = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&fifo);
                    if let Ok(mut f) = opened {
                        std::io::Write::write_all(&mut f, contents.as_bytes()).unwrap();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let free = runtime.block_on(async {
            let client = RegistryClient::new(RemoteOptions {
                hosts: HostsConfig::new(Some(config_dir.to_path_buf()), false),
                attempts: 1,
                progress_timeout: Duration::from_secs(5),
                ..Default::default()
            });
            let reference = Reference::parse("127.0.0.1:1/fifo/test:1").unwrap();
            let repo = client.repository(&reference, None).unwrap();
            let resolving = tokio::spawn(async move { repo.resolve(&reference).await });
            tokio::time::sleep(Duration::from_millis(100)).await;
            let free = !written.load(Ordering::SeqCst);
            // The writer is gone already if it gave up waiting.
            let _ = release.send(());
            // Nothing listens on port 1: the resolve fails, but it ends.
            let outcome = tokio::time::timeout(Duration::from_secs(10), resolving).await;
            assert!(matches!(outcome, Ok(Ok(Err(_)))), "{outcome:?}");
            free
        });
        writer.join().unwrap();
        free
    }

    #[test]
    fn hosts_toml_is_read_off_the_async_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join("127.0.0.1:1");
        std::fs::create_dir(&host_dir).unwrap();
        let fifo = host_dir.join("hosts.toml");
        assert!(
            timer_fires_while_reading(dir.path(), &fifo, "server = \"http://127.0.0.1:1\"\n"),
            "the runtime waited for hosts.toml"
        );
    }

    #[test]
    fn ca_files_are_read_off_the_async_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join("127.0.0.1:1");
        std::fs::create_dir(&host_dir).unwrap();
        std::fs::write(
            host_dir.join("hosts.toml"),
            "server = \"https://127.0.0.1:1\"\nca = \"ca.pem\"\n",
        )
        .unwrap();
        assert!(
            timer_fires_while_reading(dir.path(), &host_dir.join("ca.pem"), CA_PEM),
            "the runtime waited for the CA file"
        );
    }

    #[test]
    fn registry_error_bodies_are_described() {
        let body = br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied","detail":null},{"code":"TOOMANYREQUESTS"}]}"#;
        assert_eq!(
            describe_error_body(body).as_deref(),
            Some("requested access to the resource is denied (DENIED); TOOMANYREQUESTS")
        );
        assert_eq!(
            describe_error_body(b"quota exceeded for this project\n").as_deref(),
            Some("quota exceeded for this project")
        );
        assert_eq!(describe_error_body(b"<html><body>502</body></html>"), None);
        assert_eq!(describe_error_body(br#"{"errors":[]}"#), None);
        assert_eq!(describe_error_body(b""), None);
    }
}
