//! Walking an error's causes, written once: [`chain`] for the one-line
//! text logs and responses carry, [`causes`] to look for a kind of error
//! among the sources.

use std::error::Error;

/// The sources of `e`, nearest first (`e` itself not included).
pub fn causes<'a>(e: &'a dyn Error) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(e.source(), |&s| s.source())
}

/// An error and its sources on one line: "a: b: c". A source whose text the
/// line already holds (many errors repeat their cause) is left out.
pub fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    for s in causes(e) {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct E {
        text: &'static str,
        source: Option<Box<E>>,
    }

    fn e(text: &'static str, source: Option<E>) -> E {
        E {
            text,
            source: source.map(Box::new),
        }
    }

    #[test]
    fn chain_joins_causes_and_skips_repeated_text() {
        let err = e("a", Some(e("b", Some(e("c", None)))));
        assert_eq!(chain(&err), "a: b: c");
        assert_eq!(causes(&err).count(), 2);
        let repeated = e("connect failed: refused", Some(e("refused", None)));
        assert_eq!(chain(&repeated), "connect failed: refused");
        assert_eq!(chain(&e("alone", None)), "alone");
    }
}
