//! POSIX shell quoting and environment-key validation.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Quotes `s` for a POSIX shell: always single quotes, each `'` written as `'"'"'`.
///
/// `printf %s <quoted>` in `/bin/sh` prints `s` exactly, for any `s` without NUL (a shell
/// argument cannot hold NUL; see [`sh_quote_checked`]).
pub fn sh_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\"'\"'");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// [`sh_quote`], refusing NUL.
///
/// # Errors
/// `sandbox_env_value_contains_null` when `s` contains NUL.
pub fn sh_quote_checked(s: &str) -> Result<String> {
    if s.contains('\0') {
        return Err(Error::invalid(
            "sandbox_env_value_contains_null",
            "a shell argument cannot contain a NUL byte",
        ));
    }
    Ok(sh_quote(s))
}

/// Quotes and joins argv into one shell command line.
pub fn sh_join<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| sh_quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `key` is a valid environment variable name: `^[A-Za-z_][A-Za-z0-9_]*$`.
pub fn is_valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks every key (and that no value holds NUL).
///
/// # Errors
/// `sandbox_env_key_invalid:<key>` for the first bad key; `sandbox_env_value_contains_null`
/// for a value with NUL.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in env {
        if !is_valid_env_key(k) {
            return Err(Error::invalid(
                format!("sandbox_env_key_invalid:{k}"),
                format!(
                    "sandbox_env_key_invalid:{k}: environment variable names must match ^[A-Za-z_][A-Za-z0-9_]*$"
                ),
            ));
        }
        if v.contains('\0') {
            return Err(Error::invalid(
                "sandbox_env_value_contains_null",
                format!("the value of {k} contains a NUL byte"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_examples() {
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\"'\"'s'");
        assert_eq!(sh_join(&["echo", "$HOME"]), "'echo' '$HOME'");
        assert!(sh_quote_checked("a\0b").is_err());
    }

    #[test]
    fn env_keys() {
        for good in ["A", "_", "a_1", "PATH"] {
            assert!(is_valid_env_key(good), "{good}");
        }
        for bad in ["", "1A", "BAD-KEY", "A B", "É", "A=B"] {
            assert!(!is_valid_env_key(bad), "{bad}");
        }
        let env = BTreeMap::from([("BAD-KEY".to_string(), "v".to_string())]);
        assert_eq!(
            validate_env(&env).unwrap_err().code(),
            "sandbox_env_key_invalid:BAD-KEY"
        );
    }
}
