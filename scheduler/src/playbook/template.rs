//! Templates and `if` conditions: one engine (minijinja, Jinja syntax) for both.
//!
//! A playbook version is compiled once into a [`Compiled`] environment holding every
//! step's template and condition, so dispatching a step only renders.

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use super::{Playbook, StepKind};

/// Variables a template or condition may use.
const VARIABLES: [&str; 3] = ["contact", "params", "event"];
/// Longest template or condition source, in bytes.
const MAX_TEMPLATE_BYTES: usize = 16 * 1024;

/// Why a template or condition could not be evaluated for one contact.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(String);

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // A missing attribute renders empty; marketers' contacts are rarely complete.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

fn check_variables(used: std::collections::HashSet<String>) -> Result<(), String> {
    let mut unknown: Vec<_> = used
        .into_iter()
        .filter(|name| !VARIABLES.contains(&name.as_str()))
        .collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some(name) => Err(format!(
            "unknown variable {name:?} (available: {})",
            VARIABLES.join(", ")
        )),
    }
}

fn describe(err: &minijinja::Error) -> String {
    let mut text = err.kind().to_string();
    if let Some(detail) = err.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    if let Some(line) = err.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

/// Checks a template's syntax and variables.
pub(super) fn check_template(source: &str) -> Result<(), String> {
    if source.len() > MAX_TEMPLATE_BYTES {
        return Err(format!("longer than {MAX_TEMPLATE_BYTES} bytes"));
    }
    let env = environment();
    let template = env.template_from_str(source).map_err(|e| describe(&e))?;
    check_variables(template.undeclared_variables(false))
}

/// Checks a condition's syntax and variables.
pub(super) fn check_condition(expr: &str) -> Result<(), String> {
    if expr.len() > MAX_TEMPLATE_BYTES {
        return Err(format!("longer than {MAX_TEMPLATE_BYTES} bytes"));
    }
    let env = environment();
    let expression = env.compile_expression(expr).map_err(|e| describe(&e))?;
    check_variables(expression.undeclared_variables(false))
}

/// Every template and condition of one playbook version, compiled.
#[derive(Debug)]
pub struct Compiled {
    env: Environment<'static>,
}

fn template_name(step: usize) -> String {
    format!("t{step}")
}

fn condition_name(step: usize) -> String {
    format!("c{step}")
}

fn param_name(step: usize, pointer: &str) -> String {
    format!("p{step}{pointer}")
}

/// Whether a param string is a template (the rest are sent as written).
pub(super) fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// Every string leaf of `value` with its JSON pointer (`/coupon`, `/items/0`).
pub(super) fn string_leaves<'a>(
    value: &'a serde_json::Value,
    pointer: String,
    out: &mut Vec<(String, &'a str)>,
) {
    match value {
        serde_json::Value::String(text) => out.push((pointer, text)),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                string_leaves(item, format!("{pointer}/{i}"), out);
            }
        }
        serde_json::Value::Object(fields) => {
            for (key, item) in fields {
                let escaped = key.replace('~', "~0").replace('/', "~1");
                string_leaves(item, format!("{pointer}/{escaped}"), out);
            }
        }
        _ => {}
    }
}

impl Compiled {
    /// Compiles a validated playbook (its sources were checked by [`super::parse`]).
    pub fn new(playbook: &Playbook) -> Result<Self, RenderError> {
        let mut env = environment();
        for (index, step) in playbook.steps.iter().enumerate() {
            let (template, condition) = match &step.kind {
                StepKind::Action(action) => (&action.template, &action.condition),
                StepKind::Exit { condition } => (&None, condition),
                _ => continue,
            };
            if let Some(source) = template {
                env.add_template_owned(template_name(index), source.clone())
                    .map_err(|e| RenderError(describe(&e)))?;
            }
            if let StepKind::Action(action) = &step.kind {
                let params = serde_json::Value::Object(action.params.clone());
                let mut leaves = Vec::new();
                string_leaves(&params, String::new(), &mut leaves);
                for (pointer, text) in leaves.into_iter().filter(|(_, t)| is_template(t)) {
                    env.add_template_owned(param_name(index, &pointer), text.to_owned())
                        .map_err(|e| RenderError(describe(&e)))?;
                }
            }
            if let Some(expr) = condition {
                // The expression was compiled alone at validation, so it cannot
                // break out of the block it is wrapped in here.
                let source = format!("{{% if {expr} %}}true{{% endif %}}");
                env.add_template_owned(condition_name(index), source)
                    .map_err(|e| RenderError(describe(&e)))?;
            }
        }
        Ok(Self { env })
    }

    /// Renders step `index`'s template, or `None` when it has none.
    pub fn render(
        &self,
        index: usize,
        ctx: &impl Serialize,
    ) -> Result<Option<String>, RenderError> {
        match self.env.get_template(&template_name(index)) {
            Ok(template) => template
                .render(ctx)
                .map(Some)
                .map_err(|e| RenderError(describe(&e))),
            Err(_) => Ok(None),
        }
    }

    /// Step `index`'s params with every templated string rendered (e.g. a WeCom
    /// `welcome_code: "{{ event.attrs.welcome_code }}"`); the rest as written.
    pub fn render_params(
        &self,
        index: usize,
        params: &serde_json::Map<String, serde_json::Value>,
        ctx: &impl Serialize,
    ) -> Result<serde_json::Map<String, serde_json::Value>, RenderError> {
        let mut rendered = serde_json::Value::Object(params.clone());
        let original = serde_json::Value::Object(params.clone());
        let mut leaves = Vec::new();
        string_leaves(&original, String::new(), &mut leaves);
        for (pointer, _) in leaves.into_iter().filter(|(_, t)| is_template(t)) {
            let Ok(template) = self.env.get_template(&param_name(index, &pointer)) else {
                continue;
            };
            let value = template
                .render(ctx)
                .map_err(|e| RenderError(format!("params{pointer}: {}", describe(&e))))?;
            if let Some(slot) = rendered.pointer_mut(&pointer) {
                *slot = serde_json::Value::String(value);
            }
        }
        match rendered {
            serde_json::Value::Object(map) => Ok(map),
            _ => Ok(params.clone()),
        }
    }

    /// Evaluates step `index`'s `if`; a step without one always runs.
    pub fn condition_holds(&self, index: usize, ctx: &impl Serialize) -> Result<bool, RenderError> {
        match self.env.get_template(&condition_name(index)) {
            Ok(template) => template
                .render(ctx)
                .map(|out| out == "true")
                .map_err(|e| RenderError(describe(&e))),
            Err(_) => Ok(true),
        }
    }
}
