//! The methods a rule applies to a node, each as Microsoft's engine (4.1.1) does it: redact (with
//! partial dates, ages and zip codes), dateShift, cryptoHash, encrypt, substitute, perturb and
//! generalize. Each returns the labels its change earns.

use std::sync::OnceLock;

use base64::Engine as _;
use chrono::{Datelike, Duration, NaiveDate};
use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;

use super::config::{OtherValues, RangeType};
use super::fhirpath::{self, Item};
use super::rules::{
    is_visited, mark_visited, CompiledMethod, DeidError, MethodContext, Ops, ABSTRACT, CRYPTO_HASH,
    ENCRYPT, GENERALIZE, PERTURB, REDACT, SUBSTITUTE,
};
use super::tree::Tree;
use crate::fhir::json::Json;
use rust_decimal::{Decimal, RoundingStrategy};

const AGE_THRESHOLD: i32 = 89;
const QUANTITY_TYPES: &[&str] = &[
    "Age",
    "Count",
    "Duration",
    "Distance",
    "Money",
    "MoneyQuantity",
    "Quantity",
    "SimpleQuantity",
];

pub(crate) fn apply(
    context: &MethodContext,
    tree: &mut Tree,
    id: usize,
    method: &CompiledMethod,
    visited: &mut Vec<bool>,
) -> Result<Ops, DeidError> {
    match method {
        CompiledMethod::Keep => Ok(0),
        CompiledMethod::Redact => Ok(redact(context, tree, id)),
        CompiledMethod::DateShift => date_shift(context, tree, id),
        CompiledMethod::CryptoHash => Ok(crypto_hash(context, tree, id)),
        CompiledMethod::Encrypt => encrypt(context, tree, id),
        CompiledMethod::Substitute(replace_with) => substitute(tree, id, replace_with, visited),
        CompiledMethod::Perturb {
            span,
            range,
            round_to,
        } => perturb(tree, id, *span, *range, *round_to, visited),
        CompiledMethod::Generalize {
            cases,
            other_values,
        } => generalize(tree, id, cases, *other_values),
    }
}

/// The node's value as text, when it has a non-empty one.
fn value_text(tree: &Tree, id: usize) -> Option<String> {
    let node = &tree.nodes[id];
    let text = node.text()?;
    // The engine reads values as .NET prints them: booleans as `True`/`False`.
    let text = match (node.ty, text.as_ref()) {
        ("boolean", "true") => "True".to_string(),
        ("boolean", "false") => "False".to_string(),
        _ => text.into_owned(),
    };
    (!text.is_empty()).then_some(text)
}

fn set_string(tree: &mut Tree, id: usize, text: &str) {
    tree.nodes[id].value = Some(serde_json::to_string(text).expect("a string").into());
}

fn set_none(tree: &mut Tree, id: usize) {
    tree.nodes[id].value = None;
}

fn is_number_type(ty: &str) -> bool {
    matches!(ty, "integer" | "decimal" | "positiveInt" | "unsignedInt")
}

// ---------------------------------------------------------------------------------------------
// redact

fn date_regex() -> &'static Regex {
    static DATE: OnceLock<Regex> = OnceLock::new();
    DATE.get_or_init(|| {
        Regex::new(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?")
            .expect("a valid regex")
    })
}

fn date_time_regex() -> &'static Regex {
    static DATE_TIME: OnceLock<Regex> = OnceLock::new();
    DATE_TIME.get_or_init(|| {
        Regex::new(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?")
            .expect("a valid regex")
    })
}

fn time_regex() -> &'static Regex {
    static TIME: OnceLock<Regex> = OnceLock::new();
    TIME.get_or_init(|| {
        Regex::new(r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?")
            .expect("a valid regex")
    })
}

fn digits() -> &'static Regex {
    static DIGITS: OnceLock<Regex> = OnceLock::new();
    DIGITS.get_or_init(|| Regex::new(r"\d").expect("a valid regex"))
}

/// The groups of the engine's date and date-time patterns that its methods read: the year, the
/// month and day when given, and the time with its offset (`T13:28:17-05:00`).
struct DateParts<'t> {
    year: &'t str,
    month: Option<&'t str>,
    day: Option<&'t str>,
    time: Option<&'t str>,
}

