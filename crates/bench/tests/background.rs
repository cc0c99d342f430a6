//! `--background-batch` against a scripted `moe.v1.Inference` server: refused background
//! requests are reported per distinct status and message, and the streams moe-bench cancels at
//! the end of the measurement are counted as cancelled, not as errors.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use clap::Parser;
use futures::Stream;
use moe_bench::config::BenchConfig;
use moe_common::pb::v1::inference_server::{Inference, InferenceServer};
use moe_common::pb::{FinishReason, GenerateRequest, GenerateResponse, LatencyClass, Usage};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// INTERACTIVE: one token, then the end. BATCH: the first `refuse` calls are refused with
/// RESOURCE_EXHAUSTED; later ones stream a token every 10 ms up to `max_tokens`.
#[derive(Clone)]
struct Scripted {
    refuse: u32,
    batch_calls: Arc<AtomicU32>,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

fn token(id: u32) -> GenerateResponse {
    GenerateResponse {
        text: format!("t{id} "),
        token_ids: vec![id],
        ..Default::default()
    }
}

fn last(completion_tokens: u32) -> GenerateResponse {
    GenerateResponse {
        finish_reason: FinishReason::Length as i32,
        usage: Some(Usage {
            completion_tokens,
            prompt_tokens: 10,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Inference for Scripted {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let req = request.into_inner();
        if req.latency_class != LatencyClass::Batch as i32 {
            let s = futures::stream::iter([Ok(token(0)), Ok(last(1))]);
            return Ok(Response::new(Box::pin(s)));
        }
        if self.batch_calls.fetch_add(1, Ordering::SeqCst) < self.refuse {
            return Err(Status::resource_exhausted(
                "scripted: as many BATCH requests\nas may be read at once",
            ));
        }
        let max = req.max_tokens;
        let s = futures::stream::unfold(0u32, move |i| async move {
            if i > max {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok(if i == max { last(max) } else { token(i) }), i + 1))
        });
        Ok(Response::new(Box::pin(s)))
    }
}

#[tokio::test]
async fn background_refusals_are_classified_and_cancelled_streams_are_not_errors() {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let service = Scripted {
        refuse: 2,
        batch_calls: Arc::new(AtomicU32::new(0)),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InferenceServer::new(service))
            .serve_with_incoming(incoming),
    );
    // Background requests of 100,000 tokens never end within the run: moe-bench cancels them.
    let config = BenchConfig::parse_from([
        "moe-bench",
        "--target",
        &format!("grpc://{addr}"),
        "--concurrency",
        "1",
        "--requests-per-level",
        "3",
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "4",
        "--background-batch",
        "3",
        "--background-max-tokens",
        "100000",
        "--request-timeout",
        "30s",
        "--level-timeout",
        "30s",
    ]);
    config.validate().unwrap();
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        moe_bench::run(&config, CancellationToken::new()),
    )
    .await
    .expect("the run ends")
    .expect("the run succeeds");

    let bg = report.background.as_ref().expect("a background report");
    assert_eq!(bg.streaming_at_start, 3);
    assert_eq!((bg.completed, bg.errors), (0, 2), "{bg:?}");
    assert_eq!(bg.errors_before_measurement, 2);
    assert_eq!(bg.cancelled_at_stop, 3, "{bg:?}");
    assert!(bg.tokens_streamed > 0 && bg.streamed_tok_s > 0.0, "{bg:?}");
    assert_eq!(
        bg.error_kinds.get("grpc_resourceexhausted"),
        Some(&2),
        "{bg:?}"
    );
    let detail = "grpc_resourceexhausted: scripted: as many BATCH requests as may be read at once";
    assert_eq!(bg.error_details.get(detail), Some(&2), "{bg:?}");
    assert_eq!(report.under_background[0].ok, 3);

    let table = report.table();
    assert!(
        table.contains("3 requests cancelled at the end (not errors)"),
        "{table}"
    );
    assert!(
        table.contains("background errors: 2 (2 before the measurement began)"),
        "{table}"
    );
    assert!(table.contains(&format!("2× {detail}")), "{table}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["background"]["error_details"][detail], 2);
    assert_eq!(json["background"]["errors"], 2);
}
