//! YAML → [`Playbook`], with every problem reported as a field path and an expectation.
//!
//! Two passes: serde (through `serde_path_to_error`, so type errors and unknown keys
//! carry their path) into raw structs, then the semantic checks below, which collect
//! every violation rather than stopping at the first.

use std::{collections::HashMap, fmt};

use serde::Deserialize;

use super::{
    Action, Entry, Hold, MAX_SOURCE_BYTES, MAX_STEPS, Playbook, Reentry, RetryOverrides, Step,
    StepKind, WaitFor, parse_duration, template,
};
use crate::schedule::{self, RawSchedule};

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
    entry: Option<RawEntry>,
    goal: Option<RawGoal>,
    schedule: Option<RawSchedule>,
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    event: Option<String>,
    reentry: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGoal {
    event: String,
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
    wait_until: Option<String>,
    wait_for: Option<RawWaitFor>,
    on_event: Option<String>,
    on_timeout: Option<String>,
    exit: Option<bool>,
    goto: Option<String>,
    retry: Option<RawRetry>,
    transactional: Option<bool>,
    on_cap: Option<String>,
    on_quiet_hours: Option<String>,
    deadline: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWaitFor {
    event: String,
    timeout: String,
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
    let raw: RawPlaybook = read_document(
        yaml,
        "playbook",
        MAX_SOURCE_BYTES,
        "expected a mapping with name, description and steps",
    )?;
    Checker::default().check(raw)
}

/// Reads a YAML document (playbook or policy) of at most `max_bytes` into `T`: YAML 1.2
/// booleans only (a channel called `y` or `on` stays a string), a mapping at the top
/// (`not_a_mapping` otherwise), and serde's errors as one violation naming the field path.
pub(crate) fn read_document<T: serde::de::DeserializeOwned>(
    yaml: &str,
    what: &str,
    max_bytes: usize,
    not_a_mapping: &str,
) -> Result<T, Violations> {
    let whole = |description: String| {
        Violations(vec![Violation {
            field: String::new(),
            description,
        }])
    };
    if yaml.len() > max_bytes {
        return Err(whole(format!(
            "{what} is {} bytes (at most {max_bytes})",
            yaml.len()
        )));
    }
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let document: serde_json::Value = serde_saphyr::from_str_with_options(yaml, options)
        .map_err(|err| whole(format!("invalid YAML: {}", one_line(&err.to_string()))))?;
    if !document.is_object() {
        return Err(whole(not_a_mapping.to_owned()));
    }
    serde_path_to_error::deserialize(&document).map_err(|err| {
        let field = err.path().to_string();
        let inner = err.into_inner().to_string();
        Violations(vec![serde_violation(field, &inner)])
    })
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

/// Event names: `order.placed`, `contact.added`, `cart_abandoned`.
pub fn is_event_name(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_step_id(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where jumps of one step may go.
struct Jumps<'a> {
    from: usize,
    index_of: &'a HashMap<String, usize>,
}

/// `HH:MM` on a 24-hour clock.
pub(crate) fn parse_clock(text: &str) -> Option<(u8, u8)> {
    let (hour, minute) = text.trim().split_once(':')?;
    if hour.is_empty() || hour.len() > 2 || minute.len() != 2 {
        return None;
    }
    let hour: u8 = hour.parse().ok()?;
    let minute: u8 = minute.parse().ok()?;
    (hour < 24 && minute < 60).then_some((hour, minute))
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
        let schedule = raw.schedule.and_then(|raw| match schedule::check(raw) {
            Ok(schedule) => Some(schedule),
            Err(problems) => {
                for (field, problem) in problems {
                    self.fail(format!("schedule.{field}"), problem);
                }
                None
            }
        });
        let entry = self.check_entry(raw.entry, schedule.is_some());
        let goal = raw.goal.map(|goal| goal.event);
        if let Some(event) = &goal {
            self.check_event_name("goal.event", event);
        }
        let mut index_of: HashMap<String, usize> = HashMap::new();
        for (index, step) in raw.steps.iter().enumerate() {
            let path = format!("steps[{index}]");
            if !is_step_id(&step.id) {
                self.fail(
                    format!("{path}.id"),
                    format!(
                        "invalid step id {:?} (expected 1-63 characters of a-z, A-Z, 0-9, - and _)",
                        step.id
                    ),
                );
            } else if let Some(first) = index_of.get(&step.id) {
                self.fail(
                    format!("{path}.id"),
                    format!(
                        "duplicate step id {:?} (first used by steps[{first}])",
                        step.id
                    ),
                );
            } else {
                index_of.insert(step.id.clone(), index);
            }
        }
        let mut steps = Vec::with_capacity(raw.steps.len());
        for (index, step) in raw.steps.into_iter().enumerate() {
            let path = format!("steps[{index}]");
            let jumps = Jumps {
                from: index,
                index_of: &index_of,
            };
            if let Some(step) = self.check_step(&path, step, &jumps) {
                steps.push(step);
            }
        }
        if self.violations.is_empty() {
            Ok(Playbook {
                name: raw.name,
                description: raw.description,
                entry,
                goal,
                schedule,
                steps,
            })
        } else {
            Err(Violations(self.violations))
        }
    }

    fn check_event_name(&mut self, field: &str, event: &str) {
        if !is_event_name(event) {
            self.fail(
                field,
                format!(
                    "invalid event name {event:?} (expected 1-63 characters of a-z, A-Z, 0-9, ., _ and -, such as order.placed)"
                ),
            );
        }
    }

    fn check_entry(&mut self, raw: Option<RawEntry>, recurring: bool) -> Entry {
        // A recurring campaign enrolls its audience on every tick unless it says otherwise.
        let default = if recurring {
            Reentry::Always
        } else {
            Reentry::Never
        };
        let Some(raw) = raw else {
            return Entry {
                event: None,
                reentry: default,
            };
        };
        if let Some(event) = &raw.event {
            self.check_event_name("entry.event", event);
        }
        let reentry = match raw.reentry.as_deref().map(str::trim) {
            None => default,
            Some("never") => Reentry::Never,
            Some("always") => Reentry::Always,
            Some(other) => match other
                .strip_prefix("after")
                .filter(|rest| rest.starts_with(char::is_whitespace))
                .map(|rest| parse_duration(rest.trim()))
            {
                Some(Ok(duration)) if !duration.is_zero() => Reentry::After(duration),
                _ => {
                    self.fail(
                        "entry.reentry",
                        format!(
                            "invalid reentry {other:?} (expected never, always, or after <duration> such as after 3d)"
                        ),
                    );
                    default
                }
            },
        };
        Entry {
            event: raw.event,
            reentry,
        }
    }

    fn check_step(&mut self, path: &str, raw: RawStep, jumps: &Jumps<'_>) -> Option<Step> {
        let id = raw.id.clone();
        let kinds: Vec<&str> = [
            ("action", raw.action.is_some()),
            ("wait", raw.wait.is_some()),
            ("wait_until", raw.wait_until.is_some()),
            ("wait_for", raw.wait_for.is_some()),
            ("exit", raw.exit.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, present)| present.then_some(kind))
        .collect();
        let kind = match kinds.as_slice() {
            [] => {
                self.fail(
                    path,
                    "expected one of `action` (with `channel`), `wait`, `wait_until`, `wait_for` or `exit`",
                );
                return None;
            }
            [_, _, ..] => {
                self.fail(
                    path,
                    format!(
                        "a step is one kind, not several (it has {}: keep one)",
                        kinds
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ),
                );
                return None;
            }
            [kind] => *kind,
        };
        self.refuse_fields(path, kind, &raw);
        let goto = raw
            .goto
            .as_deref()
            .and_then(|target| self.jump(path, "goto", target, jumps));
        let kind = match kind {
            "action" => StepKind::Action(self.check_action(path, raw)?),
            "wait" => {
                let wait = raw.wait.unwrap_or_default();
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
            "wait_until" => {
                let text = raw.wait_until.unwrap_or_default();
                let Some((hour, minute)) = parse_clock(&text) else {
                    self.fail(
                        format!("{path}.wait_until"),
                        format!("invalid time {text:?} (expected HH:MM, such as \"20:00\")"),
                    );
                    return None;
                };
                StepKind::WaitUntil { hour, minute }
            }
            "wait_for" => {
                let wait_for = raw.wait_for?;
                self.check_event_name(&format!("{path}.wait_for.event"), &wait_for.event);
                let timeout = match parse_duration(&wait_for.timeout) {
                    Ok(timeout) if !timeout.is_zero() => timeout,
                    Ok(_) => {
                        self.fail(
                            format!("{path}.wait_for.timeout"),
                            "must be longer than zero",
                        );
                        return None;
                    }
                    Err(err) => {
                        self.fail(format!("{path}.wait_for.timeout"), err);
                        return None;
                    }
                };
                let on_event = raw
                    .on_event
                    .as_deref()
                    .and_then(|target| self.jump(path, "on_event", target, jumps));
                let on_timeout = raw
                    .on_timeout
                    .as_deref()
                    .and_then(|target| self.jump(path, "on_timeout", target, jumps));
                StepKind::WaitFor(WaitFor {
                    event: wait_for.event,
                    timeout,
                    on_event,
                    on_timeout,
                })
            }
            _ => {
                if raw.exit == Some(false) {
                    self.fail(
                        format!("{path}.exit"),
                        "only `exit: true` is meaningful (remove the step to go on)",
                    );
                }
                if raw.goto.is_some() {
                    self.fail(format!("{path}.goto"), "an exit step ends the run");
                }
                if let Some(expr) = &raw.condition
                    && let Err(err) = template::check_condition(expr)
                {
                    self.fail(format!("{path}.if"), err);
                }
                StepKind::Exit {
                    condition: raw.condition,
                }
            }
        };
        Some(Step { id, kind, goto })
    }

    /// Fields that only belong to another kind of step.
    fn refuse_fields(&mut self, path: &str, kind: &str, raw: &RawStep) {
        let fields: [(&str, bool, &[&str]); 12] = [
            ("channel", raw.channel.is_some(), &["action"]),
            ("template", raw.template.is_some(), &["action"]),
            ("params", raw.params.is_some(), &["action"]),
            ("if", raw.condition.is_some(), &["action", "exit"]),
            ("retry", raw.retry.is_some(), &["action"]),
            ("transactional", raw.transactional.is_some(), &["action"]),
            ("on_cap", raw.on_cap.is_some(), &["action"]),
            ("on_quiet_hours", raw.on_quiet_hours.is_some(), &["action"]),
            ("deadline", raw.deadline.is_some(), &["action"]),
            ("on_event", raw.on_event.is_some(), &["wait_for"]),
            ("on_timeout", raw.on_timeout.is_some(), &["wait_for"]),
            (
                "goto",
                raw.goto.is_some(),
                &["action", "wait", "wait_until", "exit"],
            ),
        ];
        for (field, present, allowed) in fields {
            if present && !allowed.contains(&kind) && !(field == "goto" && kind == "exit") {
                let hint = if field == "goto" {
                    " (use on_event / on_timeout)".to_owned()
                } else {
                    String::new()
                };
                self.fail(
                    format!("{path}.{field}"),
                    format!("not allowed on a {kind} step{hint}"),
                );
            }
        }
    }

    /// Resolves a jump target: a later step's id.
    fn jump(&mut self, path: &str, field: &str, target: &str, jumps: &Jumps<'_>) -> Option<usize> {
        match jumps.index_of.get(target) {
            Some(&to) if to > jumps.from => Some(to),
            Some(&to) => {
                self.fail(
                    format!("{path}.{field}"),
                    format!(
                        "{target:?} is steps[{to}]: jumps only go forward, to a later step, so every run ends"
                    ),
                );
                None
            }
            None => {
                self.fail(
                    format!("{path}.{field}"),
                    format!("no step has the id {target:?}"),
                );
                None
            }
        }
    }

    fn check_action(&mut self, path: &str, raw: RawStep) -> Option<Action> {
        let before = self.violations.len();
        let action = raw.action.clone().unwrap_or_default();
        if !is_step_id(&action) {
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
        if let Some(params) = &raw.params {
            let params = serde_json::Value::Object(params.clone());
            let mut leaves = Vec::new();
            template::string_leaves(&params, String::new(), &mut leaves);
            for (pointer, text) in leaves {
                if template::is_template(text)
                    && let Err(err) = template::check_template(text)
                {
                    let field = pointer.trim_start_matches('/').replace('/', ".");
                    self.fail(format!("{path}.params.{field}"), err);
                }
            }
        }
        if let Some(expr) = &raw.condition
            && let Err(err) = template::check_condition(expr)
        {
            self.fail(format!("{path}.if"), err);
        }
        let retry = self.check_retry(path, raw.retry.as_ref());
        let on_cap = self.check_hold(path, "on_cap", raw.on_cap.as_deref(), Hold::Skip);
        let on_quiet_hours = self.check_hold(
            path,
            "on_quiet_hours",
            raw.on_quiet_hours.as_deref(),
            Hold::Defer,
        );
        let deadline = raw
            .deadline
            .as_deref()
            .and_then(|text| match parse_duration(text) {
                Ok(deadline) if !deadline.is_zero() => Some(deadline),
                Ok(_) => {
                    self.fail(format!("{path}.deadline"), "must be longer than 0s");
                    None
                }
                Err(err) => {
                    self.fail(format!("{path}.deadline"), err);
                    None
                }
            });
        (self.violations.len() == before).then(|| Action {
            action,
            channel,
            template: raw.template,
            params: raw.params.unwrap_or_default(),
            condition: raw.condition,
            retry,
            transactional: raw.transactional.unwrap_or(false),
            on_cap,
            on_quiet_hours,
            deadline,
        })
    }

    fn check_hold(&mut self, path: &str, field: &str, text: Option<&str>, default: Hold) -> Hold {
        match text {
            None => default,
            Some("skip") => Hold::Skip,
            Some("defer") => Hold::Defer,
            Some(other) => {
                self.fail(
                    format!("{path}.{field}"),
                    format!("invalid value {other:?} (expected skip or defer)"),
                );
                default
            }
        }
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
    fn templated_params_are_checked_and_rendered() {
        let yaml = r#"
name: welcome
steps:
  - id: welcome
    action: send_welcome
    channel: wecom
    params:
      welcome_code: "{{ event.attrs.welcome_code }}"
      text: plain {not a template}
      attachments: [{ url: "https://shop.example/{{ contact.id }}" }]
"#;
        let playbook = parse(yaml).unwrap();
        let compiled = template::Compiled::new(&playbook).unwrap();
        let StepKind::Action(action) = &playbook.steps[0].kind else {
            panic!("an action");
        };
        let ctx = serde_json::json!({
            "contact": {"id": "c-1"},
            "event": {"attrs": {"welcome_code": "WC-9"}},
        });
        let params = compiled.render_params(0, &action.params, &ctx).unwrap();
        assert_eq!(params["welcome_code"], "WC-9");
        assert_eq!(params["text"], "plain {not a template}");
        assert_eq!(params["attachments"][0]["url"], "https://shop.example/c-1");

        let bad = yaml.replace(
            "{{ event.attrs.welcome_code }}",
            "{{ event.attrs.welcome_code",
        );
        let err = error_of(&bad);
        assert!(err.contains("steps[0].params.welcome_code"), "{err}");
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
                "steps[3]: a step is one kind, not several",
            ),
            (
                "name: welcome",
                "name: welcome\nentry: {event: x, mode: y}",
                "entry.mode: unknown field",
            ),
            (
                "name: welcome",
                "name: welcome\nentry: {reentry: sometimes}",
                "entry.reentry: invalid reentry \"sometimes\"",
            ),
            (
                "name: welcome",
                "name: welcome\ngoal: {event: \"order placed\"}",
                "goal.event: invalid event name",
            ),
            (
                "  - id: wait\n    wait: 3d",
                "  - id: wait\n    wait_until: \"25:00\"",
                "steps[3].wait_until: invalid time \"25:00\"",
            ),
            (
                "    channel: wecom\n  - id: coupon",
                "    channel: wecom\n    goto: add\n  - id: coupon",
                "steps[0].goto: \"add\" is steps[0]: jumps only go forward",
            ),
            (
                "    channel: wecom\n  - id: coupon",
                "    channel: wecom\n    goto: nowhere\n  - id: coupon",
                "steps[0].goto: no step has the id \"nowhere\"",
            ),
            (
                "  - id: wait\n    wait: 3d",
                "  - id: wait\n    wait: 3d\n    on_event: vip",
                "steps[3].on_event: not allowed on a wait step",
            ),
            (
                "  - id: wait\n    wait: 3d",
                "  - id: wait\n    wait_for: {event: order.placed, timeout: 3d}\n    on_timeout: coupon",
                "steps[3].on_timeout: \"coupon\" is steps[1]: jumps only go forward",
            ),
            (
                "    if: '\"paid\" in contact.tags'",
                "    on_cap: later",
                "steps[2].on_cap: invalid value \"later\" (expected skip or defer)",
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
    fn every_step_kind_and_jump_parses() {
        let playbook = parse(
            r#"
name: journey
entry: { event: contact.added, reentry: after 3d }
goal: { event: order.placed }
steps:
  - { id: hello, action: send, channel: crm, goto: wait-order, transactional: true }
  - { id: skipped-over, action: send, channel: crm, on_cap: defer, on_quiet_hours: skip }
  - id: wait-order
    wait_for: { event: order.placed, timeout: 3d }
    on_event: done
    on_timeout: evening
  - { id: evening, wait_until: "20:00" }
  - { id: done, exit: true, if: '"vip" in contact.tags' }
  - { id: last, action: send, channel: crm, template: "{{ event.attrs.code }}" }
"#,
        )
        .unwrap();
        assert_eq!(
            playbook.entry,
            Entry {
                event: Some("contact.added".into()),
                reentry: Reentry::After(std::time::Duration::from_secs(3 * 86400)),
            }
        );
        assert_eq!(playbook.goal.as_deref(), Some("order.placed"));
        assert_eq!(playbook.steps[0].goto, Some(2));
        assert_eq!(playbook.after(0), 2);
        assert_eq!(playbook.after(1), 2);
        let StepKind::Action(action) = &playbook.steps[1].kind else {
            panic!("an action")
        };
        assert_eq!(
            (action.on_cap, action.on_quiet_hours),
            (Hold::Defer, Hold::Skip)
        );
        let StepKind::WaitFor(wait) = &playbook.steps[2].kind else {
            panic!("a wait_for")
        };
        assert_eq!((wait.on_event, wait.on_timeout), (Some(4), Some(3)));
        assert_eq!(
            playbook.steps[3].kind,
            StepKind::WaitUntil {
                hour: 20,
                minute: 0
            }
        );
        assert!(matches!(playbook.steps[4].kind, StepKind::Exit { .. }));
        // A recurring playbook enters every tick unless it says otherwise.
        let recurring = parse(
            "name: sale\nschedule: { cron: \"0 20 * * Mon\", tz: Asia/Shanghai, audience: { tags: [paid] } }\nsteps:\n  - { id: w, wait: 1h }\n",
        )
        .unwrap();
        assert_eq!(recurring.entry.reentry, Reentry::Always);
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
