//! Secret material: client secrets read from files or the environment.
//!
//! A [`Secret`] never shows its value through `Debug` or `Display`, and its
//! memory is zeroed when dropped. A [`Source`] says where to read one; it is
//! read again at every token request so a rotated file is picked up without
//! a restart.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// A secret value. Debug and Display print `[redacted]`.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value. Call sites should not keep another copy.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from. Its Debug shows the path or variable name only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Env(String),
}

/// Why a secret could not be read. Never carries the secret's value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read secret file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} is not valid UTF-8")]
    Utf8 { path: PathBuf },
    #[error("environment variable {name} is not set")]
    EnvMissing { name: String },
    #[error("secret from {origin} is empty")]
    Empty { origin: String },
}

impl Source {
    /// Reads the secret now. A file loses exactly one trailing newline
    /// (`\n` or `\r\n`), as `echo` and editors add one.
    pub fn read(&self) -> Result<Secret, Error> {
        let value = match self {
            Source::File(path) => read_file(path)?,
            Source::Env(name) => {
                std::env::var(name).map_err(|_| Error::EnvMissing { name: name.clone() })?
            }
        };
        if value.is_empty() {
            return Err(Error::Empty {
                origin: self.to_string(),
            });
        }
        Ok(Secret::new(value))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(n) => write!(f, "environment variable {n}"),
        }
    }
}

fn read_file(path: &Path) -> Result<String, Error> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })?);
    let text = std::str::from_utf8(&bytes).map_err(|_| Error::Utf8 {
        path: path.to_owned(),
    })?;
    Ok(trim_one_newline(text).to_owned())
}

/// Removes one trailing `\n` or `\r\n`, nothing more: a secret may end in
/// spaces on purpose.
pub fn trim_one_newline(s: &str) -> &str {
    s.strip_suffix("\r\n")
        .or_else(|| s.strip_suffix('\n'))
        .unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(format!("{s}"), "[redacted]");
        assert!(!format!("{s:?}{s}").contains("hunter2"));
    }

    #[test]
    fn trims_exactly_one_newline() {
        assert_eq!(trim_one_newline("abc\n"), "abc");
        assert_eq!(trim_one_newline("abc\r\n"), "abc");
        assert_eq!(trim_one_newline("abc\n\n"), "abc\n");
        assert_eq!(trim_one_newline("abc "), "abc ");
        assert_eq!(trim_one_newline("abc"), "abc");
    }

    #[test]
    fn file_is_read_again_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "one\n").unwrap();
        let src = Source::File(path.clone());
        assert_eq!(src.read().unwrap().expose(), "one");
        std::fs::write(&path, "two\n").unwrap();
        assert_eq!(src.read().unwrap().expose(), "two");
    }

    #[test]
    fn missing_and_empty_are_errors_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Source::File(dir.path().join("nope"));
        assert!(missing.read().unwrap_err().to_string().contains("nope"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = Source::File(empty).read().unwrap_err();
        assert!(matches!(err, Error::Empty { .. }));
        let env = Source::Env("TOKEN_INJECTOR_TEST_SURELY_UNSET_VAR".into());
        assert!(matches!(env.read().unwrap_err(), Error::EnvMissing { .. }));
    }
}
