//! One module per `tp` command: its arguments, its calls and its views.

pub(crate) mod dev;
pub(crate) mod dlq;
pub(crate) mod enroll;
pub(crate) mod playbook;
pub(crate) mod run;
