//! `grpc.health.v1`, kept in step with the server's readiness.

use crate::infer::Inference;
use std::sync::Arc;
use tonic_health::ServingStatus;

/// Keep `grpc.health.v1` in step with readiness: the whole server ("") and the inference
/// service are SERVING once every model is ready, NOT_SERVING before that and while shutting
/// down.
pub(super) async fn report_health(
    health: tonic_health::server::HealthReporter,
    inference: Arc<Inference>,
) {
    const SERVICE: &str = "inference.GRPCInferenceService";
    let mut last = None;
    loop {
        let status = if inference.all_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            health.set_service_status(SERVICE, status).await;
            last = Some(status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
