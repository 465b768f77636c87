//! Hostile playbooks: the parser and validator never panic. Thousands of random and
//! mutated documents are each accepted, or rejected with violations that name a field
//! path (or the whole document) and say what was expected.

use proptest::prelude::*;
use touchpoint_scheduler::playbook::{Violations, parse};

const EXAMPLE: &str = include_str!("../../examples/welcome.yaml");

/// Field names and values a marketer (or an attacker) might write.
const KEYS: &[&str] = &[
    "name",
    "description",
    "steps",
    "id",
    "action",
    "channel",
    "template",
    "params",
    "if",
    "wait",
    "retry",
    "max_attempts",
    "initial",
    "max",
    "goto",
    "entry",
    "",
    "<<",
    "on",
];
const VALUES: &[&str] = &[
    "3d",
    "3x",
    "-1",
    "0",
    "1M",
    "yes",
    "~",
    "null",
    "[]",
    "{}",
    "\"{{ contact.attrs.name }}\"",
    "'\"paid\" in contact.tags'",
    "\"{{\"",
    "\"{% for %}\"",
    "&a [1]",
    "*a",
    "!!binary aGk=",
    "9999999999999999999999",
    "wecom",
    "send_message",
    "王芳",
    "\"\\u0000\"",
];

fn well_formed(
    result: &Result<touchpoint_scheduler::playbook::Playbook, Violations>,
) -> Result<(), String> {
    let Err(violations) = result else {
        return Ok(());
    };
    if violations.0.is_empty() {
        return Err("rejected without a violation".into());
    }
    for violation in &violations.0 {
        if violation.description.trim().is_empty() {
            return Err(format!("a violation of {:?} says nothing", violation.field));
        }
        let one_line = |text: &str| !text.chars().any(char::is_control);
        if !one_line(&violation.field) || !one_line(&violation.to_string()) {
            return Err(format!("odd field path {:?}", violation.field));
        }
    }
    Ok(())
}

/// A YAML scalar, sequence or mapping built from the words above, a few levels deep.
fn yaml_node() -> impl Strategy<Value = String> {
    let leaf = prop::sample::select(VALUES).prop_map(str::to_owned);
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|pairs| {
                let body: Vec<String> = pairs
                    .into_iter()
                    .map(|(k, v)| format!("{k:?}: {v}"))
                    .collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_documents_never_panic(doc in yaml_node()) {
        let result = parse(&doc);
        prop_assert!(well_formed(&result).is_ok(), "{:?} for {doc}", well_formed(&result));
    }

    #[test]
    fn random_bytes_never_panic(text in "\\PC{0,400}") {
        let result = parse(&text);
        prop_assert!(well_formed(&result).is_ok(), "{:?} for {text:?}", well_formed(&result));
    }

    #[test]
    fn mutated_examples_never_panic(
        cut in 0..EXAMPLE.len(),
        len in 0usize..40,
        insert in prop::sample::select(VALUES),
        line in 0usize..40,
        key in prop::sample::select(KEYS),
    ) {
        let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
        // Replace one line's value, splice in a token, and cut a slice somewhere.
        let target = line % lines.len();
        if let Some((indent_key, _)) = lines[target].split_once(':') {
            lines[target] = format!("{indent_key}: {insert}");
        }
        lines.insert(line % (lines.len() + 1), format!("  {key}: {insert}"));
        let mut text = lines.join("\n");
        let start = cut.min(text.len());
        let end = (start + len).min(text.len());
        if text.is_char_boundary(start) && text.is_char_boundary(end) {
            text.replace_range(start..end, "");
        }
        let result = parse(&text);
        prop_assert!(well_formed(&result).is_ok(), "{:?} for\n{text}", well_formed(&result));
    }
}

#[test]
fn the_example_itself_is_valid() {
    let playbook = parse(EXAMPLE).expect("examples/welcome.yaml is valid");
    assert_eq!(playbook.steps.len(), 6);
}

#[test]
fn deep_nesting_and_alias_bombs_are_refused_not_fatal() {
    let deep = format!("name: x\nsteps: {}{}", "[".repeat(5000), "]".repeat(5000));
    assert!(parse(&deep).is_err());
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
                g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
    assert!(parse(bomb).is_err());
    let huge = format!(
        "name: x\ndescription: {}\nsteps: []\n",
        "a".repeat(300 * 1024)
    );
    let err = parse(&huge).unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");
}
