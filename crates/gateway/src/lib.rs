//! moe-gateway: a stateless router. One watcher keeps the etcd registry as an immutable
//! snapshot; each `Generate` is placed by the policy in `scheduler`, proxied to a worker, retried
//! or migrated by `proxy`. `http` serves the same service as an OpenAI-compatible HTTP API.

pub mod admission;
pub mod auth;
pub mod config;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod prefix_index;
pub mod proxy;
pub mod router;
pub mod scheduler;
pub mod security;
pub mod tokenize;

use std::sync::Arc;

use moe_common::pb::v1::inference_server::InferenceServer;
use moe_common::registry::{RegistryError, Watcher};
use tokio::net::TcpListener;
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
    #[error(transparent)]
    Security(#[from] security::SecurityError),
    #[error(transparent)]
    Reflection(#[from] moe_common::grpc::ReflectionError),
}

/// Serves until `shutdown` is cancelled, then stops intake (health NOT_SERVING) and lets
/// running streams finish.
pub async fn run(
    config: GatewayConfig,
    shutdown: CancellationToken,
    listener: TcpListener,
) -> Result<(), GatewayError> {
    let etcd = config.etcd.config();
    let watcher_stop = CancellationToken::new();
    let security = security::Security::load(&config.security, watcher_stop.clone())?;
    let watcher = Watcher::start_retrying(etcd, watcher_stop.clone()).await?;
    let policy = Policy {
        interactive_spill: config.interactive_spill,
        batch_spill: config.batch_spill,
        ..Policy::default()
    };
    let router = Arc::new(
        RoutingState::new(watcher.snapshots(), policy)
            .with_worker_tls(security.worker_tls)
            .with_worker_tls_server_name(config.security.worker_tls_server_name.clone())
            .with_outliers(router::OutlierConfig {
                failures: config.outlier_failures,
                ejection: config.outlier_ejection,
                ..router::OutlierConfig::default()
            }),
    );
    // One registry per gateway; served at --metrics-listen.
    let mut registry = prometheus_client::registry::Registry::default();
    let gateway_metrics = metrics::GatewayMetrics::register(&mut registry);
    gateway_metrics.snapshot(&watcher.current());
    {
        let router = router.clone();
        let mut snapshots = watcher.snapshots();
        let stop = watcher_stop.clone();
        let gateway_metrics = gateway_metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = snapshots.changed() => if r.is_err() { return },
                }
                router.prune_channels();
                router.adverts_received(&router.snapshot());
                gateway_metrics.snapshot(&snapshots.borrow_and_update());
            }
        });
    }
    // Prefix-aware routing: one WatchPrefixCache subscription per worker in the registry.
    let prompt_sizing = {
        let index = (config.prefix_routing == config::OnOff::On).then(|| {
            let index = Arc::new(prefix_index::PrefixIndex::default());
            prefix_index::spawn(
                index.clone(),
                router.clone(),
                watcher.snapshots(),
                watcher_stop.clone(),
            );
            index
        });
        tokenize::PromptSizing {
            index,
            timeout: config.tokenize_timeout,
        }
    };
    let metrics_server = moe_common::telemetry::metrics::spawn(
        config.metrics_listen,
        registry,
        watcher_stop.clone(),
    )
    .await?;
    let service = GatewayService::new(
        router,
        ProxyConfig {
            max_streams: config.max_concurrency,
            request_timeout: config.request_timeout,
            max_attempts: config.max_attempts,
            stream_idle_timeout: config.stream_idle_timeout,
            first_message_timeout: config.first_message_timeout,
            limits: config.limits.clone(),
        },
    )
    .with_interactive_reserve(config.interactive_reserved_streams())
    .with_metrics(gateway_metrics)
    .with_api_keys(security.api_keys.clone())
    .with_prompt_sizing(prompt_sizing);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // NOT_SERVING until the registry has been listed once (etcd may be down at start).
    health_reporter
        .set_not_serving::<InferenceServer<GatewayService>>()
        .await;
    tokio::spawn(grpc::serve_once_synced(
        health_reporter.clone(),
        watcher.snapshots(),
        shutdown.clone(),
    ));
    let (reflection, reflection_v1alpha) = moe_common::grpc::reflection_services()?;
    let http_listener = match config.http_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("binding the HTTP listener on {addr}: {e}"),
            )
        })?),
        None => None,
    };
    let http_local = http_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let http_server = {
        let service = service.clone();
        let intake = http::Intake::new(
            http::IntakeLimits::from_config(&config),
            security.api_keys.clone(),
        )
        .with_metrics(service.metrics().clone());
        let shutdown = shutdown.clone();
        // New requests during the window get 503 `draining` instead of a reset (issue 16).
        let window = config.drain_grace.min(http::drain::DRAIN_ACCEPT_WINDOW);
        async move {
            match http_listener {
                Some(l) => {
                    http::serve_http(service, l, security.http_tls, intake, shutdown, window).await
                }
                None => Ok(()),
            }
        }
    };
    let local = listener.local_addr()?;
    tracing::info!(%local, http = ?http_local, workers = watcher.current().workers.len(), "gateway ready");
    let stop_server = shutdown.clone();
    let reporter = health_reporter.clone();
    // Health and reflection are outside the decoding limit: probes answer while it is full.
    // Calls arriving once the drain began are answered UNAVAILABLE with the retry hint; the
    // listener keeps accepting for the window so that connections in its backlog get that
    // answer instead of a reset (issue 16), then tonic's graceful shutdown closes it.
    let grpc_window = config.drain_grace.min(grpc::DRAIN_ACCEPT_WINDOW);
    let server = grpc::router_draining(
        &grpc::GrpcLimits::from_config(&config),
        service,
        security.api_keys,
        shutdown.clone(),
    )
    .add_service(health_service)
    .add_service(reflection)
    .add_service(reflection_v1alpha)
    .serve_with_incoming_shutdown(
        moe_common::tls::incoming(listener, security.grpc_tls, "gRPC"),
        async move {
            stop_server.cancelled().await;
            tracing::info!("draining: no new requests, finishing running streams");
            reporter
                .set_not_serving::<InferenceServer<GatewayService>>()
                .await;
            tokio::time::sleep(grpc_window).await;
            tracing::info!(window = ?grpc_window, "gRPC: drain accept window over; closing the listener");
        },
    );
    let grpc_server = async { server.await.map_err(GatewayError::from) };
    let servers = async {
        tokio::try_join!(grpc_server, async {
            http_server.await.map_err(GatewayError::from)
        })
    };
    // Draining is bounded like the worker's: after --drain-grace the remaining streams are cut
    // (their clients see the connection close) instead of holding the process open.
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(config.drain_grace).await;
    };
    tokio::select! {
        r = servers => { r?; }
        () = grace_over => {
            tracing::warn!(grace = ?config.drain_grace, "drain grace over; cutting the remaining streams");
        }
    }
    watcher_stop.cancel();
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

pub use router::RoutingState;