/// A date's parts as the engine's pattern finds them: well-formed values without the regex (the
/// same groups), anything else through it.
fn date_parts(text: &str, with_time: bool) -> Option<DateParts<'_>> {
    if let Some(parts) = canonical_date_parts(text, with_time) {
        return Some(parts);
    }
    let regex = match with_time {
        true => date_time_regex(),
        false => date_regex(),
    };
    let captures = regex.captures(text)?;
    let group = |index: usize| captures.get(index).map(|m| &text[m.range()]);
    Some(DateParts {
        year: group(1)?,
        month: group(5),
        day: group(7),
        time: group(8),
    })
}

/// `YYYY`, `YYYY-MM`, `YYYY-MM-DD` or (with time) `YYYY-MM-DDThh:mm:ss[.f](Z|±hh:mm)`, exactly and
/// within the pattern's ranges: the whole value is what the pattern would match.
fn canonical_date_parts(text: &str, with_time: bool) -> Option<DateParts<'_>> {
    let bytes = text.as_bytes();
    let digits_at = |from: usize, to: usize| {
        bytes
            .get(from..to)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let number = |from: usize, to: usize| text[from..to].parse::<u32>().unwrap_or(u32::MAX);
    if !digits_at(0, 4) || &text[..4] == "0000" {
        return None;
    }
    let mut parts = DateParts {
        year: &text[..4],
        month: None,
        day: None,
        time: None,
    };
    match bytes.len() {
        4 => return Some(parts),
        7 | 10 => {}
        n if with_time && n > 10 => {}
        _ => return None,
    }
    if bytes[4] != b'-' || !digits_at(5, 7) || !(1..=12).contains(&number(5, 7)) {
        return None;
    }
    parts.month = Some(&text[5..7]);
    if bytes.len() == 7 {
        return Some(parts);
    }
    if bytes[7] != b'-' || !digits_at(8, 10) || !(1..=31).contains(&number(8, 10)) {
        return None;
    }
    parts.day = Some(&text[8..10]);
    if bytes.len() == 10 {
        return Some(parts);
    }
    let time = &text[10..];
    let t = time.as_bytes();
    let clock_ok = t.len() >= 9
        && t[0] == b'T'
        && t[3] == b':'
        && t[6] == b':'
        && digits_at(11, 13)
        && digits_at(14, 16)
        && digits_at(17, 19)
        && number(11, 13) <= 23
        && number(14, 16) <= 59
        && number(17, 19) <= 60;
    if !clock_ok {
        return None;
    }
    let mut rest = &time[9..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let length = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if length == 0 {
            return None;
        }
        rest = &fraction[length..];
    }
    let zone_ok = match rest.as_bytes() {
        [b'Z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()) =>
        {
            let hours = u32::from(h1 - b'0') * 10 + u32::from(h2 - b'0');
            let minutes = u32::from(m1 - b'0') * 10 + u32::from(m2 - b'0');
            (hours <= 13 && minutes <= 59) || (hours == 14 && minutes == 0)
        }
        _ => false,
    };
    if !zone_ok {
        return None;
    }
    parts.time = Some(time);
    Some(parts)
}

/// The over-89 rule: true when someone born on this (partial) date is older than 89 `today`.
fn over_threshold(parts: &DateParts, today: NaiveDate) -> bool {
    let number = |part: Option<&str>, default: i32| {
        part.and_then(|text| text.parse::<i32>().ok())
            .unwrap_or(default)
    };
    let (year, month, day) = (
        number(Some(parts.year), 0),
        number(parts.month, 1),
        number(parts.day, 1),
    );
    let before_birthday = (today.month() as i32) < month
        || (today.month() as i32 == month && (today.day() as i32) < day);
    today.year() - year - i32::from(before_birthday) > AGE_THRESHOLD
}

fn redact(context: &MethodContext, tree: &mut Tree, id: usize) -> Ops {
    let node = &tree.nodes[id];
    let reads_the_value = matches!(node.ty, "date" | "dateTime" | "instant" | "decimal")
        || node.name().eq_ignore_ascii_case("postalCode");
    if !reads_the_value {
        // Most redacted values are only removed: no need to read them.
        return match node.value.as_deref() {
            None | Some("\"\"") => 0,
            Some(_) => {
                set_none(tree, id);
                REDACT
            }
        };
    }
    let Some(text) = value_text(tree, id) else {
        return 0;
    };
    let parameters = &context.parameters;
    match tree.nodes[id].ty {
        "date" => redact_date(tree, id, &text, false, context),
        "dateTime" | "instant" => redact_date(tree, id, &text, true, context),
        "decimal" if parent_type(tree, id) == Some("Age") => {
            if !parameters.enable_partial_ages_for_redact
                || text
                    .parse::<f64>()
                    .map_or(true, |age| age > AGE_THRESHOLD as f64)
            {
                set_none(tree, id);
            }
            REDACT
        }
        _ if tree.nodes[id].name().eq_ignore_ascii_case("postalCode") => {
            redact_postal_code(context, tree, id, &text)
        }
        _ => {
            set_none(tree, id);
            REDACT
        }
    }
}

fn parent_type<'t>(tree: &'t Tree, id: usize) -> Option<&'t str> {
    tree.nodes[id].parent.map(|parent| tree.nodes[parent].ty)
}

