//! The three protocols `bench` speaks, to any server: `/v1` (the image as the raw body),
//! KServe v2 REST (a BYTES input in the binary tensor extension) and KServe v2 gRPC (a BYTES
//! input in `raw_input_contents`). Nothing here needs a visionserve-only header: the server's
//! stage times are read from `Server-Timing` where a server sends it, and from the v2
//! statistics extension (`/v2/models/{m}/stats`, `ModelStatistics`) where it has one.

use crate::grpc::proto;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::collections::BTreeMap;
use tonic::transport::Channel;

/// Which protocol to send requests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `POST /v1/classify` (or `/v1/models/{m}/classify`), the image as the body.
    V1,
    /// KServe v2 REST: `POST /v2/models/{m}/infer`, binary tensor extension.
    V2,
    /// KServe v2 gRPC: `ModelInfer`.
    Grpc,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An HTTP status other than 200, or a gRPC status other than OK.
    Refused(String),
    /// No answer: the connection failed or broke.
    Transport(String),
}

impl Outcome {
    /// The key errors are counted under: `HTTP 429`, `gRPC Unavailable`, `connection`.
    pub fn label(&self) -> Option<String> {
        match self {
            Outcome::Ok => None,
            Outcome::Refused(status) => Some(status.clone()),
            Outcome::Transport(_) => Some("connection".into()),
        }
    }
}

/// One answer: how it ended and the server's own stage times for it (ms), where it said.
pub struct Reply {
    pub outcome: Outcome,
    pub stages: Vec<(String, f64)>,
}

/// The server's cumulative v2 statistics for the model: per stage, (count, total ns).
pub type Statistics = BTreeMap<String, (u64, u64)>;

/// A server and model to send images to, with every image's request prepared once.
pub struct Target {
    protocol: Protocol,
    /// `http://host:port` (the gRPC port for gRPC).
    base: String,
    /// The model (resolved from the server when not given; `/v1` may use its default).
    pub model: Option<String>,
    api_key: Option<String>,
    /// Sent with every request (`--header`): HTTP headers, or gRPC metadata.
    headers: Vec<(String, String)>,
    http: reqwest::Client,
    grpc: Option<GrpcInferenceServiceClient<Channel>>,
    /// The v2 input's name, from the model's metadata.
    input_name: String,
}

/// The largest message the gRPC client accepts (a v2 answer with every class can be large).
const GRPC_MESSAGE_BYTES: usize = 64 << 20;

