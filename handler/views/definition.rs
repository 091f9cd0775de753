//! A ViewDefinition read from its JSON and checked before any resource is read: the resource type,
//! constants, `where`, and the tree of `select`s with their columns, `forEach`, `forEachOrNull`,
//! `repeat` and `unionAll`. An error names the element (`select[0].column[1].path`).

use serde_json::Value;

use crate::fhirpath::{parse_for_views, Expr, Item, Moment, Variables};

/// Why a view cannot be run: the element, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ViewError(pub String);

#[derive(Debug, Clone)]
pub struct View {
    pub name: Option<String>,
    pub resource: String,
    pub constants: Variables,
    /// `where` paths, each of which must be true of a resource for it to give rows.
    pub filters: Vec<Expr>,
    pub select: Vec<Select>,
}

#[derive(Debug, Clone, Default)]
pub struct Select {
    pub each: Option<Each>,
    pub columns: Vec<Column>,
    pub selects: Vec<Select>,
    pub union_all: Vec<Select>,
}

/// What a `select` iterates over.
#[derive(Debug, Clone)]
pub enum Each {
    ForEach(Expr),
    ForEachOrNull(Expr),
    /// The paths applied again and again to what they give, every level's results in turn.
    Repeat(Vec<Expr>),
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub path: Expr,
    /// `collection: true`: the column holds every value, as a list.
    pub collection: bool,
    /// The FHIR type the column declares (`type`), for the formats that type their columns.
    pub ty: Option<String>,
}

impl View {
    /// Reads and checks a ViewDefinition.
    pub fn parse(json: &Value) -> Result<View, ViewError> {
        let object = json
            .as_object()
            .ok_or_else(|| ViewError("the view is not a JSON object".into()))?;
        let resource = match object.get("resource").and_then(Value::as_str) {
            Some(resource) if crate::fhir::is_resource_type(resource) => resource.to_string(),
            Some(other) => {
                return Err(ViewError(format!(
                    "resource {other:?} is not a FHIR resource type"
                )))
            }
            None => {
                return Err(ViewError(
                    "resource: the view names no resource type".into(),
                ))
            }
        };
        let mut constants = Variables::new();
        for (index, constant) in array(object.get("constant"), "constant")?
            .iter()
            .enumerate()
        {
            let (name, value) = constant_of(constant)
                .map_err(|message| ViewError(format!("constant[{index}]: {message}")))?;
            constants.insert(name, vec![value]);
        }
        let mut filters = Vec::new();
        for (index, filter) in array(object.get("where"), "where")?.iter().enumerate() {
            let at = format!("where[{index}].path");
            filters.push(path(filter.get("path"), &at)?);
        }
        let select = selects(object.get("select"), "select")?;
        let view = View {
            name: object
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string),
            resource,
            constants,
            filters,
            select,
        };
        view.check_names()?;
        Ok(view)
    }

    /// The columns of a row, in order.
    pub fn columns(&self) -> Vec<&Column> {
        let mut out = Vec::new();
        for select in &self.select {
            select.collect_columns(&mut out);
        }
        out
    }

    fn check_names(&self) -> Result<(), ViewError> {
        let mut seen = std::collections::HashSet::new();
        for column in self.columns() {
            if !is_name(&column.name) {
                return Err(ViewError(format!(
                    "column name {:?} is not a name (a letter, then letters, digits and _)",
                    column.name
                )));
            }
            if !seen.insert(column.name.as_str()) {
                return Err(ViewError(format!(
                    "column name {:?} is given twice",
                    column.name
                )));
            }
        }
        let mut variables = Vec::new();
        let mut paths = self.filters.iter().collect::<Vec<_>>();
        for select in &self.select {
            select.collect_paths(&mut paths);
        }
        for path in paths {
            variables_in(path, &mut variables);
        }
        for name in variables {
            if name != "rowIndex" && !self.constants.contains_key(&name) {
                return Err(ViewError(format!("%{name} is not a constant of the view")));
            }
        }
        Ok(())
    }
}

impl Select {
    fn collect_columns<'a>(&'a self, out: &mut Vec<&'a Column>) {
        out.extend(self.columns.iter());
        for select in &self.selects {
            select.collect_columns(out);
        }
        if let Some(first) = self.union_all.first() {
            first.collect_columns(out);
        }
    }

    fn collect_paths<'a>(&'a self, out: &mut Vec<&'a Expr>) {
        match &self.each {
            Some(Each::ForEach(path) | Each::ForEachOrNull(path)) => out.push(path),
            Some(Each::Repeat(paths)) => out.extend(paths.iter()),
            None => {}
        }
        out.extend(self.columns.iter().map(|c| &c.path));
        for select in self.selects.iter().chain(&self.union_all) {
            select.collect_paths(out);
        }
    }

    /// The names of the columns it gives, in order.
    fn column_names(&self) -> Vec<String> {
        let mut columns = Vec::new();
        self.collect_columns(&mut columns);
        columns.into_iter().map(|c| c.name.clone()).collect()
    }
}

fn array<'a>(value: Option<&'a Value>, at: &str) -> Result<&'a [Value], ViewError> {
    match value {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(ViewError(format!("{at} is not an array"))),
    }
}

