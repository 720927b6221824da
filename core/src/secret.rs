//! A secret read from the environment (the service token, the LLM API key): it
//! prints as `<redacted>` in `Debug`, has no `Display` and no `Serialize`, so it
//! cannot reach a log line, a status reply or the run directory's `config.toml` by
//! accident. [`Secret::expose`] is the one way to read it, for the place that sends it.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret from environment variable `name` among `vars`; unset or empty is
    /// None (the feature it guards is off).
    pub fn from_vars<'a>(
        name: &str,
        vars: impl IntoIterator<Item = &'a (String, String)>,
    ) -> Option<Self> {
        vars.into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
            .map(Self::new)
    }

    /// The secret from this process's environment variable `name`.
    pub fn from_env(name: &str) -> Option<Self> {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(Self)
    }

    /// The secret itself, for the code that sends it and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&s)), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2-token");
    }

    #[test]
    fn unset_or_empty_is_none() {
        let vars = vec![
            ("A".to_string(), " tok ".to_string()),
            ("B".to_string(), "  ".to_string()),
        ];
        assert_eq!(Secret::from_vars("A", &vars).unwrap().expose(), "tok");
        assert!(Secret::from_vars("B", &vars).is_none());
        assert!(Secret::from_vars("C", &vars).is_none());
    }
}
