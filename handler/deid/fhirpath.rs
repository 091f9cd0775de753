//! FHIRPath for anonymization rules and generalize cases: the whole grammar is parsed, and a
//! subset evaluated over a [`Tree`], returning the nodes themselves so the engine changes them in
//! place. A function or construct outside the subset is refused when the configuration is read,
//! never evaluated to an empty match: a rule that silently matches nothing leaks what it was meant
//! to hide. Semantics follow Firely's (the engine Microsoft's anonymizer runs): a comparison of
//! dates of different precisions that agree at the shorter one is empty, values with offsets
//! compare in UTC.

use rust_decimal::{Decimal, RoundingStrategy};
use std::cmp::Ordering;

use chrono::{Duration, NaiveDate};

use super::tree::Tree;

/// A parse or check failure, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PathError(pub String);

/// A failure while evaluating: a comparison of values that cannot be compared, a function given
/// the wrong kind of input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// The functions evaluated here; any other name is refused when a configuration is read.
const FUNCTIONS: &[(&str, usize, usize)] = &[
    ("where", 1, 1),
    ("exists", 0, 1),
    ("empty", 0, 0),
    ("not", 0, 0),
    ("first", 0, 0),
    ("last", 0, 0),
    ("tail", 0, 0),
    ("single", 0, 0),
    ("count", 0, 0),
    ("ofType", 1, 1),
    ("is", 1, 1),
    ("as", 1, 1),
    ("nodesByType", 1, 1),
    ("nodesByName", 1, 1),
    ("children", 0, 0),
    ("descendants", 0, 0),
    ("hasValue", 0, 0),
    ("startsWith", 1, 1),
    ("endsWith", 1, 1),
    ("contains", 1, 1),
    ("substring", 1, 2),
    ("toString", 0, 0),
    ("toInteger", 0, 0),
    ("toDecimal", 0, 0),
    ("replaceMatches", 2, 2),
    ("matches", 1, 1),
    ("replace", 2, 2),
    ("indexOf", 1, 1),
    ("length", 0, 0),
    ("upper", 0, 0),
    ("lower", 0, 0),
    ("all", 1, 1),
];

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Empty,
    Literal(Item),
    This,
    /// `$index`, `$total` and `%name`: parsed, not evaluated.
    Unsupported(String),
    /// An identifier on the focus (`name`), or on the result of `.0`.
    Member(Option<Box<Expr>>, String),
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    Index(Box<Expr>, Box<Expr>),
    Negate(Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Type(TypeOp, Box<Expr>, String),
    /// The literal pattern of `matches` or `replaceMatches`, compiled when the expression is read.
    Pattern(Pattern),
}

