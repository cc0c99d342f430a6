//! moe.v1 `Inference/Generate` over tonic: a worker or a gateway.

use std::net::SocketAddr;

use moe_common::pb::v1::inference_client::InferenceClient;
use moe_common::pb::{FinishReason, GenerateRequest, SamplingParams};
use tonic::transport::Channel;

use super::{BenchError, RequestSpec, Sample, StreamClock};

#[derive(Clone, Debug)]
pub struct GrpcClient {
    inner: InferenceClient<Channel>,
}

impl GrpcClient {
    pub async fn connect(addr: SocketAddr) -> Result<Self, BenchError> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| BenchError::Connect(e.to_string()))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| BenchError::Connect(format!("{addr}: {e}")))?;
        Ok(GrpcClient {
            inner: InferenceClient::new(channel),
        })
    }

    pub(super) async fn generate(
        &self,
        spec: &RequestSpec,
        mut clock: StreamClock,
    ) -> Result<Sample, BenchError> {
        let request = GenerateRequest {
            prompt: spec.prompt.clone(),
            max_tokens: spec.max_tokens,
            sampling: Some(SamplingParams {
                temperature: 0.0,
                ..Default::default()
            }),
            latency_class: spec.class.to_proto() as i32,
            ..Default::default()
        };
        let status = |s: tonic::Status| BenchError::Status {
            code: s.code(),
            message: s.message().to_string(),
        };
        let mut client = self.inner.clone();
        clock.restart();
        let mut stream = client.generate(request).await.map_err(status)?.into_inner();
        while let Some(msg) = stream.message().await.map_err(status)? {
            clock.tokens(msg.token_ids.len() as u32);
            if msg.finish_reason != FinishReason::Unspecified as i32 {
                let usage = msg.usage.unwrap_or_default();
                return clock.finish(Some(usage.completion_tokens), Some(usage.prompt_tokens));
            }
        }
        Err(BenchError::Protocol(
            "stream ended without a final message".into(),
        ))
    }
}
