//! A local SMS provider for tests, one axum server with two faces:
//!
//! - `GET /` speaks Aliyun SMS `SendSms` (RPC style, version 2017-05-25). It **verifies**
//!   each request's signature with its own implementation of Aliyun's documented scheme
//!   (written from the documentation, independently of the worker): a wrong
//!   `AccessKeySecret` gets `SignatureDoesNotMatch` (HTTP 400), an unknown `AccessKeyId`
//!   gets `InvalidAccessKeyId.NotFound`, a missing parameter `MissingParameter`. Signed
//!   requests get the next scripted business code (`OK` when none is queued).
//! - `POST /generic` is a generic SMS gateway: it records the body's fields (JSON or form)
//!   and headers and answers the next scripted HTTP status (200 when none is queued).
//!
//! It runs on the runtime of the task that started it and stops when dropped.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha1::Sha1;
use tokio::task::JoinHandle;

/// One `SendSms` request as the server saw it.
#[derive(Debug, Clone)]
pub struct AliyunRequest {
    /// Every query parameter, decoded (`Signature` included).
    pub params: BTreeMap<String, String>,
    /// The `Code` answered.
    pub code: String,
}

impl AliyunRequest {
    /// A parameter, or `""`.
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).map_or("", String::as_str)
    }
}

/// One POST to the generic gateway.
#[derive(Debug, Clone)]
pub struct GenericRequest {
    /// Its `content-type`.
    pub content_type: String,
    /// Its `authorization` header, or `""`.
    pub authorization: String,
    /// Its `idempotency-key` header, or `""`.
    pub idempotency_key: String,
    /// The body's fields.
    pub fields: BTreeMap<String, String>,
    /// The status answered.
    pub status: u16,
}

#[derive(Debug, Default)]
struct Inner {
    access_key_id: String,
    access_key_secret: String,
    codes: VecDeque<String>,
    statuses: VecDeque<u16>,
    aliyun: Vec<AliyunRequest>,
    generic: Vec<GenericRequest>,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The server; see the module documentation.
#[derive(Debug)]
pub struct SmsServer {
    addr: SocketAddr,
    shared: Shared,
    server: JoinHandle<()>,
}

impl Drop for SmsServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl SmsServer {
    /// Starts a server that accepts Aliyun requests signed by `access_key_id` with
    /// `access_key_secret`.
    pub async fn start(access_key_id: &str, access_key_secret: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the sms server");
        let addr = listener.local_addr().expect("sms server address");
        let shared: Shared = Arc::new(Mutex::new(Inner {
            access_key_id: access_key_id.to_owned(),
            access_key_secret: access_key_secret.to_owned(),
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/", get(aliyun))
            .route("/generic", post(generic))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("sms server stopped: {e}");
            }
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:<port>/`, for an Aliyun channel's `url`.
    pub fn aliyun_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// `http://127.0.0.1:<port>/generic`, for a generic channel's `url`.
    pub fn generic_url(&self) -> String {
        format!("http://{}/generic", self.addr)
    }

    /// Queues business codes for the next correctly signed `SendSms` requests.
    pub fn script_codes(&self, codes: &[&str]) {
        lock(&self.shared)
            .codes
            .extend(codes.iter().map(|&c| c.to_owned()));
    }

    /// Queues HTTP statuses for the next generic POSTs.
    pub fn script_statuses(&self, statuses: &[u16]) {
        lock(&self.shared).statuses.extend(statuses);
    }

    /// Every `SendSms` request so far.
    pub fn aliyun_requests(&self) -> Vec<AliyunRequest> {
        lock(&self.shared).aliyun.clone()
    }

    /// Every generic POST so far.
    pub fn generic_requests(&self) -> Vec<GenericRequest> {
        lock(&self.shared).generic.clone()
    }
}

/// RFC 3986 percent-encoding as Aliyun documents it: unreserved characters as they are,
/// every other UTF-8 byte as `%XX` (upper-case hex).
fn aliyun_encode(text: &str) -> String {
    const UNRESERVED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~";
    let mut out = String::new();
    for &byte in text.as_bytes() {
        if UNRESERVED.contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push_str(&hex::encode_upper([byte]));
        }
    }
    out
}

/// The signature Aliyun would compute for `params` (all but `Signature`) with `secret`.
pub fn aliyun_signature(params: &BTreeMap<String, String>, secret: &str) -> String {
    let mut pairs: Vec<(&String, &String)> = params
        .iter()
        .filter(|(name, _)| name.as_str() != "Signature")
        .collect();
    pairs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let canonical = pairs
        .iter()
        .map(|(name, value)| format!("{}={}", aliyun_encode(name), aliyun_encode(value)))
        .collect::<Vec<_>>()
        .join("&");
    let string_to_sign = ["GET", &aliyun_encode("/"), &aliyun_encode(&canonical)].join("&");
    let mut mac =
        <Hmac<Sha1>>::new_from_slice(format!("{secret}&").as_bytes()).expect("HMAC takes any key");
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn answer(status: StatusCode, code: &str, message: &str) -> (StatusCode, Json<serde_json::Value>) {
    let mut body = serde_json::json!({
        "RequestId": uuid::Uuid::new_v4().to_string().to_uppercase(),
        "Code": code,
        "Message": message,
    });
    if code == "OK" {
        body["BizId"] = serde_json::Value::from(format!(
            "{}^0",
            uuid::Uuid::new_v4().as_u128() % 1_000_000_000_000_000_000
        ));
    }
    (status, Json(body))
}

const REQUIRED: [(&str, Option<&str>); 12] = [
    ("AccessKeyId", None),
    ("Action", Some("SendSms")),
    ("Format", Some("JSON")),
    ("PhoneNumbers", None),
    ("SignName", None),
    ("SignatureMethod", Some("HMAC-SHA1")),
    ("SignatureNonce", None),
    ("SignatureVersion", Some("1.0")),
    ("TemplateCode", None),
    ("Timestamp", None),
    ("Version", Some("2017-05-25")),
    ("Signature", None),
];

async fn aliyun(
    State(shared): State<Shared>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let params: BTreeMap<String, String> = pairs.into_iter().collect();
    let mut inner = lock(&shared);
    let (status, code, message) = 'check: {
        for (name, expected) in REQUIRED {
            match (params.get(name), expected) {
                (None, _) => {
                    break 'check (
                        StatusCode::BAD_REQUEST,
                        "MissingParameter".to_owned(),
                        format!("{name} is mandatory for this action."),
                    );
                }
                (Some(value), Some(expected)) if value != expected => {
                    break 'check (
                        StatusCode::BAD_REQUEST,
                        "isv.INVALID_PARAMETERS".to_owned(),
                        format!("{name} must be {expected}"),
                    );
                }
                _ => {}
            }
        }
        let timestamp = &params["Timestamp"];
        let well_formed = timestamp.len() == 20
            && timestamp.ends_with('Z')
            && timestamp.as_bytes().get(10) == Some(&b'T');
        if !well_formed {
            break 'check (
                StatusCode::BAD_REQUEST,
                "InvalidTimeStamp.Format".to_owned(),
                "Specified time stamp or date value is not well formatted.".to_owned(),
            );
        }
        if params["AccessKeyId"] != inner.access_key_id {
            break 'check (
                StatusCode::NOT_FOUND,
                "InvalidAccessKeyId.NotFound".to_owned(),
                "Specified access key is not found.".to_owned(),
            );
        }
        let expected = aliyun_signature(&params, &inner.access_key_secret);
        if params["Signature"] != expected {
            break 'check (
                StatusCode::BAD_REQUEST,
                "SignatureDoesNotMatch".to_owned(),
                "Specified signature is not matched with our calculation.".to_owned(),
            );
        }
        let code = inner.codes.pop_front().unwrap_or_else(|| "OK".to_owned());
        let message = if code == "OK" { "OK" } else { "scripted" }.to_owned();
        (StatusCode::OK, code, message)
    };
    inner.aliyun.push(AliyunRequest {
        params,
        code: code.clone(),
    });
    answer(status, &code, &message)
}

