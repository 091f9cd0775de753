//! FHIRPath, the one engine of the project: for anonymization rules and generalize cases, and for
//! SQL on FHIR views. The whole grammar is parsed, and a subset evaluated over a [`Tree`] (a
//! resource typed by R4), returning the nodes themselves so the anonymizer changes them in
//! place. A function or construct outside the subset is refused when the configuration is read,
//! never evaluated to an empty match: a rule that silently matches nothing leaks what it was meant
//! to hide. Semantics follow Firely's (the engine Microsoft's anonymizer runs): a comparison of
//! dates of different precisions that agree at the shorter one is empty, values with offsets
//! compare in UTC.
//!
//! Three parts, used one way: `syntax` (the grammar, to an [`Expr`] whose functions are resolved to
//! [`Function`]s, bounded in size and depth) and `values` (system values, dates of partial
//! precision, .NET decimals) are what `eval` evaluates over a tree.

mod boundary;
mod eval;
pub mod r4;
mod syntax;
pub mod tree;
mod values;

pub use eval::{evaluate, evaluate_with, node_value, EvalError, Variables};
pub use syntax::{
    parse, parse_for_views, Expr, Function, Op, PathError, Pattern, TextFunction, TypeOp,
    MAX_DEPTH, MAX_EXPRESSION_CHARS,
};
pub use values::{decimal_token, parse_decimal, to_text, Item, Moment};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhirpath::tree::Tree;

    #[test]
    fn deep_or_long_expressions_are_refused_and_the_deepest_accepted_evaluates() {
        let nested = |open: &str, close: &str, depth: usize| {
            format!("{}name{}", open.repeat(depth), close.repeat(depth))
        };
        for (open, close, depth) in [
            ("(", ")", 3_000),
            ("-", "", 2_000),
            ("+", "", 2_000),
            ("", ".first()", 1_000),
            ("", ".a", 4_000),
            ("a or ", "", 1_900),
            ("where(", ")", 1_000),
            ("", "[0]", 2_000),
            ("", " is T", 1_500),
        ] {
            let text = nested(open, close, depth);
            let error = parse(&text).unwrap_err().0;
            assert!(
                error.contains("deeper than 100 levels"),
                "{open}{close}: {error}"
            );
        }
        let long = format!("name{}", ".a".repeat(6_000));
        assert!(parse(&long).unwrap_err().0.contains("more than the 10000"));
        // At the bound, on a thread with the 2 MiB stack of tokio's workers: checked, evaluated
        // and dropped.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let resource = r#"{"resourceType":"Patient","name":[{"family":"F"}]}"#;
                let tree =
                    Tree::from_json(crate::fhir::json::Json::parse(resource).unwrap()).unwrap();
                for text in [
                    format!("{}name.family{}", "(".repeat(98), ")".repeat(98)),
                    format!("name{}", ".where(true)".repeat(98)),
                    format!("name.exists(){}", " and true".repeat(98)),
                    format!("{}1", "-".repeat(98)),
                ] {
                    let expr = parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
                    evaluate(&tree, &expr, &[Item::Node(crate::fhirpath::tree::ROOT)]).unwrap();
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
