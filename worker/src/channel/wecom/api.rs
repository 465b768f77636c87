//! Calls to the WeCom server API: the shared access token, and every answer's `errcode`
//! classified into retry, slow down, or fail.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::Config;
use crate::channel::{Error, send_traced, transport_error};

/// `access_token` was refused: fetch a new one and try once more.
pub(crate) const TOKEN_ERRCODES: [i64; 3] = [40014, 42001, 40001];
/// "接口调用超过限制" and "接口并发调用超过限制": slow down (45035 is not a documented
/// global code, so it is not here).
pub(crate) const RATE_LIMIT_ERRCODES: [i64; 2] = [45009, 45033];
/// Worth another attempt: -1 system busy, 6000 data version conflict, 41063 the send
/// task is still being dispatched.
pub(crate) const BUSY_ERRCODES: [i64; 3] = [-1, 6000, 41063];
/// The contact or member does not exist or cannot be reached: 40003 invalid UserID,
/// 40096 invalid external userid, 41056 wrong external id type, 60111 UserID not found,
/// 84061 no external-contact relationship.
pub(crate) const INVALID_USER_ERRCODES: [i64; 5] = [40003, 40096, 41056, 60111, 84061];
/// The welcome code was refused: 41049 missing, 41050 invalid (unknown, used, or older
/// than 20 s), 41051 the customer and the member already started chatting.
pub(crate) const WELCOME_CODE_ERRCODES: [i64; 3] = [41049, 41050, 41051];

/// A token is refreshed this long before WeCom says it expires (a fifth of its life for
/// short-lived tokens).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Longest part of WeCom's `errmsg` kept in a step's detail.
const ERRMSG_CHARS: usize = 120;

/// The HTTP side of one WeCom channel: one connection pool and one cached access token,
/// shared by all its deliveries.
pub(crate) struct Api {
    http: reqwest::Client,
    base_url: reqwest::Url,
    corp_id: String,
    secret: SecretString,
    timeout: Duration,
    rate_limit_retry_after: Duration,
    /// Held while a token is fetched, so only one refresh is ever in flight.
    token: Mutex<Option<CachedToken>>,
    refreshes: AtomicU64,
}

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

// Hand-written: neither the secret nor the token is printed.
impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base_url", &self.base_url.as_str())
            .field("corp_id", &self.corp_id)
            .finish_non_exhaustive()
    }
}

/// Checked right before a request goes out (e.g. a step's deadline).
pub(crate) type Guard<'a> = &'a (dyn Fn() -> Result<(), Error> + Send + Sync);

/// A guard that never stops a request.
pub(crate) fn no_guard() -> Result<(), Error> {
    Ok(())
}

