//! The status table of gRPC: each v2 error as a gRPC code.

use crate::error::InferError;
use crate::v2::V2Error;
use tonic::Status;

/// The gRPC status of a v2 error.
pub fn status(err: &V2Error) -> Status {
    let message = err.to_string();
    match err {
        V2Error::InvalidArgument(_) => Status::invalid_argument(message),
        V2Error::Infer(err) => match err {
            InferError::ModelNotFound { .. } => Status::not_found(message),
            InferError::NotReady { .. } | InferError::ShuttingDown => Status::unavailable(message),
            InferError::TooManyRequests { .. }
            | InferError::Overloaded { .. }
            | InferError::MemoryBusy { .. }
            | InferError::OverMemoryBudget { .. }
            | InferError::KeyLimit { .. } => Status::resource_exhausted(message),
            InferError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
            InferError::Internal => Status::internal(message),
            InferError::NoImages
            | InferError::TooManyImages { .. }
            | InferError::Image { .. }
            | InferError::InvalidInput(_) => Status::invalid_argument(message),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_grpc_codes() {
        let code = |err: V2Error| status(&err).code();
        assert_eq!(
            code(V2Error::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(InferError::NotReady { model: "m".into() }.into()),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(
                InferError::Overloaded {
                    model: "m".into(),
                    limit: 1,
                    retry_after_s: 1
                }
                .into()
            ),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            code(
                InferError::ModelNotFound {
                    name: "x".into(),
                    available: "m".into()
                }
                .into()
            ),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(InferError::NoImages.into()),
            tonic::Code::InvalidArgument
        );
    }
}
