//! The access log (`--access-log on`, the default): one structured line per request, in the
//! text or JSON log format, with who asked (request id, trace id, client address), what (the
//! protocol, method, route, model and version, images, bytes each way), how it ended (status,
//! `error_type`, cache) and where its time went (the stage times and the total).
//!
//! Lines go to the `visionserve::access` target at INFO, so `--log` can route or silence them
//! like any other (`--log info,visionserve::access=off`). Probes and scrapes (`/health/*`,
//! `/v2/health/*`, `/metrics`) log at DEBUG: an orchestrator polls them every few seconds.
//! API keys, bodies and image content are never logged: nothing here can hold them.

use std::time::Duration;

/// What a served request tells the access log about its answer (handlers add it to their
/// response; errors add only their [`ErrorNote`]).
#[derive(Debug, Clone, Default)]
pub struct AccessNote {
    pub model: String,
    pub version: String,
    pub images: usize,
    /// `hit`, `miss` or `partial` (some images answered from the response cache); `-` when
    /// the cache is off or was not used.
    pub cache: &'static str,
    /// The slowest image's stage times (ms), as `/v1`'s `timing_ms` reports them.
    pub decode_ms: f64,
    pub preprocess_ms: f64,
    pub queue_ms: f64,
    pub inference_ms: f64,
}

/// The `error_type` of a refused or failed request.
#[derive(Debug, Clone, Copy)]
pub struct ErrorNote(pub &'static str);

/// One request, as logged.
#[derive(Debug, Default)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    /// The request's trace id: its span's when traces are exported, else the one the client
    /// sent in W3C `traceparent` (`-` without one).
    pub trace_id: &'a str,
    pub client: String,
    /// `v1`, `v2`, `grpc`, or `http` for the other routes.
    pub protocol: &'static str,
    pub method: &'a str,
    pub route: &'a str,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    /// The HTTP status, or the gRPC code's name.
    pub status: String,
    pub error_type: Option<&'static str>,
    pub note: Option<&'a AccessNote>,
    pub total: Duration,
    /// A probe or scrape: logged at DEBUG.
    pub quiet: bool,
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if valid.
pub fn trace_id(traceparent: Option<&str>) -> Option<&str> {
    let mut parts = traceparent?.trim().split('-');
    let (version, trace, parent) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid =
        hex(version, 2) && hex(trace, 32) && hex(parent, 16) && trace.bytes().any(|b| b != b'0');
    valid.then_some(trace)
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Write `record` as one event of the `visionserve::access` target.
pub fn log(record: &AccessRecord) {
    let default = AccessNote::default();
    let note = record.note.unwrap_or(&default);
    let round = |ms: f64| (ms * 1000.0).round() / 1000.0;
    macro_rules! event {
        ($level:expr) => {
            tracing::event!(
                target: "visionserve::access",
                $level,
                request_id = record.request_id,
                trace_id = record.trace_id,
                client = %record.client,
                protocol = record.protocol,
                method = record.method,
                route = record.route,
                model = if note.model.is_empty() { "-" } else { note.model.as_str() },
                version = if note.version.is_empty() { "-" } else { note.version.as_str() },
                images = note.images,
                bytes_in = %or_dash(record.bytes_in),
                bytes_out = %or_dash(record.bytes_out),
                status = %record.status,
                error_type = record.error_type.unwrap_or("-"),
                cache = if note.cache.is_empty() { "-" } else { note.cache },
                decode_ms = round(note.decode_ms),
                preprocess_ms = round(note.preprocess_ms),
                queue_ms = round(note.queue_ms),
                inference_ms = round(note.inference_ms),
                total_ms = round(record.total.as_secs_f64() * 1e3),
                "access"
            )
        };
    }
    if record.quiet {
        event!(tracing::Level::DEBUG);
    } else {
        event!(tracing::Level::INFO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_only_from_valid_traceparents() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            trace_id(Some(&format!("00-{id}-00f067aa0ba902b7-01"))),
            Some(id)
        );
        assert_eq!(trace_id(None), None);
        assert_eq!(trace_id(Some("00-xyz-00f067aa0ba902b7-01")), None);
        assert_eq!(
            trace_id(Some(&format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)))),
            None
        );
        assert_eq!(trace_id(Some(&format!("00-{id}-short-01"))), None);
    }
}
