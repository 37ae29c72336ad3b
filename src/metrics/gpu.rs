//! GPU gauges from NVML, read at each scrape: `visionserve_gpu_utilization_ratio`,
//! `visionserve_gpu_memory_used_bytes` and `visionserve_gpu_memory_total_bytes`, one series per
//! device (the dashboards in deploy/observability use these names).
//!
//! NVML is the driver's own library: `nvml-wrapper` opens `libnvidia-ml.so.1` with `dlopen`
//! when [`GpuCollector::new`] runs (the binary does not link it), so a machine without the
//! NVIDIA driver starts as usual. There, and wherever NVML fails to initialise, the collector
//! says so once in the log and exports no series at all (no zeros: "no GPU" is not "idle GPU").
//!
//! The `device` label is the CUDA device index, as in `--device cuda:N`, not NVML's index.
//! NVML numbers the GPUs by PCI bus id; CUDA numbers the GPUs it is allowed to see
//! (`CUDA_VISIBLE_DEVICES`) in its own order, fastest first unless
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`. So:
//!
//! - without `CUDA_VISIBLE_DEVICES`, CUDA index N is taken to be NVML index N. That holds with
//!   `CUDA_DEVICE_ORDER=PCI_BUS_ID`, and also with the default order on machines whose GPUs are
//!   all the same model (fastest-first breaks ties by PCI bus id), which is what GPU nodes are;
//!   a mixed-GPU host should set `CUDA_DEVICE_ORDER=PCI_BUS_ID` for the labels to be exact.
//! - with `CUDA_VISIBLE_DEVICES`, its Nth entry is CUDA device N: a `GPU-<uuid>` entry (or a
//!   unique prefix of one) is matched by UUID, which is exact; a number is an index in the
//!   order above. Like CUDA, the list ends at the first entry that names no device, and only
//!   listed devices are exported. (In a container, the NVIDIA runtime usually exposes just the
//!   assigned GPUs to NVML as well, so the single GPU of a pod is `device="0"` either way.)

use nvml_wrapper::Nvml;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

/// Metric names under the registry's `visionserve` prefix.
pub const GPU_UTILIZATION: &str = "gpu_utilization_ratio";
pub const GPU_MEMORY_USED: &str = "gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL: &str = "gpu_memory_total_bytes";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    /// The CUDA device index ("0", "1", ...).
    pub device: String,
}

/// One device's readings at one scrape; `None` where NVML could not say (for example
/// utilisation on some virtualised GPUs).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub device: String,
    /// Fraction of the last sample period (1/6 s to 1 s, by product) during which a kernel ran.
    pub utilization: Option<f64>,
    pub memory_used: Option<u64>,
    pub memory_total: Option<u64>,
}

/// Exports NVML's view of the GPUs at scrape time.
#[derive(Debug)]
pub struct GpuCollector {
    /// `None` when NVML could not be initialised: nothing is exported.
    nvml: Option<Nvml>,
    /// (CUDA index label, NVML index) of each device exported.
    devices: Vec<(String, u32)>,
}

impl GpuCollector {
    /// Initialises NVML once (it stays open for the process's life) and works out which GPUs
    /// CUDA sees. Never fails: without NVML the collector exports nothing.
    pub fn new() -> Self {
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(e) => {
                tracing::info!(error = %e, "NVML unavailable: no GPU metrics");
                return Self::disabled();
            }
        };
        let devices = match cuda_devices(&nvml, std::env::var("CUDA_VISIBLE_DEVICES").ok()) {
            Ok(devices) => devices,
            Err(e) => {
                tracing::info!(error = %e, "NVML could not list the GPUs: no GPU metrics");
                return Self::disabled();
            }
        };
        tracing::debug!(
            devices = ?devices,
            "GPU metrics from NVML (CUDA index, NVML index)"
        );
        Self {
            nvml: Some(nvml),
            devices,
        }
    }

    /// A collector that exports nothing.
    pub fn disabled() -> Self {
        Self {
            nvml: None,
            devices: Vec::new(),
        }
    }

    /// Reads every exported device now.
    pub fn read(&self) -> Vec<GpuReading> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        self.devices
            .iter()
            .filter_map(|(label, index)| {
                // A device that vanished since start-up (fallen off the bus) drops out.
                let device = nvml.device_by_index(*index).ok()?;
                let memory = device.memory_info().ok();
                Some(GpuReading {
                    device: label.clone(),
                    utilization: device
                        .utilization_rates()
                        .ok()
                        .map(|u| f64::from(u.gpu) / 100.0),
                    memory_used: memory.as_ref().map(|m| m.used),
                    memory_total: memory.as_ref().map(|m| m.total),
                })
            })
            .collect()
    }
}

impl Default for GpuCollector {
    fn default() -> Self {
        Self::new()
    }
}

/// The NVML index of each device CUDA sees, in CUDA's order, labelled with the CUDA index.
fn cuda_devices(
    nvml: &Nvml,
    visible: Option<String>,
) -> Result<Vec<(String, u32)>, nvml_wrapper::error::NvmlError> {
    let count = nvml.device_count()?;
    let Some(visible) = visible else {
        return Ok((0..count).map(|i| (i.to_string(), i)).collect());
    };
    let uuids: Vec<(u32, String)> = (0..count)
        .filter_map(|i| Some((i, nvml.device_by_index(i).ok()?.uuid().ok()?)))
        .collect();
    Ok(map_visible_devices(&visible, count, &uuids))
}

/// `CUDA_VISIBLE_DEVICES` resolved against NVML's devices: (CUDA index label, NVML index).
/// `uuids` holds (NVML index, "GPU-..." UUID).
fn map_visible_devices(visible: &str, count: u32, uuids: &[(u32, String)]) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in visible.split(',').map(str::trim) {
        let nvml_index = if let Ok(n) = entry.parse::<u32>() {
            (n < count).then_some(n)
        } else if entry.starts_with("GPU-") {
            // CUDA accepts any unique prefix of the UUID.
            let mut matches = uuids.iter().filter(|(_, uuid)| uuid.starts_with(entry));
            match (matches.next(), matches.next()) {
                (Some((index, _)), None) => Some(*index),
                _ => None,
            }
        } else {
            // MIG instances and anything else: not mapped (CUDA, too, stops here on junk).
            None
        };
        let Some(nvml_index) = nvml_index else { break };
        if out.iter().any(|(_, i)| *i == nvml_index) {
            break; // a repeated device ends the list, as in CUDA
        }
        out.push((out.len().to_string(), nvml_index));
    }
    out
}

/// Encodes the three gauges for `readings`; no readings, no metric families at all.
pub fn encode_readings(
    encoder: &mut DescriptorEncoder,
    readings: &[GpuReading],
) -> std::fmt::Result {
    family(
        encoder,
        GPU_UTILIZATION,
        "GPU utilisation from NVML: the fraction of the last sample period (1/6 s to 1 s) in which a kernel ran, per CUDA device",
        readings,
        |r| r.utilization,
    )?;
    family(
        encoder,
        GPU_MEMORY_USED,
        "GPU memory allocated on the device by all processes (NVML), per CUDA device",
        readings,
        |r| r.memory_used.map(|b| b as f64),
    )?;
    family(
        encoder,
        GPU_MEMORY_TOTAL,
        "GPU memory installed on the device (NVML), per CUDA device",
        readings,
        |r| r.memory_total.map(|b| b as f64),
    )
}

fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    readings: &[GpuReading],
    value: impl Fn(&GpuReading) -> Option<f64>,
) -> std::fmt::Result {
    let values: Vec<(DeviceLabel, ConstGauge<f64>)> = readings
        .iter()
        .filter_map(|r| {
            Some((
                DeviceLabel {
                    device: r.device.clone(),
                },
                ConstGauge::new(value(r)?),
            ))
        })
        .collect();
    let Some((_, first)) = values.first() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, gauge) in &values {
        gauge.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        if self.nvml.is_none() {
            return Ok(());
        }
        encode_readings(&mut encoder, &self.read())
    }
}

#[cfg(test)]
mod tests {
    use super::super::PREFIX;
    use super::*;
    use prometheus_client::registry::Registry;

    /// A registry shaped like `Metrics::new`'s: the collector under the `visionserve` prefix,
    /// encoded as `/metrics` serves it (Prometheus text 0.0.4) and as OpenMetrics.
    fn encode_both(collector: impl Collector) -> (String, String) {
        let mut root = Registry::default();
        root.sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(collector));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &root).unwrap();
        let mut openmetrics = String::new();
        prometheus_client::encoding::text::encode_registry(&mut openmetrics, &root).unwrap();
        (text, openmetrics)
    }

    fn encode(collector: impl Collector) -> String {
        let (text, openmetrics) = encode_both(collector);
        // Both formats carry the same samples here (gauges, no units, no exemplars).
        assert_eq!(
            text.lines().count(),
            openmetrics.lines().count(),
            "{text}\n{openmetrics}"
        );
        text
    }

    #[derive(Debug)]
    struct Fixed(Vec<GpuReading>);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            encode_readings(&mut encoder, &self.0)
        }
    }

    #[test]
    fn disabled_collector_exports_nothing() {
        assert_eq!(encode(GpuCollector::disabled()), "");
    }

    /// On a machine without the NVIDIA driver (CI), `new` must neither fail nor export anything.
    #[test]
    fn exports_nothing_without_nvml() {
        if Nvml::init().is_ok() {
            eprintln!("NVML is available here: skipping the no-GPU check");
            return;
        }
        let collector = GpuCollector::new();
        assert!(collector.read().is_empty());
        assert_eq!(encode(collector), "");
    }

    #[test]
    fn encodes_one_series_per_device_with_the_dashboard_names() {
        let readings = vec![
            GpuReading {
                device: "0".into(),
                utilization: Some(0.87),
                memory_used: Some(3 << 30),
                memory_total: Some(80 << 30),
            },
            GpuReading {
                device: "1".into(),
                utilization: None,
                memory_used: Some(1 << 20),
                memory_total: Some(80 << 30),
            },
        ];
        let text = encode(Fixed(readings));
        for line in [
            "# TYPE visionserve_gpu_utilization_ratio gauge",
            r#"visionserve_gpu_utilization_ratio{device="0"} 0.87"#,
            r#"visionserve_gpu_memory_used_bytes{device="0"} 3221225472.0"#,
            r#"visionserve_gpu_memory_used_bytes{device="1"} 1048576.0"#,
            r#"visionserve_gpu_memory_total_bytes{device="1"} 85899345920.0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        // Utilisation unknown for device 1: no series rather than a made-up value.
        assert!(!text.contains(r#"visionserve_gpu_utilization_ratio{device="1"}"#));
    }

    #[test]
    fn no_readings_no_families() {
        assert_eq!(encode(Fixed(Vec::new())), "");
    }

    #[test]
    fn maps_cuda_visible_devices() {
        let uuids = vec![
            (0, "GPU-aaaa-1111".to_string()),
            (1, "GPU-bbbb-2222".to_string()),
            (2, "GPU-abcd-3333".to_string()),
        ];
        let map = |v| map_visible_devices(v, 3, &uuids);
        assert_eq!(map("2,0"), vec![("0".into(), 2), ("1".into(), 0)]);
        assert_eq!(map("GPU-bbbb"), vec![("0".into(), 1)]);
        // "GPU-a" is ambiguous: the list ends there.
        assert_eq!(map("1,GPU-a,0"), vec![("0".into(), 1)]);
        // Out of range, junk, an empty list, a repeat: the list ends there.
        assert_eq!(map("0,7,1"), vec![("0".into(), 0)]);
        assert_eq!(map("-1"), vec![]);
        assert_eq!(map(""), vec![]);
        assert_eq!(map("1,1"), vec![("0".into(), 1)]);
        assert_eq!(map("MIG-xyz"), vec![]);
    }
}