async fn generic(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let content_type = header("content-type");
    let fields: BTreeMap<String, String> = if content_type.starts_with("application/json") {
        serde_json::from_slice(&body).unwrap_or_default()
    } else {
        serde_urlencoded_pairs(&body)
    };
    let mut inner = lock(&shared);
    let status = inner.statuses.pop_front().unwrap_or(200);
    inner.generic.push(GenericRequest {
        content_type,
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        fields,
        status,
    });
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Decodes `application/x-www-form-urlencoded` (`+` is a space).
fn serde_urlencoded_pairs(body: &[u8]) -> BTreeMap<String, String> {
    let decode = |text: &str| -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => match hex::decode(&bytes[i + 1..i + 3]) {
                    Ok(byte) => {
                        out.extend(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                },
                other => out.push(other),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_the_documented_example() {
        let params: BTreeMap<String, String> = [
            ("AccessKeyId", "testId"),
            ("Action", "SendSms"),
            ("Format", "XML"),
            ("OutId", "123"),
            ("PhoneNumbers", "15300000001"),
            ("RegionId", "cn-hangzhou"),
            ("SignName", "阿里云短信测试专用"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", "SMS_71390007"),
            ("TemplateParam", "{\"customer\":\"test\"}"),
            ("Timestamp", "2017-07-12T02:42:19Z"),
            ("Version", "2017-05-25"),
            ("Signature", "ignored"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            aliyun_signature(&params, "testSecret"),
            "zJDF+Lrzhj/ThnlvIToysFRq6t4="
        );
    }

    #[test]
    fn decodes_forms() {
        let fields = serde_urlencoded_pairs(b"to=%2B86%201&text=a+b&ref=");
        assert_eq!(fields["to"], "+86 1");
        assert_eq!(fields["text"], "a b");
        assert_eq!(fields["ref"], "");
    }
}