fn redact_date(
    tree: &mut Tree,
    id: usize,
    text: &str,
    with_time: bool,
    context: &MethodContext,
) -> Ops {
    if !context.parameters.enable_partial_dates_for_redact {
        set_none(tree, id);
        return REDACT;
    }
    if let Some(parts) = date_parts(text, with_time) {
        match over_threshold(&parts, context.today) {
            true => set_none(tree, id),
            false => {
                let year = parts.year.to_string();
                set_string(tree, id, &year);
            }
        }
    }
    REDACT
}

fn redact_postal_code(context: &MethodContext, tree: &mut Tree, id: usize, text: &str) -> Ops {
    let parameters = &context.parameters;
    if !parameters.enable_partial_zip_codes_for_redact {
        set_none(tree, id);
        return REDACT;
    }
    let restricted = parameters
        .restricted_zip_code_tabulation_areas
        .iter()
        .any(|area| text.starts_with(area.as_str()));
    let partial = if restricted {
        Some(digits().replace_all(text, "0").into_owned())
    } else if text.chars().count() >= 3 {
        let cut = text.char_indices().nth(3).map_or(text.len(), |(at, _)| at);
        Some(format!(
            "{}{}",
            &text[..cut],
            digits().replace_all(&text[cut..], "0")
        ))
    } else {
        None
    };
    if let Some(partial) = partial {
        set_string(tree, id, &partial);
    }
    ABSTRACT
}

// ---------------------------------------------------------------------------------------------
// dateShift

/// The engine's day offset for a prefix (the outermost resource's id) and key: -50 to 50.
pub fn date_shift_offset(prefix: &str, key: &str) -> i64 {
    let mut offset: i64 = 0;
    for byte in prefix.bytes().chain(key.bytes()) {
        offset = (offset * 131 + i64::from(byte)) % 101;
    }
    offset - 50
}

fn date_shift(context: &MethodContext, tree: &mut Tree, id: usize) -> Result<Ops, DeidError> {
    let Some(text) = value_text(tree, id) else {
        return Ok(0);
    };
    let with_time = match tree.nodes[id].ty {
        "date" => false,
        "dateTime" | "instant" => true,
        _ => return Ok(0),
    };
    let Some(parts) = date_parts(&text, with_time) else {
        return Ok(0);
    };
    if parts.day.is_none() || over_threshold(&parts, context.today) {
        return Ok(redact_date(tree, id, &text, with_time, context));
    }
    let offset = match context.parameters.date_shift_fixed_offset_in_days {
        Some(days) => i64::from(days),
        None => {
            let root = tree.root_of(id);
            let prefix = tree
                .children_named(root, "id")
                .next()
                .and_then(|node| tree.nodes[node].text().map(|t| t.into_owned()))
                .unwrap_or_default();
            date_shift_offset(&prefix, &context.keys.date_shift)
        }
    };
    let part = |text: Option<&str>| text.and_then(|t| t.parse::<u32>().ok()).unwrap_or(1);
    let date = NaiveDate::from_ymd_opt(
        part(Some(parts.year)) as i32,
        part(parts.month),
        part(parts.day),
    )
    .ok_or_else(|| DeidError::Processing("dateShift met a date that does not exist".into()))?;
    let shifted = (date + Duration::days(offset))
        .format("%Y-%m-%d")
        .to_string();
    let value = match parts.time {
        Some(timestamp) => {
            let zeroed = match time_regex().find(timestamp) {
                Some(time) => {
                    timestamp.replace(time.as_str(), &digits().replace_all(time.as_str(), "0"))
                }
                None => timestamp.to_string(),
            };
            format!("{shifted}{zeroed}")
        }
        None => shifted,
    };
    set_string(tree, id, &value);
    Ok(PERTURB)
}

