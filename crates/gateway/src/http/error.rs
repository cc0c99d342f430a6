//! OpenAI-shaped errors (`{"error": {"message", "type", "param", "code"}}`): the mapping from
//! gRPC status codes to HTTP statuses, and a JSON body extractor whose rejections use that shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use moe_common::chat::strict::StrictJsonError;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tonic::{Code, Status};

/// An error as the OpenAI API reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, where known.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// `Retry-After` seconds of a 429 or 503 (1 when None): the gRPC status's `retry-after-ms`
    /// rounded up (`admission::retry_after_secs`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    /// The `{"error": ...}` document, used as a response body and as an SSE event.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// Keeps the gRPC code's meaning: the same failure gets the same class of answer on both APIs.
impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Code::NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            // A request option the cluster cannot honour now (`batch_invariant` with no
            // batch-invariant worker): the client must change the request or wait for the fleet.
            Code::FailedPrecondition => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("failed_precondition"),
            ),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("resource_exhausted"),
            ),
            Code::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("unavailable"),
            ),
            Code::DeadlineExceeded => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                Some("deadline_exceeded"),
            ),
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("unauthenticated"),
            ),
            Code::PermissionDenied => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("permission_denied"),
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("internal_error"),
            ),
        };
        ApiError {
            status,
            kind,
            message: s.message().to_string(),
            param: precondition_param(&s),
            code,
            retry_after: crate::admission::retry_after_secs(&s),
        }
    }
}

/// Request fields whose FAILED_PRECONDITION refusals start `field: ` (the gateway's placement
/// and the worker's own check), reported as the error's `param`.
const PRECONDITION_FIELDS: [&str; 1] = ["batch_invariant"];

