//! Docker credential helpers (`credHelpers`, `credsStore` in `config.json`):
//! `docker-credential-<name> get` with the server on stdin answers
//! `{"ServerURL", "Username", "Secret"}` on stdout, as the docker CLI asks
//! it. Blocking: runs a process and waits for it.

use super::auth::{Credentials, Secret};
use super::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A helper that has not answered by then is killed: a pull must not hang
/// on a keychain prompt nobody sees.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The most output read from a helper; an answer is a few hundred bytes.
const MAX_OUTPUT: u64 = 1 << 20;

/// What the helpers of docker-credential-helpers print when they hold
/// nothing for the server.
const NOT_FOUND: &str = "credentials not found";

#[derive(serde::Deserialize)]
struct Answer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Runs `program get` for `server`; `Anonymous` when the helper holds
/// nothing for it.
pub fn get(program: &Path, server: &str) -> Result<Credentials> {
    let name = program.display().to_string();
    let fail = |message: String| Error::Credentials(format!("{name} get: {message}"));
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let outputs = (child.stdout.take(), child.stderr.take());
    let (Some(stdout), Some(stderr)) = outputs else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail("no pipes to the helper".into()));
    };
    // Read on threads of their own, so that a helper filling one pipe
    // never blocks while this one waits on the other.
    let read = |pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            pipe.take(MAX_OUTPUT).read_to_end(&mut out).map(|_| out)
        })
    };
    let (stdout, stderr) = (read(Box::new(stdout)), read(Box::new(stderr)));
    // A helper that exits without reading its input closes the pipe: the
    // write fails, and its exit status tells why.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let status = wait(&mut child, TIMEOUT).map_err(|e| fail(e.to_string()))?;
    let Some(status) = status else {
        return Err(fail(format!("no answer within {TIMEOUT:?}")));
    };
    let joined = |h: std::thread::JoinHandle<std::io::Result<Vec<u8>>>| match h.join() {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(fail(format!("reading its output: {e}"))),
        Err(_) => Err(fail("the output reader panicked".into())),
    };
    let (stdout, stderr) = (joined(stdout)?, joined(stderr)?);
    if !status.success() {
        let said = String::from_utf8_lossy(if stdout.is_empty() { &stderr } else { &stdout });
        if said.contains(NOT_FOUND) {
            return Ok(Credentials::Anonymous);
        }
        // A failing helper prints why, never a secret.
        return Err(fail(format!("{status}: {}", said.trim())));
    }
    // The answer holds the secret: the parse error must not quote it.
    let answer: Answer = serde_json::from_slice(&stdout).map_err(|e| {
        fail(format!(
            "its answer is not the expected JSON (line {})",
            e.line()
        ))
    })?;
    Ok(match (answer.username.as_str(), answer.secret) {
        (_, s) if s.is_empty() => Credentials::Anonymous,
        // An identity token, as docker stores one.
        ("<token>", s) => Credentials::IdentityToken(Secret::new(s)),
        (user, s) => Credentials::Basic {
            username: user.to_string(),
            password: Secret::new(s),
        },
    })
}

/// Waits for `child` up to `timeout`; `None` (and the child killed) when
/// it did not exit by then.
fn wait(
    child: &mut std::process::Child,
    timeout: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("writes the helper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("makes it executable");
        path
    }

    #[test]
    fn answers_not_found_failures_and_hangs() {
        let dir = tempfile::tempdir().expect("a temp dir");
        // Answers for the server it is given on stdin, and only that one.
        let helper = script(
            dir.path(),
            "docker-credential-t",
            r#"[ "$1" = get ] || exit 2
read -r server
case "$server" in
  r.example:5000) echo '{"ServerURL":"r.example:5000","Username":"alice","Secret":"s3cret"}' ;;
  https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"<token>","Secret":"refresh"}' ;;
  empty.example) echo '{"ServerURL":"empty.example","Username":"","Secret":""}' ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac"#,
        );
        assert_eq!(
            get(&helper, "r.example:5000").expect("an answer"),
            Credentials::Basic {
                username: "alice".into(),
                password: Secret::new("s3cret"),
            }
        );
        assert_eq!(
            get(&helper, "https://index.docker.io/v1/").expect("an answer"),
            Credentials::IdentityToken(Secret::new("refresh"))
        );
        assert_eq!(
            get(&helper, "other.example").expect("not found is no error"),
            Credentials::Anonymous
        );
        assert_eq!(
            get(&helper, "empty.example").expect("an answer"),
            Credentials::Anonymous
        );

        let broken = script(
            dir.path(),
            "docker-credential-b",
            "echo 'keychain locked' >&2; exit 3",
        );
        let err = get(&broken, "r.example").expect_err("a failing helper");
        let shown = err.to_string();
        assert!(
            shown.contains("docker-credential-b get") && shown.contains("keychain locked"),
            "{shown}"
        );

        let garbled = script(
            dir.path(),
            "docker-credential-g",
            "echo '{\"Secret\": \"s3cret\"'",
        );
        let shown = get(&garbled, "r.example")
            .expect_err("bad JSON")
            .to_string();
        assert!(!shown.contains("s3cret"), "the secret leaked: {shown}");

        let missing = dir.path().join("docker-credential-none");
        let shown = get(&missing, "r.example")
            .expect_err("no helper")
            .to_string();
        assert!(shown.contains("docker-credential-none"), "{shown}");
    }

    #[test]
    fn a_helper_that_hangs_is_killed() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let hang = script(dir.path(), "docker-credential-h", "exec sleep 60");
        let mut child = Command::new(&hang)
            .arg("get")
            .stdout(Stdio::null())
            .spawn()
            .expect("starts");
        let started = Instant::now();
        let status = wait(&mut child, Duration::from_millis(200)).expect("waits");
        assert!(status.is_none(), "it did not exit: {status:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // Killed and reaped: nothing left to wait for.
        assert!(child.try_wait().expect("reaped").is_some());
    }
}
