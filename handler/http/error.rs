//! The one place where errors become HTTP statuses and OperationOutcomes.

use warp::http::{header, HeaderValue, StatusCode};

use crate::export::ExportError;
use crate::fault::Fault;
use crate::fhir::{IssueType, OperationOutcome};

/// `Retry-After` of a kickoff refused because too many exports are running.
pub const RETRY_BUSY_SECS: u32 = 10;

/// `Retry-After` while the export storage is full: space comes back on an operator's time.
pub const RETRY_FULL_SECS: u32 = 60;
/// `Retry-After` when the export storage refuses or cannot be reached: a role assignment that has
/// not reached it yet comes within minutes.
pub const RETRY_UNAVAILABLE_SECS: u32 = 30;

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
        if let ExportError::Request(e) = error {
            let code = match e.not_supported {
                true => IssueType::NotSupported,
                false => IssueType::Invalid,
            };
            return ApiError {
                status: StatusCode::BAD_REQUEST,
                outcome: OperationOutcome::parameter_error(code, &e.parameter, e.message),
                headers: Vec::new(),
            };
        }
        let (fault, message) = (error.fault(), error.to_string());
        match fault {
            Fault::Upstream => tracing::warn!(error = %message, "FHIR source failed"),
            Fault::Unavailable => tracing::error!(error = %message, "export storage unavailable"),
            Fault::Full => tracing::error!(error = %message, "export storage full"),
            Fault::Internal => tracing::error!(error = %message, "request failed"),
            Fault::Invalid | Fault::NotFound | Fault::Busy => {}
        }
        ApiError::of_fault(fault, message)
    }
}

impl ApiError {
    /// The answer to a failure of this kind: the one table from faults to statuses.
    pub fn of_fault(fault: Fault, message: String) -> ApiError {
        match fault {
            Fault::Invalid => ApiError::new(StatusCode::BAD_REQUEST, IssueType::Invalid, message),
            Fault::NotFound => ApiError::not_found(message),
            Fault::Busy => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, IssueType::Throttled, message)
                    .with_header(header::RETRY_AFTER, &RETRY_BUSY_SECS.to_string())
            }
            Fault::Upstream => {
                ApiError::new(StatusCode::BAD_GATEWAY, IssueType::Exception, message)
            }
            // Storage that refuses (a role assigned moments ago) or cannot be reached: the
            // client is told when to try again.
            Fault::Unavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                IssueType::Transient,
                message,
            )
            .with_header(header::RETRY_AFTER, &RETRY_UNAVAILABLE_SECS.to_string()),
            Fault::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                IssueType::Transient,
                message,
            )
            .with_header(header::RETRY_AFTER, &RETRY_FULL_SECS.to_string()),
            Fault::Internal => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                IssueType::Exception,
                message,
            ),
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

impl From<crate::export::jobs::JobError> for ApiError {
    fn from(error: crate::export::jobs::JobError) -> Self {
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
