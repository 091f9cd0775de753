//! FHIRPath evaluated over a [`Tree`]: the nodes themselves come back, so that the engine changes
//! them in place.

use rust_decimal::Decimal;
use std::cmp::Ordering;

use super::syntax::{Expr, Function, Op, Pattern, TextFunction, TypeOp};
use super::values::{kind, number, parse_decimal, to_step, to_text, Item, Moment};
use crate::fhirpath::tree::Tree;

/// A failure while evaluating: a comparison of values that cannot be compared, a function given
/// the wrong kind of input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

// ---------------------------------------------------------------------------------------------
// Evaluation

/// Evaluates `expr` with `focus` as the input collection and `$this`.
pub fn evaluate(tree: &Tree, expr: &Expr, focus: &[Item]) -> Result<Vec<Item>, EvalError> {
    evaluate_with(tree, expr, focus, &Variables::new())
}

/// The values of `%name` (a view's constants, `%rowIndex`).
pub type Variables = std::collections::HashMap<String, Vec<Item>>;

/// Evaluates `expr` as `evaluate` does, with `variables` for `%name`.
pub fn evaluate_with(
    tree: &Tree,
    expr: &Expr,
    focus: &[Item],
    variables: &Variables,
) -> Result<Vec<Item>, EvalError> {
    let this = match focus {
        [single] => Some(single.clone()),
        _ => None,
    };
    Evaluator { tree, variables }.eval(expr, focus, this.as_ref())
}

/// The value of a node as a system value (`None` for a node with no value).
pub fn node_value(tree: &Tree, id: usize) -> Option<Item> {
    let node = &tree.nodes[id];
    let text = node.text()?;
    Some(match node.ty {
        "boolean" => Item::Bool(text == "true"),
        "integer" | "positiveInt" | "unsignedInt" => Item::Int(text.parse().ok()?),
        "decimal" => Item::Dec(parse_decimal(&text)?),
        "date" | "dateTime" | "instant" => match Moment::date_time(&text) {
            Some(moment) => Item::DateTime(moment),
            None => Item::Str(text.into_owned()),
        },
        "time" => match Moment::time(&text) {
            Some(moment) => Item::Time(moment),
            None => Item::Str(text.into_owned()),
        },
        _ => Item::Str(text.into_owned()),
    })
}

struct Evaluator<'t, 'a> {
    tree: &'t Tree<'a>,
    variables: &'t Variables,
}

fn single_bool(items: &[Item]) -> Result<Option<bool>, EvalError> {
    match items {
        [] => Ok(None),
        [Item::Bool(value)] => Ok(Some(*value)),
        [_] => Ok(Some(true)),
        _ => Err(EvalError(
            "a collection of several items where one boolean is expected".into(),
        )),
    }
}

fn boolean(value: Option<bool>) -> Vec<Item> {
    value.map(Item::Bool).into_iter().collect()
}

impl Evaluator<'_, '_> {
    fn value(&self, item: &Item) -> Option<Item> {
        match item {
            Item::Node(id) => node_value(self.tree, *id),
            other => Some(other.clone()),
        }
    }

    fn values(&self, items: &[Item]) -> Vec<Item> {
        items.iter().filter_map(|item| self.value(item)).collect()
    }

    fn single_value(&self, items: &[Item], what: &str) -> Result<Option<Item>, EvalError> {
        match items {
            [] => Ok(None),
            [item] => Ok(self.value(item)),
            _ => Err(EvalError(format!("{what} expects one item, not several"))),
        }
    }

    fn single_string(&self, items: &[Item], what: &str) -> Result<Option<String>, EvalError> {
        match self.single_value(items, what)? {
            None => Ok(None),
            Some(Item::Str(text)) => Ok(Some(text)),
            Some(_) => Err(EvalError(format!("{what} expects a string"))),
        }
    }

    fn single_int(&self, items: &[Item], what: &str) -> Result<Option<i64>, EvalError> {
        match self.single_value(items, what)? {
            None => Ok(None),
            Some(Item::Int(value)) => Ok(Some(value)),
            Some(_) => Err(EvalError(format!("{what} expects an integer"))),
        }
    }

