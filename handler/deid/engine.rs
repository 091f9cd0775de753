//! The de-identification engine: a configuration's rules applied to one resource as Microsoft's
//! anonymizer (4.1.1) applies them. Rules run in file order on each resource (its own type,
//! `Resource`, `DomainResource`, or no type); the first rule to reach a node decides it and its
//! subtree (`keep` too); nested resources (contained, Bundle entries) are processed after their
//! parent; each outermost resource, and each Bundle entry, gets the `meta.security` labels of what
//! was done inside it; nodes left empty are removed.

use chrono::NaiveDate;

use super::config::{AnonymizationConfig, Keys, Method, ProcessingErrors};
use super::fhirpath::{self, Item};
use super::methods;
use super::rule_path::{Matcher, RulePath};
use super::rules::{
    is_visited, mark_visited, CompiledMethod, DeidError, MethodContext, Ops, ABSTRACT, CRYPTO_HASH,
    ENCRYPT, GENERALIZE, PERTURB, REDACT, SUBSTITUTE,
};
use super::tree::{Tree, ROOT};
use crate::fhir::json::Json;

const OBSERVATION_VALUE: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The labels, in the engine's order and spelling (`CRYTOHASH` is its).
const LABELS: &[(Ops, Option<&str>, &str, &str)] = &[
    (REDACT, Some(OBSERVATION_VALUE), "REDACTED", "redacted"),
    (ABSTRACT, Some(OBSERVATION_VALUE), "ABSTRED", "abstracted"),
    (
        CRYPTO_HASH,
        Some(OBSERVATION_VALUE),
        "CRYTOHASH",
        "cryptographic hash function",
    ),
    (ENCRYPT, Some(OBSERVATION_VALUE), "MASKED", "masked"),
    (
        PERTURB,
        None,
        "PERTURBED",
        "exact value is replaced with another exact value",
    ),
    (
        SUBSTITUTE,
        None,
        "SUBSTITUTED",
        "exact value is replaced with a predefined value",
    ),
    (
        GENERALIZE,
        None,
        "GENERALIZED",
        "exact value is replaced with a general value",
    ),
];

struct CompiledRule {
    /// The rule's path as configured (configuration text, never resource data).
    path: String,
    resource_type: String,
    matcher: Matcher,
    method: CompiledMethod,
}

pub struct Engine {
    rules: Vec<CompiledRule>,
    /// For each resource type, the rules that apply to it, in file order.
    rules_by_type: rustc_hash::FxHashMap<&'static str, Vec<usize>>,
    pub(crate) keys: Keys,
    pub(crate) parameters: super::config::Parameters,
    processing_errors: ProcessingErrors,
    /// The date the over-89 rules count from.
    pub(crate) today: NaiveDate,
}

impl Engine {
    /// An engine for a checked configuration, with its keys and the date for the over-89 rules.
    pub fn new(
        config: &AnonymizationConfig,
        keys: Keys,
        today: NaiveDate,
    ) -> Result<Engine, fhirpath::PathError> {
        let mut rules = Vec::new();
        for rule in &config.rules {
            let RulePath {
                resource_type,
                matcher,
            } = RulePath::parse(&rule.path)?;
            let method = match &rule.method {
                Method::Keep => CompiledMethod::Keep,
                Method::Redact => CompiledMethod::Redact,
                Method::DateShift => CompiledMethod::DateShift,
                Method::CryptoHash => CompiledMethod::CryptoHash,
                Method::Encrypt => CompiledMethod::Encrypt,
                Method::Substitute { replace_with } => {
                    CompiledMethod::Substitute(replace_with.clone())
                }
                Method::Perturb {
                    span,
                    range,
                    round_to,
                } => CompiledMethod::Perturb {
                    span: *span,
                    range: *range,
                    round_to: *round_to,
                },
                Method::Generalize {
                    cases,
                    other_values,
                } => CompiledMethod::Generalize {
                    cases: cases
                        .iter()
                        .map(|(condition, value)| {
                            Ok((fhirpath::parse(condition)?, fhirpath::parse(value)?))
                        })
                        .collect::<Result<_, fhirpath::PathError>>()?,
                    other_values: *other_values,
                },
            };
            rules.push(CompiledRule {
                path: rule.path.clone(),
                resource_type,
                matcher,
                method,
            });
        }
        let rules_by_type = crate::fhir::types::R4_RESOURCE_TYPES
            .iter()
            .map(|&ty| {
                let applying = rules
                    .iter()
                    .enumerate()
                    .filter(|(_, rule)| {
                        matches!(
                            rule.resource_type.as_str(),
                            "" | "Resource" | "DomainResource"
                        ) || rule.resource_type == ty
                    })
                    .map(|(index, _)| index)
                    .collect();
                (ty, applying)
            })
            .collect();
        Ok(Engine {
            rules,
            rules_by_type,
            keys,
            parameters: config.parameters.clone(),
            processing_errors: config.processing_errors,
            today,
        })
    }

