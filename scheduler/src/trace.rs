//! W3C trace context of runs: a run is one trace; each attempt of each step is a
//! child span id under it, carried to the worker and on to the receiver.

use rand::Rng;

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// The trace id of a valid `traceparent`.
pub(crate) fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace != "0".repeat(32);
    valid.then_some(trace)
}

/// The traceparent of a new run: continuing the caller's trace when it sent one.
pub(crate) fn for_new_run(caller: Option<&str>) -> String {
    let trace = caller
        .and_then(trace_id)
        .map_or_else(|| random_hex(16), str::to_owned);
    format!("00-{trace}-{}-01", random_hex(8))
}

/// A child span's traceparent within the run's trace.
pub(crate) fn child_of(run_traceparent: &str) -> String {
    for_new_run(Some(run_traceparent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_callers_trace_and_starts_one_otherwise() {
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let run = for_new_run(Some(caller));
        assert_eq!(trace_id(&run), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_ne!(run, caller);
        let fresh = for_new_run(Some("garbage"));
        assert!(trace_id(&fresh).is_some());
        assert_eq!(trace_id(&child_of(&run)), trace_id(&run));
    }
}
