//! `grant = "static"`: a credential read from a file and attached as is (an
//! API key, a pre-issued token). No token endpoint, no expiry.
//!
//! The task reads the file at start and publishes it to the profile's
//! [`Store`] like a token that never expires, so the request path, the
//! route's header and prefix, readiness and redaction are the same as for
//! OAuth profiles. It then looks at the file's metadata every
//! [`POLL`] (one `stat`, no read) and reads it again when it changed: a
//! Kubernetes Secret swapping its symlink, or an edit in place. A file that
//! cannot be read, or is empty, keeps the last good credential in use,
//! shows as the profile's last error, and is tried again at every poll, so
//! `token_injector_token_fetch_consecutive_failures` climbs and its alert
//! fires while it stays broken.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::secret::{self, FileStamp};

use super::{FetchError, Observe, Store, Token};

/// How often the file's metadata is looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// Keeps `store` holding the content of `file` until the task is aborted.
pub async fn run(store: Arc<Store>, file: PathBuf, observe: impl Observe) {
    let source = secret::Source::File(file.clone());
    let mut loaded: Option<Option<FileStamp>> = None;
    // Failed reads in a row, for the failure gauge and its alert.
    let mut failures: u32 = 0;
    let mut polled = true;
    loop {
        let stamp = FileStamp::of(&file);
        // An upstream 401 drops the credential from the store: put it back
        // (after a fresh read), since there is nothing else to fetch.
        let dropped = store.fetch_requested() && store.current().is_none();
        // While reads fail, every poll tries again (the file may become
        // readable without its metadata changing, e.g. a permission fix).
        let changed = loaded != Some(stamp);
        if changed || dropped || (failures > 0 && polled) {
            store.begin_fetch();
            let read = source
                .read()
                .map_err(|e| FetchError::Secret(e.to_string()))
                .and_then(|value| {
                    Token::permanent(&value).ok_or_else(|| {
                        FetchError::Secret(format!(
                            "{source} holds characters that cannot go in a header"
                        ))
                    })
                });
            match read {
                Ok(token) => {
                    let changed = store
                        .peek()
                        .is_none_or(|held| held.header() != token.header());
                    if changed {
                        tracing::info!(profile = %store.profile(), file = %file.display(), "static credential loaded");
                    }
                    failures = 0;
                    observe.fetched(Duration::ZERO, &token);
                    store.publish(Arc::new(token));
                    loaded = Some(stamp);
                }
                Err(error) => {
                    // Logged when the failure begins or the file changes,
                    // not at every poll.
                    if failures == 0 || changed {
                        tracing::warn!(
                            profile = %store.profile(),
                            reason = error.reason(),
                            error = %error,
                            "static credential not read; the last one read stays in use"
                        );
                    }
                    failures = failures.saturating_add(1);
                    observe.failed(Duration::ZERO, &error, failures);
                    // The store keeps the credential it holds, if any.
                    store.fail(&error);
                    loaded = Some(stamp);
                }
            }
        }
        // A wake is a request finding no credential, or an upstream 401
        // dropping it: only the latter (seen as `dropped` above) reads the
        // file at once; failed reads are retried once per poll, never per
        // request.
        polled = tokio::select! {
            _ = tokio::time::sleep(POLL) => true,
            _ = store.woken() => false,
        };
    }
}
