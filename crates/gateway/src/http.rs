//! The OpenAI-compatible HTTP front end (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`). Requests go through `GatewayService::start`, the same path as gRPC
//! `Generate`: validation, placement, retries, migration and limits are shared.

pub mod chat;
pub mod drain;
pub mod error;
pub mod intake;
pub mod openai;

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::from_fn_with_state;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::{Stream, StreamExt};
use moe_common::pb::{GenerateResponse, LatencyClass, Usage};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::proxy::GatewayService;
pub use error::ApiError;
use error::OpenAiJson;
use openai::{Body, Kind, Mapped, Shape};

/// Header that picks the latency class (`interactive` or `batch`).
pub const LATENCY_CLASS_HEADER: &str = "x-moe-latency-class";
pub use intake::{Intake, IntakeLimits, MAX_BODY_BYTES};

#[derive(Clone)]
struct AppState {
    service: GatewayService,
    shutdown: CancellationToken,
}

/// The HTTP routes over `service`. Once `shutdown` is cancelled `/health` answers 503 and every
/// other route 503 `draining` ([`drain::gate`]). Completion requests pass `intake` (API key on the head, body budget and read timeout) before
/// their body is parsed; health and models do not.
pub fn router(service: GatewayService, shutdown: CancellationToken, intake: Intake) -> Router {
    let guard = from_fn_with_state(intake, intake::guard);
    Router::new()
        .route(
            "/v1/chat/completions",
            post(chat_completions).route_layer(guard.clone()),
        )
        .route("/v1/completions", post(completions).route_layer(guard))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/health", get(health))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(from_fn_with_state(shutdown.clone(), drain::gate))
        .with_state(AppState { service, shutdown })
}

/// Serves the HTTP API on `listener` (over TLS with `tls`). Once `shutdown` is cancelled it
/// keeps accepting and reading for `accept_window` (see [`drain`]), answering new requests 503
/// `draining` while running requests (streams included) go on; then it stops accepting, closes
/// idle connections and returns when the running requests have finished.
pub async fn serve_http(
    service: GatewayService,
    listener: TcpListener,
    tls: Option<moe_common::tls::ServerTls>,
    intake: Intake,
    shutdown: CancellationToken,
    accept_window: Duration,
) -> std::io::Result<()> {
    let app = router(service, shutdown.clone(), intake);
    let listener = moe_common::tls::ServerListener::new(listener, tls, "HTTP")?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(accept_window).await;
            tracing::info!(
                window = ?accept_window,
                "HTTP: drain accept window over; closing the listener and idle connections"
            );
        })
        .await
}

async fn chat_completions(
    State(state): State<AppState>,
    reserve: Option<Extension<intake::InteractiveReserve>>,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<Body>,
) -> Result<Response, ApiError> {
    let class = class_of(&headers, body.metadata.as_ref())?;
    keeps_its_share(&state, reserve.is_some(), class)?;
    let mapped = openai::chat_request(body, class)?;
    respond(&state, Kind::Chat, mapped, &headers).await
}

async fn completions(
    State(state): State<AppState>,
    reserve: Option<Extension<intake::InteractiveReserve>>,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<Body>,
) -> Result<Response, ApiError> {
    let class = class_of(&headers, body.metadata.as_ref())?;
    keeps_its_share(&state, reserve.is_some(), class)?;
    let mapped = openai::completion_request(body, class)?;
    respond(&state, Kind::Completion, mapped, &headers).await
}

/// A request read under the INTERACTIVE reserve of the body budget is refused unless it is
/// INTERACTIVE (see [`intake`]).
fn keeps_its_share(
    state: &AppState,
    read_under_reserve: bool,
    class: LatencyClass,
) -> Result<(), ApiError> {
    if read_under_reserve && class != LatencyClass::Interactive {
        state
            .service
            .metrics()
            .decoding_refused("http", crate::metrics::DecodingRefusal::BatchShare);
        return Err(intake::batch_over_its_share());
    }
    Ok(())
}

fn class_of(
    headers: &HeaderMap,
    metadata: Option<&serde_json::Map<String, Value>>,
) -> Result<LatencyClass, ApiError> {
    let header = headers
        .get(LATENCY_CLASS_HEADER)
        .map(|v| v.to_str())
        .transpose()
        .map_err(|_| ApiError::invalid(LATENCY_CLASS_HEADER, "header is not ASCII"))?;
    openai::latency_class(header, metadata)
}

