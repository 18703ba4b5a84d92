//! Config reloads: the config file is watched (its directory, so Kubernetes
//! ConfigMap symlink swaps and editors' write-and-rename are seen) and SIGHUP
//! reloads too. A valid new config is applied; an invalid one is logged with
//! the `check` messages, counted as `result="error"`, and the running config
//! stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::Running;

/// Events closer together than this are one change (editors write twice).
const SETTLE: Duration = Duration::from_millis(200);

/// Loads `path` and applies it; logs and counts the outcome. Returns whether
/// the new config is now running.
pub fn reload(running: &Running, path: &Path) -> bool {
    let counter = &running.metrics().config_reloads;
    let config = match crate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for line in e.lines() {
                tracing::error!(problem = %line, "config reload refused; the running config stays");
            }
            counter.with_label_values(&["error"]).inc();
            return false;
        }
    };
    match running.apply(config) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "config reloaded");
            counter.with_label_values(&["success"]).inc();
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; the running config stays");
            counter.with_label_values(&["error"]).inc();
            false
        }
    }
}

/// Watches `path` and reloads when its content changes, until the returned
/// watcher is dropped or the task is aborted. Reloads triggered by `hup`
/// (SIGHUP) happen whether or not the content changed.
pub fn spawn(
    running: Arc<Running>,
    path: PathBuf,
    mut hup: mpsc::Receiver<()>,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = path.file_name().map(|n| n.to_owned());
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening or reading a file is no change, and the check below reads
        // the config itself: counting those would wake this task forever.
        // Other files in the directory (secrets, logs) are not the config.
        if event.is_ok_and(|e| !is_read_only(&e.kind) && concerns(&e.paths, name.as_deref())) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut last = std::fs::read(&path).ok();
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        // `running` was started from an earlier read of the file: a change
        // made before the watch began would go unseen until the next one.
        // Loaded off the runtime: at start-up the first token requests are
        // in flight on it.
        if last.is_some() {
            let at = path.clone();
            let now = tokio::task::spawn_blocking(move || crate::config::load(&at).ok())
                .await
                .ok()
                .flatten();
            if now != running.config() {
                reload(&running, &path);
            }
        }
        loop {
            let forced = tokio::select! {
                e = rx.recv() => { if e.is_none() { break } false }
                h = hup.recv() => { if h.is_none() { break } true }
            };
            // Let a burst of events settle, then look at the content once.
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            let now = std::fs::read(&path).ok();
            if forced || (now.is_some() && now != last) {
                last = now;
                reload(&running, &path);
            }
        }
    }))
}

/// Whether an event is about the config file, under its own name (written
/// in place, or renamed over by an editor) or through a Kubernetes ConfigMap's
/// `..data` symlink swap (entries named `..*`). An event without paths
/// counts, to be safe.
fn concerns(paths: &[PathBuf], name: Option<&std::ffi::OsStr>) -> bool {
    paths.is_empty()
        || paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| Some(n) == name || n.as_encoded_bytes().starts_with(b".."))
        })
}

/// Events that leave every file as it was: opens, reads, and closes
/// without writing (a close after writing is kept).
fn is_read_only(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn only_the_config_and_configmap_entries_concern_the_watch() {
        let name = Some(OsStr::new("config.toml"));
        let p = |s: &str| vec![PathBuf::from(s)];
        assert!(concerns(&p("/etc/ti/config.toml"), name));
        assert!(concerns(&p("/etc/ti/..data"), name));
        assert!(concerns(&p("/etc/ti/..data_tmp"), name));
        assert!(concerns(&[], name));
        assert!(concerns(
            &[
                PathBuf::from("/etc/ti/x.tmp"),
                PathBuf::from("/etc/ti/config.toml")
            ],
            name
        ));
        assert!(!concerns(&p("/etc/ti/client-secret"), name));
        assert!(!concerns(&p("/etc/ti/proxy.log"), name));
        assert!(!concerns(&p("/etc/ti/config.toml.tmp"), name));
    }
}
