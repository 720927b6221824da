//! The strict answer parser. The prompt asks for exactly one line per item, in
//! order, each `<n>: <verdict>` with one of the prompt's verdict words, and nothing
//! else: `helpful` / `not helpful` for single texts, `first` / `second` / `tie` for
//! pairs. An answer in any other shape (reasoning before the verdict, a lone ":", the
//! label word inside a sentence, a missing or extra line, an HTML error page) is
//! unparseable as a whole: a judge that was steered off the format has no say, and
//! nothing becomes a positive label by accident.

use thiserror::Error;

pub const HELPFUL: &str = "helpful";
pub const NOT_HELPFUL: &str = "not helpful";
pub const FIRST: &str = "first";
pub const SECOND: &str = "second";
pub const TIE: &str = "tie";

/// Verdict words of the labelling prompt.
const LABEL_WORDS: [(&str, bool); 2] = [(HELPFUL, true), (NOT_HELPFUL, false)];

/// Verdict words of the ranking prompt, as the probability that the first text of
/// the pair shows more progress (Bradley–Terry target; a tie is 0.5).
const PAIR_WORDS: [(&str, f32); 3] = [(FIRST, 1.0), (SECOND, 0.0), (TIE, 0.5)];

#[derive(Debug, Error, PartialEq)]
pub enum ParseError {
    #[error("empty answer")]
    Empty,
    #[error("expected {expected} lines, got {got}")]
    LineCount { expected: usize, got: usize },
    #[error("line {line} is not `<n>: <verdict>` with one of the prompt's verdicts")]
    BadLine { line: usize },
}

/// One verdict per event (true = helpful), or why the answer does not count.
pub fn parse_labels(answer: &str, count: usize) -> Result<Vec<bool>, ParseError> {
    parse_lines(answer, count, &LABEL_WORDS)
}

/// One preference per pair (1 first, 0 second, 0.5 tie), or why the answer does not
/// count.
pub fn parse_preferences(answer: &str, count: usize) -> Result<Vec<f32>, ParseError> {
    parse_lines(answer, count, &PAIR_WORDS)
}

fn parse_lines<T: Copy>(
    answer: &str,
    count: usize,
    words: &[(&str, T)],
) -> Result<Vec<T>, ParseError> {
    let lines: Vec<&str> = answer
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(ParseError::Empty);
    }
    if lines.len() != count {
        return Err(ParseError::LineCount {
            expected: count,
            got: lines.len(),
        });
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let bad = ParseError::BadLine { line: i + 1 };
            let (n, verdict) = line.split_once(": ").ok_or(bad)?;
            if n != (i + 1).to_string() {
                return Err(ParseError::BadLine { line: i + 1 });
            }
            words
                .iter()
                .find(|(w, _)| *w == verdict)
                .map(|&(_, v)| v)
                .ok_or(ParseError::BadLine { line: i + 1 })
        })
        .collect()
}

/// The answer a perfect judge gives for `labels` (used by the rule judge).
pub fn format_labels(labels: &[bool]) -> String {
    format_lines(labels, &LABEL_WORDS)
}

/// The answer a perfect judge gives for `preferences` (1, 0 or 0.5 each).
pub fn format_preferences(preferences: &[f32]) -> String {
    format_lines(preferences, &PAIR_WORDS)
}

fn format_lines<T: Copy + PartialEq>(verdicts: &[T], words: &[(&str, T)]) -> String {
    verdicts
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let word = words
                .iter()
                .find(|(_, w)| w == v)
                .map_or("?", |(word, _)| word);
            format!("{}: {word}\n", i + 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_exact_format() {
        assert_eq!(
            parse_labels("1: helpful\n2: not helpful\n", 2).unwrap(),
            vec![true, false]
        );
        assert_eq!(
            parse_labels(&format_labels(&[false, true]), 2).unwrap(),
            vec![false, true]
        );
        // surrounding whitespace and blank lines are tolerated
        assert_eq!(parse_labels("\n 1: helpful \n\n", 1).unwrap(), vec![true]);
    }

    #[test]
    fn rejects_everything_else() {
        let bad = [
            "",
            ":",
            "Thought process: the key matters.\n1: helpful",
            "Thought process:",
            "1: helpful, because the key opens the door",
            "The first event is helpful.",
            "1: Helpful",
            "1:helpful",
            "2: helpful",
            "1: helpful\n1: helpful",
            "1: helpful\n2: not helpful\n3: helpful",
            "1: help",
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
            "1: not helpful or helpful",
        ];
        for answer in bad {
            let count = if answer.contains("1: helpful\n1:") {
                2
            } else {
                1
            };
            assert!(parse_labels(answer, count).is_err(), "accepted {answer:?}");
        }
        // a truncated answer misses lines
        assert_eq!(
            parse_labels("1: helpful\n2: not", 3),
            Err(ParseError::LineCount {
                expected: 3,
                got: 2
            })
        );
    }

    #[test]
    fn pairs_take_first_second_or_tie_only() {
        assert_eq!(
            parse_preferences("1: first\n2: tie\n3: second\n", 3).unwrap(),
            vec![1.0, 0.5, 0.0]
        );
        assert_eq!(
            parse_preferences(&format_preferences(&[0.0, 1.0, 0.5]), 3).unwrap(),
            vec![0.0, 1.0, 0.5]
        );
        for answer in [
            "1: helpful",
            "1: First",
            "1: the first one",
            "1: first or second",
            "Thought process: the key\n1: first",
            ":",
        ] {
            assert!(parse_preferences(answer, 1).is_err(), "accepted {answer:?}");
        }
        assert!(parse_labels("1: first", 1).is_err());
    }
}