impl Target {
    /// Connect, find the model where none is named, and check that it takes encoded images.
    pub async fn connect(
        url: &str,
        protocol: Protocol,
        model: Option<String>,
        api_key: Option<String>,
    ) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("the server's URL must start with http:// or https://, not {url:?}");
        }
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(usize::MAX)
            .build()
            .context("cannot build the HTTP client")?;
        let grpc = match protocol {
            Protocol::Grpc => Some(
                GrpcInferenceServiceClient::connect(base.clone())
                    .await
                    .with_context(|| format!("cannot connect to the gRPC server at {base}"))?
                    .max_decoding_message_size(GRPC_MESSAGE_BYTES)
                    .max_encoding_message_size(GRPC_MESSAGE_BYTES),
            ),
            _ => None,
        };
        let mut target = Self {
            protocol,
            base,
            model,
            api_key,
            headers: Vec::new(),
            http,
            grpc,
            input_name: String::new(),
        };
        if protocol != Protocol::V1 {
            if target.model.is_none() {
                target.model = Some(target.only_ready_model().await?);
            }
            target.input_name = target.bytes_input().await?;
        }
        Ok(target)
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    fn model_name(&self) -> &str {
        self.model.as_deref().unwrap_or_default()
    }

    /// Send `headers` (`--header`) with every request too.
    pub fn with_headers(mut self, headers: Vec<(String, String)>) -> Self {
        self.headers = headers;
        self
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = self.headers.iter().fold(request, |request, (name, value)| {
            request.header(name, value)
        });
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    fn grpc_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        for (name, value) in &self.headers {
            let name =
                tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes());
            if let (Ok(name), Ok(value)) = (name, value.parse()) {
                metadata.insert(name, value);
            }
        }
        if let Some(key) = &self.api_key {
            if let Ok(value) = format!("Bearer {key}").parse() {
                metadata.insert("authorization", value);
            }
        }
        request
    }

    fn grpc(&self) -> GrpcInferenceServiceClient<Channel> {
        self.grpc.clone().expect("a gRPC target has a client")
    }

    /// The one ready model of the server's repository index (v2), or an error naming them.
    async fn only_ready_model(&self) -> Result<String> {
        let names: Vec<String> = match self.protocol {
            Protocol::Grpc => bail!(
                "name the model with --model-name (KServe v2 gRPC has no call that lists models)"
            ),
            _ => self.listed_models().await?,
        };
        let mut names: Vec<String> = names
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        match names.len() {
            1 => Ok(names.remove(0)),
            0 => bail!("the server reports no ready model"),
            _ => bail!(
                "the server has several models ({}): choose one with --model-name",
                names.join(", ")
            ),
        }
    }

    /// The server's models: its v2 repository index (Triton, OpenVINO Model Server), else
    /// visionserve's public `/v1/models` (its index is part of the management API).
    async fn listed_models(&self) -> Result<Vec<String>> {
        let url = format!("{}/v2/repository/index", self.base);
        let request = self
            .http
            .post(url)
            .json(&serde_json::json!({"ready": true}));
        let index = self.authorize(request).send().await?;
        if index.status().is_success() {
            let models: Vec<serde_json::Value> = index.json().await?;
            return Ok(names(models.iter()));
        }
        let listed = self
            .authorize(self.http.get(format!("{}/v1/models", self.base)))
            .send()
            .await?;
        if !listed.status().is_success() {
            bail!(
                "name the model with --model-name: the server's repository index answered {}",
                index.status()
            );
        }
        let body: serde_json::Value = listed.json().await?;
        Ok(names(body["models"].as_array().into_iter().flatten()))
    }

    /// The model's first input, which must take encoded images (BYTES).
    async fn bytes_input(&self) -> Result<String> {
        let model = self.model_name().to_owned();
        let (name, datatype) = match self.protocol {
            Protocol::Grpc => {
                let request = self.grpc_request(proto::ModelMetadataRequest {
                    name: model.clone(),
                    version: String::new(),
                });
                let metadata = self
                    .grpc()
                    .model_metadata(request)
                    .await
                    .with_context(|| format!("model {model:?}'s metadata"))?
                    .into_inner();
                let input = metadata.inputs.into_iter().next();
                input.map(|i| (i.name, i.datatype)).unzip()
            }
            _ => {
                let url = format!("{}/v2/models/{model}", self.base);
                let response = self.authorize(self.http.get(url)).send().await?;
                if !response.status().is_success() {
                    bail!("model {model:?}'s metadata: HTTP {}", response.status());
                }
                let metadata: serde_json::Value = response.json().await?;
                let input = &metadata["inputs"][0];
                (
                    input["name"].as_str().map(str::to_owned),
                    input["datatype"].as_str().map(str::to_owned),
                )
            }
        };
        let name = name.ok_or_else(|| anyhow!("model {model:?} declares no input"))?;
        match datatype.as_deref() {
            Some("BYTES") => Ok(name),
            other => bail!(
                "model {model:?}'s input {name:?} is {}, not BYTES: bench sends encoded images, so the \
                 model must decode them itself (as visionserve's do)",
                other.unwrap_or("undeclared")
            ),
        }
    }

    /// Each image's request, built once so that sending costs a reference-count increment.
    pub fn prepare(&self, image: &[u8]) -> Prepared {
        match self.protocol {
            Protocol::V1 => Prepared::Body(Bytes::copy_from_slice(image)),
            Protocol::V2 => {
                let header = serde_json::json!({
                    "inputs": [{
                        "name": self.input_name,
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": image.len() + 4},
                    }],
                })
                .to_string();
                let mut body = Vec::with_capacity(header.len() + 4 + image.len());
                body.extend_from_slice(header.as_bytes());
                body.extend_from_slice(&(image.len() as u32).to_le_bytes());
                body.extend_from_slice(image);
                Prepared::V2 {
                    body: body.into(),
                    header_length: header.len(),
                }
            }
            Protocol::Grpc => {
                let mut raw = Vec::with_capacity(image.len() + 4);
                raw.extend_from_slice(&(image.len() as u32).to_le_bytes());
                raw.extend_from_slice(image);
                Prepared::Grpc(proto::ModelInferRequest {
                    model_name: self.model_name().to_owned(),
                    inputs: vec![proto::model_infer_request::InferInputTensor {
                        name: self.input_name.clone(),
                        datatype: "BYTES".into(),
                        shape: vec![1],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![raw.into()],
                    ..Default::default()
                })
            }
        }
    }

    /// Send one prepared request and read its whole answer.
    pub async fn send(&self, request: &Prepared) -> Reply {
        match request {
            Prepared::Body(body) => {
                let path = match &self.model {
                    Some(model) => format!("{}/v1/models/{model}/classify", self.base),
                    None => format!("{}/v1/classify", self.base),
                };
                let request = self
                    .http
                    .post(path)
                    .header("content-type", "application/octet-stream")
                    .body(body.clone());
                self.http_reply(request).await
            }
            Prepared::V2 {
                body,
                header_length,
            } => {
                let url = format!("{}/v2/models/{}/infer", self.base, self.model_name());
                let request = self
                    .http
                    .post(url)
                    .header("content-type", "application/octet-stream")
                    .header("inference-header-content-length", header_length.to_string())
                    .body(body.clone());
                self.http_reply(request).await
            }
            Prepared::Grpc(message) => {
                let request = self.grpc_request(message.clone());
                match self.grpc().model_infer(request).await {
                    Ok(_) => Reply {
                        outcome: Outcome::Ok,
                        stages: Vec::new(),
                    },
                    Err(status)
                        if status.code() == tonic::Code::Unknown
                            && status.message().contains("transport") =>
                    {
                        Reply {
                            outcome: Outcome::Transport(status.message().to_owned()),
                            stages: Vec::new(),
                        }
                    }
                    Err(status) => Reply {
                        outcome: Outcome::Refused(format!("gRPC {:?}", status.code())),
                        stages: Vec::new(),
                    },
                }
            }
        }
    }

    async fn http_reply(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = match self.authorize(request).send().await {
            Ok(response) => response,
            Err(e) => {
                return Reply {
                    outcome: Outcome::Transport(e.to_string()),
                    stages: Vec::new(),
                }
            }
        };
        let status = response.status();
        let stages = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(parse_server_timing)
            .unwrap_or_default();
        let outcome = match response.bytes().await {
            Err(e) => Outcome::Transport(e.to_string()),
            Ok(_) if status.is_success() => Outcome::Ok,
            Ok(_) => Outcome::Refused(format!("HTTP {}", status.as_u16())),
        };
        Reply { outcome, stages }
    }

    /// The model's cumulative statistics (v2 statistics extension), where the server has them.
    pub async fn statistics(&self) -> Option<Statistics> {
        let model = self.model.clone()?;
        match self.protocol {
            Protocol::Grpc => {
                let request = self.grpc_request(proto::ModelStatisticsRequest {
                    name: model,
                    version: String::new(),
                });
                let response = self
                    .grpc()
                    .model_statistics(request)
                    .await
                    .ok()?
                    .into_inner();
                let stats = response.model_stats.into_iter().next()?.inference_stats?;
                let pair =
                    |d: Option<proto::StatisticDuration>| d.map_or((0, 0), |d| (d.count, d.ns));
                Some(Statistics::from([
                    ("success".to_owned(), pair(stats.success)),
                    ("queue".to_owned(), pair(stats.queue)),
                    ("compute_input".to_owned(), pair(stats.compute_input)),
                    ("compute_infer".to_owned(), pair(stats.compute_infer)),
                    ("compute_output".to_owned(), pair(stats.compute_output)),
                ]))
            }
            _ => {
                let url = format!("{}/v2/models/{model}/stats", self.base);
                let response = self.authorize(self.http.get(url)).send().await.ok()?;
                let body: serde_json::Value =
                    response.error_for_status().ok()?.json().await.ok()?;
                let stats = &body["model_stats"][0]["inference_stats"];
                let stages = [
                    "success",
                    "queue",
                    "compute_input",
                    "compute_infer",
                    "compute_output",
                ];
                Some(
                    stages
                        .iter()
                        .map(|stage| {
                            let count = stats[stage]["count"].as_u64().unwrap_or(0);
                            let ns = stats[stage]["ns"].as_u64().unwrap_or(0);
                            (stage.to_string(), (count, ns))
                        })
                        .collect(),
                )
            }
        }
    }
}

/// The `name` of each listed model.
fn names<'a>(models: impl Iterator<Item = &'a serde_json::Value>) -> Vec<String> {
    models
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect()
}