/// A regular expression compiled once; two are equal when written alike.
#[derive(Debug, Clone)]
pub struct Pattern(std::sync::Arc<regex::Regex>);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// The most memory one compiled regular expression may take.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    fn compile(text: &str) -> Result<Pattern, String> {
        regex::RegexBuilder::new(text)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(|regex| Pattern(std::sync::Arc::new(regex)))
            .map_err(|error| match error {
                regex::Error::CompiledTooBig(limit) => {
                    format!("the regular expression compiles to more than {limit} bytes")
                }
                _ => "the regular expression does not compile".to_string(),
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeOp {
    Is,
    As,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Implies,
    Or,
    Xor,
    And,
    In,
    Contains,
    Equal,
    NotEqual,
    Equivalent,
    NotEquivalent,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    Union,
    Add,
    Subtract,
    Concatenate,
    Multiply,
    Divide,
    Div,
    Mod,
}

/// A value in a collection: a node of the tree, or a system value.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Node(usize),
    Str(String),
    Int(i64),
    /// .NET's `System.Decimal`, as the engine computes: the scale is kept (`1.50 + 1` is `2.50`).
    Dec(Decimal),
    Bool(bool),
    /// A date or date-time (`text` as written, without `@`).
    DateTime(Moment),
    Time(Moment),
    Quantity(Decimal, String),
}

/// A date, date-time or time, down to its precision.
#[derive(Debug, Clone, PartialEq)]
pub struct Moment {
    pub text: String,
    /// year, month, day, hour, minute, second, nanosecond; only `precision` of them set.
    parts: [i64; 7],
    precision: usize,
}

// ---------------------------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Number(String),
    DateTime(String),
    Time(String),
    Special(String),
    External(String),
    Symbol(&'static str),
}

const SYMBOLS: &[&str] = &[
    "<=", ">=", "!=", "!~", "(", ")", "[", "]", "{", "}", ".", ",", "+", "-", "*", "/", "&", "|",
    "<", ">", "=", "~",
];

fn lex(text: &str) -> Result<Vec<Token>, PathError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let c = chars[at];
        if c.is_whitespace() {
            at += 1;
            continue;
        }
        if c == '/' && chars.get(at + 1) == Some(&'/') {
            while at < chars.len() && chars[at] != '\n' {
                at += 1;
            }
            continue;
        }
        if c == '/' && chars.get(at + 1) == Some(&'*') {
            at += 2;
            while at + 1 < chars.len() && !(chars[at] == '*' && chars[at + 1] == '/') {
                at += 1;
            }
            at += 2;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = at;
            while at < chars.len() && (chars[at].is_ascii_alphanumeric() || chars[at] == '_') {
                at += 1;
            }
            tokens.push(Token::Ident(chars[start..at].iter().collect()));
            continue;
        }
        if c == '`' || c == '\'' {
            let (value, next) = quoted(&chars, at, c)?;
            at = next;
            tokens.push(match c {
                '`' => Token::Ident(value),
                _ => Token::Str(value),
            });
            continue;
        }
        if c.is_ascii_digit() {
            let start = at;
            while at < chars.len() && chars[at].is_ascii_digit() {
                at += 1;
            }
            if chars.get(at) == Some(&'.') && chars.get(at + 1).is_some_and(char::is_ascii_digit) {
                at += 1;
                while at < chars.len() && chars[at].is_ascii_digit() {
                    at += 1;
                }
            }
            tokens.push(Token::Number(chars[start..at].iter().collect()));
            continue;
        }
        if c == '@' {
            let start = at + 1;
            at += 1;
            while at < chars.len()
                && (chars[at].is_ascii_alphanumeric() || matches!(chars[at], '-' | ':' | '.' | '+'))
            {
                at += 1;
            }
            let literal: String = chars[start..at].iter().collect();
            tokens.push(match literal.strip_prefix('T') {
                Some(time) => Token::Time(time.to_string()),
                None => Token::DateTime(literal),
            });
            continue;
        }
        if c == '$' || c == '%' {
            let start = at + 1;
            at += 1;
            if c == '%' && matches!(chars.get(at), Some('\'' | '`')) {
                let (value, next) = quoted(&chars, at, chars[at])?;
                at = next;
                tokens.push(Token::External(value));
                continue;
            }
            while at < chars.len() && (chars[at].is_ascii_alphanumeric() || chars[at] == '_') {
                at += 1;
            }
            let name: String = chars[start..at].iter().collect();
            if name.is_empty() {
                return Err(PathError(format!("'{c}' must be followed by a name")));
            }
            tokens.push(match c {
                '$' => Token::Special(name),
                _ => Token::External(name),
            });
            continue;
        }
        let rest: String = chars[at..chars.len().min(at + 2)].iter().collect();
        match SYMBOLS.iter().find(|symbol| rest.starts_with(**symbol)) {
            Some(symbol) => {
                tokens.push(Token::Symbol(symbol));
                at += symbol.chars().count();
            }
            None => return Err(PathError(format!("unexpected character '{c}'"))),
        }
    }
    Ok(tokens)
}

fn quoted(chars: &[char], start: usize, quote: char) -> Result<(String, usize), PathError> {
    let mut value = String::new();
    let mut at = start + 1;
    while at < chars.len() {
        match chars[at] {
            '\\' => {
                let escaped = chars
                    .get(at + 1)
                    .ok_or_else(|| PathError("an unfinished escape".into()))?;
                match escaped {
                    'n' => value.push('\n'),
                    'r' => value.push('\r'),
                    't' => value.push('\t'),
                    'f' => value.push('\u{c}'),
                    'u' => {
                        let hex: String = chars.get(at + 2..at + 6).unwrap_or(&[]).iter().collect();
                        let code = u32::from_str_radix(&hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .ok_or_else(|| PathError("a bad \\u escape".into()))?;
                        value.push(code);
                        at += 4;
                    }
                    other => value.push(*other),
                }
                at += 2;
            }
            c if c == quote => return Ok((value, at + 1)),
            c => {
                value.push(c);
                at += 1;
            }
        }
    }
    Err(PathError("an unclosed quote".into()))
}

// ---------------------------------------------------------------------------------------------
// Parsing (precedence climbing, FHIRPath's order from loosest to tightest)

/// The most characters an expression may have.
pub const MAX_EXPRESSION_CHARS: usize = 10_000;
/// The deepest an expression may nest: its syntax tree, and the parser's descent into parentheses,
/// arguments and operators. Parsing, checking, evaluating and dropping a tree recurse over it, so
/// this bound is what keeps any expression from overflowing the stack.
pub const MAX_DEPTH: usize = 100;

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    /// How deep the parser has descended.
    nesting: usize,
}