    fn type_of(&self, item: &Item) -> &str {
        match item {
            Item::Node(id) => self.tree.nodes[*id].ty,
            Item::Str(_) => "String",
            Item::Int(_) => "Integer",
            Item::Dec(_) => "Decimal",
            Item::Bool(_) => "Boolean",
            Item::DateTime(_) => "DateTime",
            Item::Time(_) => "Time",
            Item::Quantity(..) => "Quantity",
        }
    }

    fn is_type(&self, item: &Item, name: &str) -> bool {
        let name = name
            .strip_prefix("FHIR.")
            .or_else(|| name.strip_prefix("System."))
            .unwrap_or(name);
        let ty = self.type_of(item);
        ty == name
            || matches!(item, Item::Node(id) if self.tree.nodes[*id].resource
                && matches!(name, "Resource" | "DomainResource"))
    }

    fn eval(
        &self,
        expr: &Expr,
        input: &[Item],
        this: Option<&Item>,
    ) -> Result<Vec<Item>, EvalError> {
        Ok(match expr {
            Expr::Empty => Vec::new(),
            Expr::Literal(item) => vec![item.clone()],
            Expr::Pattern(pattern) => vec![Item::Str(pattern.0.as_str().to_string())],
            Expr::This => this.cloned().into_iter().collect(),
            Expr::Unsupported(what) => return Err(EvalError(format!("{what} is not supported"))),
            Expr::Variable(name) => match self.variables.get(name) {
                Some(items) => items.clone(),
                None => return Err(EvalError(format!("%{name} is not defined"))),
            },
            Expr::Member(target, name) => {
                let focus = match target {
                    Some(target) => self.eval(target, input, this)?,
                    None => {
                        let starts_with_type = name.starts_with(|c: char| c.is_ascii_uppercase());
                        if starts_with_type
                            && input.iter().all(|item| self.is_type(item, name))
                            && !input.is_empty()
                        {
                            return Ok(input.to_vec());
                        }
                        input.to_vec()
                    }
                };
                let mut out = Vec::new();
                for item in &focus {
                    if let Item::Node(id) = item {
                        out.extend(self.tree.children_named(*id, name).map(Item::Node));
                    }
                }
                out
            }
            Expr::Call(target, function, arguments) => {
                let focus = match target {
                    Some(target) => self.eval(target, input, this)?,
                    None => input.to_vec(),
                };
                self.call(*function, &focus, arguments, input, this)?
            }
            Expr::Index(target, index) => {
                let focus = self.eval(target, input, this)?;
                let index = self.eval(index, input, this)?;
                match self.single_int(&index, "an index")? {
                    Some(index) if index >= 0 => {
                        focus.into_iter().nth(index as usize).into_iter().collect()
                    }
                    _ => Vec::new(),
                }
            }
            Expr::Negate(inner) => {
                let value = self.eval(inner, input, this)?;
                match self.single_value(&value, "-")? {
                    None => Vec::new(),
                    Some(Item::Int(value)) => vec![Item::Int(-value)],
                    Some(Item::Dec(value)) => vec![Item::Dec(-value)],
                    Some(Item::Quantity(value, unit)) => vec![Item::Quantity(-value, unit)],
                    Some(_) => return Err(EvalError("'-' applies to numbers".into())),
                }
            }
            Expr::Type(op, inner, name) => {
                let focus = self.eval(inner, input, this)?;
                match op {
                    TypeOp::As => focus
                        .into_iter()
                        .filter(|item| self.is_type(item, name))
                        .collect(),
                    TypeOp::Is => match focus.as_slice() {
                        [] => Vec::new(),
                        [item] => vec![Item::Bool(self.is_type(item, name))],
                        _ => return Err(EvalError("'is' expects one item".into())),
                    },
                }
            }
            Expr::Binary(op, left, right) => self.binary(*op, left, right, input, this)?,
        })
    }

