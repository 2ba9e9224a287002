//! Serving the ImageService on a unix socket.

use super::Service;
use crate::any_authority::AnyAuthority;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio_stream::StreamExt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket {0} is served by another live process; stop it or choose another --socket")]
    InUse(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Binds `socket` (0600), replacing a stale socket file from a crash but
/// never one a live process answers on. Directories it has to make for the
/// socket are 0700; one that exists keeps its mode (`/run` stays `/run`).
pub fn bind(socket: &Path) -> Result<tokio::net::UnixListener, Error> {
    if let Some(dir) = socket.parent() {
        create_private_dirs(dir)?;
    }
    if std::fs::symlink_metadata(socket).is_ok() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(Error::InUse(socket.to_path_buf()));
        }
        std::fs::remove_file(socket)
            .map_err(io(format!("removing stale socket {}", socket.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(io(format!("binding {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", socket.display())))?;
    Ok(listener)
}

/// Makes `dir` and its missing ancestors, each 0700 (whatever the umask);
/// never touches a directory that is already there.
fn create_private_dirs(dir: &Path) -> Result<(), Error> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("chmod {}", d.display())))?,
            // Made by someone else meanwhile: theirs, so its mode stays.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("creating {}", d.display()))(e)),
        }
    }
    Ok(())
}

/// Serves `routes` on `listener` (every socket hoist serves: the CRI
/// ImageService, containerd's snapshots API) until `shutdown` resolves, then
/// removes the socket file. In-flight RPCs (and the pulls only they drive)
/// are dropped then, leaving their ingests to be resumed.
pub async fn serve(
    routes: tonic::service::Routes,
    listener: tokio::net::UnixListener,
    socket: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    // Any :authority, as grpc-go servers accept: see any_authority.rs.
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|conn| conn.map(AnyAuthority::new));
    tracing::info!(socket = %socket.display(), "serving");
    let result = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}

/// The CRI socket's routes: the CRI ImageService and hoist's own API. tonic
/// `Routes` hold several services and send each request to the one its path
/// names (`/runtime.v1.ImageService/…`, `/hoist.v1.Hoist/…`), so both share
/// the socket, its permissions and its connection layer.
pub fn routes(service: Service, api: crate::api::server::Api) -> tonic::service::Routes {
    tonic::service::Routes::new(ImageServiceServer::new(service))
        .add_service(crate::api::server::service(api))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[tokio::test]
    async fn an_existing_socket_directory_keeps_its_mode() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).expect("mkdir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let socket = run.join("hoist.sock");
        let _listener = bind(&socket).expect("bind");
        assert_eq!(mode(&run), 0o755);
        assert_eq!(mode(&socket), 0o600);
    }

    #[tokio::test]
    async fn missing_socket_directories_are_made_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let socket = tmp.path().join("a/b/c/hoist.sock");
        let _listener = bind(&socket).expect("bind");
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&tmp.path().join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(tmp.path()), 0o755);
        assert_eq!(mode(&socket), 0o600);
    }
}
