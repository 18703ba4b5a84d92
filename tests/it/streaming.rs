//! Bodies stream through the proxy both ways with flat memory. Its own test
//! binary, so the process's peak RSS reflects this test alone.

use std::time::Duration;

use crate::support::*;
use futures_util::StreamExt;

const GIB: u64 = 1024 * 1024 * 1024;

/// Peak resident set of this process, in KiB (Linux `VmHWM`).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_up_and_down_with_flat_memory() {
    let w = World::new(Mode::Issue(300.0)).await;
    let app = w.start(&w.config("", "")).await;
    let client = proxied_client(app.proxy_addr());
    // Warm up pools and the token before taking the baseline.
    assert_eq!(
        client
            .get("http://api.test/")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let baseline = peak_rss_kib();

    // Upload: 1 GiB from a stream of 64 KiB chunks; the upstream counts it.
    let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let chunks = (GIB / chunk.len() as u64) as usize;
    let body = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let r = tokio::time::timeout(
        Duration::from_secs(50),
        client
            .post("http://api.test/upload")
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    )
    .await
    .expect("upload in time")
    .unwrap();
    assert_eq!(r.status(), 200);
    let echo: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(echo["body_len"].as_u64(), Some(GIB));

    // Download: 1 GiB produced by the upstream as it is read.
    let r = client
        .get(format!("http://api.test/bytes?n={GIB}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut total = 0u64;
    let read = async {
        while let Some(c) = stream.next().await {
            total += c.unwrap().len() as u64;
        }
    };
    tokio::time::timeout(Duration::from_secs(50), read)
        .await
        .expect("download in time");
    assert_eq!(total, GIB);

    let growth_mib = (peak_rss_kib().saturating_sub(baseline)) / 1024;
    assert!(
        growth_mib < 64,
        "peak RSS grew by {growth_mib} MiB while streaming 2 GiB"
    );
    app.shutdown().await;
}