// ---------------------------------------------------------------------------------------------
// cryptoHash and encrypt

/// HMAC-SHA256 of `input` under `key` (both UTF-8), lower-case hex; empty stays empty.
pub fn hmac_sha256_hex(input: &str, key: &str) -> String {
    if input.is_empty() {
        return String::new();
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(input.as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(64);
    for byte in mac.finalize().into_bytes() {
        hex.push(HEX[usize::from(byte >> 4)] as char);
        hex.push(HEX[usize::from(byte & 15)] as char);
    }
    hex
}

fn literal_references() -> &'static [Regex; 3] {
    static REFERENCES: OnceLock<[Regex; 3]> = OnceLock::new();
    REFERENCES.get_or_init(|| {
        let types = crate::fhir::types::R4_RESOURCE_TYPES.join("|");
        [
            Regex::new(&format!(
                r"^(?<prefix>((http|https)://([A-Za-z0-9\\/\.:%\$])*)?({types})/)(?<id>[A-Za-z0-9\-\.]{{1,64}})(?<suffix>/_history/[A-Za-z0-9\-\.]{{1,64}})?$"
            ))
            .expect("a valid regex"),
            Regex::new(r"^(?<prefix>urn:oid:)(?<id>[0-2](\.(0|[1-9][0-9]*))+)(?<suffix>)$")
                .expect("a valid regex"),
            Regex::new(r"^(?<prefix>urn:uuid:)(?<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?<suffix>)$")
                .expect("a valid regex"),
        ]
    })
}

/// A reference with its id part transformed (`Patient/x` → `Patient/f(x)`, `#x` → `#f(x)`); a
/// reference of no known form is transformed whole.
pub fn transform_reference_id(reference: &str, transform: impl Fn(&str) -> String) -> String {
    if reference.is_empty() {
        return String::new();
    }
    if let Some(internal) = reference.strip_prefix('#') {
        return format!("#{}", transform(internal));
    }
    if let Some(uuid) = reference.strip_prefix("urn:uuid:") {
        let groups: Vec<usize> = uuid.split('-').map(str::len).collect();
        if groups == [8, 4, 4, 4, 12] && uuid.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()) {
            return format!("urn:uuid:{}", transform(uuid));
        }
    }
    // The common relative form `Type/id[/_history/version]`, without the regex: the same answer.
    if let Some((ty, id, version)) = relative_reference(reference) {
        return match version {
            Some(version) => format!("{ty}/{}/_history/{version}", transform(id)),
            None => format!("{ty}/{}", transform(id)),
        };
    }
    for regex in literal_references() {
        if let Some(found) = regex.captures(reference) {
            let part = |name: &str| found.name(name).map_or("", |m| m.as_str());
            return format!(
                "{}{}{}",
                part("prefix"),
                transform(part("id")),
                part("suffix")
            );
        }
    }
    transform(reference)
}

/// `Type/id` or `Type/id/_history/version` with an R4 type and ids of the literal reference
/// pattern (`[A-Za-z0-9\-\.]{1,64}`).
fn relative_reference(reference: &str) -> Option<(&str, &str, Option<&str>)> {
    let is_id = |part: &str| {
        (1..=64).contains(&part.len())
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    let mut parts = reference.split('/');
    let (ty, id) = (parts.next()?, parts.next()?);
    let version = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => None,
        (Some("_history"), Some(version), None) if is_id(version) => Some(version),
        _ => return None,
    };
    let known = crate::fhir::types::is_resource_type(ty);
    (known && is_id(id)).then_some((ty, id, version))
}

