//! CRI load for `hack/bench`: ListImages latency and concurrent PullImage
//! against a running `hoist serve`.
//!
//! cri-bench SOCKET list N               N ListImages calls after one untimed call; p50/p99
//! cri-bench SOCKET pull REF COUNT       COUNT concurrent PullImage calls of REF; prints seconds
//! cri-bench SOCKET pull-tags PREFIX N   pulls PREFIX0..PREFIX{N-1}, 8 at a time
//! cri-bench SOCKET rmi REF              RemoveImage

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

async fn client(socket: String) -> anyhow::Result<ImageServiceClient<Channel>> {
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(ImageServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn pull(c: &mut ImageServiceClient<Channel>, image: &str) -> anyhow::Result<String> {
    let r = c
        .pull_image(PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().image_ref)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: cri-bench SOCKET (list N | pull REF COUNT | pull-tags PREFIX N | rmi REF)";
    let (socket, cmd) = match (args.get(1), args.get(2)) {
        (Some(s), Some(c)) => (s.clone(), c.as_str()),
        _ => anyhow::bail!(usage),
    };
    let arg = |i: usize| args.get(i).cloned().ok_or_else(|| anyhow::anyhow!(usage));
    match cmd {
        "list" => {
            let n: usize = arg(3)?.parse()?;
            let mut c = client(socket).await?;
            // One untimed call first: the steady state is what kubelet sees
            // between pulls; the first call after a pull rereads the store.
            c.list_images(ListImagesRequest { filter: None }).await?;
            let mut times = Vec::with_capacity(n);
            let mut count = 0;
            for _ in 0..n {
                let t = Instant::now();
                count = c
                    .list_images(ListImagesRequest { filter: None })
                    .await?
                    .into_inner()
                    .images
                    .len();
                times.push(t.elapsed());
            }
            times.sort();
            let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
            println!(
                "images={count} p50_ms={:.2} p99_ms={:.2}",
                ms(pct(0.50)),
                ms(pct(0.99))
            );
        }
        "pull" => {
            let image = arg(3)?;
            let count: usize = arg(4)?.parse()?;
            let t = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..count {
                let mut c = client(socket.clone()).await?;
                let image = image.clone();
                tasks.push(tokio::spawn(async move { pull(&mut c, &image).await }));
            }
            for task in tasks {
                task.await??;
            }
            println!("pulls={count} seconds={:.3}", t.elapsed().as_secs_f64());
        }
        "pull-tags" => {
            let prefix = arg(3)?;
            let n: usize = arg(4)?.parse()?;
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
            let mut tasks = Vec::new();
            for i in 0..n {
                let mut c = client(socket.clone()).await?;
                let image = format!("{prefix}{i}");
                let sem = sem.clone();
                tasks.push(tokio::spawn(async move {
                    let _slot = sem.acquire().await?;
                    pull(&mut c, &image).await
                }));
            }
            for task in tasks {
                task.await??;
            }
        }
        "rmi" => {
            let mut c = client(socket).await?;
            c.remove_image(RemoveImageRequest {
                image: spec(&arg(3)?),
            })
            .await?;
        }
        _ => anyhow::bail!(usage),
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
