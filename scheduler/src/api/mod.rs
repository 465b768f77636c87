//! gRPC services: thin layers that check requests, call the domain, convert answers.
//! Prost types stop here.

mod contact_service;
mod dead_letter_service;
mod playbook_service;
mod policy_service;
mod run_service;
mod status;
mod worker_service;

pub(crate) use contact_service::{ContactApi, EventApi};
pub(crate) use dead_letter_service::DeadLetterApi;
pub(crate) use playbook_service::PlaybookApi;
pub(crate) use policy_service::PolicyApi;
pub(crate) use run_service::{EnrollmentApi, RunApi};
pub(crate) use worker_service::WorkerApi;
