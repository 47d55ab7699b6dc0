//! Text that workloads choose (their process names, the names of interfaces in their network
//! namespaces), made safe to print where a person reads it: the `egress events` table, the
//! agent's log.
use std::{borrow::Cow, fmt::Write as _};

/// `s` with its control characters and bidirectional-text controls written as `\u{..}`, so that a
/// terminal neither runs a workload's escape sequences nor reorders the line around its text.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unprintable) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unprintable(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// C0 and C1 controls, DEL, and the marks, embeddings, overrides and isolates of the Unicode
/// bidirectional algorithm.
fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert!(matches!(printable("curl"), Cow::Borrowed("curl")));
        assert_eq!(printable("café 日本 a\\b"), "café 日本 a\\b");
        assert_eq!(printable("\u{1b}[2Jx"), "\\u{1b}[2Jx");
        assert_eq!(printable("a\tb\nc\rd"), "a\\u{9}b\\u{a}c\\u{d}d");
        assert_eq!(printable("\u{7f}\u{9b}"), "\\u{7f}\\u{9b}");
        assert_eq!(printable("ab\u{202e}cd\u{2066}"), "ab\\u{202e}cd\\u{2066}");
    }
}