    fn call(
        &self,
        function: Function,
        focus: &[Item],
        arguments: &[Expr],
        input: &[Item],
        this: Option<&Item>,
    ) -> Result<Vec<Item>, EvalError> {
        let argument = |index: usize| -> Result<Vec<Item>, EvalError> {
            self.eval(&arguments[index], input, this)
        };
        let type_argument = || match &arguments[0] {
            Expr::Member(None, name) => name.clone(),
            _ => String::new(),
        };
        let name = function.name();
        Ok(match function {
            Function::Where | Function::Exists | Function::All => {
                if function == Function::Exists && arguments.is_empty() {
                    return Ok(vec![Item::Bool(!focus.is_empty())]);
                }
                let mut kept = Vec::new();
                for item in focus {
                    let result =
                        self.eval(&arguments[0], std::slice::from_ref(item), Some(item))?;
                    if single_bool(&result)? == Some(true) {
                        kept.push(item.clone());
                    }
                }
                match function {
                    Function::Where => kept,
                    Function::Exists => vec![Item::Bool(!kept.is_empty())],
                    _ => vec![Item::Bool(kept.len() == focus.len())],
                }
            }
            Function::Empty => vec![Item::Bool(focus.is_empty())],
            Function::Not => boolean(single_bool(focus)?.map(|value| !value)),
            Function::First => focus.first().cloned().into_iter().collect(),
            Function::Last => focus.last().cloned().into_iter().collect(),
            Function::Tail => focus.iter().skip(1).cloned().collect(),
            Function::Single => match focus {
                [] | [_] => focus.to_vec(),
                _ => return Err(EvalError("single() on several items".into())),
            },
            Function::Count => vec![Item::Int(focus.len() as i64)],
            Function::OfType | Function::As => {
                let ty = type_argument();
                focus
                    .iter()
                    .filter(|item| self.is_type(item, &ty))
                    .cloned()
                    .collect()
            }
            Function::Is => match focus {
                [] => Vec::new(),
                [item] => vec![Item::Bool(self.is_type(item, &type_argument()))],
                _ => return Err(EvalError("is() expects one item".into())),
            },
            Function::NodesByType | Function::NodesByName => {
                let Some(key) = self.single_string(&argument(0)?, name)? else {
                    return Ok(Vec::new());
                };
                self.nodes_by(function, focus, &key)
            }
            Function::Children => focus
                .iter()
                .filter_map(|item| match item {
                    Item::Node(id) => Some(self.tree.children(*id).map(Item::Node)),
                    _ => None,
                })
                .flatten()
                .collect(),
            Function::Descendants => {
                let mut out = Vec::new();
                for item in focus {
                    if let Item::Node(id) = item {
                        for child in self.tree.children(*id) {
                            self.all_below(child, &mut out);
                        }
                    }
                }
                out
            }
            Function::HasValue => vec![Item::Bool(
                matches!(focus, [Item::Node(id)] if self.tree.nodes[*id].value.is_some())
                    || matches!(focus, [item] if !matches!(item, Item::Node(_))),
            )],
            Function::ToString | Function::ToInteger | Function::ToDecimal => {
                self.convert(function, focus)?
            }
            Function::Join => {
                let separator = match arguments.first() {
                    Some(_) => self.single_string(&argument(0)?, name)?.unwrap_or_default(),
                    None => String::new(),
                };
                let texts: Vec<String> = self.values(focus).iter().map(to_text).collect();
                vec![Item::Str(texts.join(&separator))]
            }
            Function::Extension => {
                let Some(url) = self.single_string(&argument(0)?, name)? else {
                    return Ok(Vec::new());
                };
                self.extensions(focus, &url)
            }
            Function::GetResourceKey => focus
                .iter()
                .filter_map(|item| match item {
                    Item::Node(id) if self.tree.nodes[*id].resource => {
                        self.tree.children_named(*id, "id").next()
                    }
                    _ => None,
                })
                .filter_map(|id| node_value(self.tree, id))
                .collect(),
            Function::GetReferenceKey => {
                let wanted = arguments.first().map(|_| type_argument());
                self.reference_keys(focus, wanted.as_deref())
            }
            Function::LowBoundary | Function::HighBoundary => {
                let high = function == Function::HighBoundary;
                focus
                    .iter()
                    .filter_map(|item| match item {
                        Item::Node(id) => {
                            let node = &self.tree.nodes[*id];
                            super::boundary::of_text(node.ty, &node.text()?, high)
                        }
                        other => super::boundary::of_item(other, high),
                    })
                    .collect()
            }
            Function::Text(text_function) => {
                let Some(text) = self.single_string(focus, name)? else {
                    return Ok(Vec::new());
                };
                self.string_function(text_function, &text, arguments, input, this)?
            }
        })
    }