/// One image's request, ready to send.
#[derive(Clone)]
pub enum Prepared {
    Body(Bytes),
    V2 { body: Bytes, header_length: usize },
    Grpc(proto::ModelInferRequest),
}

/// `decode;dur=1.2, queue;dur=3` -> [("decode", 1.2), ("queue", 3.0)]; entries without a
/// duration (`cache;desc=hit`) are skipped.
pub fn parse_server_timing(header: &str) -> Vec<(String, f64)> {
    header
        .split(',')
        .filter_map(|entry| {
            let mut parts = entry.split(';').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?;
            let duration = parts.find_map(|p| p.strip_prefix("dur="))?.parse().ok()?;
            Some((name.to_owned(), duration))
        })
        .collect()
}

/// Per-inference stage times (ms) between two statistics snapshots.
pub fn stage_means(before: &Statistics, after: &Statistics) -> Vec<(String, f64)> {
    after
        .iter()
        .filter_map(|(stage, (count, ns))| {
            let (count0, ns0) = before.get(stage).copied().unwrap_or((0, 0));
            let count = count.checked_sub(count0).filter(|c| *c > 0)?;
            let ns = ns.saturating_sub(ns0);
            Some((stage.clone(), ns as f64 / count as f64 / 1e6))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_timing_entries_with_durations() {
        let parsed =
            parse_server_timing("decode;dur=1.25, queue;dur=3, cache;desc=hit, total;dur=9.5");
        assert_eq!(
            parsed,
            vec![
                ("decode".into(), 1.25),
                ("queue".into(), 3.0),
                ("total".into(), 9.5)
            ]
        );
        assert!(parse_server_timing("").is_empty());
    }

    #[test]
    fn stage_means_are_per_inference_between_snapshots() {
        let before = Statistics::from([("queue".to_owned(), (10, 10_000_000))]);
        let after = Statistics::from([
            ("queue".to_owned(), (20, 30_000_000)),
            ("compute_infer".to_owned(), (0, 0)),
        ]);
        assert_eq!(
            stage_means(&before, &after),
            vec![("queue".to_owned(), 2.0)]
        );
    }
}
