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

/// A finite number of seconds above 0.
pub fn positive_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err("must be a finite number of seconds above 0".to_string());
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_seconds_that_cannot_be_meant_are_refused() {
        assert_eq!(count("3"), Ok(3));
        assert_eq!(count("0"), Err("must be at least 1".to_string()));
        assert!(count("-1").unwrap_err().contains("not a count"));
        assert_eq!(positive_seconds("0.5"), Ok(0.5));
        for text in ["0", "-2", "nan", "inf"] {
            assert!(positive_seconds(text).unwrap_err().contains("above 0"), "{text}");
        }
        assert!(positive_seconds("soon").unwrap_err().contains("not a number"));
    }
}
