//! Value parsers for command-line flags shared by `meshflow`'s subcommands and the examples
//! (clap `value_parser`s): a value that cannot be meant is refused by the parser, which names
//! the flag, instead of being rounded into one that can (a count of 0 run as 1).

/// A count of at least 1: sizes, threads, rounds, steps.
pub fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(count) => Ok(count),
        Err(_) => Err(format!("{text:?} is not a count")),
    }
}

/// A number of seconds above 0 and at most [`MAX_SECONDS`] (a week: longer cannot be meant, and
/// `1e300` overflowed the timing loop's `Duration` into a panic).
pub fn positive_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if !(seconds > 0.0 && seconds <= MAX_SECONDS) {
        return Err(format!("must be a number of seconds above 0 and at most {MAX_SECONDS}"));
    }
    Ok(seconds)
}

/// A finite number above 0: a rate, a peak.
pub fn positive_number(text: &str) -> Result<f64, String> {
    let number: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if !(number.is_finite() && number > 0.0) {
        return Err("must be a finite number above 0".to_string());
    }
    Ok(number)
}

/// The most seconds [`positive_seconds`] takes: a week.
pub const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_seconds_that_cannot_be_meant_are_refused() {
        assert_eq!(count("3"), Ok(3));
        assert_eq!(count("0"), Err("must be at least 1".to_string()));
        assert!(count("-1").unwrap_err().contains("not a count"));
        assert_eq!(positive_seconds("0.5"), Ok(0.5));
        assert_eq!(positive_seconds("604800"), Ok(MAX_SECONDS));
        for text in ["0", "-2", "nan", "inf", "604801", "1e300"] {
            let refused = positive_seconds(text).unwrap_err();
            assert!(refused.contains("above 0 and at most 604800"), "{text}: {refused}");
        }
        assert!(positive_seconds("soon").unwrap_err().contains("not a number"));
        assert_eq!(positive_number("989.4"), Ok(989.4));
        for text in ["0", "-1", "nan", "inf", "fast"] {
            assert!(positive_number(text).is_err(), "{text}");
        }
    }
}
