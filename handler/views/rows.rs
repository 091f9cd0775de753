//! A view run over one resource: its rows, each a value per column in the view's order.
//!
//! A `select` gives, for each item it iterates over (the focus itself without `forEach`,
//! `forEachOrNull` or `repeat`), the product of its columns' row, its nested selects' rows and
//! its `unionAll`'s rows (each branch's in turn). `forEachOrNull` over nothing gives one row of
//! nulls; `%rowIndex` is the item's index in what its select iterates over (0 at the top).

use serde_json::Value;

use super::definition::{Each, Select, View, ViewError};
use crate::fhir::json::Json;
use crate::fhirpath::tree::{Tree, ROOT};
use crate::fhirpath::{evaluate_with, node_value, Item, Variables};

/// One row: each column's name and value.
pub type Row = Vec<(String, Value)>;

/// The rows `view` gives of one resource (none when it is of another type, or `where` excludes
/// it).
pub fn rows_of(view: &View, resource: &[u8]) -> Result<Vec<Row>, ViewError> {
    let json = Json::parse_slice(resource)
        .map_err(|error| ViewError(format!("a resource is not JSON: {error}")))?;
    if json.get("resourceType").and_then(|t| t.as_str()).as_deref() != Some(&view.resource) {
        return Ok(Vec::new());
    }
    let tree = Tree::from_json(json).map_err(|error| ViewError(error.0))?;
    let mut variables = view.constants.clone();
    variables.insert("rowIndex".into(), vec![Item::Int(0)]);
    let run = Run {
        tree: &tree,
        variables,
    };
    let root = Item::Node(ROOT);
    for (index, filter) in view.filters.iter().enumerate() {
        let result = run.eval(filter, Some(&root), &format!("where[{index}]"))?;
        let values: Vec<Item> = result.iter().map(|item| run.system_value(item)).collect();
        match values.as_slice() {
            [] | [Item::Bool(false)] => return Ok(Vec::new()),
            [Item::Bool(true)] => {}
            _ => return Err(ViewError(format!("where[{index}].path gives no boolean"))),
        }
    }
    let mut rows = vec![Vec::new()];
    for select in &view.select {
        rows = product(rows, run.select(select, &root)?);
    }
    Ok(rows)
}

struct Run<'t, 'a> {
    tree: &'t Tree<'a>,
    variables: Variables,
}

impl Run<'_, '_> {
    /// Evaluates `expr` on `focus` (`None`: an empty focus, as in a `forEachOrNull` row of nulls).
    fn eval(
        &self,
        expr: &crate::fhirpath::Expr,
        focus: Option<&Item>,
        at: &str,
    ) -> Result<Vec<Item>, ViewError> {
        let focus = focus.map(std::slice::from_ref).unwrap_or_default();
        evaluate_with(self.tree, expr, focus, &self.variables)
            .map_err(|error| ViewError(format!("{at}: {error}")))
    }

    /// A node as its system value (a complex node stays a node).
    fn system_value(&self, item: &Item) -> Item {
        match item {
            Item::Node(id) => node_value(self.tree, *id).unwrap_or_else(|| item.clone()),
            other => other.clone(),
        }
    }

