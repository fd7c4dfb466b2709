//! Inputs quoted in error messages, kept short and printable.
//!
//! A message that echoes a whole input (a 20 KB id, raw layer bytes, a token) is
//! unreadable in a log, can forge log lines with control characters, and can leak
//! what was meant to stay private. Every message that quotes an input goes through
//! [`excerpt`].

/// How many characters of an input a message quotes by default.
pub const EXCERPT_CHARS: usize = 80;

/// `value` as it may appear in a message: control characters escaped, and cut after
/// [`EXCERPT_CHARS`] characters with the length of the whole said.
pub fn excerpt(value: &str) -> String {
    excerpt_to(value, EXCERPT_CHARS)
}

/// [`excerpt`] with a limit of `max_chars` characters.
pub fn excerpt_to(value: &str, max_chars: usize) -> String {
    let mut shown = String::new();
    for (count, c) in value.chars().enumerate() {
        if count == max_chars {
            shown.push_str(&format!("… ({} bytes in all)", value.len()));
            return shown;
        }
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// A path from an input (a mount source, a profile, a layer entry) as it may appear
/// in a message.
pub fn excerpt_path(path: &std::path::Path) -> String {
    excerpt(&path.to_string_lossy())
}

/// Raw bytes (for example a tar header field) as they may appear in a message.
pub fn excerpt_bytes(value: &[u8]) -> String {
    excerpt(&String::from_utf8_lossy(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_printable_values_are_kept() {
        assert_eq!(excerpt("busybox:1.36"), "busybox:1.36");
    }

    #[test]
    fn long_values_are_cut_with_their_length() {
        let long = "a".repeat(20_000);
        let shown = excerpt(&long);
        assert!(shown.starts_with(&"a".repeat(EXCERPT_CHARS)));
        assert!(shown.ends_with("(20000 bytes in all)"), "{shown}");
        assert!(shown.len() < 120);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(excerpt("web\n127.0.0.1 evil"), "web\\n127.0.0.1 evil");
        assert_eq!(excerpt_bytes(b"\x00\x01ok"), "\\u{0}\\u{1}ok");
    }
}
