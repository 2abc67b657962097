//! Ordered include/exclude filter rules with rsync's pattern syntax and matching ("INCLUDE/EXCLUDE PATTERN RULES").
//!
//! Rules are checked in the order they were added; the first rule whose pattern matches an entry decides whether it
//! is included or excluded, and an entry that no rule matches is included. Patterns are matched against an entry's
//! path relative to the transfer root, as raw bytes (names need not be UTF-8):
//!
//! - A pattern starting with `/` is anchored at the transfer root: it must match the whole relative path
//!   (`/src/main.rs` matches `src/main.rs` only).
//! - Otherwise a pattern with no `/` and no `**` matches the final component at any depth (`*.o` matches `a.o` and
//!   `x/y/a.o`), and a pattern with a `/` or a `**` matches the trailing part of the path starting at a component
//!   boundary (`b/*.txt` matches `b/c.txt` and `a/b/c.txt`, not `ab/c.txt`). An unanchored pattern starting with
//!   `**/` also matches at the top (`**/foo` matches `foo`).
//! - A trailing `/` makes the pattern match directories only (`build/`).
//! - `*` matches any run of bytes except `/`, `**` any run including `/`, `?` one byte except `/`, and `[...]` one
//!   byte of a class (`[abc]`, `[a-z]`, `[!a-z]` or `[^a-z]`, `[[:digit:]]` and the other POSIX classes, in ASCII);
//!   a class never matches `/`. In a pattern with a wildcard, `\` makes the next byte literal (`\*`); a pattern without
//!   `*`, `?` or `[` is matched literally, backslashes included. There is no `{a,b}` alternation. `**` is only "any
//!   bytes": `a/**/b` needs at least one directory between `a` and `b`, as in rsync.
//! - A pattern ending in `dir/***` matches the directory `dir` itself and everything below it.
//!
//! Excluding a directory excludes everything below it: the caller does not descend into it, so no include rule can
//! bring back an entry inside it. As in rsync, `--include '*.rs' --exclude '*'` therefore also excludes every
//! directory and copies only the `.rs` files at the top; `--include '*/' --include '*.rs' --exclude '*'` copies the
//! `.rs` files at every depth (with the directories leading to them).
//!
//! A filter file holds one rule per line: `+ PATTERN` or `include PATTERN`, `- PATTERN` or `exclude PATTERN` (one
//! space after the rule; everything after it is the pattern, spaces included). Blank lines (empty, or only spaces and
//! tabs) and lines starting with `#` or `;` are ignored, and a trailing `\r` is removed. The file's rules are added in
//! order at the point where the file is given.

use std::io;
use std::path::{Path, PathBuf};

use fastsync_engine::Show;

/// What a filter decides for an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The entry is transferred (and, for a directory, descended into).
    Include,
    /// The entry is skipped (and, for a directory, everything below it too).
    Exclude,
}

/// A rule or filter file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The pattern is empty.
    #[error("empty filter pattern")]
    EmptyPattern,
    /// The pattern is malformed; `reason` says how.
    #[error("invalid filter pattern '{pattern}': {reason}")]
    InvalidPattern { pattern: String, reason: &'static str },
    /// The filter file cannot be read.
    #[error("cannot read filter file '{}': {source}", .path.shown())]
    Read { path: PathBuf, source: io::Error },
    /// A line of a filter file is not a rule.
    #[error(
        "filter file '{}' line {line}: unknown rule '{text}' \
         (expected '+ PATTERN', '- PATTERN', 'include PATTERN', 'exclude PATTERN')",
        .path.shown()
    )]
    UnknownRule { path: PathBuf, line: usize, text: String },
    /// A rule of a filter file has a bad pattern (`source` is [`FilterError::EmptyPattern`] or
    /// [`FilterError::InvalidPattern`]).
    #[error("filter file '{}' line {line}: {source}", .path.shown())]
    InFile { path: PathBuf, line: usize, source: Box<FilterError> },
}

/// An ordered list of include/exclude rules; see the module documentation for the syntax and semantics.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    rules: Vec<Rule>,
}

impl Filter {
    /// A filter without rules: it includes everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a rule including the entries that `pattern` matches.
    pub fn add_include(&mut self, pattern: &str) -> Result<(), FilterError> {
        self.rules.push(Rule::new(Decision::Include, pattern.as_bytes())?);
        Ok(())
    }

    /// Appends a rule excluding the entries that `pattern` matches.
    pub fn add_exclude(&mut self, pattern: &str) -> Result<(), FilterError> {
        self.rules.push(Rule::new(Decision::Exclude, pattern.as_bytes())?);
        Ok(())
    }

