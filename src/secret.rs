//! Secret material: client secrets read from files or the environment.
//!
//! A [`Secret`] never shows its value through `Debug` or `Display`, and its
//! memory is zeroed when dropped. A [`Source`] says where to read one; it is
//! read again at every token request so a rotated file is picked up without
//! a restart.
//!
//! [`warn_exposed`] looks at the permissions of secret and key files (those
//! a config names) and warns, by key, path and mode, about those that group
//! or others may read. Only metadata is read, never the content.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use zeroize::Zeroizing;

/// A secret value. Debug and Display print `[redacted]`.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

// The one field zeroizes itself when dropped (and so when a clone is).
impl zeroize::ZeroizeOnDrop for Secret {}

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

/// What identifies a file's current content without reading it: a swapped
/// symlink (Kubernetes Secret volumes) changes the inode, an edit in place
/// the modification time or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    /// `None` when the file cannot be looked at (missing, no permission).
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        Some(Self {
            dev,
            ino,
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// Reads a 32-byte key (AES-256) from `path`: exactly 32 bytes as they are,
/// or their standard base64 encoding with one optional trailing newline
/// (what `openssl rand -base64 32` writes). The error says which form was
/// expected, never what the file holds.
pub fn read_key32(path: &Path) -> Result<Zeroizing<[u8; 32]>, String> {
    use base64::Engine as _;
    let bytes = Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() == 32 {
        key.copy_from_slice(&bytes);
        return Ok(key);
    }
    let text = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(&bytes[..]);
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap_or_default(),
    );
    if decoded.len() != 32 {
        return Err(format!(
            "{} holds {} bytes; expected exactly 32 bytes, or their base64 encoding (openssl rand -base64 32)",
            path.display(),
            bytes.len()
        ));
    }
    key.copy_from_slice(&decoded);
    Ok(key)
}

/// Removes one trailing `\n` or `\r\n`, nothing more: a secret may end in
/// spaces on purpose.
pub fn trim_one_newline(s: &str) -> &str {
    s.strip_suffix("\r\n")
        .or_else(|| s.strip_suffix('\n'))
        .unwrap_or(s)
}

/// A secret or key file that group or others may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    /// The config key that names the file: `profiles.billing.client_secret_file`.
    pub key: String,
    pub path: PathBuf,
    /// The permission bits, e.g. `0o644`.
    pub mode: u32,
}

/// The permission bits of `path` (following symlinks, as Kubernetes mounts
/// Secrets through them) when group or others may read it. `None` for a
/// private file, and for one that cannot be examined: config validation
/// reports unreadable files.
pub fn exposed_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o044 != 0).then_some(mode)
}

/// Logs one warning per file of `files` (config key, path: what
/// `Config::secret_files` lists) that group or others may read, naming the
/// key, the path and the mode, and returns them. Called at start and at each
/// reload; a warning, not an error, because a mounted Secret is often 0644
/// by default and the proxy must still start.
pub fn warn_exposed(files: &[(String, PathBuf)]) -> Vec<Exposed> {
    let mut exposed = Vec::new();
    for (key, path) in files {
        if let Some(mode) = exposed_mode(path) {
            tracing::warn!(
                key = %key,
                path = %path.display(),
                mode = %format_args!("{mode:04o}"),
                "secret file is readable by group or others; restrict it to the owner \
                 (chmod 600, or defaultMode: 0400 on a Kubernetes Secret volume)"
            );
            exposed.push(Exposed {
                key: key.clone(),
                path: path.clone(),
                mode,
            });
        }
    }
    exposed
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
    fn key32_raw_or_base64() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let raw: Vec<u8> = (0u8..32).collect();
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(&read_key32(&path).unwrap()[..], &raw[..]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        std::fs::write(&path, format!("{b64}\n")).unwrap();
        assert_eq!(&read_key32(&path).unwrap()[..], &raw[..]);
        std::fs::write(&path, &b64).unwrap();
        assert_eq!(&read_key32(&path).unwrap()[..], &raw[..]);
        for bad in [
            &b"short"[..],
            &[7u8; 33][..],
            b"!!!not base64 at all, 44 characters long!!",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = read_key32(&path).unwrap_err();
            assert!(e.contains("expected exactly 32 bytes"), "{e}");
        }
        // 16 bytes of base64 is not a 32-byte key.
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode([1u8; 16]),
        )
        .unwrap();
        assert!(read_key32(&path).is_err());
        assert!(
            read_key32(&dir.path().join("missing"))
                .unwrap_err()
                .contains("cannot read")
        );
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

    #[test]
    fn secret_zeroizes_on_drop() {
        // Secret promises ZeroizeOnDrop because its only field is a
        // Zeroizing<String>; this fails to build if either stops holding.
        fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let s = Secret::new("hunter2".into());
        zeroizes_on_drop(&s);
        zeroizes_on_drop(&s.0);
        // What the drop does: the bytes are overwritten before release.
        let mut inner = s.0.clone();
        zeroize::Zeroize::zeroize(&mut inner);
        assert!(inner.is_empty());
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn exposed_mode_follows_symlinks_and_ignores_missing_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("..data-secret");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("secret");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(exposed_mode(&link), Some(0o644));
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed_mode(&link), None);
        assert_eq!(exposed_mode(&dir.path().join("missing")), None);
    }
}
