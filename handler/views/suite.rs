//! The SQL on FHIR v2 conformance suite: each test file's fixtures run through each test's view,
//! the rows compared with `expect` as the suite's README says (order aside), `expectColumns` by
//! name and order, `expectError` met by a view refused or failing. The report is the format
//! sql-on-fhir.org reads (`test-report.schema.json`).

use std::path::Path;

use serde_json::{json, Map, Value};

use super::{rows_of, View};

/// One test's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub file: String,
    pub name: String,
    pub tags: Vec<String>,
    /// `None`: passed; else why not.
    pub failure: Option<String>,
}

/// Runs every `*.json` test file of `dir`, in name order.
pub fn run(dir: &Path) -> Result<Vec<Outcome>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut outcomes = Vec::new();
    for path in files {
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let suite: Value = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let resources: Vec<Vec<u8>> = suite["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|resource| serde_json::to_vec(resource).expect("JSON"))
            .collect();
        for test in suite["tests"].as_array().into_iter().flatten() {
            outcomes.push(Outcome {
                file: file.clone(),
                name: test["title"].as_str().unwrap_or_default().to_string(),
                tags: test["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect(),
                failure: check(test, &resources).err(),
            });
        }
    }
    Ok(outcomes)
}

/// The report of `outcomes` in the format of `test-report.schema.json`.
pub fn report(outcomes: &[Outcome]) -> Value {
    let mut files = Map::new();
    for outcome in outcomes {
        let mut result = json!({"passed": outcome.failure.is_none()});
        if let Some(failure) = &outcome.failure {
            result["error"] = failure.clone().into();
        }
        let entry = files
            .entry(outcome.file.clone())
            .or_insert_with(|| json!({"tests": []}));
        entry["tests"]
            .as_array_mut()
            .expect("an array")
            .push(json!({"name": outcome.name, "result": result}));
    }
    Value::Object(files)
}

fn check(test: &Value, resources: &[Vec<u8>]) -> Result<(), String> {
    let expects_error = test.get("expectError").and_then(Value::as_bool) == Some(true);
    let rows = View::parse(&test["view"]).and_then(|view| {
        let mut rows = Vec::new();
        for resource in resources {
            rows.extend(rows_of(&view, resource)?);
        }
        Ok((view, rows))
    });
    let (view, rows) = match (rows, expects_error) {
        (Err(_), true) => return Ok(()),
        (Err(error), false) => return Err(error.0),
        (Ok(_), true) => return Err("the view ran where an error was expected".into()),
        (Ok(done), false) => done,
    };
    if let Some(expected) = test.get("expectColumns").and_then(Value::as_array) {
        let names: Vec<Value> = view
            .columns()
            .iter()
            .map(|c| c.name.clone().into())
            .collect();
        if &names != expected {
            return Err(format!("columns {names:?}, expected {expected:?}"));
        }
    }
    let Some(expected) = test.get("expect").and_then(Value::as_array) else {
        return Ok(());
    };
    let canonical = |row: &Value| -> String { canonical_json(row) };
    let mut got: Vec<String> = rows
        .into_iter()
        .map(|row| canonical(&Value::Object(row.into_iter().collect())))
        .collect();
    let mut want: Vec<String> = expected.iter().map(canonical).collect();
    got.sort();
    want.sort();
    match got == want {
        true => Ok(()),
        false => Err(format!("rows {got:?}, expected {want:?}")),
    }
}

/// JSON with object keys sorted and numbers compared as numbers (`1.0` is `1`).
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(members) => {
            let mut keys: Vec<&String> = members.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        Value::from(k.as_str()),
                        canonical_json(&members[k])
                    )
                })
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", inner.join(","))
        }
        Value::Number(number) => match number.as_f64() {
            Some(float) if float.fract() == 0.0 && float.abs() < 1e15 => {
                format!("{}", float as i64)
            }
            Some(float) => format!("{float}"),
            None => number.to_string(),
        },
        other => other.to_string(),
    }
}
