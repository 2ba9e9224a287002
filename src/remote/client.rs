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
use std::sync::Arc;
use std::time::Duration;

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
    http: Mutex<HashMap<String, reqwest::Client>>,
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
        let hosts = self.options.hosts.hosts_for(reference.domain())?;
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
            hosts,
            credentials,
            authorization: Mutex::new(HashMap::new()),
        })
    }

    fn http_for(&self, host: &RegistryHost) -> Result<reqwest::Client> {
        let key = format!("{}|{:?}|{:?}", host.skip_verify, host.ca, host.client);
        if let Some(c) = self.http.lock().get(&key) {
            return Ok(c.clone());
        }
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
        self.http.lock().insert(key, client.clone());
        Ok(client)
    }
}

/// One repository at one registry, tried through its hosts in order.
pub struct Repository {
    client: Arc<RegistryClient>,
    registry: String,
    path: String,
    hosts: Vec<RegistryHost>,
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
        let hosts: Vec<&RegistryHost> = self
            .hosts
            .iter()
            .filter(|h| h.capabilities.resolve)
            .collect();
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
        let hosts: Vec<&RegistryHost> = self.hosts.iter().filter(|h| h.capabilities.pull).collect();
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
        let hosts: Vec<&RegistryHost> = self.hosts.iter().filter(|h| h.capabilities.pull).collect();
        self.first_answer(&hosts, Method::GET, &target, &headers)
            .await
    }

    /// Tries each host in order; a 404 or an unreachable host moves on to the next.
    async fn first_answer(
        &self,
        hosts: &[&RegistryHost],
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
                    tracing::debug!(host = %host.host, error = %e, "trying the next host");
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
        host: &RegistryHost,
        method: Method,
        target: &Target<'_>,
        headers: &[(reqwest::header::HeaderName, &str)],
    ) -> Result<Response> {
        let http = self.client.http_for(host)?;
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
    while let Some(chunk) = response.chunk().await.map_err(|e| Error::Unavailable {
        registry: registry.to_string(),
        message: format!("{what}: {}", error_chain(&e)),
    })? {
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
    use super::describe_error_body;

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
