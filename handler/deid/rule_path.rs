//! A rule's path as the engine reads it: the resource type it starts with, and how its nodes are
//! found. The configuration check and the engine both read paths here, so a path the check accepts
//! is one the engine can evaluate.

use std::sync::OnceLock;

use regex::Regex;

use super::fhirpath::{self, Expr, PathError};

/// How a rule finds its nodes in a resource.
pub enum Matcher {
    /// `nodesByType('T')` or `nodesByType('T').name`.
    ByType(String, Option<String>),
    ByName(String, Option<String>),
    /// The path is the resource type itself (`Patient`, `Resource`).
    Resource,
    Path(Expr),
}

/// A rule's path, read.
pub struct RulePath {
    /// The type the path starts with (`Patient` of `Patient.name`); empty for a path without one.
    pub resource_type: String,
    pub matcher: Matcher,
}

fn type_rule() -> &'static Regex {
    static RULE: OnceLock<Regex> = OnceLock::new();
    RULE.get_or_init(|| {
        Regex::new(r#"^nodesBy(?<by>Type|Name)\(['"](?<key>[A-Za-z0-9]+)['"]\)(\.(?<member>[A-Za-z0-9]+))?$"#)
            .expect("a valid regex")
    })
}

fn path_rule() -> &'static Regex {
    static RULE: OnceLock<Regex> = OnceLock::new();
    RULE.get_or_init(|| {
        Regex::new(r"^(?<type>[A-Z][a-zA-Z]*)?(\.)?(?<expression>.*?)$").expect("a valid regex")
    })
}

impl RulePath {
    /// Splits the type off as Microsoft's engine does, and parses the rest as FHIRPath.
    pub fn parse(path: &str) -> Result<RulePath, PathError> {
        let (resource_type, expression) = match path_rule().captures(path) {
            Some(found) => (
                found.name("type").map_or("", |m| m.as_str()).to_string(),
                found.name("expression").map_or("", |m| m.as_str()),
            ),
            None => (String::new(), path),
        };
        let expression = if expression.is_empty() {
            path
        } else {
            expression
        };
        let matcher = if let Some(found) = type_rule().captures(path) {
            let key = found["key"].to_string();
            let member = found.name("member").map(|m| m.as_str().to_string());
            match &found["by"] {
                "Type" => Matcher::ByType(key, member),
                _ => Matcher::ByName(key, member),
            }
        } else if path == resource_type {
            Matcher::Resource
        } else {
            Matcher::Path(fhirpath::parse(expression)?)
        };
        Ok(RulePath {
            resource_type,
            matcher,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_type_is_split_off_as_the_engine_does() {
        let path = RulePath::parse("Patient.name.given").unwrap();
        assert_eq!(path.resource_type, "Patient");
        assert!(
            matches!(path.matcher, Matcher::Path(Expr::Member(Some(_), ref n)) if n == "given")
        );
        assert!(matches!(
            RulePath::parse("Resource").unwrap().matcher,
            Matcher::Resource
        ));
        assert!(matches!(
            RulePath::parse("nodesByType('HumanName').family").unwrap().matcher,
            Matcher::ByType(ref t, Some(ref m)) if t == "HumanName" && m == "family"
        ));
        // FHIRPath reads `Patient .name` as `Patient.name`; the engine's split leaves ` .name`,
        // which does not parse: refused here, where the configuration is read.
        assert!(RulePath::parse("Patient .name").is_err());
    }
}
