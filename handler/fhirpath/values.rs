//! FHIRPath's system values: items of a collection, dates and times to their precision (compared
//! as Firely compares them), and .NET decimals as the engine computes and writes them.

use rust_decimal::{Decimal, RoundingStrategy};
use std::cmp::Ordering;

use chrono::{Duration, NaiveDate};

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
    pub(super) precision: usize,
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
    pub(super) fn compare(&self, other: &Moment) -> Option<Ordering> {
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

pub(super) fn kind(item: &Item) -> &'static str {
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

pub(super) fn number(item: &Item) -> Option<Decimal> {
    match item {
        Item::Int(value) => Some(Decimal::from(*value)),
        Item::Dec(value) => Some(*value),
        _ => None,
    }
}

/// Decimals compare rounded to FHIRPath's step of 10^-8 (half to even), as Firely compares them.
pub(super) fn to_step(value: Decimal) -> Decimal {
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
