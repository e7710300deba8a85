//! SLURM's compressed host lists: `node[01-04,07],gpu-a[1-2]` → `node01 … node07, gpu-a1, gpu-a2`.
//!
//! The grammar is SLURM's: items separated by commas outside brackets; in an item, each bracket group
//! holds comma-separated numbers or `low-high` ranges, whose zero padding follows the width of `low`;
//! several groups in one item expand as a cartesian product (`r[1-2]n[1-2]` → `r1n1 r1n2 r2n1 r2n2`).

/// The largest number of hosts one list may expand to (a guard against `n[0-999999999]`).
pub const MAX_HOSTS: usize = 1 << 20;

/// Why a host list could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host list {list:?}: {reason}")]
pub struct HostListError {
    /// The list as given.
    pub list: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Expands a SLURM host list (`SLURM_JOB_NODELIST`) into host names, in order.
pub fn expand(list: &str) -> Result<Vec<String>, HostListError> {
    let fail = |reason: String| HostListError { list: list.to_string(), reason };
    let mut hosts = Vec::new();
    for item in split_top_level(list).map_err(fail)? {
        if item.is_empty() {
            return Err(fail("empty host name".to_string()));
        }
        let expanded = expand_item(item).map_err(fail)?;
        hosts.extend(expanded);
        if hosts.len() > MAX_HOSTS {
            return Err(fail(format!("more than {MAX_HOSTS} hosts")));
        }
    }
    if hosts.is_empty() {
        return Err(fail("no hosts".to_string()));
    }
    Ok(hosts)
}

/// Splits at commas that are not inside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, character) in list.char_indices() {
        match character {
            '[' if depth == 0 => depth = 1,
            '[' => return Err("nested '['".to_string()),
            ']' if depth == 1 => depth = 0,
            ']' => return Err("']' without '['".to_string()),
            ',' if depth == 0 => {
                items.push(list[start..index].trim());
                start = index + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without ']'".to_string());
    }
    items.push(list[start..].trim());
    Ok(items)
}

/// Expands one item, which may hold several bracket groups.
fn expand_item(item: &str) -> Result<Vec<String>, String> {
    let Some(open) = item.find('[') else {
        return Ok(vec![item.to_string()]);
    };
    let close = item[open..]
        .find(']')
        .map(|offset| open + offset)
        .ok_or_else(|| "'[' without ']'".to_string())?;
    let prefix = &item[..open];
    let numbers = expand_group(&item[open + 1..close])?;
    let rests = expand_item(&item[close + 1..])?;
    let count = numbers.len().saturating_mul(rests.len());
    if count > MAX_HOSTS {
        return Err(format!("more than {MAX_HOSTS} hosts"));
    }
    let mut hosts = Vec::with_capacity(count);
    for number in &numbers {
        for rest in &rests {
            hosts.push(format!("{prefix}{number}{rest}"));
        }
    }
    Ok(hosts)
}

/// Expands the inside of one bracket group: `01-04,07` → `01 02 03 04 07`.
fn expand_group(group: &str) -> Result<Vec<String>, String> {
    let mut numbers = Vec::new();
    for part in group.split(',') {
        let part = part.trim();
        let (low, high) = part.split_once('-').unwrap_or((part, part));
        let width = low.len();
        let low_value = parse_number(low)?;
        let high_value = parse_number(high)?;
        if high_value < low_value {
            return Err(format!("range {part:?} runs backwards"));
        }
        if high_value - low_value >= MAX_HOSTS as u64 {
            return Err(format!("range {part:?} is larger than {MAX_HOSTS} hosts"));
        }
        numbers.extend((low_value..=high_value).map(|value| format!("{value:0width$}")));
    }
    Ok(numbers)
}

fn parse_number(text: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!("{text:?} is not a number"));
    }
    text.parse().map_err(|_| format!("{text:?} is too large a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass_through() {
        assert_eq!(expand("alpha").unwrap(), vec!["alpha"]);
        assert_eq!(expand("a,b, c").unwrap(), vec!["a", "b", "c"]);
    }

    #[test]
    fn ranges_keep_zero_padding_and_lists_mix() {
        assert_eq!(
            expand("node[01-04,07],gpu-a[1-2]").unwrap(),
            vec!["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"]
        );
        assert_eq!(expand("n[8-11]").unwrap(), vec!["n8", "n9", "n10", "n11"]);
        assert_eq!(expand("n[098-100]").unwrap(), vec!["n098", "n099", "n100"]);
    }

    #[test]
    fn several_groups_expand_as_a_product_with_suffixes() {
        assert_eq!(
            expand("r[1-2]n[1-2].ib").unwrap(),
            vec!["r1n1.ib", "r1n2.ib", "r2n1.ib", "r2n2.ib"]
        );
    }

    #[test]
    fn malformed_lists_are_errors() {
        for bad in
            ["", "n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[[1]]", "a,,b", "n[]", "n[0-99999999]"]
        {
            let error = expand(bad).expect_err(bad);
            assert_eq!(error.list, bad);
        }
    }
}
