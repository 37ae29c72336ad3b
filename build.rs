//! Link our binaries against libtorch so that they start without LD_LIBRARY_PATH and see CUDA.
//!
//! tch's own link arguments do not reach a dependent crate's binaries, so without this file
//! (measured) the binary has no rpath and fails to find `libtorch_cpu.so`, and the linker's
//! default `--as-needed` drops `libtorch.so`/`libtorch_cuda.so`, so CUDA is never initialised
//! even on a GPU machine.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: binaries get no libtorch rpath");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