    /// Appends the file's rules in order, at this point of the rule list. On error nothing is appended.
    pub fn add_rules_from_file(&mut self, path: &Path) -> Result<(), FilterError> {
        let bytes = std::fs::read(path).map_err(|source| FilterError::Read { path: path.to_path_buf(), source })?;
        let mut rules = Vec::new();
        for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line_number = index + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(|b| matches!(b, b' ' | b'\t')) || line.starts_with(b"#") || line.starts_with(b";") {
                continue;
            }
            let Some((decision, pattern)) = parse_rule_line(line) else {
                return Err(FilterError::UnknownRule {
                    path: path.to_path_buf(),
                    line: line_number,
                    text: fastsync_engine::show::one_line(&String::from_utf8_lossy(line)),
                });
            };
            let rule = Rule::new(decision, pattern).map_err(|source| FilterError::InFile {
                path: path.to_path_buf(),
                line: line_number,
                source: Box::new(source),
            })?;
            rules.push(rule);
        }
        self.rules.append(&mut rules);
        Ok(())
    }

    /// Whether the filter has no rules (and so includes everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides for the entry at `rel`: its path relative to the transfer root, components separated by `b'/'`, no
    /// leading or trailing `/`, raw bytes (names need not be UTF-8). `is_dir` says whether the entry is a directory
    /// (for a symbolic link: `false`, whatever it points to). The first matching rule wins; no match (and the empty
    /// path of the root itself) is [`Decision::Include`].
    pub fn decide(&self, rel: &[u8], is_dir: bool) -> Decision {
        if rel.is_empty() {
            return Decision::Include;
        }
        self.rules.iter().find(|rule| rule.matches(rel, is_dir)).map_or(Decision::Include, |rule| rule.decision)
    }
}

/// Splits a filter file line into its rule and pattern; `None` if it is no rule. A line that is only the rule's name
/// gives an empty pattern (an error reported as such).
fn parse_rule_line(line: &[u8]) -> Option<(Decision, &[u8])> {
    const NAMES: [(&[u8], Decision); 4] = [
        (b"+", Decision::Include),
        (b"-", Decision::Exclude),
        (b"include", Decision::Include),
        (b"exclude", Decision::Exclude),
    ];
    NAMES.iter().find_map(|&(name, decision)| {
        let rest = line.strip_prefix(name)?;
        match rest {
            [] => Some((decision, rest)),
            [b' ', pattern @ ..] => Some((decision, pattern)),
            _ => None,
        }
    })
}

/// Where in the path a pattern is matched (as rsync chooses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Against the final component (unanchored, no `/`, no `**`).
    Name,
    /// Against the whole path (anchored with a leading `/`).
    Whole,
    /// Against the whole path with a `/` in front, so that a leading `**/` also matches at the top (unanchored,
    /// starting with `**`).
    WholeAfterSlash,
    /// Against the whole path and each trailing part that starts after a `/` (unanchored, with a `/` or a `**`).
    Tail,
}

/// One compiled rule.
#[derive(Clone, Debug)]
struct Rule {
    decision: Decision,
    tokens: Vec<Token>,
    scope: Scope,
    /// The pattern had a trailing `/`.
    dirs_only: bool,
    /// The pattern ends in `***`: a directory is matched as its path followed by `/`, so `dir/***` matches `dir`.
    dir_with_slash: bool,
}

impl Rule {
    fn new(decision: Decision, pattern: &[u8]) -> Result<Self, FilterError> {
        let invalid = |reason| FilterError::InvalidPattern {
            pattern: fastsync_engine::show::one_line(&String::from_utf8_lossy(pattern)),
            reason,
        };
        if pattern.is_empty() {
            return Err(FilterError::EmptyPattern);
        }
        let mut stripped = pattern;
        let mut dirs_only = false;
        while stripped.len() > 1
            && let Some(rest) = stripped.strip_suffix(b"/")
        {
            stripped = rest;
            dirs_only = true;
        }
        let (anchored, body) = match stripped.strip_prefix(b"/") {
            Some(body) => (true, body),
            None => (false, stripped),
        };
        if body.is_empty() {
            return Err(invalid("it matches nothing (it is empty without its leading and trailing '/')"));
        }
        let wildcard = body.iter().any(|b| matches!(b, b'*' | b'?' | b'['));
        let tokens = if wildcard {
            parse_wildcard(body).map_err(invalid)?
        } else {
            body.iter().map(|&b| Token::Byte(b)).collect()
        };
        let has_star_star = tokens.iter().any(|token| matches!(token, Token::StarStar));
        let has_slash = tokens.iter().any(|token| matches!(token, Token::Byte(b'/')));
        let scope = if anchored {
            Scope::Whole
        } else if !has_slash && !has_star_star {
            Scope::Name
        } else if body.starts_with(b"**") {
            Scope::WholeAfterSlash
        } else {
            Scope::Tail
        };
        let dir_with_slash = body.ends_with(b"***") && matches!(tokens.last(), Some(Token::StarStar));
        Ok(Rule { decision, tokens, scope, dirs_only, dir_with_slash })
    }

