//! Request-head checks that hyper's HTTP/1 parser does not make, done on
//! the bytes as they arrive from the client.
//!
//! hyper follows RFC 9112 §6.3 for a request with both `Content-Length` and
//! `Transfer-Encoding`: it frames by `Transfer-Encoding`, drops
//! `Content-Length` and closes the connection afterwards, so the proxy never
//! sees that both were there. httparse also accepts a bare LF as a line end.
//! Neither can smuggle a request through us (requests are re-serialised),
//! but both are the signature of a smuggling attempt aimed at whatever sits
//! behind a less careful hop, so they are refused with 400 instead.
//!
//! [`Scan`] reads only request heads: from the first byte read while the
//! connection waits for a request up to the blank line that ends the head,
//! a few hundred bytes per request. Bodies are never scanned.

/// What was wrong with a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ContentLengthWithTransferEncoding,
    BareLf,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::ContentLengthWithTransferEncoding => {
                "request has both Content-Length and Transfer-Encoding"
            }
            Refusal::BareLf => "request head has a line ending without CR (bare LF)",
        }
    }
}

const CONTENT_LENGTH: &[u8] = b"content-length";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding";
/// Longest name we need to recognise; longer ones are just "other".
const NAME_MAX: usize = TRANSFER_ENCODING.len();
/// How much of the request line is kept to tie a verdict to its request.
const LINE_KEEP: usize = 64;

/// Incremental scanner over one request head at a time.
#[derive(Debug)]
pub struct Scan {
    /// Lines seen in this head (the request line is line 0).
    lines: u32,
    /// Bytes in the current line, CR excluded.
    line_len: u32,
    /// The header name so far, lower-cased, while still in the name.
    name: [u8; NAME_MAX],
    name_len: usize,
    in_value: bool,
    prev_cr: bool,
    content_length: bool,
    transfer_encoding: bool,
    bare_lf: bool,
    /// The start of the request line, and of the last head's after it ended.
    line: [u8; LINE_KEEP],
    line_kept: usize,
}

impl Default for Scan {
    fn default() -> Self {
        Self {
            lines: 0,
            line_len: 0,
            name: [0; NAME_MAX],
            name_len: 0,
            in_value: false,
            prev_cr: false,
            content_length: false,
            transfer_encoding: false,
            bare_lf: false,
            line: [0; LINE_KEEP],
            line_kept: 0,
        }
    }
}

/// The outcome of feeding bytes to a [`Scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// The head goes on past these bytes.
    More,
    /// The head ended; the rest of the bytes (if any) are not head.
    Ended(Option<Refusal>),
}

/// Whether a kept request line is that of a request with this method and
/// path (the path as hyper parsed it; the line holds the raw target).
pub fn belongs_to(line: &[u8], method: &str, path: &str) -> bool {
    let Some(rest) = line.strip_prefix(method.as_bytes()) else {
        return false;
    };
    if rest.first() != Some(&b' ') {
        return false;
    }
    path.is_empty() || rest.windows(path.len()).any(|w| w == path.as_bytes())
}