    /// De-identifies one resource (JSON bytes) into compact JSON. With `processingErrors: skip` a
    /// resource that fails becomes `{"resourceType": T, "meta": {"security": [REDACTED]}}`.
    pub fn deidentify(&self, resource: &[u8]) -> Result<Vec<u8>, DeidError> {
        match self.deidentify_strictly(resource) {
            Ok(out) => Ok(out),
            Err(error) if self.processing_errors == ProcessingErrors::Skip => {
                let ty = resource_type_of(resource).ok_or(error)?;
                Ok(redacted_stub(&ty))
            }
            Err(error) => Err(error),
        }
    }

    fn deidentify_strictly(&self, resource: &[u8]) -> Result<Vec<u8>, DeidError> {
        let json = Json::parse_slice(resource)
            .map_err(|_| DeidError::InvalidInput("the resource is not valid JSON".into()))?;
        let mut tree = Tree::from_json(json)?;
        let mut visited = Vec::new();
        self.visit(&mut tree, ROOT, &mut visited)?;
        tree.prune(ROOT);
        let mut out = Vec::with_capacity(resource.len());
        tree.write(ROOT, &mut out);
        Ok(out)
    }

    fn visit(&self, tree: &mut Tree, id: usize, visited: &mut Vec<bool>) -> Result<Ops, DeidError> {
        let resource = tree.nodes[id].resource;
        let mut ops = match resource {
            true => self.process_resource(tree, id, visited)?,
            false => 0,
        };
        // By index, without a copy of the list: visiting a child changes only its own subtree.
        let mut at = 0;
        while let Some(&child) = tree.nodes[id].children.get(at) {
            at += 1;
            if !tree.nodes[child].removed {
                ops |= self.visit(tree, child, visited)?;
            }
        }
        if !resource {
            return Ok(ops);
        }
        if tree.nodes[id].name() != "contained" {
            add_labels(tree, id, ops);
        }
        Ok(ops)
    }

    fn process_resource(
        &self,
        tree: &mut Tree,
        id: usize,
        visited: &mut Vec<bool>,
    ) -> Result<Ops, DeidError> {
        let ty = tree.nodes[id].ty;
        let mut below = Vec::new();
        collect_below(tree, id, &mut below);
        let mut by_type: rustc_hash::FxHashMap<&'static str, Vec<usize>> =
            rustc_hash::FxHashMap::default();
        for &node in &below {
            by_type.entry(tree.nodes[node].ty).or_default().push(node);
        }
        let mut ops = 0;
        let no_rules = Vec::new();
        for &index in self.rules_by_type.get(ty).unwrap_or(&no_rules) {
            let rule = &self.rules[index];
            let matches: Vec<usize> = match &rule.matcher {
                Matcher::Resource => vec![id],
                Matcher::ByType(key, member) | Matcher::ByName(key, member) => {
                    let candidates: &[usize] = match &rule.matcher {
                        Matcher::ByType(..) => by_type.get(key.as_str()).map_or(&[], Vec::as_slice),
                        _ => &below,
                    };
                    let by_type = matches!(rule.matcher, Matcher::ByType(..));
                    let found = candidates.iter().copied().filter(|&node| {
                        let node = &tree.nodes[node];
                        !node.removed && (by_type || node.name() == key)
                    });
                    match member {
                        None => found.collect(),
                        Some(member) => found
                            .flat_map(|node| tree.children_named(node, member).collect::<Vec<_>>())
                            .collect(),
                    }
                }
                Matcher::Path(expr) => fhirpath::evaluate(tree, expr, &[Item::Node(id)])
                    .map_err(|error| {
                        DeidError::Processing(format!("the rule {:?} failed: {error}", rule.path))
                    })?
                    .into_iter()
                    .filter_map(|item| match item {
                        Item::Node(node) => Some(node),
                        _ => None,
                    })
                    .collect(),
            };
            for node in matches {
                ops |= self.process_recursively(tree, node, &rule.method, visited)?;
            }
        }
        Ok(ops)
    }