    fn matches(&self, rel: &[u8], is_dir: bool) -> bool {
        if self.dirs_only && !is_dir {
            return false;
        }
        let slash_after = is_dir && self.dir_with_slash;
        match self.scope {
            Scope::Name => {
                let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(rel);
                is_match(&self.tokens, Text { slash_before: false, body: name, slash_after })
            }
            Scope::Whole => is_match(&self.tokens, Text { slash_before: false, body: rel, slash_after }),
            Scope::WholeAfterSlash => is_match(&self.tokens, Text { slash_before: true, body: rel, slash_after }),
            Scope::Tail => {
                let mut starts = std::iter::once(0).chain(memchr_all(b'/', rel).map(|slash| slash + 1));
                starts
                    .any(|start| is_match(&self.tokens, Text { slash_before: false, body: &rel[start..], slash_after }))
            }
        }
    }
}

/// The positions of `needle` in `haystack`.
fn memchr_all(needle: u8, haystack: &[u8]) -> impl Iterator<Item = usize> + '_ {
    haystack.iter().enumerate().filter(move |&(_, &b)| b == needle).map(|(position, _)| position)
}

/// One element of a compiled pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    /// This byte.
    Byte(u8),
    /// `?`: any byte but `/`.
    AnyByte,
    /// `*`: any run of bytes without `/`.
    Star,
    /// `**` (or more stars): any run of bytes.
    StarStar,
    /// `[...]`: a byte of the set (never `/`).
    Class(Box<ByteSet>),
}

/// A set of bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    fn remove(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] &= !(1 << (b & 63));
    }

    fn contains(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)] & (1 << (b & 63)) != 0
    }

    fn invert(&mut self) {
        for word in &mut self.0 {
            *word = !*word;
        }
    }
}

/// Compiles a pattern with wildcards (rsync's wildmatch syntax).
fn parse_wildcard(pattern: &[u8]) -> Result<Vec<Token>, &'static str> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'\\' => {
                let &b = pattern.get(i + 1).ok_or("it ends with a lone '\\'")?;
                tokens.push(Token::Byte(b));
                i += 2;
            }
            b'?' => {
                tokens.push(Token::AnyByte);
                i += 1;
            }
            b'*' => {
                let stars = pattern[i..].iter().take_while(|&&b| b == b'*').count();
                tokens.push(if stars == 1 { Token::Star } else { Token::StarStar });
                i += stars;
            }
            b'[' => {
                let (set, next) = parse_class(pattern, i + 1)?;
                tokens.push(Token::Class(Box::new(set)));
                i = next;
            }
            b => {
                tokens.push(Token::Byte(b));
                i += 1;
            }
        }
    }
    Ok(tokens)
}

/// Compiles the character class whose body starts at `start` (just after its `[`); returns the set and the index
/// after its `]`. Like rsync: a `]` right after `[` or `[!` is a member, `-` between two members is a range, `\`
/// escapes, `[:name:]` is a POSIX class.
fn parse_class(pattern: &[u8], start: usize) -> Result<(ByteSet, usize), &'static str> {
    const UNTERMINATED: &str = "a character class '[' has no closing ']'";
    let mut set = ByteSet::default();
    let mut i = start;
    let negated = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut previous: Option<u8> = None;
    let mut first = true;
    loop {
        let &b = pattern.get(i).ok_or(UNTERMINATED)?;
        if b == b']' && !first {
            i += 1;
            break;
        }
        first = false;
        if b == b'\\' {
            let &escaped = pattern.get(i + 1).ok_or(UNTERMINATED)?;
            set.insert(escaped);
            previous = Some(escaped);
            i += 2;
        } else if let Some(low) = previous
            && b == b'-'
            && pattern.get(i + 1).is_some_and(|&next| next != b']')
        {
            let mut high = pattern[i + 1];
            i += 2;
            if high == b'\\' {
                high = *pattern.get(i).ok_or(UNTERMINATED)?;
                i += 1;
            }
            for member in low..=high {
                set.insert(member);
            }
            previous = None;
        } else if b == b'[' && pattern.get(i + 1) == Some(&b':') {
            let name_start = i + 2;
            let close = pattern[name_start..].iter().position(|&c| c == b']').ok_or(UNTERMINATED)? + name_start;
            if close == name_start || pattern[close - 1] != b':' {
                // No ":]": the '[' is an ordinary member.
                set.insert(b'[');
                previous = Some(b'[');
                i += 1;
                continue;
            }
            let test =
                posix_class(&pattern[name_start..close - 1]).ok_or("unknown character class name in '[:...:]'")?;
            for member in 0..=u8::MAX {
                if test(member) {
                    set.insert(member);
                }
            }
            previous = None;
            i = close + 1;
        } else {
            set.insert(b);
            previous = Some(b);
            i += 1;
        }
    }
    if negated {
        set.invert();
    }
    set.remove(b'/');
    Ok((set, i))
}

