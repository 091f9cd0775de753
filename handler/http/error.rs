//! The one place where errors become HTTP statuses and OperationOutcomes.

use warp::http::StatusCode;

use crate::export::ExportError;
use crate::fhir::{IssueType, OperationOutcome};
use crate::jobs::JobError;
use crate::storage::StorageError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub outcome: OperationOutcome,
}

impl ApiError {
    pub fn new(status: StatusCode, code: IssueType, message: impl Into<String>) -> Self {
        Self {
            status,
            outcome: OperationOutcome::error(code, message),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, IssueType::NotFound, message)
    }
}

impl From<ExportError> for ApiError {
    fn from(error: ExportError) -> Self {
        match error {
            ExportError::Request(e) => {
                let code = if e.not_supported {
                    IssueType::NotSupported
                } else {
                    IssueType::Invalid
                };
                ApiError {
                    status: StatusCode::BAD_REQUEST,
                    outcome: OperationOutcome::parameter_error(code, &e.parameter, e.message),
                }
            }
            ExportError::NotFound(message) => ApiError::not_found(message),
            ExportError::Source(
                e @ (crate::source::SourceError::Remote(_)
                | crate::source::SourceError::Unsupported(_)),
            ) => {
                tracing::warn!(error = %e, "FHIR source failed");
                ApiError::new(StatusCode::BAD_GATEWAY, IssueType::Exception, e.to_string())
            }
            ExportError::Storage(
                e @ (StorageError::Denied { .. } | StorageError::Service { .. }),
            )
            | ExportError::Jobs(JobError::Storage(
                e @ (StorageError::Denied { .. } | StorageError::Service { .. }),
            )) => {
                tracing::error!(error = %e, "export storage unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    IssueType::Transient,
                    e.to_string(),
                )
            }
            ExportError::Cancelled(id) => ApiError::not_found(format!("export {id} was cancelled")),
            other => {
                tracing::error!(error = %other, "request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    IssueType::Exception,
                    other.to_string(),
                )
            }
        }
    }
}

impl From<crate::jobs::JobError> for ApiError {
    fn from(error: crate::jobs::JobError) -> Self {
        ExportError::from(error).into()
    }
}

impl From<crate::storage::StorageError> for ApiError {
    fn from(error: crate::storage::StorageError) -> Self {
        ExportError::from(error).into()
    }
}

impl From<crate::export::RequestError> for ApiError {
    fn from(error: crate::export::RequestError) -> Self {
        ExportError::from(error).into()
    }
}
