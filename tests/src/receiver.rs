//! A real HTTP server that records webhook deliveries and answers as a test scripts it.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header::RETRY_AFTER},
    response::{IntoResponse, Response},
};
use tokio::{sync::watch, task::JoinHandle};

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// `POST`, ...
    pub method: String,
    /// Path and query, e.g. `/hook`.
    pub path: String,
    pub headers: HeaderMap,
    /// The raw body, byte for byte (what the signature covers).
    pub body: Vec<u8>,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<serde_json::Value>,
    /// When the request arrived (before any scripted hold).
    pub received_at: Instant,
    /// The same moment on the wall clock.
    pub received_at_wall: SystemTime,
    /// The status the receiver answered (or will answer, while held).
    pub status: u16,
}

impl ReceivedRequest {
    /// A header's value, when present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `webhook-id` header ("" when missing).
    pub fn webhook_id(&self) -> &str {
        self.header("webhook-id").unwrap_or_default()
    }

    /// A top-level string field of the JSON body ("" when missing).
    pub fn field(&self, name: &str) -> &str {
        self.json
            .as_ref()
            .and_then(|j| j.get(name))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
    }

    /// The body's `run_id`.
    pub fn run_id(&self) -> &str {
        self.field("run_id")
    }

    /// The body's `step`.
    pub fn step(&self) -> &str {
        self.field("step")
    }

    /// The body's `attempt` (0 when missing).
    pub fn attempt(&self) -> u64 {
        self.json
            .as_ref()
            .and_then(|j| j.get("attempt"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    }

    /// A JSON pointer into the body, e.g. `/contact/attrs/name`.
    pub fn pointer(&self, pointer: &str) -> Option<&serde_json::Value> {
        self.json.as_ref().and_then(|j| j.pointer(pointer))
    }
}

/// A scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` header, in seconds.
    pub retry_after_secs: Option<u64>,
    /// How long to hold the request before answering (the connection stays open).
    pub hold: Duration,
}

impl Reply {
    /// An immediate answer with `status`.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            retry_after_secs: None,
            hold: Duration::ZERO,
        }
    }

    /// Adds a `Retry-After: <secs>` header.
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Holds the request for `hold` before answering.
    #[must_use]
    pub fn held_for(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }
}

#[derive(Debug)]
struct Inner {
    requests: Vec<ReceivedRequest>,
    script: VecDeque<Reply>,
}

#[derive(Debug, Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    count: Arc<watch::Sender<usize>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An HTTP server on `127.0.0.1:<free port>` (axum) that records every request, whatever its
/// path, and answers from a script: the queued [`Reply`]s in order, then `200` forever.
///
/// It runs on the runtime of the task that started it and stops when dropped.
#[derive(Debug)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Shared,
    server: JoinHandle<()>,
}

