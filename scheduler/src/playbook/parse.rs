//! YAML → [`Playbook`], with every problem reported as a field path and an expectation.
//!
//! Two passes: serde (through `serde_path_to_error`, so type errors and unknown keys
//! carry their path) into raw structs, then the semantic checks below, which collect
//! every violation rather than stopping at the first.

use std::{collections::HashMap, fmt};

use serde::Deserialize;

use super::{
    Action, MAX_SOURCE_BYTES, MAX_STEPS, Playbook, RetryOverrides, Step, StepKind, parse_duration,
    template,
};

/// One problem with a playbook: where, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Field path such as `steps[1].wait`; empty for the whole document.
    pub field: String,
    pub description: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.description)
        } else {
            write!(f, "{}: {}", self.field, self.description)
        }
    }
}

/// Every problem found in one playbook, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violations(pub Vec<Violation>);

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, violation) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlaybook {
    name: String,
    #[serde(default)]
    description: String,
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    action: Option<String>,
    channel: Option<String>,
    template: Option<String>,
    params: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(rename = "if")]
    condition: Option<String>,
    wait: Option<String>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial: Option<String>,
    max: Option<String>,
}

/// Parses and validates a playbook's YAML source.
pub fn parse(yaml: &str) -> Result<Playbook, Violations> {
    let whole = |description: String| {
        Violations(vec![Violation {
            field: String::new(),
            description,
        }])
    };
    if yaml.len() > MAX_SOURCE_BYTES {
        return Err(whole(format!(
            "playbook is {} bytes (at most {MAX_SOURCE_BYTES})",
            yaml.len()
        )));
    }
    // YAML 1.2 booleans only: a channel called `y` or `on` stays a string.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let document: serde_json::Value = serde_saphyr::from_str_with_options(yaml, options)
        .map_err(|err| whole(format!("invalid YAML: {}", one_line(&err.to_string()))))?;
    if !document.is_object() {
        return Err(whole(
            "expected a mapping with name, description and steps".to_owned(),
        ));
    }
    let raw: RawPlaybook = serde_path_to_error::deserialize(&document).map_err(|err| {
        let field = err.path().to_string();
        let inner = err.into_inner().to_string();
        Violations(vec![serde_violation(field, &inner)])
    })?;
    Checker::default().check(raw)
}

/// Turns a serde error at `field` into a violation whose path ends at the offending key.
fn serde_violation(field: String, message: &str) -> Violation {
    let field = if field == "." {
        String::new()
    } else {
        escape_controls(&field)
    };
    let join = |parent: &str, key: &str| {
        if parent.is_empty() {
            key.to_owned()
        } else {
            format!("{parent}.{key}")
        }
    };
    if let Some(key) = between(message, "unknown field `", "`") {
        let field = if field.ends_with(key) {
            field
        } else {
            join(&field, key)
        };
        let expected = message
            .split_once(", expected ")
            .map(|(_, rest)| format!(" (expected {})", rest.replace('`', "")))
            .unwrap_or_default();
        return Violation {
            field,
            description: format!("unknown field {key:?}{expected}"),
        };
    }
    if let Some(key) = between(message, "missing field `", "`") {
        return Violation {
            field: join(&field, key),
            description: "required".to_owned(),
        };
    }
    Violation {
        field,
        description: message.to_owned(),
    }
}

