//! The one place where errors become HTTP statuses and OperationOutcomes.

use warp::http::{header, HeaderValue, StatusCode};

use crate::export::ExportError;
use crate::fhir::{IssueType, OperationOutcome};
use crate::jobs::JobError;
use crate::storage::StorageError;

/// `Retry-After` of a kickoff refused because too many exports are running.
pub const RETRY_BUSY_SECS: u32 = 10;

/// `Retry-After` while the export storage is full: space comes back on an operator's time.
pub const RETRY_FULL_SECS: u32 = 60;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub outcome: OperationOutcome,
    /// Extra answer headers (`Retry-After`, `WWW-Authenticate`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: IssueType, message: impl Into<String>) -> Self {
        Self {
            status,
            outcome: OperationOutcome::error(code, message),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.push((name, value));
        }
        self
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
                    headers: Vec::new(),
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
            ExportError::Storage(e @ StorageError::Full { .. })
            | ExportError::Jobs(JobError::Storage(e @ StorageError::Full { .. })) => {
                tracing::error!(error = %e, "export storage full");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    IssueType::Transient,
                    e.to_string(),
                )
                .with_header(header::RETRY_AFTER, &RETRY_FULL_SECS.to_string())
            }
            ExportError::Cancelled(id) => ApiError::not_found(format!("export {id} was cancelled")),
            e @ ExportError::TooManyRunning { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                IssueType::Throttled,
                e.to_string(),
            )
            .with_header(header::RETRY_AFTER, &RETRY_BUSY_SECS.to_string()),
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

impl From<crate::auth::AuthError> for ApiError {
    fn from(error: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        let message = error.to_string();
        let challenge = |code: &str| {
            let description = message.replace(['"', '\\'], "'");
            format!(
                r#"Bearer realm="fhir-export", error="{code}", error_description="{description}""#
            )
        };
        match error {
            AuthError::Missing => {
                ApiError::new(StatusCode::UNAUTHORIZED, IssueType::Login, &message)
                    .with_header(header::WWW_AUTHENTICATE, r#"Bearer realm="fhir-export""#)
            }
            AuthError::Invalid(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, IssueType::Login, &message)
                    .with_header(header::WWW_AUTHENTICATE, &challenge("invalid_token"))
            }
            AuthError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, IssueType::Forbidden, &message)
                    .with_header(header::WWW_AUTHENTICATE, &challenge("insufficient_scope"))
            }
            AuthError::KeysUnavailable(_) | AuthError::DiscoveryUnavailable(_) => {
                tracing::error!(error = %message, "token issuer unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    IssueType::Transient,
                    message,
                )
                .with_header(header::RETRY_AFTER, "60")
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
