//! Paths and names as people read them in messages: always one line, never a terminal control sequence.
//!
//! A file name may hold any byte but `/` and NUL: newlines (which would split a one-line error in two), escape
//! sequences (which a terminal obeys: a hostile server's listing could rewrite the user's screen), bidirectional
//! overrides (which reorder what is shown), and bytes that are not UTF-8. [`Show::shown`] writes such a name with
//! those escaped, like `rsync` and GNU `ls` on a terminal do: `\n`, `\t`, `\r`, `\xNN` for the other control
//! characters and for each byte that is not UTF-8, `\u{NNNN}` for invisible or reordering code points, and `\\`
//! for a backslash, so that every distinct name is shown distinctly. Everything else, non-ASCII letters included,
//! is shown as it is.

use std::ffi::OsStr;
use std::fmt;
use std::path::Path;

/// A name or path shown with control characters and invalid UTF-8 escaped (see the module docs).
#[derive(Clone, Copy)]
pub struct Shown<'a>(&'a [u8]);

/// Anything that names a file: shown escaped with `.shown()` where `.display()` would print it raw.
pub trait Show {
    fn shown(&self) -> Shown<'_>;
}

impl Show for [u8] {
    fn shown(&self) -> Shown<'_> {
        Shown(self)
    }
}

impl Show for str {
    fn shown(&self) -> Shown<'_> {
        Shown(self.as_bytes())
    }
}

impl Show for OsStr {
    #[cfg(unix)]
    fn shown(&self) -> Shown<'_> {
        use std::os::unix::ffi::OsStrExt;
        Shown(self.as_bytes())
    }

    #[cfg(not(unix))]
    fn shown(&self) -> Shown<'_> {
        Shown(self.as_encoded_bytes())
    }
}

impl Show for Path {
    fn shown(&self) -> Shown<'_> {
        self.as_os_str().shown()
    }
}

/// Code points that are not control characters but change how the text around them is shown: bidirectional
/// embeddings, overrides and isolates, directional marks, zero-width characters and the byte order mark.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for chunk in self.0.utf8_chunks() {
            let valid = chunk.valid();
            let mut plain_from = 0;
            for (i, c) in valid.char_indices() {
                let plain = !(c.is_control() || invisible(c) || c == '\\');
                if plain {
                    continue;
                }
                f.write_str(&valid[plain_from..i])?;
                plain_from = i + c.len_utf8();
                match c {
                    '\n' => f.write_str("\\n")?,
                    '\t' => f.write_str("\\t")?,
                    '\r' => f.write_str("\\r")?,
                    '\\' => f.write_str("\\\\")?,
                    c if (c as u32) < 0x80 => write!(f, "\\x{:02x}", c as u32)?,
                    c => write!(f, "\\u{{{:04x}}}", c as u32)?,
                }
            }
            f.write_str(&valid[plain_from..])?;
            for b in chunk.invalid() {
                f.write_char('\\')?;
                write!(f, "x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Text a peer sent for a message (a server's error), made safe to print: control and invisible characters escaped
/// as by [`Show::shown`], but backslashes and tabs kept: the text usually quotes names the peer has escaped already,
/// and a tab neither splits a line nor commands a terminal.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !matches!(c, '\\' | '\t') && (c.is_control() || invisible(c)) {
            let mut one = [0u8; 4];
            out.push_str(&c.encode_utf8(&mut one).as_bytes().shown().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{self}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(b: &[u8]) -> String {
        b.shown().to_string()
    }

    #[test]
    fn ordinary_names_are_unchanged() {
        assert_eq!(shown(b"dir/sub dir/file-1.txt"), "dir/sub dir/file-1.txt");
        assert_eq!(shown("données/日本語/ünï".as_bytes()), "données/日本語/ünï");
    }

    #[test]
    fn control_characters_are_escaped_and_keep_one_line() {
        assert_eq!(shown(b"bad\nname"), "bad\\nname");
        assert_eq!(shown(b"a\tb\rc"), "a\\tb\\rc");
        // An escape sequence that would clear the screen, and DEL.
        assert_eq!(shown(b"x\x1b[2Jy\x7f"), "x\\x1b[2Jy\\x7f");
        // C1 controls are code points, not bytes.
        assert_eq!(shown("a\u{9b}b".as_bytes()), "a\\u{009b}b");
        assert!(!shown(b"\n\r\x0b\x0c\x1b\x07").chars().any(|c| c.is_control()));
    }

    #[test]
    fn invalid_utf8_bytes_are_shown_as_hex() {
        assert_eq!(shown(b"caf\xe9"), "caf\\xe9");
        assert_eq!(shown(b"\xff\xfe/ok"), "\\xff\\xfe/ok");
    }

    #[test]
    fn reordering_and_invisible_code_points_are_escaped() {
        assert_eq!(shown("evil\u{202e}txt.exe".as_bytes()), "evil\\u{202e}txt.exe");
        assert_eq!(shown("a\u{200b}b".as_bytes()), "a\\u{200b}b");
    }

    #[test]
    fn distinct_names_are_shown_distinctly() {
        // The escape of a byte and the literal text of that escape differ.
        assert_ne!(shown(b"a\nb"), shown(b"a\\nb"));
        assert_ne!(shown(b"\xe9"), shown(b"\\xe9"));
        assert_eq!(shown(b"a\\b"), "a\\\\b");
    }

    #[test]
    fn peer_text_keeps_backslashes_but_not_control_characters() {
        assert_eq!(one_line("cannot open 'a\\nb': denied"), "cannot open 'a\\nb': denied");
        assert_eq!(one_line("line\nbreak\u{1b}[31m"), "line\\nbreak\\x1b[31m");
    }

    #[test]
    fn paths_and_os_strings_show_the_same() {
        let p = Path::new("d/bad\nname");
        assert_eq!(p.shown().to_string(), "d/bad\\nname");
        assert_eq!(p.as_os_str().shown().to_string(), "d/bad\\nname");
        assert_eq!("x\n".shown().to_string(), "x\\n");
    }
}
