//! The strict answer parser. The prompt asks for exactly one line per event, in
//! order, each `<n>: helpful` or `<n>: not helpful`, and nothing else. An answer in
//! any other shape (reasoning before the verdict, a lone ":", the label word inside a
//! sentence, a missing or extra line, an HTML error page) is unparseable as a whole:
//! a judge that was steered off the format has no say, and nothing becomes a
//! positive label by accident.

use thiserror::Error;

pub const HELPFUL: &str = "helpful";
pub const NOT_HELPFUL: &str = "not helpful";

#[derive(Debug, Error, PartialEq)]
pub enum ParseError {
    #[error("empty answer")]
    Empty,
    #[error("expected {expected} lines, got {got}")]
    LineCount { expected: usize, got: usize },
    #[error("line {line} is not `<n>: helpful` or `<n>: not helpful`")]
    BadLine { line: usize },
}

/// One verdict per event (true = helpful), or why the answer does not count.
pub fn parse_labels(answer: &str, count: usize) -> Result<Vec<bool>, ParseError> {
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
            match verdict {
                HELPFUL => Ok(true),
                NOT_HELPFUL => Ok(false),
                _ => Err(ParseError::BadLine { line: i + 1 }),
            }
        })
        .collect()
}

/// The answer a perfect judge gives for `labels` (used by the rule judge).
pub fn format_labels(labels: &[bool]) -> String {
    labels
        .iter()
        .enumerate()
        .map(|(i, &h)| format!("{}: {}\n", i + 1, if h { HELPFUL } else { NOT_HELPFUL }))
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
}
