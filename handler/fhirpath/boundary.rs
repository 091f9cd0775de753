//! `lowBoundary()` and `highBoundary()` (FHIRPath 3.0, as SQL on FHIR uses them): the least and
//! greatest value a value of partial precision stands for. A decimal is its value less or more
//! half its last digit (`1.0`: 0.95 and 1.05); a date, date-time or time is filled out to the
//! millisecond (a date-time without a zone gets the widest one: +14:00 low, -12:00 high).

use rust_decimal::Decimal;

use super::values::Item;

/// The boundary of a value of FHIR type `ty` written `text`; `None` when it is not one of those
/// types or does not parse.
pub fn of_text(ty: &str, text: &str, high: bool) -> Option<Item> {
    match ty {
        "decimal" | "integer" | "positiveInt" | "unsignedInt" => {
            decimal(super::parse_decimal(text)?, high).map(Item::Dec)
        }
        "date" => date(text, high).map(Item::Str),
        "dateTime" | "instant" => date_time(text, high).map(Item::Str),
        "time" => time(text, high).map(Item::Str),
        _ => None,
    }
}

/// The boundary of a system value.
pub fn of_item(item: &Item, high: bool) -> Option<Item> {
    match item {
        Item::Dec(value) => decimal(*value, high).map(Item::Dec),
        Item::Int(value) => decimal(Decimal::from(*value), high).map(Item::Dec),
        Item::DateTime(moment) => match moment.text.contains('T') {
            true => date_time(&moment.text, high).map(Item::Str),
            false => date(&moment.text, high).map(Item::Str),
        },
        Item::Time(moment) => time(&moment.text, high).map(Item::Str),
        _ => None,
    }
}

fn decimal(value: Decimal, high: bool) -> Option<Decimal> {
    let half = Decimal::new(5, value.scale() + 1);
    match high {
        true => value.checked_add(half),
        false => value.checked_sub(half),
    }
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD` filled out to a day.
fn date(text: &str, high: bool) -> Option<String> {
    let mut parts = text.split('-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: Option<u32> = match parts.next() {
        Some(month) => Some(month.parse().ok()?),
        None => None,
    };
    let day: Option<u32> = match parts.next() {
        Some(day) => Some(day.parse().ok()?),
        None => None,
    };
    let month_number = month.unwrap_or(if high { 12 } else { 1 });
    let day = match (day, high) {
        (Some(day), _) => day,
        (None, false) => 1,
        (None, true) => last_day(year, month_number)?,
    };
    chrono::NaiveDate::from_ymd_opt(year, month_number, day)?;
    Some(format!("{year:04}-{month_number:02}-{day:02}"))
}

fn last_day(year: i32, month: u32) -> Option<u32> {
    let next = match month {
        12 => chrono::NaiveDate::from_ymd_opt(year + 1, 1, 1)?,
        _ => chrono::NaiveDate::from_ymd_opt(year, month + 1, 1)?,
    };
    Some(chrono::Datelike::day(&next.pred_opt()?))
}

/// `HH`, `HH:MM`, `HH:MM:SS` or `HH:MM:SS.fff` filled out to the millisecond.
fn time(text: &str, high: bool) -> Option<String> {
    let (clock, fraction) = match text.split_once('.') {
        Some((clock, fraction)) => (clock, Some(fraction)),
        None => (text, None),
    };
    let parts: Vec<u32> = clock
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let fill = if high { 59 } else { 0 };
    let hour = *parts.first()?;
    let minute = parts.get(1).copied().unwrap_or(fill);
    let second = parts.get(2).copied().unwrap_or(fill);
    let millis = match fraction {
        Some(fraction) => {
            let digits: String = fraction
                .chars()
                .chain(std::iter::repeat('0'))
                .take(3)
                .collect();
            digits
        }
        None => String::from(if high { "999" } else { "000" }),
    };
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    Some(format!("{hour:02}:{minute:02}:{second:02}.{millis}"))
}

/// A date, or a date-time with its time and zone, filled out to the millisecond.
fn date_time(text: &str, high: bool) -> Option<String> {
    let (day, rest) = match text.split_once('T') {
        Some((day, rest)) => (day, Some(rest)),
        None => (text, None),
    };
    let day = date(day, high)?;
    let (clock, zone) = match rest {
        None => (None, None),
        Some(rest) => match rest.find(['Z', '+', '-']) {
            Some(at) => (Some(&rest[..at]), Some(&rest[at..])),
            None => (Some(rest), None),
        },
    };
    let clock = match clock.filter(|c| !c.is_empty()) {
        Some(clock) => time(clock, high)?,
        None => time(if high { "23" } else { "00" }, high)?,
    };
    let zone = zone.unwrap_or(if high { "-12:00" } else { "+14:00" });
    Some(format!("{day}T{clock}{zone}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_fill_out_what_the_value_leaves_open() {
        let text = |ty, value, high| match of_text(ty, value, high) {
            Some(Item::Str(text)) => text,
            Some(Item::Dec(value)) => value.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(text("decimal", "1.0", false), "0.95");
        assert_eq!(text("decimal", "1.0", true), "1.05");
        assert_eq!(text("date", "1970-06", false), "1970-06-01");
        assert_eq!(text("date", "1970-06", true), "1970-06-30");
        assert_eq!(text("date", "2024-02", true), "2024-02-29");
        assert_eq!(text("date", "1970", true), "1970-12-31");
        assert_eq!(
            text("dateTime", "2010-10-10", false),
            "2010-10-10T00:00:00.000+14:00"
        );
        assert_eq!(
            text("dateTime", "2010-10-10", true),
            "2010-10-10T23:59:59.999-12:00"
        );
        assert_eq!(
            text("dateTime", "2010-10-10T10:30Z", true),
            "2010-10-10T10:30:59.999Z"
        );
        assert_eq!(text("time", "12:34:00", true), "12:34:00.999");
        assert_eq!(text("time", "12:34", false), "12:34:00.000");
    }
}
