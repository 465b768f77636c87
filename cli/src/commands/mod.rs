//! One module per `tp` command: its arguments, its calls and its views.

use std::io::Read;
use std::path::Path;

use anyhow::Context;

pub(crate) mod contact;
pub(crate) mod dev;
pub(crate) mod dlq;
pub(crate) mod enroll;
pub(crate) mod event;
pub(crate) mod playbook;
pub(crate) mod policy;
pub(crate) mod run;
pub(crate) mod stats;

/// Bad usage that clap cannot see (e.g. a file whose format its name does not tell):
/// `tp` exits with 2, as for clap's own errors.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The whole text of `file`; `-` reads stdin. `what` names it in errors ("the playbook").
pub(crate) fn read_source(file: &Path, what: &str) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut source = String::new();
        std::io::stdin()
            .read_to_string(&mut source)
            .with_context(|| format!("cannot read {what} from stdin"))?;
        return Ok(source);
    }
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

/// `KEY=VALUE` (the value may itself contain `=`), for `--attr`.
pub(crate) fn parse_attr(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {arg:?}")),
    }
}

/// `1 run` / `3 runs`.
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs() {
        assert_eq!(parse_attr("name=王芳"), Ok(("name".into(), "王芳".into())));
        assert_eq!(parse_attr("empty="), Ok(("empty".into(), String::new())));
        assert_eq!(parse_attr("url=a=b"), Ok(("url".into(), "a=b".into())));
        assert!(parse_attr("name").is_err());
        assert!(parse_attr("=x").is_err());
    }

    #[test]
    fn counts() {
        assert_eq!(count(1, "run", "runs"), "1 run");
        assert_eq!(count(0, "run", "runs"), "0 runs");
        assert_eq!(count(12, "run", "runs"), "12 runs");
    }
}
