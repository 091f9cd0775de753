//! An anonymizer configuration, read and checked as Microsoft's engine (4.1.1) reads it:
//! `fhirVersion` (absent, empty or `R4`), `processingErrors` (`raise`, `skip`), `fhirPathRules`
//! (each a `path` and a `method`, with the method's settings) and `parameters`. What the engine
//! refuses is refused here with the reason, naming the rule or parameter; duplicate keys too, which
//! it would take silently (the last one wins), since a privacy control must not be ambiguous.
//!
//! Its reader (Newtonsoft.Json) takes comments and trailing commas, and users move configurations
//! between Azure and here, so the text is first brought to strict JSON; a value is never changed.

use serde_json::{Map, Value};

use super::rule_path::RulePath;
use crate::fhir::json::Json;

/// A configuration that loaded: rules in file order, and the parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AnonymizationConfig {
    pub rules: Vec<Rule>,
    pub processing_errors: ProcessingErrors,
    pub parameters: Parameters,
}

/// One `fhirPathRules` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The FHIRPath selecting the nodes.
    pub path: String,
    pub method: Method,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Keep,
    Redact,
    DateShift,
    CryptoHash,
    Encrypt,
    /// `replaceWith`: its JSON text, compact, every value as written (a string, or an object for
    /// a complex node).
    Substitute {
        replace_with: String,
    },
    Perturb {
        span: f64,
        range: RangeType,
        round_to: u32,
    },
    /// `cases`: (condition, value) FHIRPath expressions in file order.
    Generalize {
        cases: Vec<(String, String)>,
        other_values: OtherValues,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeType {
    Fixed,
    Proportional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherValues {
    Redact,
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessingErrors {
    /// A resource that cannot be de-identified fails the export.
    Raise,
    /// It is written as a bare resource marked redacted.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateShiftScope {
    Resource,
    File,
    Folder,
}

/// `parameters`; keys left empty get a random value per export (not here).
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    pub date_shift_key: Option<String>,
    pub date_shift_scope: DateShiftScope,
    pub date_shift_fixed_offset_in_days: Option<i32>,
    pub crypto_hash_key: Option<String>,
    pub encrypt_key: Option<String>,
    pub enable_partial_ages_for_redact: bool,
    pub enable_partial_dates_for_redact: bool,
    pub enable_partial_zip_codes_for_redact: bool,
    pub restricted_zip_code_tabulation_areas: Vec<String>,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            date_shift_key: None,
            date_shift_scope: DateShiftScope::Resource,
            date_shift_fixed_offset_in_days: None,
            crypto_hash_key: None,
            encrypt_key: None,
            enable_partial_ages_for_redact: false,
            enable_partial_dates_for_redact: false,
            enable_partial_zip_codes_for_redact: false,
            restricted_zip_code_tabulation_areas: Vec::new(),
        }
    }
}

/// Why a configuration was refused (for a 400 at kickoff). Holds no key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn refused(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

impl AnonymizationConfig {
    /// Reads and checks a configuration file's bytes (a UTF-8 byte order mark is allowed).
    pub fn parse(bytes: &[u8]) -> Result<AnonymizationConfig, ConfigError> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let text = std::str::from_utf8(bytes)
            .map_err(|_| refused("the configuration is not UTF-8 text"))?;
        let strict = strict_json(text)?;
        let tree = Json::parse(&strict)
            .map_err(|e| refused(format!("the configuration is not valid JSON: {e}")))?;
        refuse_duplicate_keys(&tree, "")?;
        let Json::Object(members) = &tree else {
            return Err(refused("the configuration is not a JSON object"));
        };
        let value = tree.to_value();
        let top = value.as_object().expect("checked to be an object");
        check_version(top.get("fhirVersion"))?;
        let processing_errors = match top.get("processingErrors") {
            None | Some(Value::Null) => ProcessingErrors::Raise,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("raise") => ProcessingErrors::Raise,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("skip") => ProcessingErrors::Skip,
            Some(other) => {
                return Err(refused(format!(
                    "processingErrors {other} is not raise or skip"
                )))
            }
        };
        let rules_tree = members
            .iter()
            .find(|(key, _)| key == "fhirPathRules")
            .map(|(_, rules)| rules);
        let rules = match (top.get("fhirPathRules"), rules_tree) {
            (Some(Value::Array(rules)), Some(Json::Array(trees))) => rules
                .iter()
                .zip(trees)
                .enumerate()
                .map(|(at, (rule, tree))| parse_rule(at, rule, tree))
                .collect::<Result<Vec<Rule>, ConfigError>>()?,
            (None | Some(Value::Null), _) => {
                return Err(refused(
                    "the configuration has no fhirPathRules: give the rules to apply",
                ))
            }
            _ => return Err(refused("fhirPathRules is not a list of rules")),
        };
        let parameters = match top.get("parameters") {
            None | Some(Value::Null) => Parameters::default(),
            Some(Value::Object(parameters)) => parse_parameters(parameters)?,
            Some(_) => return Err(refused("parameters is not an object")),
        };
        check_expressions(&rules)?;
        Ok(AnonymizationConfig {
            rules,
            processing_errors,
            parameters,
        })
    }
}

