//! `hoist pull` with credentials from a docker credential helper, as
//! `docker pull` gets them: `config.json`'s `credsStore` or `credHelpers`
//! names `docker-credential-<name>`, found through PATH. The command runs
//! as a child with its own PATH and DOCKER_CONFIG, so this process's
//! environment is never changed.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// A fake helper that logs each server it is asked about and answers with
/// `user`/`password` for `server` only.
fn fake_helper(bin: &Path, name: &str, server: &str, user: &str, password: &str) {
    let program = bin.join(format!("docker-credential-{name}"));
    let log = bin.join(format!("{name}.log"));
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\n\
             echo \"$server\" >> '{}'\n\
             if [ \"$server\" = '{server}' ]; then\n\
               echo '{{\"ServerURL\":\"{server}\",\"Username\":\"{user}\",\"Secret\":\"{password}\"}}'\n\
             else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn hoist_pull_uses_the_docker_credential_helper() {
    let reg =
        Registry::start_with_auth(Some(("alice", "s3cret"))).with_push_auth("alice", "s3cret");
    let img = push_image(
        &reg,
        "private/app",
        Some("1"),
        &[random_layer(61, 1000)],
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let (bin, docker) = (dir.path().join("bin"), dir.path().join("docker"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&docker).unwrap();
    fake_helper(&bin, "fake", &reg.addr, "alice", "s3cret");
    fake_helper(&bin, "wrong", &reg.addr, "alice", "nope");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let pull = |root: &str| {
        Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--root")
            .arg(dir.path().join(root))
            .args(["pull", "--no-unpack", "--hosts-dir", "/nonexistent"])
            .arg(format!("{}/private/app:1", reg.addr))
            .env("PATH", &path)
            .env("DOCKER_CONFIG", &docker)
            .output()
            .unwrap()
    };
    let text = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let config = docker.join("config.json");

    // No helper and no entry: the registry refuses.
    std::fs::write(&config, "{}").unwrap();
    let out = pull("none");
    assert!(!out.status.success(), "{}", text(&out));

    // credsStore answers for every registry.
    std::fs::write(&config, r#"{"credsStore": "fake"}"#).unwrap();
    let out = pull("store");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&img.manifest.digest.to_string()),
        "{}",
        text(&out)
    );
    let asked = std::fs::read_to_string(bin.join("fake.log")).unwrap();
    assert!(asked.lines().all(|l| l == reg.addr), "{asked}");

    // credHelpers for this registry wins over credsStore.
    std::fs::write(
        &config,
        format!(
            r#"{{"credsStore": "wrong", "credHelpers": {{"{}": "fake"}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let out = pull("helpers");
    assert!(out.status.success(), "{}", text(&out));
    // And the wrong password from the store is refused, which shows the
    // store was asked where no credHelpers entry applies.
    std::fs::write(&config, r#"{"credsStore": "wrong"}"#).unwrap();
    let out = pull("wrong");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("nope"),
        "a secret leaked: {}",
        text(&out)
    );
}