    /// The extensions of the focus with the `url`.
    fn extensions(&self, focus: &[Item], url: &str) -> Vec<Item> {
        let mut out = Vec::new();
        for item in focus {
            let Item::Node(id) = item else { continue };
            for extension in self.tree.children_named(*id, "extension") {
                let named = self
                    .tree
                    .children_named(extension, "url")
                    .next()
                    .and_then(|at| self.tree.nodes[at].text());
                if named.as_deref() == Some(url) {
                    out.push(Item::Node(extension));
                }
            }
        }
        out
    }

    /// The keys of the resources the focus's References name (`Type/id`, relative or absolute,
    /// a version dropped): each the key `getResourceKey()` gives that resource; only those of
    /// `wanted` type when given.
    fn reference_keys(&self, focus: &[Item], wanted: Option<&str>) -> Vec<Item> {
        let mut out = Vec::new();
        for item in focus {
            let Item::Node(id) = item else { continue };
            let Some(reference) = self
                .tree
                .children_named(*id, "reference")
                .next()
                .and_then(|at| self.tree.nodes[at].text())
            else {
                continue;
            };
            let path = reference.split(['?', '#']).next().unwrap_or_default();
            let segments: Vec<&str> = path.split('/').collect();
            let at = match segments.iter().rposition(|s| *s == "_history") {
                Some(history) => history,
                None => segments.len(),
            };
            if at < 2 {
                continue;
            }
            let (resource_type, key) = (segments[at - 2], segments[at - 1]);
            if wanted.is_none_or(|wanted| wanted == resource_type) {
                out.push(Item::Str(key.to_string()));
            }
        }
        out
    }

    /// `toString`, `toInteger` and `toDecimal` of a single value.
    fn convert(&self, function: Function, focus: &[Item]) -> Result<Vec<Item>, EvalError> {
        let name = function.name();
        Ok(match function {
            Function::ToString => match self.single_value(focus, name)? {
                None => Vec::new(),
                Some(value) => vec![Item::Str(to_text(&value))],
            },
            Function::ToInteger => match self.single_value(focus, name)? {
                Some(Item::Int(value)) => vec![Item::Int(value)],
                Some(Item::Str(text)) => text.parse().ok().map(Item::Int).into_iter().collect(),
                Some(Item::Bool(value)) => vec![Item::Int(value as i64)],
                _ => Vec::new(),
            },
            Function::ToDecimal => match self.single_value(focus, name)? {
                Some(Item::Int(value)) => vec![Item::Dec(Decimal::from(value))],
                Some(Item::Dec(value)) => vec![Item::Dec(value)],
                Some(Item::Str(text)) => parse_decimal(&text).map(Item::Dec).into_iter().collect(),
                _ => Vec::new(),
            },
            _ => unreachable!("{name} is not a conversion"),
        })
    }

    /// The nodes at or below the focus (nested resources apart) of a type, or of a name.
    fn nodes_by(&self, function: Function, focus: &[Item], key: &str) -> Vec<Item> {
        let mut out = Vec::new();
        for item in focus {
            if let Item::Node(id) = item {
                self.self_and_descendants(*id, &mut |tree, node| {
                    let matches = match function {
                        Function::NodesByType => tree.nodes[node].ty == key,
                        _ => tree.nodes[node].name() == key,
                    };
                    if matches {
                        out.push(Item::Node(node));
                    }
                });
            }
        }
        out
    }