fn path(value: Option<&Value>, at: &str) -> Result<Expr, ViewError> {
    let text = value
        .and_then(Value::as_str)
        .ok_or_else(|| ViewError(format!("{at}: a FHIRPath string is required")))?;
    parse_for_views(text).map_err(|error| ViewError(format!("{at} {text:?}: {error}")))
}

fn selects(value: Option<&Value>, at: &str) -> Result<Vec<Select>, ViewError> {
    array(value, at)?
        .iter()
        .enumerate()
        .map(|(index, select)| select_of(select, &format!("{at}[{index}]")))
        .collect()
}

fn select_of(json: &Value, at: &str) -> Result<Select, ViewError> {
    let object = json
        .as_object()
        .ok_or_else(|| ViewError(format!("{at} is not an object")))?;
    let mut iterators = Vec::new();
    if object.contains_key("forEach") {
        iterators.push(Each::ForEach(path(
            object.get("forEach"),
            &format!("{at}.forEach"),
        )?));
    }
    if object.contains_key("forEachOrNull") {
        let at = format!("{at}.forEachOrNull");
        iterators.push(Each::ForEachOrNull(path(object.get("forEachOrNull"), &at)?));
    }
    if object.contains_key("repeat") {
        let repeat = array(object.get("repeat"), &format!("{at}.repeat"))?;
        let paths = repeat
            .iter()
            .enumerate()
            .map(|(index, value)| path(Some(value), &format!("{at}.repeat[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;
        iterators.push(Each::Repeat(paths));
    }
    if iterators.len() > 1 {
        return Err(ViewError(format!(
            "{at}: give one of forEach, forEachOrNull and repeat"
        )));
    }
    let mut columns = Vec::new();
    for (index, column) in array(object.get("column"), &format!("{at}.column"))?
        .iter()
        .enumerate()
    {
        let here = format!("{at}.column[{index}]");
        let name = column
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ViewError(format!("{here}.name is required")))?;
        let collection = match column.get("collection") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(value)) => *value,
            Some(_) => return Err(ViewError(format!("{here}.collection is not true or false"))),
        };
        columns.push(Column {
            name: name.to_string(),
            path: path(column.get("path"), &format!("{here}.path"))?,
            collection,
            ty: column
                .get("type")
                .and_then(Value::as_str)
                .map(str::to_string),
        });
    }
    let select = Select {
        each: iterators.pop(),
        columns,
        selects: selects(object.get("select"), &format!("{at}.select"))?,
        union_all: selects(object.get("unionAll"), &format!("{at}.unionAll"))?,
    };
    if let Some((first, rest)) = select.union_all.split_first() {
        let names = first.column_names();
        for (index, other) in rest.iter().enumerate() {
            if other.column_names() != names {
                return Err(ViewError(format!(
                    "{at}.unionAll[{}]: its columns {:?} differ from those of unionAll[0] {:?}",
                    index + 1,
                    other.column_names(),
                    names
                )));
            }
        }
    }
    Ok(select)
}

/// A constant's name and value (`valueString`, `valueInteger`, ... as the FHIR type it names).
fn constant_of(json: &Value) -> Result<(String, Item), String> {
    let name = json
        .get("name")
        .and_then(Value::as_str)
        .filter(|name| is_name(name))
        .ok_or("a name (a letter, then letters, digits and _) is required")?;
    let object = json.as_object().ok_or("not an object")?;
    let (key, value) = object
        .iter()
        .find(|(key, _)| key.starts_with("value"))
        .ok_or("a value[x] is required")?;
    let text = || {
        value
            .as_str()
            .map(str::to_string)
            .ok_or(format!("{key} is not a string"))
    };
    let item = match &key["value".len()..] {
        "Boolean" => Item::Bool(value.as_bool().ok_or("valueBoolean is not true or false")?),
        "Integer" | "PositiveInt" | "UnsignedInt" | "Integer64" => {
            Item::Int(value.as_i64().ok_or(format!("{key} is not an integer"))?)
        }
        "Decimal" => {
            let text = value.to_string();
            Item::Dec(crate::fhirpath::parse_decimal(&text).ok_or("valueDecimal is not a number")?)
        }
        "Date" | "DateTime" | "Instant" => Item::DateTime(
            Moment::date_time(&text()?).ok_or(format!("{key} is not a date or date-time"))?,
        ),
        "Time" => Item::Time(Moment::time(&text()?).ok_or("valueTime is not a time")?),
        _ => Item::Str(text()?),
    };
    Ok((name.to_string(), item))
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `%name`s an expression reads.
fn variables_in(expr: &Expr, out: &mut Vec<String>) {
    match expr {
        Expr::Variable(name) => out.push(name.clone()),
        Expr::Member(Some(target), _) | Expr::Negate(target) | Expr::Type(_, target, _) => {
            variables_in(target, out)
        }
        Expr::Call(target, _, arguments) => {
            if let Some(target) = target {
                variables_in(target, out);
            }
            for argument in arguments {
                variables_in(argument, out);
            }
        }
        Expr::Index(target, index) | Expr::Binary(_, target, index) => {
            variables_in(target, out);
            variables_in(index, out);
        }
        _ => {}
    }
}