/// An expression with the depth of its tree.
type Parsed = (Expr, usize);

fn too_deep() -> PathError {
    PathError(format!(
        "the expression nests deeper than {MAX_DEPTH} levels"
    ))
}

/// A node over children of depth `below`, refused past [`MAX_DEPTH`] before it is built.
fn node(below: usize, build: impl FnOnce() -> Expr) -> Result<Parsed, PathError> {
    if below >= MAX_DEPTH {
        return Err(too_deep());
    }
    Ok((build(), below + 1))
}

fn binary_op(token: &Token) -> Option<(Op, u8)> {
    Some(match token {
        Token::Ident(word) => match word.as_str() {
            "implies" => (Op::Implies, 1),
            "or" => (Op::Or, 2),
            "xor" => (Op::Xor, 2),
            "and" => (Op::And, 3),
            "in" => (Op::In, 4),
            "contains" => (Op::Contains, 4),
            "div" => (Op::Div, 10),
            "mod" => (Op::Mod, 10),
            _ => return None,
        },
        Token::Symbol(symbol) => match *symbol {
            "=" => (Op::Equal, 5),
            "!=" => (Op::NotEqual, 5),
            "~" => (Op::Equivalent, 5),
            "!~" => (Op::NotEquivalent, 5),
            "<" => (Op::Less, 6),
            "<=" => (Op::LessOrEqual, 6),
            ">" => (Op::Greater, 6),
            ">=" => (Op::GreaterOrEqual, 6),
            "|" => (Op::Union, 7),
            "+" => (Op::Add, 9),
            "-" => (Op::Subtract, 9),
            "&" => (Op::Concatenate, 9),
            "*" => (Op::Multiply, 10),
            "/" => (Op::Divide, 10),
            _ => return None,
        },
        _ => return None,
    })
}