/// The test of a POSIX character class (ASCII, as in the C locale).
fn posix_class(name: &[u8]) -> Option<fn(u8) -> bool> {
    Some(match name {
        b"alnum" => |b: u8| b.is_ascii_alphanumeric(),
        b"alpha" => |b: u8| b.is_ascii_alphabetic(),
        b"blank" => |b: u8| b == b' ' || b == b'\t',
        b"cntrl" => |b: u8| b.is_ascii_control(),
        b"digit" => |b: u8| b.is_ascii_digit(),
        b"graph" => |b: u8| b.is_ascii_graphic(),
        b"lower" => |b: u8| b.is_ascii_lowercase(),
        b"print" => |b: u8| b.is_ascii_graphic() || b == b' ',
        b"punct" => |b: u8| b.is_ascii_punctuation(),
        b"space" => |b: u8| b.is_ascii_whitespace() || b == 0x0b,
        b"upper" => |b: u8| b.is_ascii_uppercase(),
        b"xdigit" => |b: u8| b.is_ascii_hexdigit(),
        _ => return None,
    })
}

/// The text a pattern is matched against: `body`, optionally between a `/` before and a `/` after (rsync matches a
/// string list the same way), so that no path has to be copied.
#[derive(Clone, Copy)]
struct Text<'a> {
    slash_before: bool,
    body: &'a [u8],
    slash_after: bool,
}

impl Text<'_> {
    fn len(&self) -> usize {
        usize::from(self.slash_before) + self.body.len() + usize::from(self.slash_after)
    }

    /// The byte at `i < self.len()`.
    fn at(&self, i: usize) -> u8 {
        match i.checked_sub(usize::from(self.slash_before)) {
            // Before the body (the slash before) or after it (the slash after).
            None => b'/',
            Some(i) => self.body.get(i).copied().unwrap_or(b'/'),
        }
    }
}

/// How a partial match ended (rsync's wildmatch): the abort results stop the star loops of the callers early.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Match,
    NoMatch,
    /// The text ran out: no longer run of any star before can help.
    AbortAll,
    /// A `*` met a `/`: only a `**` before can help.
    AbortToStarStar,
}

/// Whether `tokens` match all of `text`.
fn is_match(tokens: &[Token], text: Text<'_>) -> bool {
    match_from(tokens, &text, 0) == Outcome::Match
}

