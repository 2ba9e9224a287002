//! Compiles containerd's snapshots API (proto/) into server and client stubs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = "proto/github.com/containerd/containerd/api";
    tonic_prost_build::configure()
        .build_server(true)
        // The client serves the tests that drive the socket.
        .build_client(true)
        .compile_protos(
            &[
                format!("{api}/services/snapshots/v1/snapshots.proto"),
                format!("{api}/types/mount.proto"),
            ],
            &["proto".to_string()],
        )?;
    Ok(())
}