const TYPE_LEVEL: u8 = 8;

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn expect(&mut self, symbol: &str) -> Result<(), PathError> {
        match self.next() {
            Some(Token::Symbol(found)) if found == symbol => Ok(()),
            _ => Err(PathError(format!("expected '{symbol}'"))),
        }
    }

    /// Runs `parse` one level further down, refused past [`MAX_DEPTH`].
    fn descend<T>(
        &mut self,
        parse: impl FnOnce(&mut Self) -> Result<T, PathError>,
    ) -> Result<T, PathError> {
        if self.nesting >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.nesting += 1;
        let parsed = parse(self);
        self.nesting -= 1;
        parsed
    }

    fn expression(&mut self, level: u8) -> Result<Parsed, PathError> {
        self.descend(|parser| parser.operators(level))
    }

    fn operators(&mut self, level: u8) -> Result<Parsed, PathError> {
        let (mut left, mut depth) = self.unary()?;
        loop {
            if let Some(Token::Ident(word)) = self.peek() {
                let op = match word.as_str() {
                    "is" => Some(TypeOp::Is),
                    "as" => Some(TypeOp::As),
                    _ => None,
                };
                if let Some(op) = op {
                    if TYPE_LEVEL < level {
                        break;
                    }
                    self.at += 1;
                    let name = self.type_name()?;
                    (left, depth) = node(depth, || Expr::Type(op, Box::new(left), name))?;
                    continue;
                }
            }
            let Some((op, op_level)) = self.peek().and_then(binary_op) else {
                break;
            };
            if op_level < level {
                break;
            }
            self.at += 1;
            let (right, right_depth) = self.expression(op_level + 1)?;
            (left, depth) = node(depth.max(right_depth), || {
                Expr::Binary(op, Box::new(left), Box::new(right))
            })?;
        }
        Ok((left, depth))
    }

    fn type_name(&mut self) -> Result<String, PathError> {
        let Some(Token::Ident(mut name)) = self.next() else {
            return Err(PathError("expected a type name".into()));
        };
        while self.peek() == Some(&Token::Symbol(".")) {
            self.at += 1;
            let Some(Token::Ident(part)) = self.next() else {
                return Err(PathError("expected a type name".into()));
            };
            name = format!("{name}.{part}");
        }
        Ok(name)
    }

    fn unary(&mut self) -> Result<Parsed, PathError> {
        match self.peek() {
            Some(Token::Symbol("-")) => {
                self.at += 1;
                let (inner, depth) = self.descend(Self::unary)?;
                node(depth, || Expr::Negate(Box::new(inner)))
            }
            Some(Token::Symbol("+")) => {
                self.at += 1;
                self.descend(Self::unary)
            }
            _ => self.postfix(),
        }
    }

    fn postfix(&mut self) -> Result<Parsed, PathError> {
        let (mut expr, mut depth) = self.term()?;
        loop {
            match self.peek() {
                Some(Token::Symbol(".")) => {
                    self.at += 1;
                    (expr, depth) = self.invocation(Some((expr, depth)))?;
                }
                Some(Token::Symbol("[")) => {
                    self.at += 1;
                    let (index, index_depth) = self.expression(0)?;
                    self.expect("]")?;
                    (expr, depth) = node(depth.max(index_depth), || {
                        Expr::Index(Box::new(expr), Box::new(index))
                    })?;
                }
                _ => return Ok((expr, depth)),
            }
        }
    }

    fn invocation(&mut self, target: Option<Parsed>) -> Result<Parsed, PathError> {
        let target_depth = target.as_ref().map_or(0, |(_, depth)| *depth);
        let target = target.map(|(expr, _)| Box::new(expr));
        match self.next() {
            Some(Token::Ident(name)) => {
                if self.peek() == Some(&Token::Symbol("(")) {
                    self.at += 1;
                    let mut arguments = Vec::new();
                    let mut depth = target_depth;
                    if self.peek() != Some(&Token::Symbol(")")) {
                        loop {
                            let (argument, argument_depth) = self.expression(0)?;
                            arguments.push(argument);
                            depth = depth.max(argument_depth);
                            if self.peek() == Some(&Token::Symbol(",")) {
                                self.at += 1;
                                continue;
                            }
                            break;
                        }
                    }
                    self.expect(")")?;
                    if matches!(name.as_str(), "matches" | "replaceMatches") {
                        if let Some(Expr::Literal(Item::Str(text))) = arguments.first() {
                            let pattern = Pattern::compile(text)
                                .map_err(|error| PathError(format!("{name}(): {error}")))?;
                            arguments[0] = Expr::Pattern(pattern);
                        }
                    }
                    node(depth, || Expr::Call(target, name, arguments))
                } else {
                    node(target_depth, || Expr::Member(target, name))
                }
            }
            Some(Token::Special(name)) if target.is_none() => Ok((
                match name.as_str() {
                    "this" => Expr::This,
                    _ => Expr::Unsupported(format!("${name}")),
                },
                1,
            )),
            _ => Err(PathError("expected a name after '.'".into())),
        }
    }

    fn term(&mut self) -> Result<Parsed, PathError> {
        let leaf = |expr| Ok((expr, 1));
        match self.peek().cloned() {
            Some(Token::Symbol("(")) => {
                self.at += 1;
                let inner = self.expression(0)?;
                self.expect(")")?;
                Ok(inner)
            }
            Some(Token::Symbol("{")) => {
                self.at += 1;
                self.expect("}")?;
                leaf(Expr::Empty)
            }
            Some(Token::Str(text)) => {
                self.at += 1;
                leaf(Expr::Literal(Item::Str(text)))
            }
            Some(Token::Number(text)) => {
                self.at += 1;
                let number = match text.contains('.') {
                    true => text.parse().ok().map(Item::Dec),
                    false => text.parse().ok().map(Item::Int),
                }
                .ok_or_else(|| PathError("a bad number".into()))?;
                if let Some(Token::Str(unit)) = self.peek().cloned() {
                    self.at += 1;
                    let value = match number {
                        Item::Int(value) => Decimal::from(value),
                        Item::Dec(value) => value,
                        _ => unreachable!("a number"),
                    };
                    return leaf(Expr::Literal(Item::Quantity(value, unit)));
                }
                leaf(Expr::Literal(number))
            }
            Some(Token::DateTime(text)) => {
                self.at += 1;
                let moment = Moment::date_time(&text)
                    .ok_or_else(|| PathError(format!("'@{text}' is not a date or date-time")))?;
                leaf(Expr::Literal(Item::DateTime(moment)))
            }
            Some(Token::Time(text)) => {
                self.at += 1;
                let moment = Moment::time(&text)
                    .ok_or_else(|| PathError(format!("'@T{text}' is not a time")))?;
                leaf(Expr::Literal(Item::Time(moment)))
            }
            Some(Token::External(name)) => {
                self.at += 1;
                leaf(Expr::Unsupported(format!("%{name}")))
            }
            Some(Token::Ident(word)) if word == "true" || word == "false" => {
                self.at += 1;
                leaf(Expr::Literal(Item::Bool(word == "true")))
            }
            Some(Token::Ident(_)) | Some(Token::Special(_)) => self.invocation(None),
            Some(token) => Err(PathError(format!("unexpected {}", describe(&token)))),
            None => Err(PathError("the expression ends too soon".into())),
        }
    }
}

