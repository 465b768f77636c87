//! Errors to gRPC status, in one place.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{playbook::Violations, playbook_cache::LoadError, store};

/// A store failure: UNAVAILABLE when Redis cannot be reached (retryable), else INTERNAL.
pub(crate) fn from_store(err: &store::Error) -> Status {
    match err {
        store::Error::Redis(e)
            if e.is_io_error()
                || e.is_connection_dropped()
                || e.is_timeout()
                || e.is_connection_refusal() =>
        {
            Status::unavailable(format!("Redis is unavailable: {e}"))
        }
        store::Error::Shared(inner) => from_store(inner),
        other => Status::internal(other.to_string()),
    }
}

impl From<store::Error> for Status {
    fn from(err: store::Error) -> Self {
        from_store(&err)
    }
}

/// INVALID_ARGUMENT naming every violation, with a BadRequest detail per field.
pub(crate) fn invalid_playbook(violations: &Violations) -> Status {
    let details = ErrorDetails::with_bad_request(
        violations
            .0
            .iter()
            .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, violations.to_string(), details)
}

/// INVALID_ARGUMENT for one request field.
pub(crate) fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    let details = ErrorDetails::with_bad_request_violation(field, description.clone());
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        details,
    )
}

impl From<LoadError> for Status {
    fn from(err: LoadError) -> Self {
        match err {
            LoadError::NotFound { .. } => Status::not_found(err.to_string()),
            LoadError::Invalid { .. } => Status::internal(err.to_string()),
            LoadError::Store(e) => from_store(&e),
        }
    }
}