impl Api {
    pub(crate) fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("touchpoint-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url: config.base_url.clone(),
            corp_id: config.corp_id.clone(),
            secret: config.secret.clone(),
            timeout: config.timeout,
            rate_limit_retry_after: config.rate_limit_retry_after,
            token: Mutex::new(None),
            refreshes: AtomicU64::new(0),
        })
    }

    /// How many times a token was fetched.
    pub(crate) fn token_fetches(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// The cached token, or a new one. Callers that find no valid token wait for the one
    /// refresh in flight instead of starting their own.
    async fn token(&self) -> Result<String, Error> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok(token.value.clone());
        }
        let fetched = self.fetch_token().await?;
        let value = fetched.value.clone();
        *cached = Some(fetched);
        Ok(value)
    }

    /// Forgets `stale` (unless another delivery already replaced it).
    async fn invalidate(&self, stale: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|token| token.value == stale) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<CachedToken, Error> {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let mut url = self.url("/cgi-bin/gettoken");
        url.query_pairs_mut()
            .append_pair("corpid", &self.corp_id)
            .append_pair("corpsecret", self.secret.expose_secret());
        let answer = self
            .send(self.http.get(url))
            .await
            .map_err(|error| prefix("gettoken", error))?;
        match errcode(&answer) {
            0 => {}
            code => return Err(prefix("gettoken", self.classify(code, &answer))),
        }
        let value = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| Error::retryable("gettoken: no access_token in the answer"))?;
        let lifetime = Duration::from_secs(
            answer
                .get("expires_in")
                .and_then(Value::as_u64)
                .unwrap_or(7200),
        );
        let margin = REFRESH_MARGIN.min(lifetime / 5);
        Ok(CachedToken {
            value: value.to_owned(),
            refresh_at: Instant::now() + lifetime.saturating_sub(margin),
        })
    }

    /// POSTs `body` to `path` with the access token and answers the JSON of a successful
    /// call (errcode 0). A refused token is refreshed and the call made once more.
    /// `guard` runs right before each request goes out, after any token refresh.
    pub(crate) async fn post(
        &self,
        path: &str,
        body: &Value,
        guard: Guard<'_>,
    ) -> Result<Value, Error> {
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            guard()?;
            let mut url = self.url(path);
            url.query_pairs_mut().append_pair("access_token", &token);
            let answer = self.send(self.http.post(url).json(body)).await?;
            match errcode(&answer) {
                0 => return Ok(answer),
                code if TOKEN_ERRCODES.contains(&code) && !refreshed => {
                    tracing::info!(errcode = code, "wecom access token refused; refreshing it");
                    self.invalidate(&token).await;
                    refreshed = true;
                }
                code => return Err(self.classify(code, &answer)),
            }
        }
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{path}"));
        url
    }

    /// Sends and reads a JSON answer: 5xx and transport errors are retryable, 429 slows
    /// down, any other non-2xx fails.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, Error> {
        let response = send_traced(&self.http, request, "")
            .await
            .map_err(|error| transport_error(error, self.timeout))?;
        let status = response.status();
        if status.as_u16() == 429 {
            return Err(Error::rate_limited(
                "HTTP 429",
                Some(self.rate_limit_retry_after),
            ));
        }
        if status.is_server_error() {
            return Err(Error::retryable(format!("HTTP {}", status.as_u16())));
        }
        if !status.is_success() {
            return Err(Error::permanent(format!("HTTP {}", status.as_u16())));
        }
        response
            .json::<Value>()
            .await
            .map_err(|error| transport_error(error, self.timeout))
    }

    /// An errcode (not 0) as an [`Error`]; see [`classify`].
    pub(crate) fn classify(&self, code: i64, answer: &Value) -> Error {
        let errmsg = answer.get("errmsg").and_then(Value::as_str).unwrap_or("");
        classify(code, errmsg, self.rate_limit_retry_after)
    }
}

/// The `errcode` of an answer (0 when it has none, as some successful answers do).
pub(crate) fn errcode(answer: &Value) -> i64 {
    answer.get("errcode").and_then(Value::as_i64).unwrap_or(0)
}

/// What an errcode means for the step: rate limits slow the channel down, the busy set
/// is retried, everything else fails the step with `errcode N: errmsg` (refused tokens
/// are retried once by [`Api::post`] before they get here).
pub(crate) fn classify(code: i64, errmsg: &str, rate_limit_retry_after: Duration) -> Error {
    let detail = format!("errcode {code}: {}", short_errmsg(errmsg));
    if RATE_LIMIT_ERRCODES.contains(&code) {
        Error::rate_limited(detail, Some(rate_limit_retry_after))
    } else if BUSY_ERRCODES.contains(&code) {
        Error::retryable(detail)
    } else if INVALID_USER_ERRCODES.contains(&code) {
        Error::permanent(format!("{detail} (contact or member not reachable)"))
    } else if WELCOME_CODE_ERRCODES.contains(&code) {
        Error::permanent(format!("{detail} (welcome code refused)"))
    } else {
        Error::permanent(detail)
    }
}

/// WeCom's message up to its `, hint:` (a request id) and at most [`ERRMSG_CHARS`]
/// characters, on one line.
fn short_errmsg(errmsg: &str) -> String {
    let head = errmsg.split(", hint:").next().unwrap_or(errmsg);
    head.chars()
        .take(ERRMSG_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

fn prefix(what: &str, error: Error) -> Error {
    match error {
        Error::Retryable {
            detail,
            retry_after,
            rate_limited,
        } => Error::Retryable {
            detail: format!("{what}: {detail}"),
            retry_after,
            rate_limited,
        },
        Error::Permanent { detail } => Error::permanent(format!("{what}: {detail}")),
        Error::Skipped { detail } => Error::skipped(format!("{what}: {detail}")),
    }
}