impl WebhookReceiver {
    /// Starts a receiver answering `200` to everything until scripted otherwise.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("receiver address");
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                requests: Vec::new(),
                script: VecDeque::new(),
            })),
            count: Arc::new(watch::channel(0).0),
        };
        let app = Router::new().fallback(record).with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("webhook receiver stopped: {e}");
            }
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:<port>/hook` (any path is accepted).
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues one immediate answer per status, after those already queued: with `[503, 503]`
    /// the next two requests get 503, the ones after 200.
    pub fn respond_with(&self, statuses: &[u16]) {
        self.script(statuses.iter().map(|&s| Reply::status(s)));
    }

    /// Queues answers, after those already queued.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.lock().script.extend(replies);
    }

    /// Queues a `200` held for `hold`: the next request without a scripted answer hangs that
    /// long (its connection open), so a test can kill the worker mid-delivery.
    pub fn hold_next(&self, hold: Duration) {
        self.script([Reply::status(200).held_for(hold)]);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.shared.lock().requests.clone()
    }

    /// How many requests have arrived.
    pub fn count(&self) -> usize {
        *self.shared.count.borrow()
    }

    /// Waits until at least `n` requests have arrived and returns all of them.
    ///
    /// # Panics
    /// After `timeout`, listing what did arrive.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedRequest> {
        let mut rx = self.shared.count.subscribe();
        let arrived = tokio::time::timeout(timeout, rx.wait_for(|&count| count >= n)).await;
        if !matches!(arrived, Ok(Ok(_))) {
            panic!(
                "expected {n} webhook requests within {timeout:?}, got {}:\n{}",
                self.count(),
                self.summary()
            );
        }
        self.requests()
    }

    /// Waits until a request matching `pred` has arrived and returns it.
    ///
    /// # Panics
    /// After `timeout`, listing what did arrive.
    pub async fn wait_for_request(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&ReceivedRequest) -> bool,
    ) -> ReceivedRequest {
        let mut rx = self.shared.count.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(found) = self.requests().into_iter().find(|r| pred(r)) {
                return found;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "the expected webhook request did not arrive within {timeout:?}; got:\n{}",
                    self.summary()
                );
            }
        }
    }

    /// One line per request: arrival offset, status answered, run, step, attempt, webhook-id.
    pub fn summary(&self) -> String {
        let requests = self.requests();
        let Some(first) = requests.first().map(|r| r.received_at) else {
            return "  (none)".to_owned();
        };
        let mut out = String::new();
        for r in &requests {
            let _ = writeln!(
                out,
                "  +{:>6}ms {} {} run={} step={} attempt={} webhook-id={}",
                r.received_at.duration_since(first).as_millis(),
                r.status,
                r.path,
                r.run_id(),
                r.step(),
                r.attempt(),
                r.webhook_id(),
            );
        }
        out
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut inner = shared.lock();
        let reply = inner
            .script
            .pop_front()
            .unwrap_or_else(|| Reply::status(200));
        inner.requests.push(ReceivedRequest {
            method: method.to_string(),
            path: uri.to_string(),
            headers,
            json: serde_json::from_slice(&body).ok(),
            body: body.to_vec(),
            received_at: Instant::now(),
            received_at_wall: SystemTime::now(),
            status: reply.status,
        });
        reply
    };
    shared.count.send_modify(|count| *count += 1);
    if !reply.hold.is_zero() {
        tokio::time::sleep(reply.hold).await;
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, format!("scripted {}", reply.status)).into_response();
    if let Some(secs) = reply.retry_after_secs {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(url: &str, body: &str) -> (u16, Option<String>) {
        // A tiny HTTP/1.1 client over a TcpStream keeps reqwest out of the harness.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .expect("host");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "POST /hook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             webhook-id: msg_1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response[9..12].parse().expect("status");
        let retry_after = response
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .map(str::to_owned);
        (status, retry_after)
    }

    #[tokio::test]
    async fn records_and_answers_from_the_script() {
        let receiver = WebhookReceiver::start().await;
        receiver.respond_with(&[503]);
        receiver.script([Reply::status(429).retry_after(7)]);
        assert_eq!(post(&receiver.url(), r#"{"step":"a"}"#).await, (503, None));
        assert_eq!(
            post(&receiver.url(), r#"{"step":"b"}"#).await,
            (429, Some("7".to_owned()))
        );
        assert_eq!(post(&receiver.url(), "not json").await, (200, None));
        let requests = receiver.wait_for(3, Duration::from_secs(5)).await;
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0].step(), "a");
        assert_eq!(requests[0].status, 503);
        assert_eq!(requests[0].webhook_id(), "msg_1");
        assert_eq!(requests[0].header("content-type"), Some("application/json"));
        assert_eq!(requests[1].status, 429);
        assert_eq!(requests[2].json, None);
        assert_eq!(requests[2].body, b"not json");
        assert_eq!(requests[2].method, "POST");
        assert_eq!(requests[2].path, "/hook");
    }

    #[tokio::test]
    async fn holds_the_next_request() {
        let receiver = WebhookReceiver::start().await;
        receiver.hold_next(Duration::from_millis(400));
        let started = Instant::now();
        assert_eq!(post(&receiver.url(), "{}").await, (200, None));
        assert!(started.elapsed() >= Duration::from_millis(400));
        let found = receiver
            .wait_for_request(Duration::from_secs(1), |r| r.body == b"{}")
            .await;
        assert_eq!(found.status, 200);
    }
}