    fn string_function(
        &self,
        function: TextFunction,
        text: &str,
        arguments: &[Expr],
        input: &[Item],
        this: Option<&Item>,
    ) -> Result<Vec<Item>, EvalError> {
        let name = Function::Text(function).name();
        let mut strings = Vec::new();
        for argument in arguments {
            let value = self.eval(argument, input, this)?;
            strings.push(match self.single_value(&value, name)? {
                None => return Ok(Vec::new()),
                Some(value) => value,
            });
        }
        let string = |index: usize| match &strings[index] {
            Item::Str(text) => Ok(text.clone()),
            _ => Err(EvalError(format!("{name}() expects a string argument"))),
        };
        let int = |index: usize| match &strings[index] {
            Item::Int(value) => Ok(*value),
            _ => Err(EvalError(format!("{name}() expects an integer argument"))),
        };
        let chars: Vec<char> = text.chars().collect();
        Ok(vec![match function {
            TextFunction::StartsWith => Item::Bool(text.starts_with(&string(0)?)),
            TextFunction::EndsWith => Item::Bool(text.ends_with(&string(0)?)),
            TextFunction::Contains => Item::Bool(text.contains(&string(0)?)),
            TextFunction::Length => Item::Int(chars.len() as i64),
            TextFunction::Upper => Item::Str(text.to_uppercase()),
            TextFunction::Lower => Item::Str(text.to_lowercase()),
            TextFunction::IndexOf => {
                let needle = string(0)?;
                Item::Int(match text.find(&needle) {
                    Some(at) => text[..at].chars().count() as i64,
                    None => -1,
                })
            }
            TextFunction::Substring => {
                let start = int(0)?;
                if start < 0 || start as usize >= chars.len() {
                    return Ok(Vec::new());
                }
                let length = match strings.len() {
                    2 => int(1)?.max(0) as usize,
                    _ => chars.len(),
                };
                Item::Str(chars.iter().skip(start as usize).take(length).collect())
            }
            TextFunction::Replace => Item::Str(text.replace(&string(0)?, &string(1)?)),
            TextFunction::Matches | TextFunction::ReplaceMatches => {
                let regex = match arguments.first() {
                    Some(Expr::Pattern(pattern)) => pattern.clone(),
                    _ => Pattern::compile(&string(0)?)
                        .map_err(|error| EvalError(format!("{name}(): {error}")))?,
                };
                let regex = &regex.0;
                match function {
                    TextFunction::Matches => Item::Bool(regex.is_match(text)),
                    _ => Item::Str(regex.replace_all(text, string(1)?.as_str()).into_owned()),
                }
            }
        }])
    }

    fn self_and_descendants(&self, id: usize, visit: &mut dyn FnMut(&Tree, usize)) {
        visit(self.tree, id);
        for child in self.tree.children(id) {
            if !self.tree.nodes[child].resource {
                self.self_and_descendants(child, visit);
            }
        }
    }

    fn all_below(&self, id: usize, out: &mut Vec<Item>) {
        out.push(Item::Node(id));
        for child in self.tree.children(id) {
            self.all_below(child, out);
        }
    }

