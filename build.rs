//! Compiles the gRPC interfaces in proto/ into server and client stubs:
//! containerd's snapshots API and hoist's own API (hoist.v1).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = "proto/github.com/containerd/containerd/api";
    tonic_prost_build::configure()
        .build_server(true)
        // Clients: the command line (hoist.v1) and the tests that drive the sockets.
        .build_client(true)
        .compile_protos(
            &[
                format!("{api}/services/snapshots/v1/snapshots.proto"),
                format!("{api}/types/mount.proto"),
                "proto/hoist/v1/hoist.proto".to_string(),
            ],
            &["proto".to_string()],
        )?;
    Ok(())
}