/// The field a FAILED_PRECONDITION names, when its message starts with one it knows.
fn precondition_param(s: &Status) -> Option<String> {
    if s.code() != Code::FailedPrecondition {
        return None;
    }
    let (field, _) = s.message().split_once(": ")?;
    PRECONDITION_FIELDS
        .contains(&field)
        .then(|| field.to_string())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_later = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if retry_later {
            let secs = self.retry_after.unwrap_or(1).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON request body. Unlike `axum::Json` it ignores the content type (`curl -d` sends a form
/// type) and rejects malformed or mistyped bodies with a 400 in the OpenAI shape.
pub struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(mut req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // The body's share of the intake budget is held until it has been parsed.
        let _permit = req.extensions_mut().remove::<super::intake::BodyPermit>();
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError {
                status: e.status(),
                kind: "invalid_request_error",
                message: e.body_text(),
                param: None,
                code: None,
                retry_after: None,
            })?;
        match moe_common::chat::strict::from_slice(&bytes) {
            Ok(v) => Ok(OpenAiJson(v)),
            Err(StrictJsonError::Unknown(fields)) => {
                let mut e = ApiError::invalid(
                    fields[0].clone(),
                    format!(
                        "unsupported parameter(s): {} (this server refuses fields it does not implement; see docs/api.md)",
                        fields.join(", ")
                    ),
                );
                e.code = Some("unsupported_parameter");
                Err(e)
            }
            Err(StrictJsonError::Syntax(e)) => Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                message: format!("the request body is not valid JSON for this endpoint: {e}"),
                param: None,
                code: None,
                retry_after: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_keep_their_meaning_over_http() {
        let cases = [
            (
                Status::invalid_argument("x"),
                400,
                "invalid_request_error",
                None,
            ),
            (
                Status::not_found("x"),
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                Status::resource_exhausted("x"),
                429,
                "rate_limit_error",
                Some("resource_exhausted"),
            ),
            (
                Status::unavailable("x"),
                503,
                "server_error",
                Some("unavailable"),
            ),
            (
                Status::deadline_exceeded("x"),
                504,
                "timeout_error",
                Some("deadline_exceeded"),
            ),
            (
                Status::unauthenticated("x"),
                401,
                "authentication_error",
                Some("unauthenticated"),
            ),
            (
                Status::permission_denied("x"),
                403,
                "permission_error",
                Some("permission_denied"),
            ),
            (
                Status::failed_precondition("x"),
                400,
                "invalid_request_error",
                Some("failed_precondition"),
            ),
            (
                Status::internal("x"),
                500,
                "server_error",
                Some("internal_error"),
            ),
            (
                Status::unknown("x"),
                500,
                "server_error",
                Some("internal_error"),
            ),
        ];
        for (status, http, kind, code) in cases {
            let grpc = status.code();
            let e = ApiError::from(status);
            assert_eq!(
                (e.status.as_u16(), e.kind, e.code),
                (http, kind, code),
                "{grpc:?}"
            );
            assert_eq!(e.message, "x");
        }
    }

    #[test]
    fn batch_invariant_refusals_name_the_field() {
        let e = ApiError::from(Status::failed_precondition(
            "batch_invariant: no worker serving model \"m\" guarantees batch-invariant output",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("batch_invariant"));
        assert_eq!(e.body()["error"]["param"], "batch_invariant");
        assert_eq!(e.body()["error"]["code"], "failed_precondition");
        assert!(e.message.contains("batch-invariant"), "{}", e.message);
        // Other codes, or messages that name no known field, leave `param` unset.
        let e = ApiError::from(Status::unavailable("batch_invariant: x"));
        assert_eq!(e.param, None);
        let e = ApiError::from(Status::failed_precondition("model: x"));
        assert_eq!(e.param, None);
    }

    #[test]
    fn error_body_has_the_openai_shape() {
        let body = ApiError::invalid("n", "only n=1 is supported").body();
        assert_eq!(
            body,
            json!({"error": {
                "message": "only n=1 is supported",
                "type": "invalid_request_error",
                "param": "n",
                "code": null,
            }})
        );
    }

    #[tokio::test]
    async fn malformed_json_is_a_400_in_the_openai_shape() {
        #[derive(serde::Deserialize)]
        struct Body {
            #[allow(dead_code)]
            n: u32,
        }
        for raw in ["{not json", r#"{"n": "one"}"#, ""] {
            let req = Request::builder()
                .body(axum::body::Body::from(raw))
                .unwrap();
            let Err(e) = OpenAiJson::<Body>::from_request(req, &()).await else {
                panic!("{raw:?} was accepted");
            };
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{raw:?}");
            assert_eq!(e.kind, "invalid_request_error");
        }
    }

    #[test]
    fn overload_answers_say_when_to_retry() {
        let r = ApiError::from(Status::resource_exhausted("busy")).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::from(Status::invalid_argument("bad")).into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }

    /// `Retry-After` is the gRPC hint of the same refusal, rounded up to whole seconds.
    #[test]
    fn retry_after_is_the_grpc_hint_rounded_up() {
        use crate::admission::{exhausted_after, retry_hint};
        use std::time::Duration;
        let wait = |ms: u64| {
            let s = exhausted_after("queue", retry_hint(Some(Duration::from_millis(ms))));
            let grpc = s
                .metadata()
                .get("retry-after-ms")
                .unwrap()
                .to_str()
                .unwrap();
            let grpc: u64 = grpc.parse().unwrap();
            let r = ApiError::from(s).into_response();
            let http: u64 = r.headers()[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            (grpc, http)
        };
        assert_eq!(wait(200), (1000, 1));
        assert_eq!(wait(4200), (4200, 5));
        assert_eq!(wait(7000), (7000, 7));
        assert_eq!(wait(3_600_000), (60_000, 60));
        // An API-key limit's own hint too (it was answered 1 before).
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "retry-after-ms",
            tonic::metadata::MetadataValue::from(7500u64),
        );
        let quota = Status::with_metadata(Code::ResourceExhausted, "tokens per minute", md);
        let r = ApiError::from(quota).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "8");
    }
}