fn describe(token: &Token) -> String {
    match token {
        Token::Symbol(symbol) => format!("'{symbol}'"),
        Token::Ident(name) => format!("'{name}'"),
        _ => "a literal".into(),
    }
}

/// Parses a FHIRPath expression and checks that everything in it is evaluated here.
pub fn parse(text: &str) -> Result<Expr, PathError> {
    let length = text.chars().count();
    if length > MAX_EXPRESSION_CHARS {
        return Err(PathError(format!(
            "the expression has {length} characters, more than the {MAX_EXPRESSION_CHARS} allowed"
        )));
    }
    let tokens = lex(text)?;
    if tokens.is_empty() {
        return Err(PathError("the expression is empty".into()));
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        nesting: 0,
    };
    let (expr, _) = parser.expression(0)?;
    if let Some(token) = parser.peek() {
        return Err(PathError(format!("unexpected {}", describe(token))));
    }
    check(&expr)?;
    Ok(expr)
}

fn check(expr: &Expr) -> Result<(), PathError> {
    match expr {
        Expr::Empty | Expr::Literal(_) | Expr::Pattern(_) | Expr::This | Expr::Member(None, _) => {
            Ok(())
        }
        Expr::Unsupported(what) => Err(PathError(format!("{what} is not supported"))),
        Expr::Member(Some(target), _) => check(target),
        Expr::Call(target, name, arguments) => {
            let Some((_, least, most)) = FUNCTIONS.iter().find(|(known, ..)| known == name) else {
                return Err(PathError(format!(
                    "the function {name}() is unknown or not supported"
                )));
            };
            if arguments.len() < *least || arguments.len() > *most {
                return Err(PathError(format!(
                    "{name}() takes {least} to {most} arguments"
                )));
            }
            if matches!(name.as_str(), "ofType" | "is" | "as")
                && !matches!(arguments[0], Expr::Member(None, _))
            {
                return Err(PathError(format!("{name}() takes a type name")));
            }
            if let Some(target) = target {
                check(target)?;
            }
            match name.as_str() {
                "ofType" | "is" | "as" => Ok(()),
                _ => arguments.iter().try_for_each(check),
            }
        }
        Expr::Index(target, index) => {
            check(target)?;
            check(index)
        }
        Expr::Negate(inner) | Expr::Type(_, inner, _) => check(inner),
        Expr::Binary(_, left, right) => {
            check(left)?;
            check(right)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dates and times

impl Moment {
    /// `YYYY[-MM[-DD[Thh[:mm[:ss[.fff]]][Z|±hh:mm]]]]`; offsets are applied (values compare in UTC).
    pub fn date_time(text: &str) -> Option<Moment> {
        let (date, time) = match text.split_once('T') {
            Some((date, time)) => (date, Some(time)),
            None => (text, None),
        };
        let mut parts = [0i64; 7];
        let mut precision = 0;
        let mut fields = date.split('-');
        let year = fields.next()?;
        if year.len() != 4 {
            return None;
        }
        parts[0] = year.parse().ok()?;
        precision = precision.max(1);
        for (index, field) in fields.enumerate() {
            if index > 1 || field.len() != 2 {
                return None;
            }
            parts[index + 1] = field.parse().ok()?;
            precision = index + 2;
        }
        if precision >= 2 && !(1..=12).contains(&parts[1]) {
            return None;
        }
        if let Some(time) = time.filter(|time| !time.is_empty()) {
            if precision < 3 {
                return None;
            }
            let (clock, offset) = split_offset(time)?;
            let clock = Moment::time(clock)?;
            parts[3..7].copy_from_slice(&clock.parts[0..4]);
            precision = 3 + clock.precision;
            if let Some(minutes) = offset {
                let at =
                    NaiveDate::from_ymd_opt(parts[0] as i32, parts[1] as u32, parts[2] as u32)?
                        .and_hms_opt(parts[3] as u32, parts[4] as u32, parts[5].min(59) as u32)?
                        - Duration::minutes(minutes);
                use chrono::{Datelike, Timelike};
                parts[0] = at.year() as i64;
                parts[1] = at.month() as i64;
                parts[2] = at.day() as i64;
                parts[3] = at.hour() as i64;
                parts[4] = at.minute() as i64;
                parts[5] = at.second() as i64;
            }
        } else if precision == 3 {
            NaiveDate::from_ymd_opt(parts[0] as i32, parts[1] as u32, parts[2] as u32)?;
        }
        Some(Moment {
            text: text.to_string(),
            parts,
            precision,
        })
    }

    /// `hh[:mm[:ss[.fff]]]`.
    pub fn time(text: &str) -> Option<Moment> {
        let mut parts = [0i64; 7];
        let (clock, fraction) = match text.split_once('.') {
            Some((clock, fraction)) => (clock, Some(fraction)),
            None => (text, None),
        };
        let mut precision = 0;
        for (index, field) in clock.split(':').enumerate() {
            if index > 2 || field.len() != 2 || !field.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            parts[index] = field.parse().ok()?;
            precision = index + 1;
        }
        if parts[0] > 23 || parts[1] > 59 || parts[2] > 60 {
            return None;
        }
        if let Some(fraction) = fraction {
            if precision != 3
                || fraction.is_empty()
                || !fraction.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            let digits: String = fraction
                .chars()
                .chain("000000000".chars())
                .take(9)
                .collect();
            parts[3] = digits.parse().ok()?;
            precision = 4;
        }
        Some(Moment {
            text: text.to_string(),
            parts,
            precision,
        })
    }

    /// Firely's comparison: `None` when the two agree at the shorter precision but differ in it.
    fn compare(&self, other: &Moment) -> Option<Ordering> {
        let common = self.precision.min(other.precision);
        for index in 0..common {
            match self.parts[index].cmp(&other.parts[index]) {
                Ordering::Equal => continue,
                unequal => return Some(unequal),
            }
        }
        (self.precision == other.precision).then_some(Ordering::Equal)
    }
}

/// Splits `hh:mm:ss(Z|±hh:mm)` into the clock and the offset in minutes.
fn split_offset(time: &str) -> Option<(&str, Option<i64>)> {
    if let Some(clock) = time.strip_suffix('Z') {
        return Some((clock, Some(0)));
    }
    match time.rfind(['+', '-']) {
        Some(at) => {
            let (clock, offset) = time.split_at(at);
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let (hours, minutes) = offset[1..].split_once(':')?;
            let minutes = hours.parse::<i64>().ok()? * 60 + minutes.parse::<i64>().ok()?;
            Some((clock, Some(sign * minutes)))
        }
        None => Some((time, None)),
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// Evaluates `expr` with `focus` as the input collection and `$this`.
pub fn evaluate(tree: &Tree, expr: &Expr, focus: &[Item]) -> Result<Vec<Item>, EvalError> {
    let this = match focus {
        [single] => Some(single.clone()),
        _ => None,
    };
    Evaluator { tree }.eval(expr, focus, this.as_ref())
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
            Expr::Call(target, name, arguments) => {
                let focus = match target {
                    Some(target) => self.eval(target, input, this)?,
                    None => input.to_vec(),
                };
                self.call(name, &focus, arguments, input, this)?
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
        name: &str,
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
        Ok(match name {
            "where" | "exists" | "all" => {
                if name == "exists" && arguments.is_empty() {
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
                match name {
                    "where" => kept,
                    "exists" => vec![Item::Bool(!kept.is_empty())],
                    _ => vec![Item::Bool(kept.len() == focus.len())],
                }
            }
            "empty" => vec![Item::Bool(focus.is_empty())],
            "not" => boolean(single_bool(focus)?.map(|value| !value)),
            "first" => focus.first().cloned().into_iter().collect(),
            "last" => focus.last().cloned().into_iter().collect(),
            "tail" => focus.iter().skip(1).cloned().collect(),
            "single" => match focus {
                [] | [_] => focus.to_vec(),
                _ => return Err(EvalError("single() on several items".into())),
            },
            "count" => vec![Item::Int(focus.len() as i64)],
            "ofType" | "as" => {
                let ty = type_argument();
                focus
                    .iter()
                    .filter(|item| self.is_type(item, &ty))
                    .cloned()
                    .collect()
            }
            "is" => match focus {
                [] => Vec::new(),
                [item] => vec![Item::Bool(self.is_type(item, &type_argument()))],
                _ => return Err(EvalError("is() expects one item".into())),
            },
            "nodesByType" | "nodesByName" => {
                let Some(key) = self.single_string(&argument(0)?, name)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in focus {
                    if let Item::Node(id) = item {
                        self.self_and_descendants(*id, &mut |tree, node| {
                            let matches = match name {
                                "nodesByType" => tree.nodes[node].ty == key,
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
            "children" => focus
                .iter()
                .filter_map(|item| match item {
                    Item::Node(id) => Some(self.tree.children(*id).map(Item::Node)),
                    _ => None,
                })
                .flatten()
                .collect(),
            "descendants" => {
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
            "hasValue" => vec![Item::Bool(
                matches!(focus, [Item::Node(id)] if self.tree.nodes[*id].value.is_some())
                    || matches!(focus, [item] if !matches!(item, Item::Node(_))),
            )],
            "toString" => match self.single_value(focus, name)? {
                None => Vec::new(),
                Some(value) => vec![Item::Str(to_text(&value))],
            },
            "toInteger" => match self.single_value(focus, name)? {
                Some(Item::Int(value)) => vec![Item::Int(value)],
                Some(Item::Str(text)) => text.parse().ok().map(Item::Int).into_iter().collect(),
                Some(Item::Bool(value)) => vec![Item::Int(value as i64)],
                _ => Vec::new(),
            },
            "toDecimal" => match self.single_value(focus, name)? {
                Some(Item::Int(value)) => vec![Item::Dec(Decimal::from(value))],
                Some(Item::Dec(value)) => vec![Item::Dec(value)],
                Some(Item::Str(text)) => parse_decimal(&text).map(Item::Dec).into_iter().collect(),
                _ => Vec::new(),
            },
            _ => {
                let Some(text) = self.single_string(focus, name)? else {
                    return Ok(Vec::new());
                };
                self.string_function(name, &text, arguments, input, this)?
            }
        })
    }

    fn string_function(
        &self,
        name: &str,
        text: &str,
        arguments: &[Expr],
        input: &[Item],
        this: Option<&Item>,
    ) -> Result<Vec<Item>, EvalError> {
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
        Ok(vec![match name {
            "startsWith" => Item::Bool(text.starts_with(&string(0)?)),
            "endsWith" => Item::Bool(text.ends_with(&string(0)?)),
            "contains" => Item::Bool(text.contains(&string(0)?)),
            "length" => Item::Int(chars.len() as i64),
            "upper" => Item::Str(text.to_uppercase()),
            "lower" => Item::Str(text.to_lowercase()),
            "indexOf" => {
                let needle = string(0)?;
                Item::Int(match text.find(&needle) {
                    Some(at) => text[..at].chars().count() as i64,
                    None => -1,
                })
            }
            "substring" => {
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
            "replace" => Item::Str(text.replace(&string(0)?, &string(1)?)),
            "matches" | "replaceMatches" => {
                let regex = match arguments.first() {
                    Some(Expr::Pattern(pattern)) => pattern.clone(),
                    _ => Pattern::compile(&string(0)?)
                        .map_err(|error| EvalError(format!("{name}(): {error}")))?,
                };
                let regex = &regex.0;
                match name {
                    "matches" => Item::Bool(regex.is_match(text)),
                    _ => Item::Str(regex.replace_all(text, string(1)?.as_str()).into_owned()),
                }
            }
            other => {
                return Err(EvalError(format!(
                    "the function {other}() is not supported"
                )))
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
                let (a, b) = (single_bool(&left)?, single_bool(&right)?);
                boolean(match op {
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
                })
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
                let (left, right) = (self.values(&left), self.values(&right));
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
                boolean(match op {
                    Op::NotEqual | Op::NotEquivalent => result.map(|value| !value),
                    _ => result,
                })
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

fn kind(item: &Item) -> &'static str {
    match item {
        Item::Node(_) => "an element",
        Item::Str(_) => "a string",
        Item::Int(_) => "an integer",
        Item::Dec(_) => "a decimal",
        Item::Bool(_) => "a boolean",
        Item::DateTime(_) => "a date-time",
        Item::Time(_) => "a time",
        Item::Quantity(..) => "a quantity",
    }
}

fn number(item: &Item) -> Option<Decimal> {
    match item {
        Item::Int(value) => Some(Decimal::from(*value)),
        Item::Dec(value) => Some(*value),
        _ => None,
    }
}

/// Decimals compare rounded to FHIRPath's step of 10^-8 (half to even), as Firely compares them.
fn to_step(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(8, RoundingStrategy::MidpointNearestEven)
}

/// A decimal as .NET's `decimal.Parse` reads it (exponents allowed, scale kept); `None` outside its
/// range.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    if text.starts_with(['+', '.']) || text.ends_with('.') {
        return None;
    }
    match text.contains(['e', 'E']) {
        true => Decimal::from_scientific(text).ok(),
        false => text.parse().ok(),
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

/// A decimal as Newtonsoft.Json writes .NET's decimal into the engine's output: with its scale,
/// and `.0` when it has none.
pub fn decimal_token(value: Decimal) -> String {
    let mut text = value.to_string();
    if !text.contains('.') {
        text.push_str(".0");
    }
    text
}

/// A system value as text (`toString()`).
pub fn to_text(item: &Item) -> String {
    match item {
        Item::Str(text) => text.clone(),
        Item::Int(value) => value.to_string(),
        Item::Dec(value) => value.to_string(),
        Item::Bool(value) => value.to_string(),
        Item::DateTime(moment) | Item::Time(moment) => moment.text.clone(),
        Item::Quantity(value, unit) => format!("{value} '{unit}'"),
        Item::Node(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_parses_and_unsupported_parts_are_named() {
        for ok in [
            "nodesByType('HumanName').family",
            "Device.where(id.exists()).id",
            "onset as Age",
            "(name | address).where(use = 'home')",
            "$this in ('en-AU' | 'en-CA')",
            "($this div 10 -1)*10 ",
            "$this.toString().replaceMatches('\\\\b(?<y>\\\\d{4})','${y}')",
            "$this >= @1990-01-01T00:00:00Z and $this < @T12:00",
            "a.b[0].c is FHIR.string",
        ] {
            parse(ok).unwrap_or_else(|error| panic!("{ok}: {error}"));
        }
        assert!(parse("invalid()").unwrap_err().0.contains("invalid()"));
        assert!(parse("name && family").is_err());
        assert!(parse("%resource.id").unwrap_err().0.contains("%resource"));
        assert!(parse("name.select(family)")
            .unwrap_err()
            .0
            .contains("select()"));
        assert!(parse("name.").is_err());
        assert!(parse("").is_err());
    }

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
                    evaluate(&tree, &expr, &[Item::Node(crate::deid::tree::ROOT)]).unwrap();
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn literal_patterns_compile_once_when_read() {
        assert!(parse("name.family.matches('(')")
            .unwrap_err()
            .0
            .contains("matches(): the regular expression does not compile"));
        assert!(parse("name.family.replaceMatches('(a{1000}){1000}', 'b')")
            .unwrap_err()
            .0
            .contains("compiles to more than"));
        let Expr::Call(_, _, arguments) = parse("family.matches('^F')").unwrap() else {
            panic!("a call");
        };
        assert!(matches!(arguments[0], Expr::Pattern(_)));
    }

    #[test]
    fn partial_dates_compare_as_firely_does() {
        let date = |text| Moment::date_time(text).unwrap();
        assert_eq!(date("2000").compare(&date("2000-01-01")), None);
        assert_eq!(
            date("2000").compare(&date("1990-01-01")),
            Some(Ordering::Greater)
        );
        assert_eq!(
            date("2010-01-01T00:00:00+09:00").compare(&date("2010-01-01T00:00:00+08:00")),
            Some(Ordering::Less)
        );
        assert_eq!(
            date("2009-12-31T16:00:00Z").compare(&date("2010-01-01T00:00:00+08:00")),
            Some(Ordering::Equal)
        );
    }
}