    /// What the methods read besides the node.
    fn context(&self) -> MethodContext<'_> {
        MethodContext {
            keys: &self.keys,
            parameters: &self.parameters,
            today: self.today,
        }
    }

    fn process_recursively(
        &self,
        tree: &mut Tree,
        id: usize,
        method: &CompiledMethod,
        visited: &mut Vec<bool>,
    ) -> Result<Ops, DeidError> {
        if is_visited(visited, id) {
            return Ok(0);
        }
        let mut ops = methods::apply(&self.context(), tree, id, method, visited)?;
        mark_visited(visited, id);
        let mut at = 0;
        while let Some(&child) = tree.nodes[id].children.get(at) {
            at += 1;
            let node = &tree.nodes[child];
            if !node.removed && !node.resource {
                ops |= self.process_recursively(tree, child, method, visited)?;
            }
        }
        Ok(ops)
    }
}

/// Every node below `id`, a nested resource included but not what is inside it.
fn collect_below(tree: &Tree, id: usize, out: &mut Vec<usize>) {
    for child in tree.children(id) {
        out.push(child);
        if !tree.nodes[child].resource {
            collect_below(tree, child, out);
        }
    }
}

/// Adds to `meta.security` the labels of `ops` that it lacks (codes compared in any case).
fn add_labels(tree: &mut Tree, resource: usize, ops: Ops) {
    if ops == 0 {
        return;
    }
    let existing = tree.children_named(resource, "meta").next();
    let meta = match existing {
        Some(meta) => meta,
        None => {
            let meta = tree
                .new_member(tree.nodes[resource].ty, "meta")
                .expect("R4 has meta");
            let position = tree.nodes[resource]
                .children
                .iter()
                .position(|&child| tree.nodes[child].key == "id")
                .map_or(0, |at| at + 1);
            tree.attach_at(resource, meta, position);
            meta
        }
    };
    for &(op, system, code, display) in LABELS {
        if ops & op == 0 {
            continue;
        }
        let present = tree.children_named(meta, "security").any(|coding| {
            tree.children_named(coding, "code").any(|node| {
                tree.nodes[node]
                    .text()
                    .is_some_and(|text| text.eq_ignore_ascii_case(code))
            })
        });
        if present {
            continue;
        }
        let coding = tree
            .new_member("Meta", "security")
            .expect("R4 has Meta.security");
        let mut fields = vec![("code", "code", code), ("display", "string", display)];
        if let Some(system) = system {
            fields.insert(0, ("system", "uri", system));
        }
        for (key, ty, text) in fields {
            let field = tree.new_primitive(key, ty, serde_json::to_string(text).expect("a string"));
            tree.attach(coding, field);
        }
        tree.attach(meta, coding);
    }
}

fn resource_type_of(resource: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "resourceType")]
        resource_type: String,
    }
    serde_json::from_slice::<Typed>(resource)
        .ok()
        .map(|typed| typed.resource_type)
        .filter(|ty| crate::fhir::types::is_resource_type(ty))
}

/// The engine's stand-in for a resource it could not process.
pub fn redacted_stub(resource_type: &str) -> Vec<u8> {
    format!(
        r#"{{"resourceType":{},"meta":{{"security":[{{"system":"{OBSERVATION_VALUE}","code":"REDACTED","display":"redacted"}}]}}}}"#,
        serde_json::to_string(resource_type).expect("a string")
    )
    .into_bytes()
}
