//! Config reloads: the config file is watched (its directory, so Kubernetes
//! ConfigMap symlink swaps and editors' write-and-rename are seen) and SIGHUP
//! reloads too. A valid new config is applied; an invalid one is logged with
//! the `check` messages, counted as `result="error"`, and the running config
//! stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut last = std::fs::read(&path).ok();
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
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
