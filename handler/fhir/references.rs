//! Walking every `Reference.reference` string of a resource, contained resources included.

use serde_json::Value;

/// Calls `visit` with each `reference` string in `value`, in place, stopping at the first error.
pub fn try_for_each_reference<E>(
    value: &mut Value,
    mut visit: impl FnMut(&mut String) -> Result<(), E>,
) -> Result<(), E> {
    let mut pending = vec![value];
    while let Some(node) = pending.pop() {
        match node {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match child {
                        Value::String(reference) if key == "reference" => visit(reference)?,
                        Value::Object(_) | Value::Array(_) => pending.push(child),
                        _ => {}
                    }
                }
            }
            Value::Array(items) => pending.extend(items.iter_mut()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visits_nested_repeated_and_contained_references() {
        let mut resource = serde_json::json!({"subject": {"reference": "a"}, "performer": [{"reference": "b"}],
            "contained": [{"resourceType": "Observation", "subject": {"reference": "c"}}], "note": [{"text": "reference"}]});
        let mut seen = Vec::new();
        try_for_each_reference(&mut resource, |r| {
            seen.push(r.clone());
            r.push('!');
            Ok::<_, ()>(())
        })
        .unwrap();
        seen.sort();
        assert_eq!(seen, ["a", "b", "c"]);
        assert_eq!(resource["subject"]["reference"], "a!");
    }
}
