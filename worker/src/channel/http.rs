//! What every HTTP adapter shares: the traced call, `Retry-After`, and how a request
//! that got no answer is classified.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use touchpoint_proto::security::root_cause;
use tracing::Instrument as _;

use super::Error;

/// Sends an adapter's outbound HTTP call inside a client span (OpenTelemetry HTTP
/// semantic conventions; the URL's path and query stay out of it: they may carry tokens
/// or signatures). With the delivery's `traceparent` (empty for none), the request
/// carries the span's own, so the provider continues the run's trace under the call.
pub async fn send_traced(
    http: &reqwest::Client,
    request: reqwest::RequestBuilder,
    traceparent: &str,
) -> reqwest::Result<reqwest::Response> {
    let mut request = request.build()?;
    let method = request.method().as_str().to_owned();
    let url = request.url();
    let span = tracing::info_span!(
        "http",
        otel.name = %method,
        otel.kind = "client",
        http.request.method = %method,
        server.address = url.host_str().unwrap_or_default(),
        server.port = url.port_or_known_default().unwrap_or_default(),
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if !traceparent.is_empty() {
        let traceparent = touchpoint_proto::telemetry::continue_trace(&span, traceparent);
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&traceparent) {
            request.headers_mut().insert("traceparent", value);
        }
    }
    let response = http.execute(request).instrument(span.clone()).await?;
    span.record("http.response.status_code", response.status().as_u16());
    Ok(response)
}

/// `Retry-After` as delta-seconds or as an HTTP-date (a date before `now` means now).
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A request that got no (readable) answer: worth retrying, unless it could not even be
/// built. The detail names the cause only, never the URL (its query may hold a phone
/// number, a token or a signature).
pub(crate) fn transport_error(error: reqwest::Error, timeout: Duration) -> Error {
    let error = error.without_url();
    if error.is_builder() {
        Error::permanent(format!("invalid request: {}", root_cause(&error)))
    } else if error.is_timeout() {
        Error::retryable(format!(
            "timeout after {}",
            humantime::format_duration(timeout)
        ))
    } else if error.is_decode() {
        Error::retryable(format!("unreadable answer: {}", root_cause(&error)))
    } else if error.is_connect() {
        Error::retryable(format!("connect error: {}", root_cause(&error)))
    } else {
        Error::retryable(format!("request failed: {}", root_cause(&error)))
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        assert_eq!(
            retry_after(&headers("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2026 07:28:30 GMT"), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2026 07:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
