//! gRPC server pieces both binaries serve beside their own API.

use tonic_reflection::server::{Builder, v1, v1alpha};

/// The reflection services could not be built from the descriptor sets.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ReflectionError(#[from] tonic_reflection::server::Error);

/// The server reflection services for `moe.v1` and `grpc.health.v1`: v1, and v1alpha too, since
/// grpcio-reflection and older grpcurl speak only that version.
pub fn reflection_services() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    ReflectionError,
> {
    let builder = || {
        Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_services_build_from_the_descriptor_sets() {
        let built = reflection_services();
        assert!(built.is_ok(), "{:?}", built.err());
    }
}
