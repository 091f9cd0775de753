//! OperationOutcome: the FHIR answer for every error and note.

use serde::Serialize;

/// The `OperationOutcome.issue.code` values this service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssueType {
    Invalid,
    NotSupported,
    NotFound,
    Deleted,
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

/// The texts of an OperationOutcome body (each issue's `diagnostics`, else `details.text`), or
/// the start of whatever came back.
pub fn texts_in(body: &[u8]) -> String {
    let outcome: Option<String> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let issues = v.get("issue")?.as_array()?;
            let texts: Vec<String> = issues
                .iter()
                .filter_map(|i| {
                    i.get("diagnostics")
                        .or_else(|| i.pointer("/details/text"))
                        .and_then(|d| d.as_str())
                        .map(str::to_string)
                })
                .collect();
            (!texts.is_empty()).then(|| texts.join("; "))
        });
    outcome.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        if text.trim().is_empty() {
            "no details".into()
        } else {
            text
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_outcome_is_read_as_its_texts_not_raw_json() {
        let medplum = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","details":{"text":"Unknown search parameter"}}]}"#;
        assert_eq!(texts_in(medplum), "Unknown search parameter");
        let two = br#"{"resourceType":"OperationOutcome","issue":[{"diagnostics":"a"},{"diagnostics":"b"}]}"#;
        assert_eq!(texts_in(two), "a; b");
        assert_eq!(texts_in(b"  "), "no details");
    }
}