    fn binary(
        &self,
        op: Op,
        left: &Expr,
        right: &Expr,
        input: &[Item],
        this: Option<&Item>,
    ) -> Result<Vec<Item>, EvalError> {
        let left = self.eval(left, input, this)?;
        let right = self.eval(right, input, this)?;
        Ok(match op {
            Op::Union => {
                let mut out: Vec<Item> = Vec::new();
                for item in left.into_iter().chain(right) {
                    if !out.iter().any(|seen| self.same(seen, &item)) {
                        out.push(item);
                    }
                }
                out
            }
            Op::And | Op::Or | Op::Xor | Op::Implies => {
                boolean(logic(op, single_bool(&left)?, single_bool(&right)?))
            }
            Op::In | Op::Contains => {
                let (element, collection) = match op {
                    Op::In => (left, right),
                    _ => (right, left),
                };
                match self.single_value(&element, "in")? {
                    None => Vec::new(),
                    Some(element) => {
                        let mut found = false;
                        for item in self.values(&collection) {
                            if self.equal(&element, &item)? == Some(true) {
                                found = true;
                            }
                        }
                        vec![Item::Bool(found)]
                    }
                }
            }
            Op::Equal | Op::NotEqual | Op::Equivalent | Op::NotEquivalent => {
                boolean(self.equality(op, &left, &right)?)
            }
            Op::Less | Op::LessOrEqual | Op::Greater | Op::GreaterOrEqual => {
                let a = self.single_value(&left, "a comparison")?;
                let b = self.single_value(&right, "a comparison")?;
                let (Some(a), Some(b)) = (a, b) else {
                    return Ok(Vec::new());
                };
                boolean(self.order(&a, &b)?.map(|ordering| match op {
                    Op::Less => ordering == Ordering::Less,
                    Op::LessOrEqual => ordering != Ordering::Greater,
                    Op::Greater => ordering == Ordering::Greater,
                    _ => ordering != Ordering::Less,
                }))
            }
            Op::Concatenate => {
                let a = self
                    .single_value(&left, "&")?
                    .map(|v| to_text(&v))
                    .unwrap_or_default();
                let b = self
                    .single_value(&right, "&")?
                    .map(|v| to_text(&v))
                    .unwrap_or_default();
                vec![Item::Str(a + &b)]
            }
            Op::Add | Op::Subtract | Op::Multiply | Op::Divide | Op::Div | Op::Mod => {
                let a = self.single_value(&left, "arithmetic")?;
                let b = self.single_value(&right, "arithmetic")?;
                let (Some(a), Some(b)) = (a, b) else {
                    return Ok(Vec::new());
                };
                arithmetic(op, a, b)?.into_iter().collect()
            }
        })
    }

    /// `=`, `!=`, `~` and `!~` of two collections, item by item.
    fn equality(&self, op: Op, left: &[Item], right: &[Item]) -> Result<Option<bool>, EvalError> {
        let (left, right) = (self.values(left), self.values(right));
        let equivalence = matches!(op, Op::Equivalent | Op::NotEquivalent);
        let result = match (left.len(), right.len()) {
            (0, 0) if equivalence => Some(true),
            (0, _) | (_, 0) if equivalence => Some(false),
            (0, _) | (_, 0) => None,
            (a, b) if a != b => Some(false),
            _ => {
                let mut all = Some(true);
                for (a, b) in left.iter().zip(&right) {
                    let same = match equivalence {
                        true => Some(self.equivalent(a, b)?),
                        false => self.equal(a, b)?,
                    };
                    all = match (all, same) {
                        (Some(false), _) | (_, Some(false)) => Some(false),
                        (Some(true), Some(true)) => Some(true),
                        _ => None,
                    };
                }
                all
            }
        };
        Ok(match op {
            Op::NotEqual | Op::NotEquivalent => result.map(|value| !value),
            _ => result,
        })
    }

    fn same(&self, a: &Item, b: &Item) -> bool {
        match (a, b) {
            (Item::Node(a), Item::Node(b)) => a == b,
            (Item::Node(_), _) | (_, Item::Node(_)) => false,
            _ => self.equal(a, b).ok().flatten() == Some(true),
        }
    }

    fn equal(&self, a: &Item, b: &Item) -> Result<Option<bool>, EvalError> {
        Ok(match (a, b) {
            (Item::Str(a), Item::Str(b)) => Some(a == b),
            (Item::Bool(a), Item::Bool(b)) => Some(a == b),
            (Item::DateTime(a), Item::DateTime(b)) | (Item::Time(a), Item::Time(b)) => {
                a.compare(b).map(|ordering| ordering == Ordering::Equal)
            }
            _ => match (number(a), number(b)) {
                (Some(a), Some(b)) => Some(to_step(a) == to_step(b)),
                _ => Some(false),
            },
        })
    }

    fn equivalent(&self, a: &Item, b: &Item) -> Result<bool, EvalError> {
        Ok(match (a, b) {
            (Item::Str(a), Item::Str(b)) => {
                let normal = |text: &str| {
                    text.split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .to_lowercase()
                };
                normal(a) == normal(b)
            }
            (Item::DateTime(a), Item::DateTime(b)) | (Item::Time(a), Item::Time(b)) => {
                a.precision == b.precision && a.compare(b) == Some(Ordering::Equal)
            }
            _ => self.equal(a, b)? == Some(true),
        })
    }