    /// The rows of `select` on `focus`.
    fn select(&self, select: &Select, focus: &Item) -> Result<Vec<Row>, ViewError> {
        let items: Vec<Option<Item>> = match &select.each {
            None => vec![Some(focus.clone())],
            Some(Each::ForEach(path)) => self
                .eval(path, Some(focus), "forEach")?
                .into_iter()
                .map(Some)
                .collect(),
            Some(Each::ForEachOrNull(path)) => {
                let found = self.eval(path, Some(focus), "forEachOrNull")?;
                match found.is_empty() {
                    true => vec![None],
                    false => found.into_iter().map(Some).collect(),
                }
            }
            Some(Each::Repeat(paths)) => self.repeat(paths, focus)?.into_iter().map(Some).collect(),
        };
        let mut rows = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let scoped;
            let run = match select.each {
                None => self,
                Some(_) => {
                    let mut variables = self.variables.clone();
                    variables.insert("rowIndex".into(), vec![Item::Int(index as i64)]);
                    scoped = Run {
                        tree: self.tree,
                        variables,
                    };
                    &scoped
                }
            };
            rows.extend(run.rows_at(select, item.as_ref())?);
        }
        Ok(rows)
    }

    /// The rows of one item a select iterates over (`None`: a `forEachOrNull` that found nothing:
    /// its columns evaluated on nothing, its nested selects all null).
    fn rows_at(&self, select: &Select, item: Option<&Item>) -> Result<Vec<Row>, ViewError> {
        let mut columns = Vec::new();
        for column in &select.columns {
            let found = self.eval(&column.path, item, &format!("column {}", column.name))?;
            let value = match (column.collection, found.as_slice()) {
                (true, _) => Value::Array(found.iter().map(|i| self.value(i)).collect()),
                (false, []) => Value::Null,
                (false, [one]) => self.value(one),
                (false, _) => {
                    return Err(ViewError(format!(
                        "column {} has several values: give it collection: true",
                        column.name
                    )))
                }
            };
            columns.push((column.name.clone(), value));
        }
        let mut rows = vec![columns];
        let Some(item) = item else {
            let mut nulls = Vec::new();
            for nested in select.selects.iter().chain(select.union_all.first()) {
                nulls.extend(null_row(nested));
            }
            rows[0].extend(nulls);
            return Ok(rows);
        };
        for nested in &select.selects {
            rows = product(rows, self.select(nested, item)?);
        }
        if !select.union_all.is_empty() {
            let mut union = Vec::new();
            for branch in &select.union_all {
                union.extend(self.select(branch, item)?);
            }
            rows = product(rows, union);
        }
        Ok(rows)
    }

    /// What `repeat` reaches from `focus`: the paths applied to the focus, then to each result,
    /// depth first.
    fn repeat(
        &self,
        paths: &[crate::fhirpath::Expr],
        focus: &Item,
    ) -> Result<Vec<Item>, ViewError> {
        let mut out = Vec::new();
        for path in paths {
            for item in self.eval(path, Some(focus), "repeat")? {
                out.push(item.clone());
                out.extend(self.repeat(paths, &item)?);
            }
        }
        Ok(out)
    }

    /// A value as a cell: a primitive as its JSON value, a complex element as its JSON.
    fn value(&self, item: &Item) -> Value {
        let item = match item {
            Item::Node(id) => match node_value(self.tree, *id) {
                Some(value) => value,
                None => {
                    let mut out = Vec::new();
                    self.tree.write(*id, &mut out);
                    return serde_json::from_slice(&out).unwrap_or(Value::Null);
                }
            },
            other => other.clone(),
        };
        match item {
            Item::Bool(value) => Value::Bool(value),
            Item::Int(value) => Value::from(value),
            Item::Dec(value) => serde_json::from_str(&value.to_string()).unwrap_or(Value::Null),
            other => Value::String(crate::fhirpath::to_text(&other)),
        }
    }
}

/// A row of nulls for every column of `select`.
fn null_row(select: &Select) -> Row {
    let mut columns = Vec::new();
    collect_names(select, &mut columns);
    columns
        .into_iter()
        .map(|name| (name, Value::Null))
        .collect()
}

fn collect_names(select: &Select, out: &mut Vec<String>) {
    out.extend(select.columns.iter().map(|c| c.name.clone()));
    for nested in &select.selects {
        collect_names(nested, out);
    }
    if let Some(first) = select.union_all.first() {
        collect_names(first, out);
    }
}

/// Every row of `left` joined with every row of `right`.
fn product(left: Vec<Row>, right: Vec<Row>) -> Vec<Row> {
    let mut out = Vec::with_capacity(left.len() * right.len());
    for a in &left {
        for b in &right {
            let mut row = a.clone();
            row.extend(b.iter().cloned());
            out.push(row);
        }
    }
    out
}
