//! Templates and `if` conditions: one engine (minijinja, Jinja syntax) for both.
//!
//! A playbook version is compiled once into a [`Compiled`] environment holding every
//! step's template and condition, so dispatching a step only renders.

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use super::{Playbook, StepKind};

/// Variables a template or condition may use.
const VARIABLES: [&str; 2] = ["contact", "params"];
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

impl Compiled {
    /// Compiles a validated playbook (its sources were checked by [`super::parse`]).
    pub fn new(playbook: &Playbook) -> Result<Self, RenderError> {
        let mut env = environment();
        for (index, step) in playbook.steps.iter().enumerate() {
            let StepKind::Action(action) = &step.kind else {
                continue;
            };
            if let Some(source) = &action.template {
                env.add_template_owned(template_name(index), source.clone())
                    .map_err(|e| RenderError(describe(&e)))?;
            }
            if let Some(expr) = &action.condition {
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
