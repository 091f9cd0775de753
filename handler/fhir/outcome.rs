//! OperationOutcome: the FHIR answer for every error and note.

use serde::Serialize;

/// The `OperationOutcome.issue.code` values this service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssueType {
    Invalid,
    NotSupported,
    NotFound,
    Exception,
    Timeout,
    Throttled,
    Transient,
    Forbidden,
    Login,
    Informational,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Information,
}

#[derive(Debug, Clone, Serialize)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueType,
    pub diagnostics: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expression: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "resourceType", rename = "OperationOutcome")]
pub struct OperationOutcome {
    pub issue: Vec<Issue>,
}

impl OperationOutcome {
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self::single(Severity::Error, code, diagnostics, None)
    }

    /// An error about one request parameter, named in `expression` as well as in the text.
    pub fn parameter_error(
        code: IssueType,
        parameter: &str,
        diagnostics: impl Into<String>,
    ) -> Self {
        Self::single(Severity::Error, code, diagnostics, Some(parameter))
    }

    pub fn information(diagnostics: impl Into<String>) -> Self {
        Self::single(
            Severity::Information,
            IssueType::Informational,
            diagnostics,
            None,
        )
    }

    fn single(
        severity: Severity,
        code: IssueType,
        diagnostics: impl Into<String>,
        expression: Option<&str>,
    ) -> Self {
        Self {
            issue: vec![Issue {
                severity,
                code,
                diagnostics: diagnostics.into(),
                expression: expression.map(|e| vec![e.to_string()]).unwrap_or_default(),
            }],
        }
    }

    pub fn diagnostics(&self) -> String {
        self.issue
            .iter()
            .map(|i| i.diagnostics.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("OperationOutcome serialises")
    }
}