impl Scan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the head. After `Ended`, the scanner is
    /// reset for the next head.
    pub fn feed(&mut self, bytes: &[u8]) -> Fed {
        let mut i = 0;
        while i < bytes.len() {
            // A header value and the request line matter only for where
            // they end (and the line for its first bytes): jump to the next
            // CR or LF instead of looking at each byte.
            if self.in_value || self.lines == 0 {
                let rest = &bytes[i..];
                let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                if run > 0 {
                    self.other(&rest[..run]);
                    i += run;
                    continue;
                }
            }
            let b = bytes[i];
            i += 1;
            match b {
                b'\n' => {
                    if !self.prev_cr {
                        self.bare_lf = true;
                    }
                    self.prev_cr = false;
                    if self.line_len == 0 {
                        // Empty lines before the request line are ignored
                        // (RFC 9112 §2.2); after it, one ends the head.
                        if self.lines > 0 {
                            let verdict = self.verdict();
                            let (line, kept) = (self.line, self.line_kept);
                            *self = Self::default();
                            (self.line, self.line_kept) = (line, kept);
                            return Fed::Ended(verdict);
                        }
                        continue;
                    }
                    self.lines += 1;
                    self.line_len = 0;
                    self.name_len = 0;
                    self.in_value = false;
                }
                b'\r' => self.prev_cr = true,
                b':' => {
                    self.other_byte();
                    self.in_value = true;
                    let name = &self.name[..self.name_len.min(NAME_MAX)];
                    if self.name_len <= NAME_MAX {
                        self.content_length |= name == CONTENT_LENGTH;
                        self.transfer_encoding |= name == TRANSFER_ENCODING;
                    }
                }
                _ => {
                    self.other_byte();
                    if self.name_len < NAME_MAX {
                        self.name[self.name_len] = b.to_ascii_lowercase();
                    }
                    self.name_len = self.name_len.saturating_add(1);
                }
            }
        }
        Fed::More
    }

    /// A byte of a header name (or its colon): neither CR nor LF.
    fn other_byte(&mut self) {
        self.prev_cr = false;
        self.line_len = self.line_len.saturating_add(1);
    }

    /// A run of bytes without CR or LF in a value or the request line.
    fn other(&mut self, run: &[u8]) {
        self.prev_cr = false;
        self.line_len = self
            .line_len
            .saturating_add(u32::try_from(run.len()).unwrap_or(u32::MAX));
        if self.lines == 0 {
            let keep = run.len().min(LINE_KEEP - self.line_kept);
            self.line[self.line_kept..self.line_kept + keep].copy_from_slice(&run[..keep]);
            self.line_kept += keep;
        }
    }

    /// The start of the request line of the head that ended last (up to
    /// 64 bytes), to check that a verdict belongs to the request hyper
    /// parsed: bytes of a body read after an early answer can look like a
    /// head too.
    pub fn request_line(&self) -> &[u8] {
        &self.line[..self.line_kept]
    }

    fn verdict(&self) -> Option<Refusal> {
        if self.content_length && self.transfer_encoding {
            Some(Refusal::ContentLengthWithTransferEncoding)
        } else if self.bare_lf {
            Some(Refusal::BareLf)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(head: &[u8]) -> Fed {
        Scan::new().feed(head)
    }

    #[test]
    fn clean_heads_pass() {
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Fed::Ended(None)
        );
        assert_eq!(
            scan_all(b"\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Fed::Ended(None)
        );
        assert_eq!(
            scan_all(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Fed::Ended(None)
        );
        // A value that merely mentions the other header is not that header.
        assert_eq!(
            scan_all(
                b"GET / HTTP/1.1\r\nX-Note: content-length\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            Fed::Ended(None)
        );
        assert_eq!(
            scan_all(
                b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            Fed::Ended(None)
        );
    }

    #[test]
    fn both_framings_are_refused_in_either_order_and_case() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 4\r\n\r\n",
        ] {
            assert_eq!(
                scan_all(head),
                Fed::Ended(Some(Refusal::ContentLengthWithTransferEncoding)),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn bare_lf_anywhere_in_the_head_is_refused() {
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
            Fed::Ended(Some(Refusal::BareLf))
        );
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\r\nHost: a\n\n"),
            Fed::Ended(Some(Refusal::BareLf))
        );
    }

    #[test]
    fn a_head_split_at_every_byte_gives_the_same_verdict() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n";
        for split in 0..head.len() {
            let mut s = Scan::new();
            let first = s.feed(&head[..split]);
            assert_eq!(first, Fed::More, "split at {split}");
            assert_eq!(
                s.feed(&head[split..]),
                Fed::Ended(Some(Refusal::ContentLengthWithTransferEncoding)),
                "split at {split}"
            );
        }
    }

    #[test]
    fn the_scanner_resets_after_each_head() {
        let mut s = Scan::new();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\nHost: a\n\n"),
            Fed::Ended(Some(Refusal::BareLf))
        );
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\n\r\n"), Fed::Ended(None));
    }

    #[test]
    fn the_request_line_is_kept_for_the_verdict() {
        let mut s = Scan::new();
        s.feed(
            b"\r\nPOST /x?y=1 HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(s.request_line(), b"POST /x?y=1 HTTP/1.1");
        assert!(belongs_to(s.request_line(), "POST", "/x"));
        assert!(!belongs_to(s.request_line(), "GET", "/x"));
        assert!(!belongs_to(s.request_line(), "POST", "/other"));
        assert!(!belongs_to(b"{\"a\": 1}", "GET", "/"));
    }

    #[test]
    fn long_names_are_not_mistaken_for_known_ones() {
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\r\nTransfer-Encoding-Extra: x\r\nContent-Length: 1\r\n\r\n"),
            Fed::Ended(None)
        );
    }
}