/// `fhirVersion`: absent, null, empty or `R4` (any case).
fn check_version(version: Option<&Value>) -> Result<(), ConfigError> {
    match version {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(v)) if v.is_empty() || v.eq_ignore_ascii_case("R4") => Ok(()),
        Some(Value::String(v)) => Err(refused(format!(
            "fhirVersion {v:?} is not supported: this server de-identifies R4 (give R4, or leave it empty)"
        ))),
        Some(other) => Err(refused(format!("fhirVersion {other} is not a string"))),
    }
}

fn parse_rule(at: usize, rule: &Value, tree: &Json<'_>) -> Result<Rule, ConfigError> {
    let Value::Object(settings) = rule else {
        return Err(refused(format!("fhirPathRules[{at}] is not an object")));
    };
    let (Some(path), Some(method)) = (settings.get("path"), settings.get("method")) else {
        return Err(refused(format!(
            "fhirPathRules[{at}] lacks its path or its method"
        )));
    };
    let (Value::String(path), Value::String(method)) = (path, method) else {
        return Err(refused(format!(
            "fhirPathRules[{at}]: path and method are strings"
        )));
    };
    let rule_name = format!("fhirPathRules[{at}] ({})", shortened(path));
    let method = match method.to_ascii_lowercase().as_str() {
        "keep" => Method::Keep,
        "redact" => Method::Redact,
        "dateshift" => Method::DateShift,
        "cryptohash" => Method::CryptoHash,
        "encrypt" => Method::Encrypt,
        "substitute" => {
            let Some(replace_with) = tree.get("replaceWith") else {
                return Err(refused(format!("{rule_name}: substitute needs replaceWith")));
            };
            Method::Substitute {
                replace_with: String::from_utf8(replace_with.to_bytes())
                    .expect("JSON text is UTF-8"),
            }
        }
        "perturb" => parse_perturb(&rule_name, settings)?,
        "generalize" => parse_generalize(&rule_name, settings)?,
        _ => {
            return Err(refused(format!(
                "{rule_name}: method {method:?} is not one of keep, redact, dateShift, cryptoHash, encrypt, substitute, perturb, generalize"
            )))
        }
    };
    Ok(Rule {
        path: path.clone(),
        method,
    })
}