/// A key written with control characters (a quoted YAML key can hold a newline) is
/// shown escaped, so an error stays one line.
fn escape_controls(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.escape_debug().to_string()
    } else {
        text.to_owned()
    }
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_name(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_step_id(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Default)]
struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    fn fail(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(Violation {
            field: field.into(),
            description: description.into(),
        });
    }

    fn check(mut self, raw: RawPlaybook) -> Result<Playbook, Violations> {
        if !is_name(&raw.name) {
            self.fail(
                "name",
                format!(
                    "invalid name {:?} (expected 1-63 characters of a-z, 0-9 and -)",
                    raw.name
                ),
            );
        }
        if raw.steps.is_empty() {
            self.fail("steps", "a playbook needs at least one step");
        }
        if raw.steps.len() > MAX_STEPS {
            self.fail(
                "steps",
                format!("{} steps (at most {MAX_STEPS})", raw.steps.len()),
            );
        }
        let mut first_index_of: HashMap<String, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(raw.steps.len());
        for (index, step) in raw.steps.into_iter().enumerate() {
            let path = format!("steps[{index}]");
            if !is_step_id(&step.id) {
                self.fail(
                    format!("{path}.id"),
                    format!(
                        "invalid step id {:?} (expected 1-63 characters of a-z, A-Z, 0-9, - and _)",
                        step.id
                    ),
                );
            } else if let Some(first) = first_index_of.get(&step.id) {
                self.fail(
                    format!("{path}.id"),
                    format!(
                        "duplicate step id {:?} (first used by steps[{first}])",
                        step.id
                    ),
                );
            } else {
                first_index_of.insert(step.id.clone(), index);
            }
            if let Some(step) = self.check_step(&path, step) {
                steps.push(step);
            }
        }
        if self.violations.is_empty() {
            Ok(Playbook {
                name: raw.name,
                description: raw.description,
                steps,
            })
        } else {
            Err(Violations(self.violations))
        }
    }

    fn check_step(&mut self, path: &str, raw: RawStep) -> Option<Step> {
        let id = raw.id.clone();
        let kind = match (raw.action.clone(), raw.wait.clone()) {
            (Some(_), Some(_)) => {
                self.fail(
                    path,
                    "a step is either an action or a wait, not both (remove `action` or `wait`)",
                );
                return None;
            }
            (None, None) => {
                self.fail(path, "expected `action` (with `channel`) or `wait`");
                return None;
            }
            (None, Some(wait)) => {
                for (field, present) in [
                    ("channel", raw.channel.is_some()),
                    ("template", raw.template.is_some()),
                    ("params", raw.params.is_some()),
                    ("if", raw.condition.is_some()),
                    ("retry", raw.retry.is_some()),
                ] {
                    if present {
                        self.fail(format!("{path}.{field}"), "not allowed on a wait step");
                    }
                }
                match parse_duration(&wait) {
                    Ok(duration) if !duration.is_zero() => StepKind::Wait { duration },
                    Ok(_) => {
                        self.fail(format!("{path}.wait"), "must be longer than zero");
                        return None;
                    }
                    Err(err) => {
                        self.fail(format!("{path}.wait"), err);
                        return None;
                    }
                }
            }
            (Some(action), None) => StepKind::Action(self.check_action(path, &action, raw)?),
        };
        Some(Step { id, kind })
    }

    fn check_action(&mut self, path: &str, action: &str, raw: RawStep) -> Option<Action> {
        let before = self.violations.len();
        if !is_step_id(action) {
            self.fail(
                format!("{path}.action"),
                format!("invalid action {action:?} (expected a word such as send_message)"),
            );
        }
        let channel = raw.channel.clone().unwrap_or_default();
        if raw.channel.is_none() {
            self.fail(
                format!("{path}.channel"),
                "required for an action step (the name of a channel a worker serves)",
            );
        } else if !is_step_id(&channel) {
            self.fail(
                format!("{path}.channel"),
                format!("invalid channel name {channel:?}"),
            );
        }
        if let Some(source) = &raw.template
            && let Err(err) = template::check_template(source)
        {
            self.fail(format!("{path}.template"), err);
        }
        if let Some(expr) = &raw.condition
            && let Err(err) = template::check_condition(expr)
        {
            self.fail(format!("{path}.if"), err);
        }
        let retry = self.check_retry(path, raw.retry.as_ref());
        (self.violations.len() == before).then(|| Action {
            action: action.to_owned(),
            channel,
            template: raw.template,
            params: raw.params.unwrap_or_default(),
            condition: raw.condition,
            retry,
        })
    }

    fn check_retry(&mut self, path: &str, raw: Option<&RawRetry>) -> RetryOverrides {
        let mut retry = RetryOverrides::default();
        let Some(raw) = raw else { return retry };
        if let Some(max_attempts) = raw.max_attempts {
            if (1..=100).contains(&max_attempts) {
                retry.max_attempts = Some(max_attempts);
            } else {
                self.fail(
                    format!("{path}.retry.max_attempts"),
                    format!("{max_attempts} (expected 1 to 100)"),
                );
            }
        }
        for (field, text, slot) in [
            ("initial", &raw.initial, &mut retry.initial),
            ("max", &raw.max, &mut retry.max),
        ] {
            if let Some(text) = text {
                match parse_duration(text) {
                    Ok(duration) => *slot = Some(duration),
                    Err(err) => self.fail(format!("{path}.retry.{field}"), err),
                }
            }
        }
        if let (Some(initial), Some(max)) = (retry.initial, retry.max)
            && initial > max
        {
            self.fail(format!("{path}.retry.initial"), "longer than retry.max");
        }
        retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name: welcome
description: test
steps:
  - id: add
    action: add_contact
    channel: wecom
  - id: coupon
    action: send_message
    channel: wecom
    template: "{{ contact.attrs.name }} {{ params.coupon }}"
    params: { coupon: WELCOME10 }
  - id: vip
    action: invite_to_group
    channel: wecom
    if: '"paid" in contact.tags'
  - id: wait
    wait: 3d
"#;

    fn error_of(yaml: &str) -> String {
        parse(yaml).unwrap_err().to_string()
    }

    #[test]
    fn accepts_the_base_playbook() {
        let playbook = parse(BASE).unwrap();
        assert_eq!(playbook.steps.len(), 4);
        assert_eq!(
            playbook.steps[3].kind,
            StepKind::Wait {
                duration: std::time::Duration::from_secs(3 * 86400)
            }
        );
    }

    #[test]
    fn every_problem_names_its_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "wait: 3d",
                "wait: 3x",
                "steps[3].wait: invalid duration \"3x\" (expected e.g. 30s, 15m, 72h, 3d)",
            ),
            (
                "id: vip",
                "id: coupon",
                "steps[2].id: duplicate step id \"coupon\"",
            ),
            (
                "channel: wecom\n  - id: coupon",
                "chanel: wecom\n  - id: coupon",
                "steps[0].chanel: unknown field",
            ),
            (
                "name: welcome",
                "name: Welcome New",
                "name: invalid name \"Welcome New\"",
            ),
            (
                "'\"paid\" in contact.tags'",
                "'\"paid\" in'",
                "steps[2].if:",
            ),
            (
                "\"{{ contact.attrs.name }} {{ params.coupon }}\"",
                "\"{{ contact.attrs.name \"",
                "steps[1].template:",
            ),
            (
                "\"{{ contact.attrs.name }} {{ params.coupon }}\"",
                "\"{{ contct.name }}\"",
                "steps[1].template: unknown variable \"contct\"",
            ),
            (
                "    channel: wecom\n  - id: coupon",
                "  - id: coupon",
                "steps[0].channel: required",
            ),
            (
                "  - id: wait\n    wait: 3d",
                "  - id: wait\n    wait: 3d\n    action: x\n    channel: y",
                "steps[3]: a step is either",
            ),
            (
                "name: welcome",
                "name: welcome\nentry: {event: x}",
                "entry: unknown field",
            ),
            ("wait: 3d", "wait: 1M", "steps[3].wait: invalid duration"),
        ];
        for (from, to, expected) in cases {
            assert!(BASE.contains(from), "case does not apply: {from}");
            let message = error_of(&BASE.replacen(from, to, 1));
            assert!(
                message.starts_with(expected),
                "expected {expected:?}, got {message:?}"
            );
        }
    }

    #[test]
    fn whole_document_problems() {
        assert!(
            error_of("name: x\nsteps: []\n")
                .starts_with("steps: a playbook needs at least one step")
        );
        assert!(error_of("steps:\n  - {id: a, wait: 1s}\n").starts_with("name: required"));
        assert!(error_of("name: x\nsteps: [").contains("line"));
        assert!(error_of("- just\n- a list\n").starts_with("expected a mapping"));
        assert!(
            error_of("name: x\nsteps:\n  - {id: a, wait: 1s, retry: {max_attempts: 2}}\n")
                .starts_with("steps[0].retry: not allowed")
        );
        assert!(
            error_of(
                "name: x\nsteps:\n  - {id: a, action: s, channel: c, retry: {max_attempts: 0}}\n"
            )
            .starts_with("steps[0].retry.max_attempts")
        );
        assert!(error_of("name: x\nsteps:\n  - {id: a, wait: 5}\n").starts_with("steps[0].wait"));
    }

    #[test]
    fn collects_several_violations() {
        let yaml =
            BASE.replacen("wait: 3d", "wait: 3x", 1)
                .replacen("name: welcome", "name: BAD", 1);
        let violations = parse(&yaml).unwrap_err();
        assert_eq!(violations.0.len(), 2, "{violations}");
    }
}
