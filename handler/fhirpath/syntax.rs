//! FHIRPath's grammar: text to an [`Expr`], bounded in size and depth while it is read, with
//! every function resolved to a [`Function`] the evaluator runs and literal patterns compiled.

use rust_decimal::Decimal;

use super::values::{Item, Moment};

/// A parse or check failure, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PathError(pub String);

/// The functions evaluated here, resolved from their names while parsing: any other name is
/// refused when an expression is read, and the evaluator's `match` over this enum has an arm for
/// each, so a function the parser accepts is one the evaluator runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Where,
    Exists,
    All,
    Empty,
    Not,
    First,
    Last,
    Tail,
    Single,
    Count,
    OfType,
    Is,
    As,
    NodesByType,
    NodesByName,
    Children,
    Descendants,
    HasValue,
    ToString,
    ToInteger,
    ToDecimal,
    /// SQL on FHIR's: `join`, `extension`, `getResourceKey`, `getReferenceKey`, `lowBoundary`,
    /// `highBoundary`; refused in anonymization rules.
    Join,
    Extension,
    GetResourceKey,
    GetReferenceKey,
    LowBoundary,
    HighBoundary,
    /// A function of one string.
    Text(TextFunction),
}

/// The functions of one string (the focus), with their arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFunction {
    StartsWith,
    EndsWith,
    Contains,
    Substring,
    Replace,
    Matches,
    ReplaceMatches,
    IndexOf,
    Length,
    Upper,
    Lower,
}

impl Function {
    /// Every function, for the tests that hold the names and the variants together.
    pub const ALL: [Function; 38] = [
        Function::Where,
        Function::Exists,
        Function::All,
        Function::Empty,
        Function::Not,
        Function::First,
        Function::Last,
        Function::Tail,
        Function::Single,
        Function::Count,
        Function::OfType,
        Function::Is,
        Function::As,
        Function::NodesByType,
        Function::NodesByName,
        Function::Children,
        Function::Descendants,
        Function::HasValue,
        Function::ToString,
        Function::ToInteger,
        Function::ToDecimal,
        Function::Join,
        Function::Extension,
        Function::GetResourceKey,
        Function::GetReferenceKey,
        Function::LowBoundary,
        Function::HighBoundary,
        Function::Text(TextFunction::StartsWith),
        Function::Text(TextFunction::EndsWith),
        Function::Text(TextFunction::Contains),
        Function::Text(TextFunction::Substring),
        Function::Text(TextFunction::Replace),
        Function::Text(TextFunction::Matches),
        Function::Text(TextFunction::ReplaceMatches),
        Function::Text(TextFunction::IndexOf),
        Function::Text(TextFunction::Length),
        Function::Text(TextFunction::Upper),
        Function::Text(TextFunction::Lower),
    ];

