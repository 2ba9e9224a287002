//! Serving the ImageService on a unix socket.

use super::Service;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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

/// Binds `socket` (directory 0700, socket 0600), replacing a stale socket
/// file from a crash but never one a live process answers on.
pub fn bind(socket: &Path) -> Result<tokio::net::UnixListener, Error> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", dir.display())))?;
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

/// Serves until `shutdown` resolves; in-flight RPCs (and the pulls only
/// they drive) are dropped then, leaving their ingests to be resumed.
pub async fn serve(
    service: Service,
    listener: tokio::net::UnixListener,
    socket: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tracing::info!(socket = %socket.display(), "serving the CRI ImageService");
    let result = tonic::transport::Server::builder()
        .add_service(ImageServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}
