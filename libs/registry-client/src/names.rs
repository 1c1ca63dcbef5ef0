//! Region and tenant names: one rule for every service, so a name the
//! registry stores is one a request can name, and the other way round.
//!
//! Both are ASCII letters, digits, `-`, `_` and `.`, starting with a letter
//! or a digit; regions are 1 to 64 characters, tenants 1 to 128.

/// Longest region name.
pub const MAX_REGION_CHARS: usize = 64;
/// Longest tenant name.
pub const MAX_TENANT_CHARS: usize = 128;

/// The rule for region names, in words (for error messages).
pub const REGION_RULE: &str =
    "1-64 characters of letters, digits, '-', '_' and '.', starting with a letter or digit";
/// The rule for tenant names, in words (for error messages).
pub const TENANT_RULE: &str =
    "1-128 characters of letters, digits, '-', '_' and '.', starting with a letter or digit";

fn is_name(name: &str, max_chars: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_chars
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Whether `name` is a valid region name.
pub fn is_region_name(name: &str) -> bool {
    is_name(name, MAX_REGION_CHARS)
}

/// A name that breaks its rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a region name. The message quotes the name and states the rule,
    /// for the caller to prefix with the field.
    #[error("'{name}' is not a region name: {REGION_RULE}")]
    NotARegion {
        /// The offending name, cut to its first 80 characters (it may come
        /// from a request, and ends up in logs and answers).
        name: String,
    },
}

/// Checks a region name; the error quotes the name (its first 80
/// characters) and states the rule, for the caller to prefix with the field.
pub fn check_region(name: &str) -> Result<(), Error> {
    if is_region_name(name) {
        Ok(())
    } else {
        Err(Error::NotARegion {
            name: name.chars().take(80).collect(),
        })
    }
}

/// Whether `name` is a valid tenant name.
pub fn is_tenant_name(name: &str) -> bool {
    is_name(name, MAX_TENANT_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names() {
        for good in [
            "me-central-1",
            "uae.north",
            "eu_west",
            "1a",
            &"r".repeat(64),
        ] {
            assert!(is_region_name(good), "{good}");
        }
        for bad in [
            "",
            "-east",
            ".east",
            "_east",
            "uae north",
            "uae/north",
            "émirats",
            &"r".repeat(65),
        ] {
            assert!(!is_region_name(bad), "{bad}");
        }
    }

    #[test]
    fn region_errors_quote_the_name_and_state_the_rule() {
        assert_eq!(check_region("me-central-1"), Ok(()));
        let error = check_region("uae north").unwrap_err().to_string();
        assert!(
            error.starts_with("'uae north' is not a region name: "),
            "{error}"
        );
        assert!(error.ends_with(REGION_RULE), "{error}");
        let long = check_region(&"r".repeat(1000)).unwrap_err().to_string();
        assert!(
            long.starts_with(&format!("'{}' ", "r".repeat(80))),
            "{long}"
        );
    }

    #[test]
    fn tenant_names_are_longer_than_region_names() {
        let long = "t".repeat(100);
        assert!(is_tenant_name(&long));
        assert!(!is_region_name(&long));
        assert!(!is_tenant_name(&"t".repeat(129)));
        assert!(!is_tenant_name("bank a"));
    }
}
