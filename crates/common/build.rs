//! Compiles `proto/moe/v1/*.proto` into Rust, with a descriptor set for gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with `env!`: Cargo reuses a compiled build script across checkouts
    // that share a target directory, and a baked-in path would point at another checkout.
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let inference = proto_root.join("moe/v1/inference.proto");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // prost's codec, but a request that does not decode is INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::MoeCodec")
        .file_descriptor_set_path(out_dir.join("moe_v1_descriptor.bin"))
        .compile_protos(&[inference], std::slice::from_ref(&proto_root))?;
    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
