//! Two jobs: compile the v2 gRPC protocol (`proto/grpc_service.proto`) and ONNX's messages
//! (`proto/onnx.proto`) with the pure-Rust `protox` compiler, so that no system `protoc` is
//! needed; and link our binaries against libtorch so that they start without LD_LIBRARY_PATH
//! and see CUDA.
//!
//! tch's own link arguments do not reach a dependent crate's binaries, so without this file
//! (measured) the binary has no rpath and fails to find `libtorch_cpu.so`, and the linker's
//! default `--as-needed` drops `libtorch.so`/`libtorch_cuda.so`, so CUDA is never initialised
//! even on a GPU machine.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    compile_protocol()?;
    compile_onnx()?;
    link_libtorch();
    Ok(())
}

fn compile_protocol() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/grpc_service.proto");
    let descriptors = protox::compile(["grpc_service.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client serves the benchmark and the tests.
        .build_client(true)
        // Raw tensors as `Bytes`: slices of the received buffer, not copies.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(descriptors)?;
    Ok(())
}

/// ONNX's own `onnx.proto` (ONNX 1.23, Apache-2.0, copied unchanged): the messages of the graphs
/// `models::onnx` writes.
fn compile_onnx() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_fds(descriptors)?;
    Ok(())
}

fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: binaries get no libtorch rpath");
        export_libtorch_version(None);
        return;
    };
    export_libtorch_version(Some(Path::new(&lib_dir)));
    export_openvino_library(Path::new(&lib_dir));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

/// Where the OpenVINO runtime of the PyPI wheel `openvino` is, when it sits in the same
/// site-packages as torch (`make` installs both into one venv): the `openvino` backend loads it
/// from there unless `VISIONSERVE_OPENVINO_LIB` says otherwise.
fn export_openvino_library(torch_lib: &Path) {
    let Some(site_packages) = torch_lib.parent().and_then(Path::parent) else {
        return;
    };
    let libs = site_packages.join("openvino").join("libs");
    println!("cargo:rerun-if-changed={}", libs.display());
    let Ok(entries) = std::fs::read_dir(&libs) else {
        println!(
            "cargo:warning=no OpenVINO wheel next to torch ({}): the openvino backend will need VISIONSERVE_OPENVINO_LIB",
            libs.display()
        );
        return;
    };
    let mut found: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libopenvino_c.so"))
        })
        .collect();
    found.sort();
    if let Some(library) = found.last() {
        println!(
            "cargo:rustc-env=VISIONSERVE_OPENVINO_LIB_BUILT={}",
            library.display()
        );
    }
}

/// `visionserve_build_info` names the libtorch and CUDA versions built against. The PyPI wheel
/// records them in `torch/version.py`, next to `torch/lib`; a plain libtorch download has
/// `build-version` there instead.
fn export_libtorch_version(lib_dir: Option<&Path>) {
    let torch_dir = lib_dir.and_then(Path::parent);
    let version_py = torch_dir.map(|d| d.join("version.py"));
    let build_version = torch_dir.map(|d| d.join("build-version"));
    let python = version_py
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let (mut libtorch, mut cuda) = ("unknown".to_owned(), "none".to_owned());
    if let Some(text) = python {
        println!("cargo:rerun-if-changed={}", version_py.unwrap().display());
        for line in text.lines() {
            if let Some(value) = python_string_value(line, "__version__") {
                libtorch = value;
            } else if let Some(value) = python_string_value(line, "cuda") {
                cuda = value;
            }
        }
    } else if let Some(text) = build_version.and_then(|p| std::fs::read_to_string(p).ok()) {
        libtorch = text.trim().to_owned();
    }
    println!("cargo:rustc-env=VISIONSERVE_LIBTORCH_VERSION={libtorch}");
    println!("cargo:rustc-env=VISIONSERVE_LIBTORCH_CUDA={cuda}");
}

/// The quoted value of `name = '...'` (or `name: Optional[str] = '...'`) in version.py.
fn python_string_value(line: &str, name: &str) -> Option<String> {
    let rest = line.strip_prefix(name)?;
    if !(rest.starts_with(' ') || rest.starts_with(':') || rest.starts_with('=')) {
        return None;
    }
    let value = rest.split_once('=')?.1.trim();
    let quoted = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\''));
    quoted.map(str::to_owned)
}
