//! Links the shared cuBLAS when the `cuda` feature is on.
//!
//! `llama-cpp-sys-2` asks for the static cuBLAS archives, which a CUDA toolkit laid out from NVIDIA's
//! PyPI wheels (`shared/gpu/cuda-toolkit-from-wheels.sh`) does not ship: that script leaves empty
//! stand-ins and exports `MOE_CUDA_DYLIBS`, the folder of the shared libraries. CPU builds print
//! nothing here and are unaffected.

fn main() {
    println!("cargo:rerun-if-env-changed=MOE_CUDA_DYLIBS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Some(dir) = std::env::var_os("MOE_CUDA_DYLIBS") {
        println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
    }
    println!("cargo:rustc-link-lib=dylib=cublas");
    println!("cargo:rustc-link-lib=dylib=cublasLt");
}