/// Starts the request and answers as an SSE stream or as one JSON object. The API key comes
/// from `Authorization: Bearer KEY`, checked by `GatewayService::start` as for gRPC.
async fn respond(
    state: &AppState,
    kind: Kind,
    mapped: Mapped,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let Mapped {
        mut request,
        stream,
        include_usage,
    } = mapped;
    let model = if request.model.is_empty() {
        // Any model: name it when the cluster serves just one.
        let mut models = state.service.models();
        if models.len() == 1 {
            models.remove(0)
        } else {
            String::new()
        }
    } else {
        request.model.clone()
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let shape = Shape::new(kind, created, model);
    request.request_id = shape.id.clone();
    let api_key = crate::auth::bearer(
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let mut rx = state.service.start_sized(request, None, api_key).await?;
    // Waiting for the first message lets failures before any output (every worker refused,
    // the worker's own validation) keep their HTTP status instead of becoming an SSE event.
    let first = next_message(&mut rx).await?;
    if stream {
        Ok(sse(shape, first, rx, include_usage).into_response())
    } else {
        collect(shape, first, rx).await
    }
}

type Messages = ReceiverStream<Result<GenerateResponse, Status>>;

async fn next_message(rx: &mut Messages) -> Result<GenerateResponse, ApiError> {
    match rx.next().await {
        Some(Ok(m)) => Ok(m),
        Some(Err(status)) => Err(status.into()),
        None => Err(Status::internal("the stream ended without a final message").into()),
    }
}

/// The stream owns `rx` and nothing else holds it: when the client disconnects, hyper drops the
/// body, `rx` is dropped, and the proxy task drops the worker stream (cancelling the sequence).
fn sse(
    shape: Shape,
    first: GenerateResponse,
    mut rx: Messages,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = async_stream::stream! {
        let mut pending = Some(first);
        let mut is_first = true;
        loop {
            let msg = match pending.take() {
                Some(m) => m,
                None => match next_message(&mut rx).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(id = %shape.id, message = %e.message, "stream failed after it started");
                        yield Ok(data(&e.body()));
                        break;
                    }
                },
            };
            let done = openai::finish_reason(msg.finish_reason).is_some();
            if is_first || done || !msg.text.is_empty() || chat::has_extras(&msg) {
                yield Ok(data(&shape.chunk(&msg, is_first, include_usage)));
                is_first = false;
            }
            if done {
                if include_usage {
                    let usage = msg.usage.unwrap_or_default();
                    yield Ok(data(&shape.usage_chunk(&usage, &msg.system_fingerprint)));
                }
                yield Ok(Event::default().data("[DONE]"));
                break;
            }
        }
    };
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Gathers the whole text; the answer carries the serving worker in `x-moe-*` headers
/// (`x-moe-batch-invariant`: the final message's `batch_invariant`).
async fn collect(
    shape: Shape,
    first: GenerateResponse,
    mut rx: Messages,
) -> Result<Response, ApiError> {
    let mut reply = chat::Reply::default();
    let mut msg = first;
    loop {
        reply.push(&msg);
        if let Some(finish) = openai::finish_reason(msg.finish_reason) {
            let usage: Usage = msg.usage.unwrap_or_default();
            let body = shape.complete(&reply, finish, &usage, &msg.system_fingerprint);
            let mut response = Json(body).into_response();
            let h = response.headers_mut();
            for (name, value) in [
                ("x-moe-worker-id", msg.worker_id),
                ("x-moe-offload-profile", msg.offload_profile),
                ("x-moe-migrations", msg.migrations.to_string()),
                ("x-moe-batch-invariant", msg.batch_invariant.to_string()),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(HeaderName::from_static(name), v);
                }
            }
            return Ok(response);
        }
        msg = next_message(&mut rx).await?;
    }
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "moe-cluster"})
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .service
        .models()
        .iter()
        .map(|m| model_json(m))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if state.service.models().contains(&model) {
        Ok(Json(model_json(&model)))
    } else {
        Err(ApiError::not_found(
            format!("no ready worker serves model {model:?}"),
            "model_not_found",
        ))
    }
}

/// 200 while at least one worker is ready and the gateway is not draining; 503 otherwise.
async fn health(State(state): State<AppState>) -> Response {
    let models = state.service.models();
    let (code, status) = if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if models.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    } else {
        (StatusCode::OK, "ok")
    };
    (code, Json(json!({"status": status, "models": models}))).into_response()
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(
        format!("no route for {method} {}", uri.path()),
        "unknown_url",
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        message: format!("{method} is not allowed on {}", uri.path()),
        param: None,
        code: Some("method_not_allowed"),
        retry_after: None,
    }
}