    fn order(&self, a: &Item, b: &Item) -> Result<Option<Ordering>, EvalError> {
        match (a, b) {
            (Item::Str(a), Item::Str(b)) => Ok(Some(a.cmp(b))),
            (Item::DateTime(a), Item::DateTime(b)) | (Item::Time(a), Item::Time(b)) => {
                Ok(a.compare(b))
            }
            _ => match (number(a), number(b)) {
                (Some(a), Some(b)) => Ok(Some(to_step(a).cmp(&to_step(b)))),
                _ => Err(EvalError(format!(
                    "cannot compare {} with {}",
                    kind(a),
                    kind(b)
                ))),
            },
        }
    }
}

/// FHIRPath's three-valued `and`, `or`, `xor` and `implies`.
fn logic(op: Op, a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match op {
        Op::And => match (a, b) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Op::Or => match (a, b) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Op::Xor => a.zip(b).map(|(a, b)| a != b),
        _ => match (a, b) {
            (Some(false), _) | (_, Some(true)) => Some(true),
            (Some(true), Some(false)) => Some(false),
            _ => None,
        },
    }
}

fn arithmetic(op: Op, a: Item, b: Item) -> Result<Option<Item>, EvalError> {
    if let (Op::Add, Item::Str(a), Item::Str(b)) = (op, &a, &b) {
        return Ok(Some(Item::Str(format!("{a}{b}"))));
    }
    if let (Item::Int(a), Item::Int(b)) = (&a, &b) {
        let (a, b) = (*a, *b);
        return match op {
            Op::Add => Ok(a.checked_add(b).map(Item::Int)),
            Op::Subtract => Ok(a.checked_sub(b).map(Item::Int)),
            Op::Multiply => Ok(a.checked_mul(b).map(Item::Int)),
            Op::Divide => divide(Decimal::from(a), Decimal::from(b)),
            Op::Div => Ok(a.checked_div(b).map(Item::Int)),
            _ => Ok(a.checked_rem(b).map(Item::Int)),
        };
    }
    let (Some(x), Some(y)) = (number(&a), number(&b)) else {
        return Err(EvalError(format!(
            "arithmetic on {} and {}",
            kind(&a),
            kind(&b)
        )));
    };
    let overflow = || EvalError("a decimal overflowed".into());
    match op {
        Op::Add => x
            .checked_add(y)
            .map(|sum| Some(Item::Dec(sum)))
            .ok_or_else(overflow),
        Op::Subtract => x
            .checked_sub(y)
            .map(|difference| Some(Item::Dec(difference)))
            .ok_or_else(overflow),
        Op::Multiply => x
            .checked_mul(y)
            .map(|product| Some(Item::Dec(product)))
            .ok_or_else(overflow),
        Op::Divide => divide(x, y),
        Op::Div if y.is_zero() => Ok(None),
        Op::Div => {
            let quotient = x.checked_div(y).ok_or_else(overflow)?.trunc();
            i64::try_from(quotient)
                .map(|quotient| Some(Item::Int(quotient)))
                .map_err(|_| overflow())
        }
        _ if y.is_zero() => Ok(None),
        _ => x
            .checked_rem(y)
            .map(|remainder| Some(Item::Dec(remainder)))
            .ok_or_else(overflow),
    }
}

/// `/` as .NET divides decimals: a quotient exact at the dividend's scale less the divisor's keeps
/// that scale (`4.00 / 2` is `2.00`); any other loses its trailing zeros (`10 / 4` is `2.5`).
fn divide(x: Decimal, y: Decimal) -> Result<Option<Item>, EvalError> {
    if y.is_zero() {
        return Ok(None);
    }
    let quotient = x
        .checked_div(y)
        .ok_or_else(|| EvalError("a decimal overflowed".into()))?;
    let least_scale = x.scale().saturating_sub(y.scale());
    let mut at_least_scale = quotient;
    at_least_scale.rescale(least_scale);
    Ok(Some(Item::Dec(match at_least_scale == quotient {
        true => at_least_scale,
        false => quotient.normalize(),
    })))
}