/// Matches `tokens` against `text` from byte `start` to its end.
fn match_from(tokens: &[Token], text: &Text<'_>, start: usize) -> Outcome {
    let len = text.len();
    let mut t = start;
    for (p, token) in tokens.iter().enumerate() {
        let star_star = match token {
            Token::Star => false,
            Token::StarStar => true,
            _ => {
                if t == len {
                    return Outcome::AbortAll;
                }
                let b = text.at(t);
                let ok = match token {
                    Token::Byte(expected) => b == *expected,
                    Token::AnyByte => b != b'/',
                    Token::Class(set) => set.contains(b),
                    Token::Star | Token::StarStar => unreachable!("handled above"),
                };
                if !ok {
                    return Outcome::NoMatch;
                }
                t += 1;
                continue;
            }
        };
        let rest = &tokens[p + 1..];
        if rest.is_empty() {
            // A trailing "**" matches everything left, a trailing "*" only if no '/' is left.
            return if star_star || !(t..len).any(|i| text.at(i) == b'/') { Outcome::Match } else { Outcome::NoMatch };
        }
        // Stars are merged into one token, so `rest` starts with a token that consumes a byte: try every start but
        // the end.
        while t < len {
            match match_from(rest, text, t) {
                Outcome::NoMatch => {
                    if !star_star && text.at(t) == b'/' {
                        return Outcome::AbortToStarStar;
                    }
                }
                Outcome::AbortToStarStar if star_star => {}
                outcome => return outcome,
            }
            t += 1;
        }
        return Outcome::AbortAll;
    }
    if t == len { Outcome::Match } else { Outcome::NoMatch }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Exclude, Include};

    /// A filter from `(decision, pattern)` rules.
    fn filter(rules: &[(Decision, &str)]) -> Filter {
        let mut filter = Filter::new();
        for &(decision, pattern) in rules {
            match decision {
                Include => filter.add_include(pattern),
                Exclude => filter.add_exclude(pattern),
            }
            .unwrap_or_else(|error| panic!("pattern {pattern:?}: {error}"));
        }
        filter
    }

    /// Whether `pattern` alone (as an exclude rule) matches the entry.
    fn matches(pattern: &str, rel: &str, is_dir: bool) -> bool {
        filter(&[(Exclude, pattern)]).decide(rel.as_bytes(), is_dir) == Exclude
    }

    /// Asserts which of `rels` (files) the pattern matches.
    fn assert_files(pattern: &str, matching: &[&str], not_matching: &[&str]) {
        for rel in matching {
            assert!(matches(pattern, rel, false), "{pattern:?} should match file {rel:?}");
        }
        for rel in not_matching {
            assert!(!matches(pattern, rel, false), "{pattern:?} should not match file {rel:?}");
        }
    }

    /// Writes `contents` to a filter file in a new temporary directory.
    fn filter_file(contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rules.txt");
        std::fs::write(&path, contents).expect("write filter file");
        (dir, path)
    }

    #[test]
    fn no_rules_include_everything() {
        let filter = Filter::new();
        assert!(filter.is_empty());
        assert_eq!(filter.decide(b"a/b/c.txt", false), Include);
        assert_eq!(filter.decide(b"a", true), Include);
        let filter = self::filter(&[(Exclude, "*")]);
        assert!(!filter.is_empty());
        assert_eq!(filter.decide(b"a", true), Exclude);
        assert_eq!(Filter::default().decide(b"x", false), Include);
    }

    #[test]
    fn no_matching_rule_includes() {
        let filter = filter(&[(Exclude, "*.o"), (Exclude, "target/")]);
        assert_eq!(filter.decide(b"src/main.rs", false), Include);
        assert_eq!(filter.decide(b"src/main.o", false), Exclude);
        assert_eq!(filter.decide(b"target", true), Exclude);
        assert_eq!(filter.decide(b"target", false), Include);
    }

    #[test]
    fn first_matching_rule_wins() {
        let include_first = filter(&[(Include, "*.rs"), (Exclude, "*")]);
        assert_eq!(include_first.decide(b"main.rs", false), Include);
        assert_eq!(include_first.decide(b"main.c", false), Exclude);
        let exclude_first = filter(&[(Exclude, "*"), (Include, "*.rs")]);
        assert_eq!(exclude_first.decide(b"main.rs", false), Exclude);
        let specific_first = filter(&[(Exclude, "secret.rs"), (Include, "*.rs"), (Exclude, "*")]);
        assert_eq!(specific_first.decide(b"secret.rs", false), Exclude);
        assert_eq!(specific_first.decide(b"lib.rs", false), Include);
    }

    #[test]
    fn excluding_everything_excludes_directories_unless_included() {
        let filter_without_dirs = filter(&[(Include, "*.rs"), (Exclude, "*")]);
        assert_eq!(filter_without_dirs.decide(b"src", true), Exclude);
        let filter_with_dirs = filter(&[(Include, "*/"), (Include, "*.rs"), (Exclude, "*")]);
        assert_eq!(filter_with_dirs.decide(b"src", true), Include);
        assert_eq!(filter_with_dirs.decide(b"src/deep", true), Include);
        assert_eq!(filter_with_dirs.decide(b"src/deep/lib.rs", false), Include);
        assert_eq!(filter_with_dirs.decide(b"src/deep/lib.c", false), Exclude);
        // "*/" matches directories only: a file named like a directory is still excluded.
        assert_eq!(filter_with_dirs.decide(b"src/README", false), Exclude);
    }

    #[test]
    fn pattern_without_slash_matches_the_name_at_any_depth() {
        assert_files(
            "c.txt",
            &["c.txt", "b/c.txt", "a/b/c.txt"],
            &["xc.txt", "a/b/xc.txt", "a/b/c.txt.bak", "c.txt/d"],
        );
        assert!(matches("c.txt", "a/c.txt", true));
        assert_files("*.txt", &["c.txt", "a/b/c.txt", ".txt"], &["c.txt/d", "a/b/c.txtx"]);
        assert_files("b", &["b", "a/b"], &["a/b/c", "ab"]);
    }

    #[test]
    fn anchored_pattern_matches_the_whole_path() {
        assert_files("/a/b", &["a/b"], &["x/a/b", "a/b/c", "a", "b"]);
        assert_files("/c.txt", &["c.txt"], &["a/b/c.txt", "b/c.txt"]);
        assert_files("/a/*/c.txt", &["a/b/c.txt", "a/x/c.txt"], &["a/c.txt", "a/b/d/c.txt", "z/a/b/c.txt"]);
        assert!(matches("/a", "a", true));
        assert!(!matches("/a", "x/a", true));
    }

    #[test]
    fn pattern_with_slash_matches_the_trailing_part_at_a_component_boundary() {
        assert_files(
            "b/*.txt",
            &["b/c.txt", "a/b/c.txt", "x/y/b/.txt"],
            &["c.txt", "ab/c.txt", "a/b/d/c.txt", "a/b", "b/c.txt/d"],
        );
        assert_files("a/b/c.txt", &["a/b/c.txt", "z/a/b/c.txt"], &["za/b/c.txt", "a/b/c.txt/x", "b/c.txt"]);
        assert_files("b/c", &["b/c", "a/b/c"], &["a/b/c/d", "a/bb/c"]);
    }

    #[test]
    fn trailing_slash_matches_directories_only() {
        let filter = filter(&[(Exclude, "build/")]);
        assert_eq!(filter.decide(b"build", true), Exclude);
        assert_eq!(filter.decide(b"a/b/build", true), Exclude);
        assert_eq!(filter.decide(b"build", false), Include);
        assert_eq!(filter.decide(b"a/build", false), Include);
        let anchored = self::filter(&[(Exclude, "/a/b/")]);
        assert_eq!(anchored.decide(b"a/b", true), Exclude);
        assert_eq!(anchored.decide(b"a/b", false), Include);
        assert_eq!(anchored.decide(b"x/a/b", true), Include);
        // Several trailing slashes are one.
        assert!(matches("build//", "build", true));
        assert!(!matches("build//", "build", false));
    }

    #[test]
    fn star_stops_at_slash_and_double_star_does_not() {
        assert_files("/a/*", &["a/x", "a/.hidden"], &["a", "a/x/y", "b/a/x"]);
        assert_files("/*.txt", &["c.txt"], &["a/c.txt", "a/b/c.txt"]);
        assert_files("/a*z", &["az", "abcz"], &["a/z", "ab/cz"]);
        assert_files("/a/**", &["a/x", "a/x/y", "a/x/y/z"], &["a", "b/a/x"]);
        assert_files("a/*", &["a/x", "p/a/x"], &["a/x/y"]);
        assert_files("a/**", &["a/x", "a/x/y", "p/a/x/y"], &["a", "pa/x"]);
        // "**" is any run of bytes, so "a/**/b" needs at least one directory in between (as in rsync).
        assert_files("a/**/b", &["a/x/b", "a/x/y/b", "p/a/x/b"], &["a/b", "a/x/bb", "a/x/b/c"]);
        // Inside a name "**" crosses slashes too.
        assert_files("/a**z", &["az", "abz", "a/b/z", "a/z"], &["a/b/zz/y", "za"]);
        assert_files("*z", &["z", "az", "q/az"], &["a/z/b"]);
        // A "*" that meets a '/' lets an enclosing "**" go on.
        assert_files("/**x*z", &["x/xz", "xa/xbz", "a/b/xz"], &["x/z", "xa/bz"]);
    }

    #[test]
    fn leading_double_star_slash_matches_at_any_depth_including_the_top() {
        assert_files("**/foo", &["foo", "a/foo", "a/b/foo"], &["xfoo", "foo/a"]);
        assert_files("**/b/*.txt", &["b/c.txt", "a/b/c.txt"], &["a/b/d/c.txt", "ab/c.txt"]);
        assert_files("**", &["a", "a/b/c"], &[]);
        assert_files("**.txt", &["c.txt", "a/b/c.txt"], &["a/b/c.txtx"]);
        // Anchored "/**/foo" is matched against the path itself: it needs a directory before "foo".
        assert_files("/**/foo", &["a/foo", "a/b/foo"], &["foo"]);
    }

    #[test]
    fn triple_star_matches_the_directory_and_everything_inside() {
        let filter = filter(&[(Include, "/dir/***"), (Exclude, "*")]);
        assert_eq!(filter.decide(b"dir", true), Include);
        assert_eq!(filter.decide(b"dir/file", false), Include);
        assert_eq!(filter.decide(b"dir/sub", true), Include);
        assert_eq!(filter.decide(b"dir/sub/file", false), Include);
        assert_eq!(filter.decide(b"dir", false), Exclude, "a file named like the directory");
        assert_eq!(filter.decide(b"dirx", true), Exclude);
        assert_eq!(filter.decide(b"other", true), Exclude);
        assert_eq!(filter.decide(b"x/dir", true), Exclude, "anchored");
        let unanchored = self::filter(&[(Exclude, "dir/***")]);
        assert_eq!(unanchored.decide(b"p/dir", true), Exclude);
        assert_eq!(unanchored.decide(b"p/dir/q/r", false), Exclude);
        assert_eq!(unanchored.decide(b"p/dirx", true), Include);
        assert_eq!(unanchored.decide(b"p/dir", false), Include);
        // Without the third star the directory itself is not matched.
        assert!(!matches("/dir/**", "dir", true));
    }

    #[test]
    fn question_mark_and_classes() {
        assert_files("?.rs", &["a.rs", "x/b.rs"], &["ab.rs", ".rs"]);
        assert_files("/a?b", &["axb"], &["a/b", "ab"]);
        assert_files("[abc].txt", &["a.txt", "c.txt", "d/b.txt"], &["d.txt", "ab.txt"]);
        assert_files("[!abc].txt", &["d.txt", "1.txt"], &["a.txt", "b.txt"]);
        assert_files("[^abc].txt", &["d.txt"], &["c.txt"]);
        assert_files("file[0-9]", &["file0", "file9"], &["filea", "file10", "file"]);
        assert_files("[[:digit:]][[:upper:]]", &["1A", "9Z"], &["1a", "AA"]);
        assert_files("x[[:space:]]y", &["x y", "x\ty"], &["xy", "x_y"]);
        assert_files("[]a]", &["]", "a"], &["b"]);
        assert_files("[!]a]", &["b"], &["]", "a"]);
        assert_files("[a-]", &["a", "-"], &["b"]);
        assert_files("[\\]]x", &["]x"], &["\\x"]);
        // "[" not followed by ":" starts a plain member "[".
        assert_files("[[a]", &["[", "a"], &["b"]);
        // A class never matches '/', even negated.
        assert_files("/a[!x]b", &["acb"], &["a/b"]);
    }

    #[test]
    fn backslash_escapes_in_wildcard_patterns_only() {
        assert_files("\\*.txt", &["*.txt"], &["a.txt"]);
        assert_files("a\\?*", &["a?", "a?bc"], &["ab"]);
        // Without wildcards the pattern is literal, backslashes included.
        assert_files("a\\b", &["a\\b"], &["ab"]);
    }

    #[test]
    fn braces_are_literal() {
        assert_files("*.{rs,c}", &["x.{rs,c}"], &["x.rs", "x.c"]);
    }

    #[test]
    fn names_need_not_be_utf8() {
        let filter = filter(&[(Exclude, "*.bin"), (Include, "keep/"), (Exclude, "/keep/?")]);
        assert_eq!(filter.decide(b"dir/\xff\xfe.bin", false), Exclude);
        assert_eq!(filter.decide(b"\xff/\xfe", true), Include);
        assert_eq!(filter.decide(b"keep/\xff", false), Exclude, "'?' matches one byte");
        assert_eq!(filter.decide(b"keep/\xff\xfe", false), Include);
        let (_dir, path) = filter_file(b"- \xff*\n+ *\n");
        let mut from_file = Filter::new();
        from_file.add_rules_from_file(&path).expect("filter file");
        assert_eq!(from_file.decide(b"a/\xff\x80x", false), Exclude);
        assert_eq!(from_file.decide(b"a/\xfe\xff", false), Include);
        assert_eq!(from_file.decide(b"\xff/b", false), Include);
    }

    #[test]
    fn bad_patterns_are_errors() {
        let mut filter = Filter::new();
        assert!(matches!(filter.add_include(""), Err(FilterError::EmptyPattern)));
        assert!(matches!(filter.add_exclude(""), Err(FilterError::EmptyPattern)));
        for pattern in ["/", "//", "[abc", "*[", "[]", "[!]", "a*\\", "[[:nope:]]", "[[:alpha:]"] {
            match filter.add_exclude(pattern) {
                Err(FilterError::InvalidPattern { pattern: named, .. }) => assert_eq!(named, pattern),
                other => panic!("{pattern:?}: {other:?}"),
            }
        }
        assert!(filter.is_empty(), "failed rules are not added");
        let error = filter.add_exclude("src/[abc").expect_err("unterminated class");
        assert_eq!(error.to_string(), "invalid filter pattern 'src/[abc': a character class '[' has no closing ']'");
    }

    #[test]
    fn filter_file_rules_are_added_in_order_at_their_place() {
        let (_dir, path) = filter_file(
            b"# comment\n\
              ; another comment\n\
              \n\
              + *.rs\r\n\
              include keep.txt\n\
              \x20\t\n\
              - *.txt\n\
              exclude tmp/\n",
        );
        let mut filter = Filter::new();
        filter.add_include("important.txt").expect("include");
        filter.add_rules_from_file(&path).expect("filter file");
        filter.add_exclude("*").expect("exclude");
        assert_eq!(filter.rules.len(), 6);
        assert_eq!(filter.decide(b"important.txt", false), Include, "the rule before the file comes first");
        assert_eq!(filter.decide(b"src/main.rs", false), Include, "'\\r' is stripped");
        assert_eq!(filter.decide(b"a/keep.txt", false), Include);
        assert_eq!(filter.decide(b"a/other.txt", false), Exclude);
        assert_eq!(filter.decide(b"x/tmp", true), Exclude);
        assert_eq!(filter.decide(b"x/other", true), Exclude, "the rule after the file comes last");
    }

    #[test]
    fn filter_file_patterns_keep_their_spaces() {
        let (_dir, path) = filter_file(b"+ foo \n+  bar\n- *\n");
        let mut filter = Filter::new();
        filter.add_rules_from_file(&path).expect("filter file");
        assert_eq!(filter.decide(b"foo ", false), Include);
        assert_eq!(filter.decide(b"foo", false), Exclude);
        assert_eq!(filter.decide(b" bar", false), Include);
        assert_eq!(filter.decide(b"bar", false), Exclude);
    }

    #[test]
    fn filter_file_errors_name_the_file_and_line() {
        let (dir, path) = filter_file(b"+ *.rs\n# fine\nx foo\n- *\n");
        let mut filter = Filter::new();
        let error = filter.add_rules_from_file(&path).expect_err("unknown rule");
        assert!(matches!(error, FilterError::UnknownRule { line: 3, .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "filter file '{}' line 3: unknown rule 'x foo' \
                 (expected '+ PATTERN', '- PATTERN', 'include PATTERN', 'exclude PATTERN')",
                path.shown()
            )
        );
        assert!(filter.is_empty(), "no rule of a bad file is added");

        for (contents, line, text) in [
            (&b"+*.rs\n"[..], 1, "+*.rs"),
            (b"\n\n-foo\n", 3, "-foo"),
            (b"include\tfoo\n", 1, "include\tfoo"),
            (b"excludes foo\n", 1, "excludes foo"),
            (b"  - foo\n", 1, "  - foo"),
            (b"! \n", 1, "! "),
        ] {
            std::fs::write(&path, contents).expect("write");
            match filter.add_rules_from_file(&path) {
                Err(FilterError::UnknownRule { line: got_line, text: got_text, .. }) => {
                    assert_eq!((got_line, got_text.as_str()), (line, text));
                }
                other => panic!("{contents:?}: {other:?}"),
            }
        }

        std::fs::write(&path, b"+ a\n- \n").expect("write");
        let error = filter.add_rules_from_file(&path).expect_err("empty pattern");
        assert_eq!(error.to_string(), format!("filter file '{}' line 2: empty filter pattern", path.shown()));
        std::fs::write(&path, b"exclude\n").expect("write");
        let error = filter.add_rules_from_file(&path).expect_err("empty pattern");
        assert!(
            matches!(&error, FilterError::InFile { line: 1, source, .. } if matches!(**source, FilterError::EmptyPattern))
        );
        std::fs::write(&path, b"+ a\r\n+ b\r\n- [x\r\n").expect("write");
        let error = filter.add_rules_from_file(&path).expect_err("bad class");
        assert_eq!(
            error.to_string(),
            format!(
                "filter file '{}' line 3: invalid filter pattern '[x': a character class '[' has no closing ']'",
                path.shown()
            )
        );
        assert!(filter.is_empty());

        let missing = dir.path().join("missing.txt");
        let error = filter.add_rules_from_file(&missing).expect_err("missing file");
        assert_eq!(
            error.to_string(),
            format!("cannot read filter file '{}': No such file or directory (os error 2)", missing.shown())
        );
    }

    #[test]
    fn root_and_empty_file() {
        let filter = filter(&[(Exclude, "*"), (Exclude, "**")]);
        assert_eq!(filter.decide(b"", true), Include, "the root itself is never filtered");
        let (_dir, path) = filter_file(b"");
        let mut empty = Filter::new();
        empty.add_rules_from_file(&path).expect("empty file");
        assert!(empty.is_empty());
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        // rsync's abort rules cut the backtracking: without them each of these takes seconds to ages.
        let cases = [
            // The text runs out: longer runs of the stars before cannot help.
            ("/".to_string() + &"*a".repeat(20) + "b", "a".repeat(60)),
            ("**a".repeat(10) + "b", "a/".repeat(30)),
            // A "*" cannot run past a '/': the single stars before it need not try further.
            ("/".to_string() + &"*a".repeat(10) + "*b", "a".repeat(30) + "/b"),
        ];
        for (pattern, rel) in cases {
            let start = std::time::Instant::now();
            assert!(!matches(&pattern, &rel, false), "{pattern:?} {rel:?}");
            assert!(start.elapsed() < std::time::Duration::from_secs(1), "{pattern:?} took {:?}", start.elapsed());
        }
    }
}
