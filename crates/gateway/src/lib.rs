//! moe-gateway: a stateless router. One watcher keeps the etcd registry as an immutable
//! snapshot; each `Generate` is placed by the policy in `scheduler`, proxied to a worker, retried
//! or migrated by `proxy`.

pub mod config;
pub mod proxy;
pub mod router;
pub mod scheduler;

use std::sync::Arc;

use moe_common::pb::v1::inference_server::InferenceServer;
use moe_common::registry::{EtcdConfig, RegistryError, Watcher};
use moe_common::request::RequestLimits;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;
use proxy::{GatewayService, ProxyConfig};
use scheduler::Policy;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("watching etcd: {0}")]
    Registry(#[from] RegistryError),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves until `shutdown` is cancelled, then stops intake (health NOT_SERVING) and lets
/// running streams finish.
pub async fn run(
    config: GatewayConfig,
    shutdown: CancellationToken,
    listener: TcpListener,
) -> Result<(), GatewayError> {
    let mut etcd = EtcdConfig::new(config.etcd.clone());
    etcd.prefix = config.etcd_prefix.clone();
    etcd.user = config.etcd_user.clone().zip(config.etcd_password.clone());
    let watcher_stop = CancellationToken::new();
    let watcher = Watcher::start(etcd, watcher_stop.clone()).await?;
    let policy = Policy {
        interactive_spill: config.interactive_spill,
        batch_spill: config.batch_spill,
        ..Policy::default()
    };
    let router = Arc::new(Router::new(watcher.snapshots(), policy));
    {
        let router = router.clone();
        let mut snapshots = watcher.snapshots();
        let stop = watcher_stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = snapshots.changed() => if r.is_err() { return },
                }
                router.prune_channels();
            }
        });
    }
    let service = GatewayService::new(
        router,
        ProxyConfig {
            max_streams: config.max_concurrency,
            request_timeout: config.request_timeout,
            max_attempts: config.max_attempts,
            limits: RequestLimits {
                max_tokens: config.max_tokens_limit,
                ..RequestLimits::default()
            },
        },
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InferenceServer<GatewayService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_common::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let local = listener.local_addr()?;
    tracing::info!(%local, workers = watcher.current().workers.len(), "gateway ready");
    let stop_server = shutdown.clone();
    let reporter = health_reporter.clone();
    let server = tonic::transport::Server::builder()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.max_concurrency * 2,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            stop_server.cancelled().await;
            tracing::info!("draining: no new requests, finishing running streams");
            reporter
                .set_not_serving::<InferenceServer<GatewayService>>()
                .await;
        });
    server.await?;
    watcher_stop.cancel();
    tracing::info!("gateway stopped");
    Ok(())
}

pub use router::Router;
