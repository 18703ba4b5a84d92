//! Header rewriting: hop-by-hop removal (RFC 9110 §7.6.1) and token
//! injection. Small functions, tested alone.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::error::{Error, Kind};

/// Removes hop-by-hop headers: the fixed set, every `Proxy-*` header,
/// `Keep-Alive`, and the headers the `Connection` header names.
///
/// Runs twice per request (its head and the response's), so it reads the
/// names once and returns at once when none is hop-by-hop, and otherwise
/// removes only what is there (a `remove` per absent name was most of its
/// cost).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| hop_by_hop(k.as_str())) {
        return;
    }
    // Every `Connection` line counts. Usually there is one: the clone is a
    // reference count, and an empty Vec does not allocate.
    let (first, more) = {
        let mut lines = headers.get_all(header::CONNECTION).iter().cloned();
        (lines.next(), lines.collect::<Vec<_>>())
    };
    for line in first.iter().chain(&more) {
        for name in line.to_str().unwrap_or("").split(',') {
            let name = name.trim();
            // `keep-alive`, the usual token, and the other fixed names but
            // `te` go in the pass below: no lookup for them here.
            if !name.eq_ignore_ascii_case("te") && fixed_hop_by_hop(name) {
                continue;
            }
            // By `&str`: no HeaderName made (and allocated) for a lookup;
            // not a valid name, nothing to remove.
            headers.remove(name);
        }
    }
    // The names are cloned out first (the map is borrowed while read), in
    // one pass; the first few on the stack: a message carries one or two.
    let mut first: [Option<HeaderName>; 4] = Default::default();
    let mut rest = Vec::new();
    let fixed = headers
        .keys()
        .filter(|k| *k != header::TE && hop_by_hop(k.as_str()));
    for (i, name) in fixed.enumerate() {
        match first.get_mut(i) {
            Some(slot) => *slot = Some(name.clone()),
            None => rest.push(name.clone()),
        }
    }
    for name in first.into_iter().flatten().chain(rest) {
        headers.remove(name);
    }
    // `TE: trailers` is end to end in practice: gRPC needs it to reach the
    // upstream, and HTTP/2 allows exactly that value (RFC 9113 §8.2.2).
    // Other codings are hop-by-hop: keep only `trailers`, spelled as HTTP/2
    // wants it, and one line of it.
    if headers.contains_key(header::TE) {
        let trailers = headers.get_all(header::TE).iter().any(|line| {
            line.as_bytes().split(|&b| b == b',').any(|item| {
                // A coding may carry parameters (`trailers;q=1` is not one).
                item.trim_ascii().eq_ignore_ascii_case(b"trailers")
            })
        });
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// [`hop_by_hop`] for a name in any case (a `Connection` token), without
/// lowercasing it first; the same names.
fn fixed_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
        || name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
}

/// Whether a header (by its lowercase name) is hop-by-hop by itself: the
/// fixed set, `Keep-Alive`, `TE` and every `Proxy-*`.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || name.starts_with("proxy-")
}

/// Refuses request framing that parsers disagree on (request smuggling).
///
/// hyper has already refused bad and conflicting `Content-Length` values and
/// a `Transfer-Encoding` whose last coding is not `chunked`. It accepts
/// `gzip, chunked` (the body would go out still gzip-coded, without saying
/// so) and `chunked` twice; both are refused here. When a request carries
/// both `Content-Length` and `Transfer-Encoding`, hyper frames it by
/// `Transfer-Encoding`, drops `Content-Length` and closes the connection
/// after the response, so the pair is no longer visible here; the check
/// for it stays for any server path that keeps both.
pub fn check_framing(headers: &HeaderMap) -> Result<(), Error> {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = codings.next() else {
        return Ok(());
    };
    let only_chunked = first
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(b"chunked")
        && codings.next().is_none();
    if !only_chunked {
        return Err(Error::new(
            Kind::BadRequest,
            "unsupported Transfer-Encoding: only \"chunked\" is accepted",
        ));
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(Error::new(
            Kind::BadRequest,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    Ok(())
}

/// Sets `Authorization` to the token's value, replacing every value the app
/// sent. The value is already marked sensitive.
#[inline]
pub fn inject(headers: &mut HeaderMap, value: &HeaderValue) {
    inject_as(headers, &header::AUTHORIZATION, value.clone());
}

/// Sets header `name` (a route's `header`) to a credential, replacing every
/// value the app sent. The value is already marked sensitive.
#[inline]
pub fn inject_as(headers: &mut HeaderMap, name: &HeaderName, value: HeaderValue) {
    debug_assert!(value.is_sensitive());
    headers.insert(name, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_hop_by_hop_checks_name_the_same_headers() {
        for name in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-x",
            "proxy",
            "host",
            "trailers",
            "x-te",
            "",
        ] {
            let upper = name.to_ascii_uppercase();
            assert_eq!(fixed_hop_by_hop(&upper), hop_by_hop(name), "{name}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop, authorization"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "gzip"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-connection", "keep-alive"),
            ("proxy-custom", "1"),
            ("authorization", "Bearer app"),
            ("accept", "*/*"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept", "x-keep"]);
    }

    #[test]
    fn framing_allows_only_a_single_chunked_coding() {
        assert!(check_framing(&map(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&map(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(check_framing(&map(&[("transfer-encoding", "Chunked ")])).is_ok());
        for bad in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[("transfer-encoding", "chunked, chunked")],
            &[("transfer-encoding", "identity")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
        ] {
            let e = check_framing(&map(bad)).unwrap_err();
            assert_eq!(e.kind, Kind::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
        // What reaches an HTTP/2 upstream is exactly one `trailers`.
        for lines in [
            &[("te", "Trailers")][..],
            &[("te", "gzip, trailers")],
            &[("te", "deflate;q=0.5"), ("te", " trailers ")],
        ] {
            let mut h = map(lines);
            strip_hop_by_hop(&mut h);
            let all: Vec<_> = h.get_all("te").iter().collect();
            assert_eq!(all, vec!["trailers"], "{lines:?}");
        }
        for lines in [
            &[("te", "gzip")][..],
            &[("te", "trailers;q=0.5")],
            &[("te", "gzip"), ("te", "deflate")],
        ] {
            let mut h = map(lines);
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key("te"), "{lines:?}");
        }
    }

    #[test]
    fn every_hop_by_hop_header_is_seen_by_the_fast_check() {
        for name in [
            header::CONNECTION,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
            header::PROXY_AUTHORIZATION,
            header::PROXY_AUTHENTICATE,
            header::TE,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
        ] {
            assert!(hop_by_hop(name.as_str()), "{name}");
            let mut h = map(&[("accept", "*/*")]);
            h.insert(name.clone(), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(&name), "{name} kept");
            assert!(h.contains_key(header::ACCEPT));
        }
        for name in [
            "accept",
            "authorization",
            "host",
            "content-length",
            "tex",
            "proxyish",
        ] {
            assert!(!hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn many_hop_by_hop_headers_are_all_removed() {
        let mut h = map(&[("accept", "*/*")]);
        for i in 0..50 {
            h.append(
                HeaderName::from_bytes(format!("proxy-x{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        h.insert(header::UPGRADE, HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
    }

    #[test]
    fn inject_replaces_all_app_values() {
        let mut h = map(&[
            ("authorization", "Bearer app1"),
            ("authorization", "Basic x"),
        ]);
        let mut v = HeaderValue::from_static("Bearer real");
        v.set_sensitive(true);
        inject(&mut h, &v);
        let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(all, vec![&v]);
        assert!(h[header::AUTHORIZATION].is_sensitive());
    }
}
