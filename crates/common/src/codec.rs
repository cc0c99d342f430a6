//! The protobuf codec of `moe.v1`: prost's, except that a request that does not decode (invalid
//! UTF-8 in a string field, truncated or malformed bytes) is the client's fault and gets
//! INVALID_ARGUMENT instead of prost's INTERNAL. A response that does not decode stays INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::pb::{
    GenerateRequest, GenerateResponse, PrefixCacheEvent, TokenizeResponse, WatchPrefixCacheRequest,
};

/// The status code for a message of this type that fails to decode.
pub trait DecodeFailure {
    fn status(message: String) -> Status;
}

impl DecodeFailure for GenerateRequest {
    fn status(message: String) -> Status {
        Status::invalid_argument(format!(
            "request does not decode as moe.v1.GenerateRequest: {message}"
        ))
    }
}

impl DecodeFailure for GenerateResponse {
    fn status(message: String) -> Status {
        Status::internal(message)
    }
}

impl DecodeFailure for WatchPrefixCacheRequest {
    fn status(message: String) -> Status {
        Status::invalid_argument(format!(
            "request does not decode as moe.v1.WatchPrefixCacheRequest: {message}"
        ))
    }
}

impl DecodeFailure for TokenizeResponse {
    fn status(message: String) -> Status {
        Status::internal(message)
    }
}

impl DecodeFailure for PrefixCacheEvent {
    fn status(message: String) -> Status {
        Status::internal(message)
    }
}

/// Used by the generated client and server code (see build.rs).
#[derive(Debug, Clone)]
pub struct MoeCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for MoeCodec<T, U> {
    fn default() -> Self {
        MoeCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for MoeCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + DecodeFailure + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MoeDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        MoeDecoder(ProstDecoder::new(BufferSettings::default()))
    }
}

pub struct MoeDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + DecodeFailure> Decoder for MoeDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|s| U::status(s.message().to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