    pub fn from_name(name: &str) -> Option<Function> {
        use TextFunction::*;
        Some(match name {
            "where" => Function::Where,
            "exists" => Function::Exists,
            "all" => Function::All,
            "empty" => Function::Empty,
            "not" => Function::Not,
            "first" => Function::First,
            "last" => Function::Last,
            "tail" => Function::Tail,
            "single" => Function::Single,
            "count" => Function::Count,
            "ofType" => Function::OfType,
            "is" => Function::Is,
            "as" => Function::As,
            "nodesByType" => Function::NodesByType,
            "nodesByName" => Function::NodesByName,
            "children" => Function::Children,
            "descendants" => Function::Descendants,
            "hasValue" => Function::HasValue,
            "toString" => Function::ToString,
            "toInteger" => Function::ToInteger,
            "toDecimal" => Function::ToDecimal,
            "join" => Function::Join,
            "extension" => Function::Extension,
            "getResourceKey" => Function::GetResourceKey,
            "getReferenceKey" => Function::GetReferenceKey,
            "lowBoundary" => Function::LowBoundary,
            "highBoundary" => Function::HighBoundary,
            "startsWith" => Function::Text(StartsWith),
            "endsWith" => Function::Text(EndsWith),
            "contains" => Function::Text(Contains),
            "substring" => Function::Text(Substring),
            "replace" => Function::Text(Replace),
            "matches" => Function::Text(Matches),
            "replaceMatches" => Function::Text(ReplaceMatches),
            "indexOf" => Function::Text(IndexOf),
            "length" => Function::Text(Length),
            "upper" => Function::Text(Upper),
            "lower" => Function::Text(Lower),
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use TextFunction::*;
        match self {
            Function::Where => "where",
            Function::Exists => "exists",
            Function::All => "all",
            Function::Empty => "empty",
            Function::Not => "not",
            Function::First => "first",
            Function::Last => "last",
            Function::Tail => "tail",
            Function::Single => "single",
            Function::Count => "count",
            Function::OfType => "ofType",
            Function::Is => "is",
            Function::As => "as",
            Function::NodesByType => "nodesByType",
            Function::NodesByName => "nodesByName",
            Function::Children => "children",
            Function::Descendants => "descendants",
            Function::HasValue => "hasValue",
            Function::ToString => "toString",
            Function::ToInteger => "toInteger",
            Function::ToDecimal => "toDecimal",
            Function::Join => "join",
            Function::Extension => "extension",
            Function::GetResourceKey => "getResourceKey",
            Function::GetReferenceKey => "getReferenceKey",
            Function::LowBoundary => "lowBoundary",
            Function::HighBoundary => "highBoundary",
            Function::Text(StartsWith) => "startsWith",
            Function::Text(EndsWith) => "endsWith",
            Function::Text(Contains) => "contains",
            Function::Text(Substring) => "substring",
            Function::Text(Replace) => "replace",
            Function::Text(Matches) => "matches",
            Function::Text(ReplaceMatches) => "replaceMatches",
            Function::Text(IndexOf) => "indexOf",
            Function::Text(Length) => "length",
            Function::Text(Upper) => "upper",
            Function::Text(Lower) => "lower",
        }
    }

    /// The fewest and the most arguments.
    pub fn arity(self) -> (usize, usize) {
        use TextFunction::*;
        match self {
            Function::Where | Function::All | Function::OfType | Function::Is | Function::As => {
                (1, 1)
            }
            Function::NodesByType | Function::NodesByName | Function::Extension => (1, 1),
            Function::Exists | Function::Join | Function::GetReferenceKey => (0, 1),
            Function::GetResourceKey => (0, 0),
            Function::LowBoundary | Function::HighBoundary => (0, 1),
            Function::Empty
            | Function::Not
            | Function::First
            | Function::Last
            | Function::Tail
            | Function::Single
            | Function::Count
            | Function::Children
            | Function::Descendants
            | Function::HasValue
            | Function::ToString
            | Function::ToInteger
            | Function::ToDecimal => (0, 0),
            Function::Text(StartsWith | EndsWith | Contains | Matches | IndexOf) => (1, 1),
            Function::Text(Substring) => (1, 2),
            Function::Text(Replace | ReplaceMatches) => (2, 2),
            Function::Text(Length | Upper | Lower) => (0, 0),
        }
    }

    /// `ofType`, `is`, `as` and `getReferenceKey` take a type name, not an expression.
    fn takes_a_type(self) -> bool {
        matches!(
            self,
            Function::OfType | Function::Is | Function::As | Function::GetReferenceKey
        )
    }

    /// Functions of SQL on FHIR, which anonymization rules may not use.
    pub fn is_for_views(self) -> bool {
        matches!(
            self,
            Function::Join
                | Function::Extension
                | Function::GetResourceKey
                | Function::GetReferenceKey
                | Function::LowBoundary
                | Function::HighBoundary
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Empty,
    Literal(Item),
    This,
    /// `$index` and `$total`: parsed, not evaluated.
    Unsupported(String),
    /// `%name`: a view's constant, or `%rowIndex`; refused in anonymization rules.
    Variable(String),
    /// An identifier on the focus (`name`), or on the result of `.0`.
    Member(Option<Box<Expr>>, String),
    Call(Option<Box<Expr>>, Function, Vec<Expr>),
    Index(Box<Expr>, Box<Expr>),
    Negate(Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Type(TypeOp, Box<Expr>, String),
    /// The literal pattern of `matches` or `replaceMatches`, compiled when the expression is read.
    Pattern(Pattern),
}

/// A regular expression compiled once; two are equal when written alike.
#[derive(Debug, Clone)]
pub struct Pattern(pub(super) std::sync::Arc<regex::Regex>);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// The most memory one compiled regular expression may take.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    pub(super) fn compile(text: &str) -> Result<Pattern, String> {
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
            let (token, next) = variable(&chars, at)?;
            tokens.push(token);
            at = next;
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

/// `$this`, `%name` or `%'name'` at `start`: the token, and where the text goes on.
fn variable(chars: &[char], start: usize) -> Result<(Token, usize), PathError> {
    let c = chars[start];
    let mut at = start + 1;
    if c == '%' && matches!(chars.get(at), Some('\'' | '`')) {
        let (value, next) = quoted(chars, at, chars[at])?;
        return Ok((Token::External(value), next));
    }
    while at < chars.len() && (chars[at].is_ascii_alphanumeric() || chars[at] == '_') {
        at += 1;
    }
    let name: String = chars[start + 1..at].iter().collect();
    if name.is_empty() {
        return Err(PathError(format!("'{c}' must be followed by a name")));
    }
    let token = match c {
        '$' => Token::Special(name),
        _ => Token::External(name),
    };
    Ok((token, at))
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
                    let function = Function::from_name(&name).ok_or_else(|| {
                        PathError(format!("the function {name}() is unknown or not supported"))
                    })?;
                    let (least, most) = function.arity();
                    if arguments.len() < least || arguments.len() > most {
                        return Err(PathError(format!(
                            "{name}() takes {least} to {most} arguments"
                        )));
                    }
                    let not_a_type = |a: &Expr| !matches!(a, Expr::Member(None, _));
                    if function.takes_a_type() && arguments.first().is_some_and(not_a_type) {
                        return Err(PathError(format!("{name}() takes a type name")));
                    }
                    if let Function::Text(TextFunction::Matches | TextFunction::ReplaceMatches) =
                        function
                    {
                        if let Some(Expr::Literal(Item::Str(text))) = arguments.first() {
                            let pattern = Pattern::compile(text)
                                .map_err(|error| PathError(format!("{name}(): {error}")))?;
                            arguments[0] = Expr::Pattern(pattern);
                        }
                    }
                    node(depth, || Expr::Call(target, function, arguments))
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
                leaf(Expr::Variable(name))
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

/// Parses a FHIRPath expression.
fn parse_any(text: &str) -> Result<Expr, PathError> {
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
    Ok(expr)
}

/// Parses an anonymization rule's path and checks that everything in it is evaluated as the
/// anonymizer's engine does.
pub fn parse(text: &str) -> Result<Expr, PathError> {
    let expr = parse_any(text)?;
    check(&expr, Grammar::Anonymization)?;
    Ok(expr)
}

/// Parses a SQL on FHIR view's path: constants (`%name`) and the view functions too.
pub fn parse_for_views(text: &str) -> Result<Expr, PathError> {
    let expr = parse_any(text)?;
    check(&expr, Grammar::Views)?;
    Ok(expr)
}

/// Whose expressions: each accepts what its evaluation supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grammar {
    Anonymization,
    Views,
}

fn check(expr: &Expr, grammar: Grammar) -> Result<(), PathError> {
    let check = |expr: &Expr| check(expr, grammar);
    match expr {
        Expr::Empty | Expr::Literal(_) | Expr::Pattern(_) | Expr::This | Expr::Member(None, _) => {
            Ok(())
        }
        Expr::Unsupported(what) => Err(PathError(format!("{what} is not supported"))),
        Expr::Variable(name) if grammar == Grammar::Anonymization => {
            Err(PathError(format!("%{name} is not supported")))
        }
        Expr::Variable(_) => Ok(()),
        Expr::Member(Some(target), _) => check(target),
        Expr::Call(target, function, arguments) => {
            if function.is_for_views() && grammar == Grammar::Anonymization {
                return Err(PathError(format!(
                    "the function {}() is unknown or not supported",
                    function.name()
                )));
            }
            if let Some(target) = target {
                check(target)?;
            }
            match function.takes_a_type() {
                true => Ok(()),
                false => arguments.iter().try_for_each(check),
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
    fn every_function_has_one_name_and_arity() {
        let mut names = std::collections::HashSet::new();
        for function in Function::ALL {
            assert_eq!(Function::from_name(function.name()), Some(function));
            assert!(names.insert(function.name()), "{function:?}");
            let (least, most) = function.arity();
            assert!(least <= most, "{function:?}");
        }
        assert_eq!(Function::from_name("select"), None);
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
}
