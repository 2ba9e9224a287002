//! Publishing pulled images to containerd, so that its CRI plugin can run
//! them.
//!
//! kubelet pulls through hoist and creates containers through containerd;
//! containerd's CRI must then know the image under the names and id kubelet
//! uses. hoist forwards each finished CRI pull to containerd's own CRI
//! `PullImage`: containerd fetches the index, manifest and config (a few
//! KiB), and when it prepares each layer with hoist as its snapshotter, hoist
//! answers that the chain already exists, so no layer is fetched or unpacked
//! a second time. containerd's `PullImage` returns once its image store has
//! the image, so a `CreateContainer` right after cannot race it. Removal is
//! forwarded the same way.
//!
//! Forwarding to a containerd whose CRI unpacks into another snapshotter
//! would download every layer again, so hoist asks containerd's CRI for its
//! configuration first and forwards only when it uses hoist's snapshotter.
//! Without a reachable containerd, hoist is a pure image service and says so
//! once in its log.

use super::errors::internal;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use tonic::Status;
use tonic::transport::Channel;

/// containerd's default address.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// The name containerd's configuration gives hoist's proxy snapshotter.
pub const DEFAULT_SNAPSHOTTER: &str = "hoist";

pub struct Containerd {
    address: PathBuf,
    snapshotter: String,
    /// What was last logged about forwarding, so that each change is said
    /// once: 0 nothing, 1 forwarding, 2 unreachable, 3 other snapshotter.
    said: AtomicU8,
}

/// Whether containerd takes part, and why not.
enum Reach {
    Forward(Channel),
    Unreachable(String),
    OtherSnapshotter(String),
}

impl Containerd {
    pub fn new(address: PathBuf, snapshotter: String) -> Self {
        Containerd {
            address,
            snapshotter,
            said: AtomicU8::new(0),
        }
    }

    /// After hoist's pull of `spec`: the same pull through containerd's CRI.
    /// Its image id must be the one hoist recorded.
    pub async fn publish(
        &self,
        spec: ImageSpec,
        auth: Option<AuthConfig>,
        sandbox_config: Option<PodSandboxConfig>,
        image_ref: &str,
    ) -> Result<(), Status> {
        let Some(channel) = self.channel().await else {
            return Ok(());
        };
        let reply = ImageServiceClient::new(channel)
            .pull_image(PullImageRequest {
                image: Some(spec.clone()),
                auth,
                sandbox_config,
            })
            .await
            .map_err(|s| {
                Status::new(
                    s.code(),
                    format!(
                        "publishing {} to containerd at {}: {}",
                        spec.image,
                        self.address.display(),
                        s.message()
                    ),
                )
            })?
            .into_inner();
        if reply.image_ref != image_ref {
            return Err(internal(format!(
                "containerd resolved {} to {}, hoist to {image_ref}",
                spec.image, reply.image_ref
            )));
        }
        Ok(())
    }

    /// After hoist removed an image: containerd's record of each of its
    /// names goes too (containerd drops its hold on hoist's layers).
    pub async fn remove(&self, names: &[String]) -> Result<(), Status> {
        let Some(channel) = self.channel().await else {
            return Ok(());
        };
        let mut images = ImageServiceClient::new(channel);
        for name in names {
            images
                .remove_image(RemoveImageRequest {
                    image: Some(ImageSpec {
                        image: name.clone(),
                        ..Default::default()
                    }),
                })
                .await
                .map_err(|s| {
                    Status::new(
                        s.code(),
                        format!("removing {name} from containerd: {}", s.message()),
                    )
                })?;
        }
        Ok(())
    }

    /// A channel to containerd when it should be told, logging each change
    /// of that answer once.
    async fn channel(&self) -> Option<Channel> {
        let (said, channel) = match self.reach().await {
            Reach::Forward(c) => (1, Some(c)),
            Reach::Unreachable(why) => {
                if self.said.swap(2, Ordering::Relaxed) != 2 {
                    tracing::warn!(
                        address = %self.address.display(),
                        "containerd is not reachable ({why}): serving images only; pods cannot run them until it is"
                    );
                }
                return None;
            }
            Reach::OtherSnapshotter(name) => {
                if self.said.swap(3, Ordering::Relaxed) != 3 {
                    tracing::warn!(
                        address = %self.address.display(),
                        snapshotter = name,
                        expected = self.snapshotter,
                        "containerd's CRI unpacks into another snapshotter: not publishing images to it, since it would download them again"
                    );
                }
                return None;
            }
        };
        if self.said.swap(said, Ordering::Relaxed) != said {
            tracing::info!(address = %self.address.display(), "publishing pulled images to containerd");
        }
        channel
    }

    async fn reach(&self) -> Reach {
        if !self.address.exists() {
            return Reach::Unreachable(format!("no socket at {}", self.address.display()));
        }
        let channel = match crate::grpc_unix::connect(self.address.clone()).await {
            Ok(c) => c,
            Err(e) => return Reach::Unreachable(e.to_string()),
        };
        let status = RuntimeServiceClient::new(channel.clone())
            .status(StatusRequest { verbose: true })
            .await;
        match status {
            Ok(reply) => match cri_snapshotter(&reply.into_inner().info) {
                Some(name) if name == self.snapshotter => Reach::Forward(channel),
                Some(name) => Reach::OtherSnapshotter(name),
                None => Reach::Unreachable("its CRI status names no snapshotter".into()),
            },
            Err(s) => Reach::Unreachable(format!("CRI status: {}", s.message())),
        }
    }
}

/// The snapshotter containerd's CRI plugin unpacks into, from the verbose
/// `Status` answer's `config` (containerd 1.6 to 2.x put it there).
fn cri_snapshotter(info: &std::collections::HashMap<String, String>) -> Option<String> {
    let config: serde_json::Value = serde_json::from_str(info.get("config")?).ok()?;
    config
        .pointer("/containerd/snapshotter")
        .or_else(|| config.pointer("/snapshotter"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshotter_read_from_the_cri_config() {
        let mut info = std::collections::HashMap::new();
        info.insert(
            "config".to_string(),
            r#"{"containerd":{"snapshotter":"hoist","defaultRuntimeName":"runc"}}"#.to_string(),
        );
        assert_eq!(cri_snapshotter(&info).as_deref(), Some("hoist"));
        info.insert(
            "config".to_string(),
            r#"{"containerd":{"snapshotter":"overlayfs"}}"#.to_string(),
        );
        assert_eq!(cri_snapshotter(&info).as_deref(), Some("overlayfs"));
        info.insert("config".to_string(), "not json".to_string());
        assert_eq!(cri_snapshotter(&info), None);
        assert_eq!(cri_snapshotter(&Default::default()), None);
    }
}
