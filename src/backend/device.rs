//! Device selection and the per-process / per-thread CPU settings libtorch needs to be fast.

use crate::config::{DType, DeviceChoice};
use anyhow::{bail, Result};
use tch::{Cuda, Device, Kind};

/// Resolve `--device` to a libtorch device, failing when CUDA was asked for and is missing.
pub fn resolve(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(if Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceChoice::Cuda(index) => {
            let count = Cuda::device_count() as usize;
            if count == 0 {
                bail!("--device cuda:{index}: CUDA is not available (no GPU or driver visible to libtorch)");
            }
            if index >= count {
                bail!("--device cuda:{index}: only {count} CUDA device(s) present");
            }
            Ok(Device::Cuda(index))
        }
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub fn kind(dtype: DType, device: Device) -> Result<Kind> {
    match (dtype, device) {
        (DType::F32, _) => Ok(Kind::Float),
        (DType::F16, Device::Cpu) => {
            bail!("--dtype f16 needs CUDA (CPUs have no fast f16 convolutions); on CPU use --dtype bf16 or f32")
        }
        (DType::F16, _) => Ok(Kind::Half),
        (DType::Bf16, _) => Ok(Kind::BFloat16),
    }
}

/// Say once that libtorch runs bf16 slowly on this CPU, when it does.
pub fn warn_if_torch_emulates_bf16(kind: Kind, device: Device) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if kind == Kind::BFloat16 && device == Device::Cpu && !cpu_has_bf16() {
        WARNED.call_once(|| {
            tracing::warn!(
                "--dtype bf16 on libtorch on a CPU without bf16 instructions (avx512_bf16 or \
                 amx_bf16): oneDNN emulates it, and it ran about 30x slower than f32 on such a \
                 CPU (BENCHMARKS.md); use f32 here"
            )
        });
    }
}

/// Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16), read from the kernel's
/// x86 CPU flags; without it libtorch's bf16 convolutions are emulated, far slower than f32,
/// and OpenVINO runs f32 instead. Other architectures are not judged (true: no warning).
#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_has_bf16() -> bool {
    true
}

#[cfg(target_arch = "x86_64")]
pub fn cpu_has_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .find(|line| line.starts_with("flags"))
            .is_some_and(|flags| {
                flags
                    .split_whitespace()
                    .any(|flag| flag == "avx512_bf16" || flag == "amx_bf16")
            })
    })
}

/// Flush denormal floats to zero on this thread (and on threads it creates later, which
/// inherit the floating-point control register). Random-weight and fine-tuned models produce
/// denormals whose slow path made tf_efficientnetv2_s 20x slower on CPU here. libtorch's
/// intra-op workers are created on first use by the thread that runs the model, so call this
/// on that thread before the first forward.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reading and writing MXCSR only changes this thread's float rounding of denormals:
    // FTZ (bit 15) flushes denormal results, DAZ (bit 6) treats denormal inputs as zero.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: setting FPCR.FZ (bit 24) only flushes denormals to zero on this thread.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr);
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr);
    }
}

/// Keep glibc from returning libtorch's large activation buffers to the OS after every
/// forward. With the defaults, buffers above the (dynamic) mmap threshold are mmap-ed and
/// unmapped per batch: 60-100k page faults per batch-8 pass of Lite0, and batch 8 ran slower per
/// image than batch 1. Must run before libtorch allocates. Environment variables set by the user
/// (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) win.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 1 GiB: above any activation buffer of the models we serve (a 32 MiB threshold still
        // left batch-8 Lite0 27 % slower: its expanded stage-1 activations are 38 MiB).
        const MMAP_THRESHOLD: libc::c_int = 1 << 30;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator tunables; it is called before other threads
        // allocate through libtorch.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
            if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
    }
}

/// Give the pages of freed memory back to the system (after a model version is unloaded).
/// The raised trim threshold of [`tune_allocator`] keeps glibc from doing it by itself, which
/// is what keeps batches fast; an unload is the moment to do it once.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Versions and capabilities for the start-up log.
pub fn summary(device: Device) -> String {
    let cuda = if Cuda::is_available() {
        format!(
            "CUDA available ({} device(s), cuDNN {})",
            Cuda::device_count(),
            tch::utils::version_cudnn()
        )
    } else {
        "CUDA not available".to_owned()
    };
    format!(
        "device {}; {cuda}; {} intra-op threads",
        describe(device),
        tch::get_num_threads()
    )
}
