//! Grants beyond client credentials through the proxy, against the test
//! token endpoint (which records each request's form): the files a grant
//! reads are read again at every token request. The interop with a real
//! authorization server is in interop_grants.rs; Google's shapes in
//! google.rs and google_wif.rs.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

fn form_value(w: &World, key: &str) -> Option<String> {
    w.tokens
        .state
        .last_form
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// A token exchange from a file (a projected ServiceAccount token the
/// kubelet replaces): each renewal sends the file's current content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_subject_token_file_is_sent_at_the_next_renewal() {
    let w = World::new(Mode::Issue(2.0)).await;
    std::fs::write(w.dir.path().join("subject"), "sa-token-1\n").unwrap();
    let text = w.config("", "").replace(
        "client_secret_file = \"client-secret\"\n",
        "grant = \"token_exchange\"\nsubject_token_file = \"subject\"\n\
         subject_token_type = \"urn:ietf:params:oauth:token-type:jwt\"\n\
         requested_token_type = \"urn:ietf:params:oauth:token-type:access_token\"\n\
         audience = \"https://api.test\"\n",
    );
    let run = w.start(&text).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(
        form_value(&w, "grant_type").as_deref(),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(
        form_value(&w, "subject_token").as_deref(),
        Some("sa-token-1")
    );
    assert_eq!(
        form_value(&w, "subject_token_type").as_deref(),
        Some("urn:ietf:params:oauth:token-type:jwt")
    );
    assert_eq!(
        form_value(&w, "audience").as_deref(),
        Some("https://api.test")
    );
    // No client authentication without a secret: no client_secret, no
    // Authorization; the client_id is sent (RFC 6749 §3.2.1).
    assert!(form_value(&w, "client_secret").is_none());
    assert!(w.tokens.state.last_authorization.lock().unwrap().is_none());
    assert_eq!(form_value(&w, "client_id").as_deref(), Some(CLIENT_ID));
    let r = proxied_client(run.proxy_addr())
        .get("http://api.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    std::fs::write(w.dir.path().join("subject"), "sa-token-2\n").unwrap();
    let before = w.tokens.state.count();
    // A 2 s token renews within about a second.
    w.tokens.state.wait_for_requests(before + 1, WAIT).await;
    eventually(WAIT, || async {
        (form_value(&w, "subject_token").as_deref() == Some("sa-token-2")).then_some(())
    })
    .await;
}
