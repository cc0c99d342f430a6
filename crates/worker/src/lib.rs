//! moe-worker: serves one GGUF MoE model through llama.cpp with an offload profile, streams
//! completions over gRPC (`moe.v1.Inference`) and advertises itself in etcd.

pub mod advert;
pub mod chat;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod service;
pub mod supervise;
pub mod worker_service;

use std::sync::Arc;

use moe_common::pb::v1::inference_server::InferenceServer;
use moe_common::registry::{Registrar, RegistrarConfig, RegistryError, WorkerState};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::WorkerConfig;
use engine::{EngineConfig, EngineError};
use service::{InferenceService, Intake};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("registering in etcd: {0}")]
    Registry(#[from] RegistryError),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] moe_common::tls::TlsError),
    #[error("engine failed, worker left the cluster: {0}")]
    EngineFault(#[from] supervise::EngineFault),
    #[error(transparent)]
    Reflection(#[from] moe_common::grpc::ReflectionError),
}

fn engine_config(c: &WorkerConfig) -> EngineConfig {
    EngineConfig {
        model_path: c.model.clone(),
        model_name: c.model_name.clone(),
        offload: c.offload,
        vram_budget: c.vram_budget.map(|b| b.0),
        gpu_layers: c.gpu_layers,
        ctx_size: c.ctx_size,
        parallel: c.parallel,
        cache_sequences: c.cache_sequences,
        threads: c.threads,
        batch_size: c.batch_size,
        ubatch_size: c.ubatch_size(),
        kv_unified: c.kv_unified,
        cache_type_k: c.cache_type_k,
        cache_type_v: c.cache_type_v,
        decode_mode: c.decode_mode(),
        grouped_rows: c.grouped_rows as usize,
        max_queue: c.max_queue,
        queue_timeout: c.queue_timeout,
    }
}

/// Loads the model, registers, serves until `shutdown` is cancelled, then drains: stop intake
/// (health NOT_SERVING, advert `draining`), let streams finish within the drain grace, cancel
/// the rest, revoke the lease, stop the server.
pub async fn run(
    config: WorkerConfig,
    shutdown: CancellationToken,
    listener: TcpListener,
) -> Result<(), WorkerError> {
    let local = listener.local_addr()?;
    // Certificates are checked before the model loads, so a bad file fails fast.
    let tls = config
        .tls
        .files()
        .map(moe_common::tls::ServerTls::grpc)
        .transpose()?;
    let engine = engine::start(engine_config(&config)).await?;
    let id = config.worker_id(local.port());
    let endpoint = format!(
        "{}://{}",
        if tls.is_some() { "https" } else { "http" },
        config.advertise_addr.clone().unwrap_or_else(|| {
            if local.ip().is_unspecified() {
                format!("127.0.0.1:{}", local.port())
            } else {
                local.to_string()
            }
        })
    );

    let (state_tx, state_rx) = watch::channel(WorkerState::Ready);
    let first = advert::build(
        &id,
        &endpoint,
        engine.model(),
        WorkerState::Ready,
        &engine.stats().borrow(),
    );
    let (advert_tx, advert_rx) = watch::channel(first);
    let metrics_advert = advert_rx.clone();
    let background = CancellationToken::new();
    tokio::spawn(advert::follow(
        engine.clone(),
        id.clone(),
        endpoint.clone(),
        state_rx,
        advert_tx,
        background.clone(),
    ));
    let registrar = if config.etcd.etcd.is_empty() {
        tracing::warn!("no --etcd given: serving without registration");
        None
    } else {
        let etcd = config.etcd.config();
        let rc = RegistrarConfig {
            etcd,
            lease_ttl: config.lease_ttl,
            min_update_interval: std::time::Duration::from_millis(250),
        };
        Some(Registrar::start(rc, advert_rx).await?)
    };

    // One registry per worker; served at --metrics-listen.
    let mut registry = prometheus_client::registry::Registry::default();
    let worker_metrics = metrics::WorkerMetrics::register(
        &mut registry,
        &id,
        &engine.model().info.name,
        &engine.model().profile.to_string(),
    );
    tokio::spawn(metrics::follow(
        worker_metrics.clone(),
        metrics::Sources {
            stats: engine.stats(),
            advert: metrics_advert,
            registration: registrar.as_ref().map(Registrar::status),
        },
        background.clone(),
    ));
    let metrics_server =
        moe_common::telemetry::metrics::spawn(config.metrics_listen, registry, background.clone())
            .await?;

    let intake = Arc::new(Intake::default());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    let (reflection, reflection_v1alpha) = moe_common::grpc::reflection_services()?;
    let service = InferenceService::new(engine.clone(), id.clone(), intake.clone())
        .with_metrics(worker_metrics)
        .with_limits(config.limits.clone());
    let stop_server = CancellationToken::new();
    // HTTP/2 pings (20 s, answered within 10 s) close a gateway connection that went half-open;
    // `tls::incoming` sets TCP keepalive on every accepted socket.
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            InferenceServer::new(service)
                .max_decoding_message_size(config.limits.max_message_bytes),
        )
        .add_service(
            moe_common::pb::v1::worker_server::WorkerServer::new(
                worker_service::WorkerService::new(engine.clone(), config.limits.clone()),
            )
            .max_decoding_message_size(config.limits.max_message_bytes),
        )
        .serve_with_incoming_shutdown(
            moe_common::tls::incoming(listener, tls, "gRPC"),
            stop_server.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    tracing::info!(%id, %endpoint, model = %engine.model().info.name, profile = %engine.model().profile, "worker ready");

    let fault = tokio::select! {
        () = shutdown.cancelled() => None,
        fault = supervise::watch_engine(engine.stats(), config.engine_stall_timeout) => Some(fault),
    };
    if let Some(fault) = fault {
        // A dead or wedged engine fails every request while the worker would look healthy:
        // stop looking healthy, leave etcd (bounded), and exit non-zero so it is restarted.
        tracing::error!(%fault, in_flight = intake.in_flight(), "engine failed; leaving the cluster and exiting");
        intake.start_draining();
        health_reporter
            .set_not_serving::<InferenceServer<InferenceService>>()
            .await;
        state_tx.send_replace(WorkerState::Draining);
        if let Some(r) = registrar {
            r.deregister().await;
        }
        background.cancel();
        stop_server.cancel();
        // Streams waiting on a wedged engine never end: do not wait for them.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server).await;
        return Err(fault.into());
    }
    tracing::info!(in_flight = intake.in_flight(), "draining");
    intake.start_draining();
    health_reporter
        .set_not_serving::<InferenceServer<InferenceService>>()
        .await;
    state_tx.send_replace(WorkerState::Draining);
    if tokio::time::timeout(config.drain_grace, intake.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = intake.in_flight(),
            "drain grace over; cancelling streams"
        );
    }
    engine.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), intake.wait_idle()).await;
    if let Some(r) = registrar {
        r.deregister().await;
    }
    background.cancel();
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    stop_server.cancel();
    match server.await {
        Ok(r) => r?,
        Err(e) => tracing::warn!(error = %e, "server task failed"),
    }
    tracing::info!("worker stopped");
    Ok(())
}
