//! The API-key gate (and, under `--tls-client-ca`, the client-certificate gate) in front of
//! every gRPC method but the health checks, which also stamps when each call arrived (for
//! deadlines).

use crate::auth::{ApiKeys, KeyPolicy};
use crate::infer::Inference;
use std::future::Future;
use std::sync::Arc;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// The gate in front of every gRPC call: it stamps when the call arrived (for deadlines), and
/// checks API keys on every method but the health checks (`grpc.health.v1` and the protocol's
/// ServerLive, ServerReady, ModelReady, as `/v2/health/*` over REST). It sees only the call's
/// path and metadata, so a refused call's message is never decoded: UNAUTHENTICATED comes
/// straight back.
#[derive(Clone)]
pub(super) struct RequireApiKey<S> {
    pub(super) inner: S,
    pub(super) keys: Arc<ApiKeys>,
    pub(super) inference: Arc<Inference>,
    /// `--access-log on`: refused calls are logged here (they never reach the service).
    pub(super) access_log: bool,
    /// `--tls-client-ca`: calls on a connection that presented no client certificate are
    /// refused (kubelet's probes present none, so the health methods stay open).
    pub(super) require_client_certificate: bool,
}

/// When a call's headers arrived (stamped by [`RequireApiKey`], which runs first).
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrival(pub(super) std::time::Instant);

fn is_open_method(path: &str) -> bool {
    const SERVICE: &str = "/inference.GRPCInferenceService/";
    path.starts_with("/grpc.health.v1.Health/")
        || path
            .strip_prefix(SERVICE)
            .is_some_and(|method| matches!(method, "ServerLive" | "ServerReady" | "ModelReady"))
}

impl<S, B> tower::Service<http::Request<B>> for RequireApiKey<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request
            .extensions_mut()
            .insert(Arrival(std::time::Instant::now()));
        if !is_open_method(request.uri().path()) {
            match self.check(&request) {
                Ok(Some(key)) => {
                    // The key's limits are the inference service's to apply (`infer`).
                    request.extensions_mut().insert(key);
                }
                Ok(None) => {}
                Err((message, error_type)) => {
                    self.inference.metrics().unauthorized_request("grpc");
                    if self.access_log {
                        log_refusal(&request, error_type);
                    }
                    let refusal = Status::unauthenticated(message).into_http();
                    return Box::pin(std::future::ready(Ok(refusal)));
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

impl<S> RequireApiKey<S> {
    /// The client certificate (under mTLS), then the API key; a refusal's message and
    /// error_type.
    fn check<B>(
        &self,
        request: &http::Request<B>,
    ) -> Result<Option<Arc<KeyPolicy>>, (String, &'static str)> {
        if self.require_client_certificate && !presented_certificate(request.extensions()) {
            return Err((
                CERTIFICATE_REQUIRED.to_owned(),
                "client_certificate_required",
            ));
        }
        let headers = request.headers();
        let value = |name| headers.get(name).map(http::HeaderValue::as_bytes);
        self.keys
            .check(value("authorization"), value("x-api-key"))
            .map_err(|err| (err.to_string(), err.error_type()))
    }
}

const CERTIFICATE_REQUIRED: &str = "a client certificate is required: this server checks them \
     (--tls-client-ca); connect with a certificate its CA signed";

/// The call's connection presented a client certificate in its TLS handshake (one that reached
/// a call was verified there: an unverified one fails the handshake).
fn presented_certificate(extensions: &http::Extensions) -> bool {
    extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .is_some_and(|info| info.peer_certs().is_some())
}

/// The client's address, over TCP or TLS.
fn client_address(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
}

/// The access log's line for a call refused before its message was read.
fn log_refusal<B>(request: &http::Request<B>, error_type: &'static str) {
    let client =
        client_address(request.extensions()).map_or_else(|| "-".to_owned(), |a| a.to_string());
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
    };
    crate::access::log(&crate::access::AccessRecord {
        request_id: "-",
        trace_id: crate::access::trace_id(header("traceparent")).unwrap_or("-"),
        client,
        protocol: "grpc",
        method: "POST",
        route: request.uri().path(),
        status: format!("{:?}", tonic::Code::Unauthenticated),
        error_type: Some(error_type),
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_health_methods_are_open() {
        assert!(is_open_method("/grpc.health.v1.Health/Check"));
        assert!(is_open_method(
            "/inference.GRPCInferenceService/ServerReady"
        ));
        assert!(is_open_method("/inference.GRPCInferenceService/ModelReady"));
        assert!(!is_open_method(
            "/inference.GRPCInferenceService/ModelInfer"
        ));
        assert!(!is_open_method(
            "/inference.GRPCInferenceService/ModelMetadata"
        ));
        assert!(!is_open_method("/other.Service/ServerLive"));
    }
}