fn crypto_hash(context: &MethodContext, tree: &mut Tree, id: usize) -> Ops {
    let Some(text) = value_text(tree, id) else {
        return 0;
    };
    let key = context.keys.crypto_hash.as_str();
    let is_reference = tree.nodes[id].name().eq_ignore_ascii_case("reference")
        && parent_type(tree, id).is_some_and(|ty| ty.eq_ignore_ascii_case("Reference"));
    let hashed = match is_reference {
        true => transform_reference_id(&text, |part| hmac_sha256_hex(part, key)),
        false => hmac_sha256_hex(&text, key),
    };
    set_string(tree, id, &hashed);
    CRYPTO_HASH
}

/// base64(IV ‖ AES-CBC-PKCS7(UTF-8 text)), with a random IV: the engine's format.
pub fn encrypt_text(text: &str, key: &[u8]) -> Result<String, DeidError> {
    use aws_lc_rs::cipher::{
        PaddedBlockEncryptingKey, UnboundCipherKey, AES_128, AES_192, AES_256,
    };
    let algorithm = match key.len() {
        16 => &AES_128,
        24 => &AES_192,
        32 => &AES_256,
        _ => {
            return Err(DeidError::Processing(
                "the encrypt key is not 16, 24 or 32 bytes".into(),
            ))
        }
    };
    let failed = |_| DeidError::Processing("encryption failed".into());
    let key = UnboundCipherKey::new(algorithm, key).map_err(failed)?;
    let key = PaddedBlockEncryptingKey::cbc_pkcs7(key).map_err(failed)?;
    let mut data = text.as_bytes().to_vec();
    let context = key.encrypt(&mut data).map_err(failed)?;
    let iv: &[u8] = (&context).try_into().map_err(failed)?;
    let mut out = iv.to_vec();
    out.extend_from_slice(&data);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

/// The inverse of [`encrypt_text`].
pub fn decrypt_text(encoded: &str, key: &[u8]) -> Option<String> {
    use aws_lc_rs::cipher::{
        DecryptionContext, PaddedBlockDecryptingKey, UnboundCipherKey, AES_128, AES_192, AES_256,
    };
    let algorithm = match key.len() {
        16 => &AES_128,
        24 => &AES_192,
        32 => &AES_256,
        _ => return None,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    if bytes.len() < 16 {
        return None;
    }
    let (iv, data) = bytes.split_at(16);
    let key =
        PaddedBlockDecryptingKey::cbc_pkcs7(UnboundCipherKey::new(algorithm, key).ok()?).ok()?;
    let iv: [u8; 16] = iv.try_into().ok()?;
    let mut data = data.to_vec();
    let plain = key
        .decrypt(&mut data, DecryptionContext::Iv128(iv.into()))
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

fn encrypt(context: &MethodContext, tree: &mut Tree, id: usize) -> Result<Ops, DeidError> {
    let Some(text) = value_text(tree, id) else {
        return Ok(0);
    };
    let encrypted = encrypt_text(&text, context.keys.encrypt.as_bytes())?;
    set_string(tree, id, &encrypted);
    Ok(ENCRYPT)
}

// ---------------------------------------------------------------------------------------------
// substitute

fn owned(json: Json<'_>) -> Json<'static> {
    match json {
        Json::Leaf(token) => Json::Leaf(token.into_owned().into()),
        Json::Array(items) => Json::Array(items.into_iter().map(owned).collect()),
        Json::Object(members) => Json::Object(
            members
                .into_iter()
                .map(|(key, value)| (key.into_owned().into(), owned(value)))
                .collect(),
        ),
    }
}

fn substitute(
    tree: &mut Tree,
    id: usize,
    replace_with: &str,
    visited: &mut Vec<bool>,
) -> Result<Ops, DeidError> {
    let ty = tree.nodes[id].ty;
    let invalid = || DeidError::Processing(format!("replaceWith is not a valid {ty}"));
    let json = owned(Json::parse(replace_with).map_err(|_| invalid())?);
    let replacement = match (tree.nodes[id].is_primitive(), json) {
        (true, Json::Leaf(token)) => {
            let token = primitive_token(tree.nodes[id].ty, &token);
            tree.new_like(id, Json::Leaf(token.into()))
                .map_err(|_| invalid())?
        }
        (false, json @ Json::Object(_)) => tree.new_like(id, json).map_err(|_| invalid())?,
        (false, Json::Leaf(token)) if token == "null" => tree
            .new_like(id, Json::Object(Vec::new()))
            .map_err(|_| invalid())?,
        _ => return Err(invalid()),
    };
    let mut keep = Vec::new();
    collect_keep(tree, id, visited, &mut keep);
    substitute_node(tree, id, Some(replacement), visited, &keep);
    let mut below = Vec::new();
    descendants(tree, id, &mut below);
    for node in below {
        mark_visited(visited, node);
    }
    Ok(SUBSTITUTE)
}

/// A primitive's token from a `replaceWith` leaf: numbers and booleans as such for number and
/// boolean elements, anything else as a string.
fn primitive_token(ty: &str, token: &str) -> String {
    let text = Json::Leaf(token.into())
        .as_str()
        .map(|text| text.into_owned())
        .unwrap_or_else(|| token.to_string());
    let number = is_number_type(ty) && serde_json::from_str::<serde_json::Number>(&text).is_ok();
    let boolean = ty == "boolean" && (text == "true" || text == "false");
    match number || boolean {
        true => text,
        false => serde_json::to_string(&text).expect("a string"),
    }
}

fn collect_keep(tree: &Tree, id: usize, visited: &[bool], keep: &mut Vec<usize>) -> bool {
    let mut should_keep = false;
    for child in tree.children(id).collect::<Vec<_>>() {
        should_keep |= collect_keep(tree, child, visited, keep);
    }
    if should_keep || is_visited(visited, id) {
        keep.push(id);
        return true;
    }
    false
}

fn substitute_node(
    tree: &mut Tree,
    id: usize,
    replacement: Option<usize>,
    visited: &[bool],
    keep: &[usize],
) {
    if is_visited(visited, id) {
        return;
    }
    let mut names: Vec<String> = Vec::new();
    if let Some(replacement) = replacement {
        for child in tree.children(replacement) {
            let name = tree.nodes[child].name().to_string();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        for name in &names {
            let children: Vec<usize> = tree.children_named(id, name).collect();
            let targets: Vec<usize> = tree.children_named(replacement, name).collect();
            let mut next = 0;
            for child in children {
                if is_visited(visited, child) {
                    next += 1;
                    continue;
                }
                if next < targets.len() {
                    substitute_node(tree, child, Some(targets[next]), visited, keep);
                    next += 1;
                } else if keep.contains(&child) {
                    substitute_node(tree, child, None, visited, keep);
                } else {
                    tree.remove(child);
                }
            }
            for &target in &targets[next.min(targets.len())..] {
                tree.nodes[replacement].children.retain(|&c| c != target);
                tree.attach(id, target);
            }
        }
    }
    let others: Vec<usize> = tree
        .children(id)
        .filter(|&child| !names.iter().any(|name| name == tree.nodes[child].name()))
        .collect();
    for child in others {
        if is_visited(visited, child) {
            continue;
        }
        if keep.contains(&child) {
            substitute_node(tree, child, None, visited, keep);
        } else {
            tree.remove(child);
        }
    }
    let value = replacement.and_then(|replacement| tree.nodes[replacement].value.clone());
    tree.nodes[id].value = value;
}

fn descendants(tree: &Tree, id: usize, out: &mut Vec<usize>) {
    for child in tree.children(id) {
        out.push(child);
        descendants(tree, child, out);
    }
}

// ---------------------------------------------------------------------------------------------
// perturb

/// The engine's perturbation, in .NET's decimal: the value plus uniform noise converted to decimal
/// (15 significant digits), rounded half to even to `roundTo` places (a value with fewer places
/// keeps them).
fn perturb(
    tree: &mut Tree,
    id: usize,
    span: f64,
    range: RangeType,
    round_to: u32,
    visited: &mut Vec<bool>,
) -> Result<Ops, DeidError> {
    let ty = tree.nodes[id].ty;
    let value_node = if matches!(ty, "decimal" | "integer" | "positiveInt" | "unsignedInt") {
        Some(id)
    } else if QUANTITY_TYPES.contains(&ty) {
        tree.children_named(id, "value").next()
    } else {
        None
    };
    let Some(value_node) = value_node else {
        return Ok(0);
    };
    if is_visited(visited, value_node) {
        return Ok(0);
    }
    let Some(original) = tree.nodes[value_node]
        .text()
        .and_then(|text| fhirpath::parse_decimal(&text))
    else {
        return Ok(0);
    };
    let value_type = tree.nodes[value_node].ty;
    let is_integer = matches!(value_type, "integer" | "positiveInt" | "unsignedInt");
    let round_to = if is_integer { 0 } else { round_to };
    let span = match range {
        RangeType::Proportional => f64::try_from(original).unwrap_or(f64::MAX) * span,
        RangeType::Fixed => span,
    }
    .abs();
    let noise = match span > 0.0 {
        true => rand::Rng::random_range(&mut rand::rng(), -span / 2.0..=span / 2.0),
        false => 0.0,
    };
    let overflow = || DeidError::Processing("perturb overflowed a decimal".into());
    let noise = Decimal::from_scientific(&format!("{noise:.14e}")).map_err(|_| overflow())?;
    let mut perturbed = original
        .checked_add(noise.normalize())
        .ok_or_else(overflow)?
        .round_dp_with_strategy(round_to, RoundingStrategy::MidpointNearestEven);
    if value_type == "positiveInt" && perturbed <= Decimal::ZERO {
        perturbed = Decimal::ONE;
    }
    if value_type == "unsignedInt" && perturbed < Decimal::ZERO {
        perturbed = Decimal::ZERO;
    }
    if perturbed.is_zero() {
        perturbed.set_sign_positive(true);
    }
    let token = match is_integer {
        true => perturbed.trunc().to_string(),
        false => fhirpath::decimal_token(perturbed),
    };
    tree.nodes[value_node].value = Some(token.into());
    let mut below = Vec::new();
    descendants(tree, id, &mut below);
    for node in below {
        mark_visited(visited, node);
    }
    Ok(PERTURB)
}

// ---------------------------------------------------------------------------------------------
// generalize

fn generalize(
    tree: &mut Tree,
    id: usize,
    cases: &[(fhirpath::Expr, fhirpath::Expr)],
    other_values: OtherValues,
) -> Result<Ops, DeidError> {
    if !tree.nodes[id].is_primitive() {
        return Err(DeidError::Processing(format!(
            "generalize applies to primitive values, not to {}",
            tree.nodes[id].ty
        )));
    }
    if tree.nodes[id].value.is_none() {
        return Ok(0);
    }
    let failed = |error: fhirpath::EvalError| {
        DeidError::Processing(format!("a generalize case failed: {error}"))
    };
    let focus = [Item::Node(id)];
    for (condition, value) in cases {
        let result = fhirpath::evaluate(tree, condition, &focus).map_err(failed)?;
        let matched = match result.as_slice() {
            [] => true,
            [Item::Bool(value)] => *value,
            [_] => true,
            _ => {
                return Err(failed(fhirpath::EvalError(
                    "a condition gave several values".into(),
                )))
            }
        };
        if !matched {
            continue;
        }
        let result = fhirpath::evaluate(tree, value, &focus).map_err(failed)?;
        let token = match result.as_slice() {
            [] => None,
            [item] => item_token(tree, item),
            _ => {
                return Err(failed(fhirpath::EvalError(
                    "a case value gave several values".into(),
                )))
            }
        };
        tree.nodes[id].value = token.map(Into::into);
        return Ok(GENERALIZE);
    }
    if other_values == OtherValues::Redact {
        set_none(tree, id);
    }
    Ok(GENERALIZE)
}

fn item_token(tree: &Tree, item: &Item) -> Option<String> {
    Some(match item {
        Item::Node(node) => tree.nodes[*node].value.as_deref()?.to_string(),
        Item::Int(value) => value.to_string(),
        Item::Dec(value) => fhirpath::decimal_token(*value),
        Item::Bool(value) => value.to_string(),
        other => serde_json::to_string(&fhirpath::to_text(other)).expect("a string"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deid::{AnonymizationConfig, Engine, Keys};

    /// `Observation.valueQuantity.value` as written after one rule on `Observation.value`.
    fn quantity_after(rule: serde_json::Value, value: &str) -> String {
        let config = serde_json::json!({ "fhirPathRules": [rule] }).to_string();
        let config = AnonymizationConfig::parse(config.as_bytes()).unwrap();
        let today = NaiveDate::from_ymd_opt(2025, 9, 5).unwrap();
        let engine = Engine::new(&config, Keys::default(), today).unwrap();
        let input = format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},"valueQuantity":{{"value":{value}}}}}"#
        );
        let output = String::from_utf8(engine.deidentify(input.as_bytes()).unwrap()).unwrap();
        let start = output
            .find(r#""valueQuantity":{"value":"#)
            .unwrap_or_else(|| panic!("{value}: {output}"))
            + 25;
        let end = start + output[start..].find('}').unwrap();
        output[start..end].to_string()
    }

    #[test]
    fn generalize_computes_in_dotnet_decimal_and_writes_as_newtonsoft_does() {
        for (value, expression, expected) in [
            ("70.5", "$this - 0.5", "70.0"),
            ("1.50", "$this + 1", "2.50"),
            ("10", "$this / 4", "2.5"),
            ("4.00", "$this / 2", "2.00"),
            ("1", "$this / 3", "0.3333333333333333333333333333"),
            ("0.1", "$this + 0.2", "0.3"),
            ("7.5", "$this mod 2", "1.5"),
            ("7.5", "$this div 2", "3"),
            ("70", "$this.toDecimal()", "70.0"),
            ("1e3", "$this * 1", "1000.0"),
        ] {
            let rule = serde_json::json!({
                "path": "Observation.value.value", "method": "generalize",
                "cases": { "true": expression },
            });
            assert_eq!(
                quantity_after(rule, value),
                expected,
                "{value}: {expression}"
            );
        }
        // Decimals compare at FHIRPath's step, 10^-8, as Firely compares them.
        for (value, expected) in [("1.000000001", "0"), ("1.00000002", "1.00000002")] {
            let rule = serde_json::json!({
                "path": "Observation.value.value", "method": "generalize",
                "cases": { "$this = 1.0": "0" }, "otherValues": "keep",
            });
            assert_eq!(quantity_after(rule, value), expected, "{value} = 1.0");
        }
    }

    #[test]
    fn perturb_rounds_in_dotnet_decimal_and_keeps_fewer_places() {
        for (value, round_to, expected) in [
            ("70.3", 0, "70.0"),
            ("70.5", 2, "70.5"),
            ("70.1049", 2, "70.10"),
            ("70.125", 2, "70.12"),
        ] {
            let rule = serde_json::json!({
                "path": "Observation.value", "method": "perturb", "span": 0, "roundTo": round_to,
            });
            assert_eq!(
                quantity_after(rule, value),
                expected,
                "{value} to {round_to}"
            );
        }
    }

    #[test]
    fn encryption_round_trips_with_every_key_size() {
        for key in [
            "0123456789abcdef",
            "0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef",
        ] {
            let sealed = encrypt_text("Ĳ text", key.as_bytes()).unwrap();
            assert_eq!(decrypt_text(&sealed, key.as_bytes()).unwrap(), "Ĳ text");
        }
    }

    #[test]
    fn well_formed_dates_are_split_as_the_engines_pattern_splits_them() {
        for text in [
            "2015",
            "2015-02",
            "2015-02-07",
            "1000",
            "0000",
            "2015-13",
            "2015-02-32",
            "2015-02-07T13:28:17Z",
            "2015-02-07T13:28:17.12345-05:00",
            "2015-02-07T13:28:17+14:00",
            "2015-02-07T13:28:17+14:30",
            "2015-02-07T24:00:00Z",
            "2015-02-07T13:28:60+13:59",
            "2015-02-07T13:28:17",
            "2015-02-07T13:28:17.Z",
            "20150207",
            "2015-2-7",
            "x2015-02-07",
        ] {
            for with_time in [false, true] {
                let regex = match with_time {
                    true => date_time_regex(),
                    false => date_regex(),
                };
                let expected = regex.captures(text).map(|c| {
                    let group = |i: usize| c.get(i).map(|m| m.as_str().to_string());
                    (group(1), group(5), group(7), group(8))
                });
                let got = date_parts(text, with_time).map(|p| {
                    let own = |t: Option<&str>| t.map(str::to_string);
                    (
                        Some(p.year.to_string()),
                        own(p.month),
                        own(p.day),
                        own(p.time),
                    )
                });
                assert_eq!(got, expected, "{text} (time: {with_time})");
            }
        }
    }

    #[test]
    fn the_offset_is_the_engines() {
        assert_eq!(date_shift_offset("", "dummy"), -21);
    }
}