/// A setting's text as the engine converts it: a string as it is, a number as written.
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Every rule's path and every generalize case must be FHIRPath the engine evaluates.
fn check_expressions(rules: &[Rule]) -> Result<(), ConfigError> {
    for (at, rule) in rules.iter().enumerate() {
        let name = format!("fhirPathRules[{at}] ({:?})", shortened(&rule.path));
        RulePath::parse(&rule.path).map_err(|error| {
            refused(format!("{name}: the path is not usable FHIRPath: {error}"))
        })?;
        if let Method::Generalize { cases, .. } = &rule.method {
            for (condition, value) in cases {
                for expression in [condition, value] {
                    super::fhirpath::parse(expression).map_err(|error| {
                        refused(format!(
                            "{name}: the case expression {:?} is not usable FHIRPath: {error}",
                            shortened(expression)
                        ))
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// A configuration's text quoted in a message: its first 100 characters.
fn shortened(text: &str) -> String {
    const SHOWN: usize = 100;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

fn parse_perturb(rule: &str, settings: &Map<String, Value>) -> Result<Method, ConfigError> {
    let span = match settings.get("span") {
        None => return Err(refused(format!("{rule}: perturb needs a span"))),
        Some(span) => text_of(span)
            .and_then(|text| text.trim().parse::<f64>().ok())
            .filter(|span| span.is_finite() && *span >= 0.0)
            .ok_or_else(|| refused(format!("{rule}: span {span} is not a number of 0 or more")))?,
    };
    // The noise, up to half the span, is a .NET decimal: at most 79,228,162,514,264,337,593,543,950,335.
    let largest_noise = f64::try_from(rust_decimal::Decimal::MAX).expect("a finite number");
    if span / 2.0 > largest_noise {
        return Err(refused(format!(
            "{rule}: span {span} gives noise beyond the largest decimal ({largest_noise:e})"
        )));
    }
    let round_to = match settings.get("roundTo") {
        None => 2,
        Some(round_to) => text_of(round_to)
            .and_then(|text| text.trim().parse::<i64>().ok())
            .filter(|n| (0..=28).contains(n))
            .ok_or_else(|| {
                refused(format!(
                    "{rule}: roundTo {round_to} is not a whole number from 0 to 28"
                ))
            })? as u32,
    };
    let range = match settings.get("rangeType") {
        None => RangeType::Fixed,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("fixed") => RangeType::Fixed,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("proportional") => RangeType::Proportional,
        Some(other) => {
            return Err(refused(format!(
                "{rule}: rangeType {other} is not fixed or proportional"
            )))
        }
    };
    Ok(Method::Perturb {
        span,
        range,
        round_to,
    })
}

fn parse_generalize(rule: &str, settings: &Map<String, Value>) -> Result<Method, ConfigError> {
    let cases = match settings.get("cases") {
        None => return Err(refused(format!("{rule}: generalize needs cases"))),
        Some(Value::Object(cases)) => cases
            .iter()
            .map(|(condition, value)| match value {
                Value::String(value) => Ok((condition.clone(), value.clone())),
                other => Err(refused(format!(
                    "{rule}: the value of case {condition:?} is {other}, not a FHIRPath expression"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(refused(format!(
                "{rule}: cases is not an object of condition: value expressions"
            )))
        }
    };
    let other_values = match settings.get("otherValues") {
        None => OtherValues::Redact,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("redact") => OtherValues::Redact,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("keep") => OtherValues::Keep,
        Some(other) => {
            return Err(refused(format!(
                "{rule}: otherValues {other} is not redact or keep"
            )))
        }
    };
    Ok(Method::Generalize {
        cases,
        other_values,
    })
}

fn parse_parameters(parameters: &Map<String, Value>) -> Result<Parameters, ConfigError> {
    let text = |name: &str| -> Result<Option<String>, ConfigError> {
        match parameters.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(refused(format!("parameters.{name} is not a string"))),
        }
    };
    let flag = |name: &str| -> Result<bool, ConfigError> {
        match parameters.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(refused(format!("parameters.{name} is not true or false"))),
        }
    };
    let date_shift_scope = match parameters.get("dateShiftScope") {
        None | Some(Value::Null) => DateShiftScope::Resource,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("resource") => DateShiftScope::Resource,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("file") => DateShiftScope::File,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("folder") => DateShiftScope::Folder,
        Some(other) => {
            return Err(refused(format!(
                "parameters.dateShiftScope {other} is not resource, file or folder"
            )))
        }
    };
    let date_shift_fixed_offset_in_days = match parameters.get("dateShiftFixedOffsetInDays") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(
            || {
                refused(format!(
                    "parameters.dateShiftFixedOffsetInDays {n} is not a whole number of days"
                ))
            },
        )?),
        Some(other) => {
            return Err(refused(format!(
                "parameters.dateShiftFixedOffsetInDays {other} is not a whole number of days"
            )))
        }
    };
    let encrypt_key = text("encryptKey")?;
    if let Some(key) = &encrypt_key {
        let bits = key.len() * 8;
        if ![128, 192, 256].contains(&bits) {
            return Err(refused(format!(
                "parameters.encryptKey is {bits} bits; give a key of 128, 192 or 256 bits (16, 24 or 32 bytes of UTF-8)"
            )));
        }
    }
    let areas = match parameters.get("restrictedZipCodeTabulationAreas") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(areas)) => areas
            .iter()
            .map(|area| match area {
                Value::String(area) => Ok(area.clone()),
                other => Err(refused(format!(
                    "parameters.restrictedZipCodeTabulationAreas holds {other}, not a string"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(refused(
                "parameters.restrictedZipCodeTabulationAreas is not a list of strings",
            ))
        }
    };
    Ok(Parameters {
        date_shift_key: text("dateShiftKey")?,
        date_shift_scope,
        date_shift_fixed_offset_in_days,
        crypto_hash_key: text("cryptoHashKey")?,
        encrypt_key,
        enable_partial_ages_for_redact: flag("enablePartialAgesForRedact")?,
        enable_partial_dates_for_redact: flag("enablePartialDatesForRedact")?,
        enable_partial_zip_codes_for_redact: flag("enablePartialZipCodesForRedact")?,
        restricted_zip_code_tabulation_areas: areas,
    })
}

/// Refuses an object that names a key twice, at any depth (`at`: where, for the message).
fn refuse_duplicate_keys(tree: &Json<'_>, at: &str) -> Result<(), ConfigError> {
    match tree {
        Json::Object(members) => {
            for (index, (key, value)) in members.iter().enumerate() {
                let here = format!("{at}/{key}");
                if members[..index].iter().any(|(earlier, _)| earlier == key) {
                    return Err(refused(format!(
                        "the configuration gives {here} twice; give each key once"
                    )));
                }
                refuse_duplicate_keys(value, &here)?;
            }
            Ok(())
        }
        Json::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(index, item)| refuse_duplicate_keys(item, &format!("{at}/{index}"))),
        Json::Leaf(_) => Ok(()),
    }
}

/// The text without what Newtonsoft.Json reads past and JSON does not allow: `//` and `/* */`
/// comments, and a comma before a closing `]` or `}`. Strings are copied as they are.
fn strict_json(text: &str) -> Result<String, ConfigError> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    // Where the last comma outside strings went, while only blanks followed it.
    let mut pending_comma: Option<usize> = None;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'"' => {
                let start = at;
                at += 1;
                while at < bytes.len() && bytes[at] != b'"' {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                at = (at + 1).min(bytes.len());
                out.push_str(&text[start..at]);
                pending_comma = None;
            }
            b'/' if bytes.get(at + 1) == Some(&b'/') => {
                at = text[at..].find('\n').map_or(bytes.len(), |end| at + end);
            }
            b'/' if bytes.get(at + 1) == Some(&b'*') => {
                let end = text[at + 2..]
                    .find("*/")
                    .ok_or_else(|| refused("the configuration has a comment that does not end"))?;
                at += 2 + end + 2;
            }
            b',' => {
                pending_comma = Some(out.len());
                out.push(',');
                at += 1;
            }
            b']' | b'}' => {
                if let Some(comma) = pending_comma.take() {
                    out.remove(comma);
                }
                out.push(bytes[at] as char);
                at += 1;
            }
            byte if byte.is_ascii_whitespace() => {
                out.push(byte as char);
                at += 1;
            }
            _ => {
                let next = text[at..].chars().next().expect("inside the text");
                out.push(next);
                at += next.len_utf8();
                pending_comma = None;
            }
        }
    }
    Ok(out)
}

/// The keys the methods use; those a configuration leaves empty are filled by the caller (one
/// random value per export).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Keys {
    pub date_shift: String,
    pub crypto_hash: String,
    pub encrypt: String,
}

impl Keys {
    /// The configuration's keys, each empty one replaced by a fresh random key.
    pub fn for_export(config: &AnonymizationConfig) -> Keys {
        let random = || {
            use rand::Rng;
            let bytes: [u8; 16] = rand::rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let parameters = &config.parameters;
        Keys {
            date_shift: parameters.date_shift_key.clone().unwrap_or_else(random),
            crypto_hash: parameters.crypto_hash_key.clone().unwrap_or_else(random),
            // 32 hex characters: as UTF-8 bytes (the engine's reading) an AES-256 key.
            encrypt: parameters.encrypt_key.clone().unwrap_or_else(random),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(config: &str) -> String {
        AnonymizationConfig::parse(config.as_bytes()).unwrap_err().0
    }

    #[test]
    fn a_configuration_loads_with_its_rules_in_order() {
        let config = AnonymizationConfig::parse(
            "\u{feff}{\"fhirVersion\": \"r4\", // the version\n \"fhirPathRules\": [
                {\"path\": \"Patient.name\", \"method\": \"Redact\"},
                {\"path\": \"Patient.gender\", \"method\": \"substitute\", \"replaceWith\": {\"a\": 1.50}},
                {\"path\": \"Condition.onset as Age\", \"method\": \"perturb\", \"span\": \"3\", \"roundTo\": 1},
                {\"path\": \"Patient.birthDate\", \"method\": \"generalize\", \"cases\": {\"$this < @2000\": \"@1990\"}},
            ], \"parameters\": {\"encryptKey\": \"0123456789abcdef\", \"enablePartialDatesForRedact\": true}}"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(config.rules.len(), 4);
        assert_eq!(config.rules[0].method, Method::Redact);
        assert_eq!(
            config.rules[1].method,
            Method::Substitute {
                replace_with: "{\"a\":1.50}".into()
            }
        );
        assert_eq!(
            config.rules[2].method,
            Method::Perturb {
                span: 3.0,
                range: RangeType::Fixed,
                round_to: 1
            }
        );
        assert!(config.parameters.enable_partial_dates_for_redact);
        assert_eq!(config.processing_errors, ProcessingErrors::Raise);
    }

    #[test]
    fn what_the_engine_refuses_is_refused_with_the_reason() {
        for (config, reason) in [
            ("{\"fhirPathRules\": []", "not valid JSON"),
            ("{\"fhirVersion\": \"Stu3\", \"fhirPathRules\": []}", "Stu3"),
            ("{\"abc\": 1}", "no fhirPathRules"),
            ("{\"fhirPathRules\": [{\"path\": \"Patient\", \"method\": \"skip\"}]}", "\"skip\""),
            ("{\"fhirPathRules\": [{\"path\": \"Patient\", \"method\": \"substitute\"}]}", "replaceWith"),
            ("{\"fhirPathRules\": [{\"path\": \"Patient\"}]}", "method"),
            ("{\"fhirPathRules\": [{\"path\": \"P\", \"method\": \"perturb\"}]}", "span"),
            ("{\"fhirPathRules\": [{\"path\": \"P\", \"method\": \"perturb\", \"span\": \"-1\"}]}", "span"),
            ("{\"fhirPathRules\": [{\"path\": \"P\", \"method\": \"perturb\", \"span\": 1, \"roundTo\": \"29\"}]}", "roundTo"),
            ("{\"fhirPathRules\": [{\"path\": \"P\", \"method\": \"perturb\", \"span\": 1, \"rangeType\": \"x\"}]}", "rangeType"),
            ("{\"fhirPathRules\": [{\"path\": \"P\", \"method\": \"generalize\"}]}", "cases"),
            ("{\"fhirPathRules\": [{\"path\": \"P\", \"method\": \"generalize\", \"cases\": {}, \"otherValues\": \"x\"}]}", "otherValues"),
            ("{\"fhirPathRules\": [], \"parameters\": {\"encryptKey\": \"0123456789\"}}", "80 bits"),
            ("{\"fhirPathRules\": [], \"fhirPathRules\": []}", "/fhirPathRules twice"),
            ("{\"fhirPathRules\": [{\"path\": \"P\", \"method\": \"redact\", \"method\": \"keep\"}]}", "/fhirPathRules/0/method twice"),
            ("{\"fhirPathRules\": [], \"processingErrors\": \"ignore\"}", "processingErrors"),
            ("{\"fhirPathRules\": [], \"parameters\": {\"enablePartialAgesForRedact\": \"yes\"}}", "enablePartialAgesForRedact"),
            ("{\"fhirPathRules\": [] /* open", "does not end"),
        ] {
            let error = error_of(config);
            assert!(error.contains(reason), "{config}: {error}");
        }
    }

    #[test]
    fn comments_and_trailing_commas_go_and_strings_stay() {
        let strict = strict_json(
            "{\"a\": \"x, ]//\", // note\n \"b\": [1, 2,], /* c */ \"c\": {\"d\": 1,},}",
        )
        .unwrap();
        let value: Value = serde_json::from_str(&strict).unwrap();
        assert_eq!(value["a"], "x, ]//");
        assert_eq!(value["b"], serde_json::json!([1, 2]));
        assert_eq!(value["c"]["d"], 1);
    }
}
