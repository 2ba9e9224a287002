//! Registry credentials and the auth handshake: anonymous, basic, and the
//! bearer-token challenge (realm, service, scope), with tokens cached per
//! scope until they expire. Secrets live in [`Secret`], whose `Debug` and
//! `Display` never show them.

use super::{Error, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A string that must never reach a log.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What the caller gives to authenticate against one registry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: Secret,
    },
    /// An OAuth2 refresh token, exchanged at the token realm.
    IdentityToken(Secret),
    /// A bearer token sent as it is.
    RegistryToken(Secret),
    /// Credentials for one host (`host[:port]`) only, as a CRI
    /// `server_address` scopes them: any other host, a mirror included, is
    /// asked anonymously. See [`Credentials::for_host`].
    OnlyFor {
        host: String,
        credentials: Box<Credentials>,
    },
}

impl Credentials {
    /// Reads CRI/docker `auth` (base64 `user:password`).
    pub fn from_auth_field(auth: &str) -> Result<Self> {
        let decoded = BASE64
            .decode(auth.trim())
            .map_err(|e| Error::Credentials(format!("auth is not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| Error::Credentials("auth is not UTF-8".to_string()))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| Error::Credentials("auth is not user:password".to_string()))?;
        Ok(Credentials::Basic {
            username: user.to_string(),
            password: Secret::new(pass),
        })
    }

    /// Limits these credentials to the host a CRI `AuthConfig.server_address`
    /// names, as containerd's `ParseAuth` does: its scheme, user info and
    /// path are dropped and the rest is compared with the host contacted.
    /// An empty address leaves them for every host. (containerd's URL
    /// parser finds no host in an address without a scheme, so there such
    /// credentials never apply; hoist reads it as `host[:port]`.)
    pub fn only_for_server_address(self, server_address: &str) -> Self {
        let address = server_address.trim();
        if address.is_empty() || self == Credentials::Anonymous {
            return self;
        }
        let rest = address.split_once("://").map_or(address, |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        Credentials::OnlyFor {
            host: host.to_string(),
            credentials: Box::new(self),
        }
    }

    /// What to present to `host` (`host[:port]`, as contacted).
    pub fn for_host(&self, host: &str) -> Credentials {
        match self {
            Credentials::OnlyFor {
                host: only,
                credentials,
            } => {
                if !only.is_empty() && only.eq_ignore_ascii_case(host) {
                    credentials.for_host(host)
                } else {
                    Credentials::Anonymous
                }
            }
            other => other.clone(),
        }
    }

    /// Reads the CLI's `USER[:PASSWORD]`.
    pub fn from_user_flag(user: &str) -> Self {
        let (username, password) = user.split_once(':').unwrap_or((user, ""));
        Credentials::Basic {
            username: username.to_string(),
            password: Secret::new(password),
        }
    }

    /// Builds credentials from the fields of a CRI `AuthConfig` or a docker
    /// `config.json` entry, in the order containerd prefers them.
    pub fn from_fields(
        username: &str,
        password: &str,
        auth: &str,
        identity_token: &str,
        registry_token: &str,
    ) -> Result<Self> {
        Ok(if !registry_token.is_empty() {
            Credentials::RegistryToken(Secret::new(registry_token))
        } else if !identity_token.is_empty() {
            Credentials::IdentityToken(Secret::new(identity_token))
        } else if !username.is_empty() {
            Credentials::Basic {
                username: username.to_string(),
                password: Secret::new(password),
            }
        } else if !auth.is_empty() {
            Self::from_auth_field(auth)?
        } else {
            Credentials::Anonymous
        })
    }
}

/// Where credentials come from: one set given by the caller, else a docker
/// `config.json`, else none.
#[derive(Debug, Clone, Default)]
pub struct CredentialSource {
    pub explicit: Option<Credentials>,
    pub docker_config: Option<PathBuf>,
}

impl CredentialSource {
    /// The credentials for `host`, the host actually contacted (a mirror's
    /// own name for a mirror). Reads a file: call it off the async runtime.
    pub fn for_host(&self, host: &str) -> Result<Credentials> {
        if let Some(c) = &self.explicit {
            return Ok(c.for_host(host));
        }
        match &self.docker_config {
            Some(path) => docker_config_lookup(path, host),
            None => Ok(Credentials::Anonymous),
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    /// Registry -> helper name, ahead of `credsStore`.
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    /// The helper for every registry without one of its own.
    #[serde(default, rename = "credsStore")]
    creds_store: String,
}

#[derive(serde::Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    identitytoken: String,
    #[serde(default)]
    registrytoken: String,
}

/// The server address docker stores Docker Hub's credentials under.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

/// Finds `host` in a docker `config.json` as the docker CLI does: its
/// credential helper (`credHelpers`, else `credsStore`), then `auths`; a
/// missing file means none. May run a helper: blocking.
pub fn docker_config_lookup(path: &std::path::Path, host: &str) -> Result<Credentials> {
    // Found through PATH, as docker finds them.
    lookup_with_helpers(path, host, &|name| {
        PathBuf::from(format!("docker-credential-{name}"))
    })
}

/// [`docker_config_lookup`] with `helper` naming the program of a helper.
fn lookup_with_helpers(
    path: &std::path::Path,
    host: &str,
    helper: &dyn Fn(&str) -> PathBuf,
) -> Result<Credentials> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(e) => {
            return Err(Error::Credentials(format!(
                "reading {}: {e}",
                path.display()
            )));
        }
    };
    let config: DockerConfig = serde_json::from_str(&text)
        .map_err(|e| Error::Credentials(format!("parsing {}: {e}", path.display())))?;
    let docker_hub = ["docker.io", "registry-1.docker.io", "index.docker.io"].contains(&host);
    let matches = |key: &str| {
        let key = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let key = key.split('/').next().unwrap_or(key);
        key == host || (docker_hub && (key == "index.docker.io" || key == "docker.io"))
    };
    // A registry's own entry wins, even an empty one (the file, then).
    let name = match config.cred_helpers.iter().find(|(key, _)| matches(key)) {
        Some((_, name)) => name.as_str(),
        None => config.creds_store.as_str(),
    };
    if !name.is_empty() {
        // A name is a suffix of a program found through PATH, not a path.
        if name.contains('/') {
            return Err(Error::Credentials(format!(
                "{}: credential helper name {name:?}",
                path.display()
            )));
        }
        let server = if docker_hub { DOCKER_HUB_SERVER } else { host };
        let found = super::credential_helper::get(&helper(name), server)?;
        // Nothing there: docker falls back to the file's own entry too.
        if found != Credentials::Anonymous {
            return Ok(found);
        }
    }
    let entry = config.auths.iter().find(|(key, _)| matches(key));
    match entry {
        Some((_, a)) => Credentials::from_fields(
            &a.username,
            &a.password,
            &a.auth,
            &a.identitytoken,
            &a.registrytoken,
        ),
        None => Ok(Credentials::Anonymous),
    }
}

/// One `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            // Values may hold commas (scopes do); only a quote ends them.
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// (realm, service, scope + a fingerprint of the credentials): a token is
/// never handed to a caller with other credentials.
type TokenKey = (String, String, String);

fn fingerprint(scope: &str, credentials: &Credentials) -> String {
    fn who(credentials: &Credentials) -> String {
        match credentials {
            Credentials::Anonymous => String::new(),
            Credentials::Basic { username, password } => {
                format!("basic\0{username}\0{}", password.expose())
            }
            Credentials::IdentityToken(t) => format!("identity\0{}", t.expose()),
            Credentials::RegistryToken(t) => format!("registry\0{}", t.expose()),
            Credentials::OnlyFor { host, credentials } => {
                format!("only\0{host}\0{}", who(credentials))
            }
        }
    }
    format!(
        "{scope}\0{}",
        crate::digest::Digest::of(who(credentials).as_bytes())
    )
}

/// The most tokens the cache holds. There is one per scope (repository)
/// and credentials: unbounded, a long-lived daemon would keep one for every
/// repository it ever pulled.
pub const MAX_TOKENS: usize = 1024;

/// Bearer tokens by (realm, service, scope), each until it expires, at most
/// [`MAX_TOKENS`] of them.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<TokenKey, (Secret, Instant)>>,
}

impl TokenCache {
    pub fn get(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
        credentials: &Credentials,
    ) -> Option<Secret> {
        let key = (
            realm.to_string(),
            service.to_string(),
            fingerprint(scope, credentials),
        );
        let tokens = self.tokens.lock();
        let (token, until) = tokens.get(&key)?;
        (Instant::now() < *until).then(|| token.clone())
    }

    /// Asks the realm for a token and caches it.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        realm: &str,
        service: &str,
        scope: &str,
        credentials: &Credentials,
    ) -> Result<Secret> {
        let registry = realm.to_string();
        let unavailable = |e: reqwest::Error| Error::Unavailable {
            registry: registry.clone(),
            message: format!("token request failed: {}", super::client::error_chain(&e)),
        };
        let mut query: Vec<(&str, &str)> = Vec::new();
        if !service.is_empty() {
            query.push(("service", service));
        }
        if !scope.is_empty() {
            query.push(("scope", scope));
        }
        let response = match credentials {
            Credentials::IdentityToken(token) => {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.expose()),
                    ("service", service),
                    ("scope", scope),
                    ("client_id", "hoist"),
                ];
                http.post(realm).form(&form).send().await
            }
            Credentials::Basic { username, password } => {
                http.get(realm)
                    .query(&query)
                    .basic_auth(username, Some(password.expose()))
                    .send()
                    .await
            }
            // Scoped credentials are resolved for their host before they
            // get here; unresolved, they count as none.
            Credentials::Anonymous
            | Credentials::RegistryToken(_)
            | Credentials::OnlyFor { .. } => http.get(realm).query(&query).send().await,
        }
        .map_err(unavailable)?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(Error::Denied {
                registry: realm.to_string(),
                what: format!("token for {scope:?}"),
                message: status.to_string(),
            });
        }
        if !status.is_success() {
            return Err(Error::Protocol {
                registry: realm.to_string(),
                what: "token".to_string(),
                message: status.to_string(),
            });
        }
        let body: TokenResponse = response.json().await.map_err(unavailable)?;
        let token = if body.token.is_empty() {
            body.access_token
        } else {
            body.token
        };
        if token.is_empty() {
            return Err(Error::Protocol {
                registry: realm.to_string(),
                what: "token".to_string(),
                message: "the token response holds no token".to_string(),
            });
        }
        // Registries default to 60 s; renew a little early, and never trust
        // a lifetime longer than a day.
        let ttl = Duration::from_secs(body.expires_in.unwrap_or(60).clamp(10, 86_400) - 5);
        let secret = Secret::new(token);
        self.insert(
            (
                realm.to_string(),
                service.to_string(),
                fingerprint(scope, credentials),
            ),
            secret.clone(),
            Instant::now() + ttl,
        );
        Ok(secret)
    }

    /// Caches a token until `until`, first dropping the expired ones and,
    /// when the cache is still full, the one that expires soonest.
    fn insert(&self, key: TokenKey, token: Secret, until: Instant) {
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        tokens.retain(|_, (_, expires)| *expires > now);
        if tokens.len() >= MAX_TOKENS && !tokens.contains_key(&key) {
            let soonest = tokens
                .iter()
                .min_by_key(|(_, (_, expires))| *expires)
                .map(|(k, _)| k.clone());
            if let Some(k) = soonest {
                tokens.remove(&k);
            }
        }
        tokens.insert(key, (token, until));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tokens.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = Credentials::Basic {
            username: "me".into(),
            password: Secret::new("hunter2"),
        };
        let shown = format!("{c:?} {}", Secret::new("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("me"));
        let t = format!("{:?}", Credentials::IdentityToken(Secret::new("tok")));
        assert!(!t.contains("tok\""), "{t}");
    }

    #[test]
    fn credential_fields_in_preference_order() {
        let auth = BASE64.encode("u:p:with:colons");
        assert_eq!(
            Credentials::from_fields("", "", &auth, "", "").unwrap(),
            Credentials::Basic {
                username: "u".into(),
                password: Secret::new("p:with:colons")
            }
        );
        assert!(matches!(
            Credentials::from_fields("u", "p", &auth, "id", "reg").unwrap(),
            Credentials::RegistryToken(_)
        ));
        assert!(matches!(
            Credentials::from_fields("u", "p", "", "id", "").unwrap(),
            Credentials::IdentityToken(_)
        ));
        assert_eq!(
            Credentials::from_fields("", "", "", "", "").unwrap(),
            Credentials::Anonymous
        );
        assert!(Credentials::from_fields("", "", "!!!", "", "").is_err());
        assert_eq!(
            Credentials::from_user_flag("a:b:c"),
            Credentials::Basic {
                username: "a".into(),
                password: Secret::new("b:c")
            }
        );
    }

    #[test]
    fn server_address_scopes_credentials_to_its_host() {
        let basic = || Credentials::from_user_flag("u:p");
        for address in [
            "https://registry.example:5000",
            "https://registry.example:5000/v1/",
            "http://user@registry.example:5000/path?x#y",
            "registry.example:5000",
            "registry.example:5000/team",
        ] {
            let scoped = basic().only_for_server_address(address);
            assert_eq!(
                scoped.for_host("registry.example:5000"),
                basic(),
                "{address}"
            );
            assert_eq!(
                scoped.for_host("REGISTRY.example:5000"),
                basic(),
                "{address}"
            );
            for other in [
                "mirror.example:5000",
                "registry.example",
                "registry.example:5001",
            ] {
                assert_eq!(
                    scoped.for_host(other),
                    Credentials::Anonymous,
                    "{address} -> {other}"
                );
            }
        }
        // No address: every host, as containerd does.
        assert_eq!(
            basic().only_for_server_address("").for_host("anything:1"),
            basic()
        );
        // An address without a host matches none.
        let nowhere = basic().only_for_server_address("https:///v1/");
        assert_eq!(nowhere.for_host(""), Credentials::Anonymous);
        assert_eq!(
            Credentials::Anonymous.only_for_server_address("https://r.example"),
            Credentials::Anonymous
        );
        // The explicit source resolves per host too.
        let source = CredentialSource {
            explicit: Some(basic().only_for_server_address("https://r.example")),
            docker_config: None,
        };
        assert_eq!(source.for_host("r.example").unwrap(), basic());
        assert_eq!(
            source.for_host("m.example").unwrap(),
            Credentials::Anonymous
        );
        let shown = format!("{:?}", basic().only_for_server_address("https://r.example"));
        assert!(
            shown.contains("r.example") && !shown.contains("\"p\""),
            "{shown}"
        );
    }

    #[test]
    fn docker_config_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = BASE64.encode("alice:secret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{auth}"}},
                     "localhost:5000": {{"username": "bob", "password": "pw"}}}}}}"#
            ),
        )
        .unwrap();
        assert!(matches!(
            docker_config_lookup(&path, "docker.io").unwrap(),
            Credentials::Basic { username, .. } if username == "alice"
        ));
        assert!(matches!(
            docker_config_lookup(&path, "localhost:5000").unwrap(),
            Credentials::Basic { username, .. } if username == "bob"
        ));
        assert_eq!(
            docker_config_lookup(&path, "quay.io").unwrap(),
            Credentials::Anonymous
        );
        assert_eq!(
            docker_config_lookup(&dir.path().join("absent.json"), "quay.io").unwrap(),
            Credentials::Anonymous
        );
        std::fs::write(&path, "{not json").unwrap();
        let err = docker_config_lookup(&path, "quay.io").unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    #[test]
    fn docker_config_credential_helpers() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Each helper answers with its own name as the user, and records
        // the server it was asked about.
        for name in ["ecr", "store"] {
            let program = dir.path().join(format!("docker-credential-{name}"));
            let asked = dir.path().join(format!("{name}.asked"));
            std::fs::write(
                &program,
                format!(
                    "#!/bin/sh\nread -r server\nprintf %s \"$server\" > {}\n\
                     case \"$server\" in none.example) echo 'credentials not found in native keychain'; exit 1;; esac\n\
                     echo '{{\"ServerURL\":\"x\",\"Username\":\"{name}\",\"Secret\":\"pw\"}}'\n",
                    asked.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let helpers = |name: &str| dir.path().join(format!("docker-credential-{name}"));
        let asked = |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.asked")));
        let path = dir.path().join("config.json");
        let auth = BASE64.encode("carol:filed");
        std::fs::write(
            &path,
            format!(
                r#"{{"credHelpers": {{"ecr.example:5000": "ecr"}}, "credsStore": "store",
                     "auths": {{"none.example": {{"auth": "{auth}"}}}}}}"#
            ),
        )
        .unwrap();
        let user = |host: &str| match lookup_with_helpers(&path, host, &helpers).unwrap() {
            Credentials::Basic { username, .. } => username,
            other => panic!("{host}: {other:?}"),
        };
        // credHelpers for its registry, credsStore for the rest.
        assert_eq!(user("ecr.example:5000"), "ecr");
        assert_eq!(asked("ecr").unwrap(), "ecr.example:5000");
        assert_eq!(user("quay.io"), "store");
        assert_eq!(asked("store").unwrap(), "quay.io");
        // Docker Hub is asked for under the address docker stores it at.
        assert_eq!(user("registry-1.docker.io"), "store");
        assert_eq!(asked("store").unwrap(), DOCKER_HUB_SERVER);
        // Nothing in the helper: the file's own entry.
        assert_eq!(user("none.example"), "carol");

        // A helper that is not there is an error that names it.
        std::fs::write(&path, r#"{"credsStore": "absent"}"#).unwrap();
        let err = lookup_with_helpers(&path, "quay.io", &helpers).unwrap_err();
        assert!(
            err.to_string().contains("docker-credential-absent"),
            "{err}"
        );
        // A helper name is never a path.
        std::fs::write(&path, r#"{"credsStore": "../../bin/sh"}"#).unwrap();
        assert!(lookup_with_helpers(&path, "quay.io", &helpers).is_err());
    }

    #[test]
    fn the_token_cache_drops_expired_tokens_and_stays_bounded() {
        let cache = TokenCache::default();
        let anonymous = Credentials::Anonymous;
        let key = |scope: &str| {
            (
                "https://auth.example/token".to_string(),
                "registry".to_string(),
                fingerprint(scope, &anonymous),
            )
        };
        let now = Instant::now();
        let hour = Duration::from_secs(3600);

        // Tokens that have expired since they were cached go at the next insert.
        for i in 0..10 {
            let old = (Secret::new("old"), now);
            cache.tokens.lock().insert(key(&format!("old/{i}")), old);
        }
        assert_eq!(cache.len(), 10);
        cache.insert(key("fresh"), Secret::new("fresh"), now + hour);
        assert_eq!(cache.len(), 1, "the expired tokens are swept");
        let get =
            |scope: &str| cache.get("https://auth.example/token", "registry", scope, &anonymous);
        assert_eq!(get("fresh"), Some(Secret::new("fresh")));

        // Full of live tokens, it makes room by dropping the one that
        // expires soonest, never the one being added.
        cache.insert(
            key("soonest"),
            Secret::new("s"),
            now + Duration::from_secs(60),
        );
        for i in 2..MAX_TOKENS {
            let until = now + hour + Duration::from_secs(i as u64);
            cache.insert(key(&format!("repo/{i}")), Secret::new("t"), until);
        }
        assert_eq!(cache.len(), MAX_TOKENS);
        cache.insert(key("newest"), Secret::new("n"), now + hour * 2);
        assert_eq!(cache.len(), MAX_TOKENS);
        assert_eq!(get("soonest"), None);
        assert_eq!(get("newest"), Some(Secret::new("n")));
        assert_eq!(get("fresh"), Some(Secret::new("fresh")));

        // Renewing a cached scope when full evicts nothing else.
        cache.insert(key("fresh"), Secret::new("renewed"), now + hour * 3);
        assert_eq!(cache.len(), MAX_TOKENS);
        assert_eq!(get("fresh"), Some(Secret::new("renewed")));
        assert_eq!(get("repo/2"), Some(Secret::new("t")));
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer realm=https://x/t, service=svc"),
            Some(Challenge::Bearer {
                realm: "https://x/t".into(),
                service: Some("svc".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }
}
