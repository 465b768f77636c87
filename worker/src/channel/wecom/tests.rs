//! The WeCom adapter: crypto against WeCom's published vector, errcode classification,
//! and the adapter against a small real HTTP server on 127.0.0.1.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::adapter::{SendTask, with_link};
use super::api::classify;
use super::callback::{ContactAdded, xml_field};
use super::*;
use crate::channel::tests::delivery;
use crate::channel::{ChannelAdapter, Delivered, Delivery, Error, Progress, Registry};
use crate::config::{ChannelKind, WorkerConfig};

// WeCom's published sample ("加解密方案说明"): the URL verification of corp
// wx5823bf96d3bd56c7 with Token QDG6eK.
const SAMPLE_TOKEN: &str = "QDG6eK";
const SAMPLE_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
const SAMPLE_CORP: &str = "wx5823bf96d3bd56c7";
const SAMPLE_SIGNATURE: &str = "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3";
const SAMPLE_TIMESTAMP: &str = "1409659589";
const SAMPLE_NONCE: &str = "263014780";
const SAMPLE_ECHOSTR: &str =
    "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==";

#[test]
fn the_published_url_verification_sample_checks_and_decrypts() {
    assert_eq!(
        signature(SAMPLE_TOKEN, SAMPLE_TIMESTAMP, SAMPLE_NONCE, SAMPLE_ECHOSTR),
        SAMPLE_SIGNATURE
    );
    let cipher = CallbackCipher::new(SAMPLE_KEY).unwrap();
    let echo = cipher.decrypt(SAMPLE_ECHOSTR, SAMPLE_CORP).unwrap();
    assert_eq!(String::from_utf8(echo).unwrap(), "1616140317555161061");
    assert_eq!(
        cipher.decrypt(SAMPLE_ECHOSTR, "wx-another-corp"),
        Err(CryptoError::WrongReceiver)
    );
}

#[test]
fn signatures_are_checked_in_any_case_and_refuse_a_change() {
    let args = (SAMPLE_TOKEN, SAMPLE_TIMESTAMP, SAMPLE_NONCE, SAMPLE_ECHOSTR);
    assert!(verify_signature(
        args.0,
        args.1,
        args.2,
        args.3,
        &SAMPLE_SIGNATURE.to_uppercase()
    ));
    assert!(!verify_signature(
        args.0,
        "1409659590",
        args.2,
        args.3,
        SAMPLE_SIGNATURE
    ));
    assert!(!verify_signature(args.0, args.1, args.2, args.3, "5c45ff"));
}

#[test]
fn encryption_round_trips_with_padding_to_32_bytes() {
    let cipher = CallbackCipher::new(SAMPLE_KEY).unwrap();
    // Lengths around the 32-byte padding block, including an exact multiple.
    for length in [0usize, 1, 11, 12, 13, 44, 100] {
        let message = "x".repeat(length);
        let encrypted = cipher.encrypt([7; 16], message.as_bytes(), SAMPLE_CORP);
        let raw =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &encrypted).unwrap();
        assert_eq!(raw.len() % 32, 0, "length {length}");
        assert_eq!(
            cipher.decrypt(&encrypted, SAMPLE_CORP).unwrap(),
            message.as_bytes()
        );
    }
    assert_eq!(
        cipher.decrypt("not base64!", SAMPLE_CORP),
        Err(CryptoError::BadCiphertext)
    );
    assert_eq!(
        CallbackCipher::new("short").err(),
        Some(CryptoError::BadKey)
    );
    // A ciphertext from another key decrypts to garbage, refused as malformed or foreign.
    let other = CallbackCipher::new(&"A".repeat(43)).unwrap();
    let foreign = other.encrypt([1; 16], b"<xml/>", SAMPLE_CORP);
    assert!(cipher.decrypt(&foreign, SAMPLE_CORP).is_err());
}

#[test]
fn errcodes_are_classified() {
    let wait = Duration::from_secs(60);
    for code in [45009, 45033] {
        let error = classify(code, "api freq out of limit, hint: [abc]", wait);
        assert!(error.is_rate_limited(), "{code}");
        assert_eq!(error.retry_after(), Some(wait));
        assert_eq!(
            error.detail(),
            format!("errcode {code}: api freq out of limit")
        );
    }
    for code in [-1, 6000, 41063] {
        let error = classify(code, "system busy", wait);
        assert!(error.is_retryable() && !error.is_rate_limited(), "{code}");
    }
    for code in [40003, 40096, 41056, 60111, 84061] {
        let error = classify(code, "invalid user", wait);
        assert!(!error.is_retryable(), "{code}");
        assert!(
            error.detail().contains("not reachable"),
            "{}",
            error.detail()
        );
    }
    for code in [41049, 41050, 41051] {
        let error = classify(code, "invalid welcome_code", wait);
        assert!(!error.is_retryable(), "{code}");
        assert_eq!(
            error.detail(),
            format!("errcode {code}: invalid welcome_code (welcome code refused)")
        );
    }
    let unknown = classify(99999, "something new", wait);
    assert_eq!(unknown, Error::permanent("errcode 99999: something new"));
}

#[test]
fn contact_way_state_fits_30_characters_and_names_the_run() {
    for run_id in [
        "0190a3c4e5f67890abcdef0123456789-0",
        "0190a3c4e5f67890abcdef0123456789-255",
        "ffffffffffffffffffffffffffffffff-65535",
        "00000000000000000000000000000000-7",
        "035880qZShYqCy9k3dp668-53",
        "zzzzzzzzzzzzzzzzzzzzzz-65535",
        "0000000000000000000000-0",
    ] {
        let state = state_for_run(run_id);
        assert!(state.len() <= 30, "{state}");
        assert!(state.chars().all(|c| c.is_ascii_alphanumeric()), "{state}");
        assert_eq!(state_for_run(run_id), state, "stable");
        assert_eq!(run_id_from_state(&state).as_deref(), Some(run_id));
    }
    for other in [
        "a-run-id-of-another-shape-that-is-long",
        "035880qZShYqCy9k3dp668-053",
        "035880qZShYqCy9k3dp668-",
    ] {
        let state = state_for_run(other);
        assert_eq!(state.len(), 30, "{other}");
        assert_eq!(run_id_from_state(&state), None, "{other}");
    }
    assert_eq!(run_id_from_state("n035880qZShYqCy9k3dp668"), None);
    assert_eq!(run_id_from_state("n035880qZShYqCy9k3dp66"), None);
    assert_ne!(
        state_for_run("0190a3c4e5f67890abcdef0123456789-1"),
        state_for_run("0190a3c4e5f67890abcdef0123456789-2")
    );
}

#[test]
fn links_replace_the_placeholder_or_follow_the_message() {
    assert_eq!(
        with_link("扫码加我：{link} 谢谢", "https://q/1"),
        "扫码加我：https://q/1 谢谢"
    );
    assert_eq!(
        with_link("加我好友", "https://q/1"),
        "加我好友\nhttps://q/1"
    );
    assert_eq!(with_link("", "https://q/1"), "https://q/1");
}

#[test]
fn contact_added_callbacks_become_events_with_a_stable_request_id() {
    let xml = "<xml><ToUserName><![CDATA[ww1]]></ToUserName><CreateTime>1403610513</CreateTime>\
        <MsgType><![CDATA[event]]></MsgType><Event><![CDATA[change_external_contact]]></Event>\
        <ChangeType><![CDATA[add_external_contact]]></ChangeType><UserID><![CDATA[zhangsan]]></UserID>\
        <ExternalUserID><![CDATA[woAJ2GCAAAXtWyujaWJHDDGi0mACAAAA]]></ExternalUserID>\
        <State><![CDATA[r0000000000000000000000007]]></State><WelcomeCode><![CDATA[WELCOMECODE]]></WelcomeCode></xml>";
    assert_eq!(xml_field(xml, "UserID").as_deref(), Some("zhangsan"));
    let added = ContactAdded::from_xml(xml).unwrap();
    let event = added.event();
    assert_eq!(event.name, "contact.added");
    assert_eq!(event.contact_id, "woAJ2GCAAAXtWyujaWJHDDGi0mACAAAA");
    assert_eq!(event.attrs["welcome_code"], "WELCOMECODE");
    assert_eq!(event.attrs["user_id"], "zhangsan");
    assert_eq!(event.attrs["state"], "r0000000000000000000000007");
    assert_eq!(event.attrs["run_id"], "00000000000000000000000000000000-7");
    assert_eq!(event.attrs["external_user_id"], event.contact_id);
    assert_eq!(
        ContactAdded::from_xml(xml).unwrap().request_id(),
        event.request_id
    );
    let other = ContactAdded {
        welcome_code: "OTHER".to_owned(),
        ..added
    };
    assert_ne!(other.request_id(), event.request_id);
    let deleted = xml.replace("add_external_contact", "del_external_contact");
    assert_eq!(ContactAdded::from_xml(&deleted), None);
    let half = xml.replace("add_external_contact", "add_half_external_contact");
    assert!(ContactAdded::from_xml(&half).is_some());
}

#[test]
fn worker_toml_wecom_channels_are_checked_field_by_field() {
    let env = |name: &str| {
        HashMap::from([
            ("WECOM_SECRET", "s3cret"),
            ("WECOM_TOKEN", SAMPLE_TOKEN),
            ("WECOM_AES_KEY", SAMPLE_KEY),
        ])
        .get(name)
        .map(|v| (*v).to_owned())
    };
    let full = r#"
[[channel]]
name = "crm"
kind = "log"

[[channel]]
name = "wecom"
kind = "wecom"
corp_id = "ww1"
secret_env = "WECOM_SECRET"
base_url = "http://127.0.0.1:9/"
timeout = "3s"
confirm_poll = "200ms"
confirm_timeout = "5s"
sender = "zhangsan"
fallback_channel = "crm"
callback_listen = "127.0.0.1:8090"
token_env = "WECOM_TOKEN"
encoding_aes_key_env = "WECOM_AES_KEY"
"#;
    let config = WorkerConfig::from_toml(full, env).unwrap();
    let ChannelKind::Wecom(wecom) = &config.channels[1].kind else {
        panic!("not wecom: {:?}", config.channels[1].kind);
    };
    assert_eq!(wecom.corp_id, "ww1");
    assert_eq!(wecom.confirm_poll, Duration::from_millis(200));
    assert_eq!(wecom.sender.as_deref(), Some("zhangsan"));
    let callback = wecom.callback.as_ref().unwrap();
    assert_eq!(callback.path, Config::DEFAULT_CALLBACK_PATH);
    assert!(!format!("{config:?}").contains("s3cret"));

    let error = |text: String| WorkerConfig::from_toml(&text, env).unwrap_err().to_string();
    assert_eq!(
        error(full.replace("corp_id = \"ww1\"\n", "")),
        "channel[1].corp_id: required for kind \"wecom\""
    );
    assert_eq!(
        error(full.replace("WECOM_SECRET\"", "NOT_SET\"")),
        "channel[1].secret_env: environment variable \"NOT_SET\" is not set"
    );
    assert_eq!(
        error(full.replace("\"127.0.0.1:8090\"", "\"port 8090\"")),
        "channel[1].callback_listen: expected an address such as \"127.0.0.1:8090\", got \"port 8090\""
    );
    assert_eq!(
        error(full.replace("encoding_aes_key_env = \"WECOM_AES_KEY\"\n", "")),
        "channel[1].encoding_aes_key_env: required with callback_listen (the environment variable holding the EncodingAESKey)"
    );
    assert_eq!(
        error(full.replace("WECOM_AES_KEY\"", "WECOM_TOKEN\"")),
        "channel[1].encoding_aes_key_env: environment variable \"WECOM_TOKEN\" is not an EncodingAESKey (expected 43 characters of base64)"
    );
    assert_eq!(
        error(full.replace("confirm_timeout = \"5s\"", "confirm_timeout = \"100ms\"")),
        "channel[1].confirm_timeout: expected at least confirm_poll"
    );
    // The fallback must be another channel of the worker.
    let config = WorkerConfig::from_toml(
        &full.replace("fallback_channel = \"crm\"", "fallback_channel = \"sms\""),
        env,
    )
    .unwrap();
    let built = Registry::from_config(&config.channels)
        .unwrap_err()
        .to_string();
    assert!(built.contains("fallback_channel \"sms\""), "{built}");
}

// ---------------------------------------------------------------------------------------
// A small WeCom API on 127.0.0.1: tokens counted, answers scripted per endpoint.

#[derive(Clone, Default)]
struct Server {
    tokens_issued: Arc<AtomicU32>,
    /// Scripted answers by endpoint path (after `/cgi-bin/`); the default is errcode 0.
    scripts: Arc<Mutex<HashMap<String, VecDeque<Value>>>>,
    /// Every API call: (path, body), gettoken excluded.
    calls: Arc<Mutex<Vec<(String, Value)>>>,
    token_delay: Duration,
}

impl Server {
    async fn start(token_delay: Duration) -> (Self, String) {
        let server = Self {
            token_delay,
            ..Self::default()
        };
        let app = Router::new()
            .route("/cgi-bin/gettoken", get(gettoken))
            .route("/cgi-bin/{*path}", post(api))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (server, url)
    }

    fn script(&self, path: &str, answers: Vec<Value>) {
        self.scripts
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default()
            .extend(answers);
    }

    fn calls(&self, path: &str) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, body)| body.clone())
            .collect()
    }
}

async fn gettoken(
    State(server): State<Server>,
    Query(query): Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    tokio::time::sleep(server.token_delay).await;
    if query.get("corpsecret").map(String::as_str) != Some("s3cret") {
        return axum::Json(json!({ "errcode": 40001, "errmsg": "invalid credential" }));
    }
    let n = server.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
    axum::Json(
        json!({ "errcode": 0, "errmsg": "ok", "access_token": format!("token-{n}"), "expires_in": 7200 }),
    )
}

async fn api(
    State(server): State<Server>,
    Path(path): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    let token = query.get("access_token").cloned().unwrap_or_default();
    let current = format!("token-{}", server.tokens_issued.load(Ordering::SeqCst));
    if token != current {
        return axum::Json(json!({ "errcode": 42001, "errmsg": "access_token expired" }));
    }
    server.calls.lock().unwrap().push((path.clone(), body));
    let scripted = server
        .scripts
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(VecDeque::pop_front);
    axum::Json(scripted.unwrap_or_else(|| json!({ "errcode": 0, "errmsg": "ok" })))
}

fn config(base_url: &str) -> Config {
    Config {
        corp_id: "ww1".to_owned(),
        secret: "s3cret".to_owned().into(),
        base_url: base_url.parse().unwrap(),
        timeout: Duration::from_secs(5),
        confirm_poll: Duration::from_millis(20),
        confirm_timeout: Duration::from_secs(5),
        rate_limit_retry_after: Duration::from_secs(2),
        sender: Some("zhangsan".to_owned()),
        fallback_channel: None,
        callback: None,
    }
}

fn wecom_delivery(action: &str, params: Value) -> Delivery {
    Delivery {
        action: action.to_owned(),
        channel: "wecom".to_owned(),
        params,
        ..delivery()
    }
}

#[tokio::test]
async fn concurrent_deliveries_share_one_token_refresh() {
    let (server, url) = Server::start(Duration::from_millis(200)).await;
    let adapter = Arc::new(WecomAdapter::new("wecom", config(&url)).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let adapter = Arc::clone(&adapter);
        tasks.push(tokio::spawn(async move {
            adapter
                .deliver(&wecom_delivery("tag", json!({ "add_tag": "et-vip" })))
                .await
        }));
    }
    for task in tasks {
        assert_eq!(
            task.await.unwrap().unwrap().detail,
            "tags marked: 1 added, 0 removed"
        );
    }
    assert_eq!(server.tokens_issued.load(Ordering::SeqCst), 1);
    assert_eq!(adapter.token_fetches(), 1);
    let marks = server.calls("externalcontact/mark_tag");
    assert_eq!(marks.len(), 8);
    assert_eq!(
        marks[0],
        json!({ "userid": "zhangsan", "external_userid": "wmXXXX", "add_tag": ["et-vip"], "remove_tag": [] })
    );

    // The server forgets the token (a new one was issued elsewhere): one refresh, one retry.
    server.tokens_issued.fetch_add(1, Ordering::SeqCst);
    adapter
        .deliver(&wecom_delivery("tag", json!({ "remove_tag": ["et-old"] })))
        .await
        .unwrap();
    assert_eq!(adapter.token_fetches(), 2);
}

#[tokio::test]
async fn a_wrong_secret_fails_without_echoing_it() {
    let (_server, url) = Server::start(Duration::ZERO).await;
    let mut config = config(&url);
    config.secret = "wrong-secret".to_owned().into();
    let adapter = WecomAdapter::new("wecom", config).unwrap();
    let error = adapter
        .deliver(&wecom_delivery("tag", json!({ "add_tag": "x" })))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        Error::permanent("gettoken: errcode 40001: invalid credential")
    );
}

#[tokio::test]
async fn a_welcome_past_its_deadline_is_skipped_and_never_sent() {
    let (server, url) = Server::start(Duration::from_millis(300)).await;
    let adapter = WecomAdapter::new("wecom", config(&url)).unwrap();
    // Not past the deadline when the delivery starts, but past it once the token is in.
    let mut welcome = wecom_delivery("send_welcome", json!({ "welcome_code": "CODE-1" }));
    welcome.step_deadline = Some(SystemTime::now() + Duration::from_millis(100));
    assert!(!welcome.past_step_deadline());
    let error = adapter.deliver(&welcome).await.unwrap_err();
    assert!(matches!(error, Error::Skipped { .. }), "{error:?}");
    assert_eq!(server.tokens_issued.load(Ordering::SeqCst), 1);
    assert!(server.calls("externalcontact/send_welcome_msg").is_empty());

    // In time, the welcome goes out with the code and the rendered message.
    welcome.step_deadline = Some(SystemTime::now() + Duration::from_secs(20));
    let delivered = adapter.deliver(&welcome).await.unwrap();
    assert_eq!(delivered, Delivered::new("welcome message sent"));
    assert_eq!(
        server.calls("externalcontact/send_welcome_msg"),
        [
            json!({ "welcome_code": "CODE-1", "text": { "content": "王芳，欢迎！新人券 WELCOME10 已到账" } })
        ]
    );
}

#[tokio::test]
async fn an_unrendered_welcome_code_falls_back_to_the_code_the_callback_received() {
    let (server, url) = Server::start(Duration::ZERO).await;
    let adapter = WecomAdapter::new("wecom", config(&url)).unwrap();
    let welcome = wecom_delivery(
        "send_welcome",
        json!({ "welcome_code": "{{ event.attrs.welcome_code }}" }),
    );
    let error = adapter.deliver(&welcome).await.unwrap_err();
    assert!(error.detail().starts_with("no welcome_code"), "{error:?}");
    adapter.welcome_codes.insert("wmXXXX", "FROM-CALLBACK");
    adapter.deliver(&welcome).await.unwrap();
    assert_eq!(
        server.calls("externalcontact/send_welcome_msg")[0]["welcome_code"],
        "FROM-CALLBACK"
    );
}

#[tokio::test]
async fn send_message_waits_for_the_member_and_resumes_without_a_second_task() {
    let (server, url) = Server::start(Duration::ZERO).await;
    let adapter = WecomAdapter::new("wecom", config(&url)).unwrap();
    server.script(
        "externalcontact/add_msg_template",
        vec![json!({ "errcode": 0, "errmsg": "ok", "fail_list": [], "msgid": "msg-1" })],
    );
    let unsent = json!({ "errcode": 0, "errmsg": "ok", "detail_list": [
        { "external_userid": "wmXXXX", "userid": "zhangsan", "status": 0 } ] });
    let sent = json!({ "errcode": 0, "errmsg": "ok", "detail_list": [
        { "external_userid": "wmXXXX", "userid": "zhangsan", "status": 1, "send_time": 1 } ] });
    server.script(
        "externalcontact/get_groupmsg_send_result",
        vec![
            unsent.clone(),
            json!({ "errcode": 41063, "errmsg": "dispatching" }),
            sent.clone(),
        ],
    );
    let reports = Arc::new(Mutex::new(Vec::new()));
    let mut message = wecom_delivery("send_message", json!({}));
    let sink = Arc::clone(&reports);
    message.progress = Progress::new(move |detail, state| {
        sink.lock()
            .unwrap()
            .push((detail.to_owned(), state.to_owned()));
    });
    let delivered = adapter.deliver(&message).await.unwrap();
    assert_eq!(delivered.detail, "sent by the member (msgid msg-1)");
    let created = server.calls("externalcontact/add_msg_template");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["chat_type"], "single");
    assert_eq!(created[0]["external_userid"], json!(["wmXXXX"]));
    assert_eq!(created[0]["sender"], "zhangsan");
    assert_eq!(
        created[0]["text"]["content"],
        "王芳，欢迎！新人券 WELCOME10 已到账"
    );
    assert_eq!(
        server
            .calls("externalcontact/get_groupmsg_send_result")
            .len(),
        3
    );
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].0, "awaiting_confirmation");
    let saved: SendTask = serde_json::from_str(&reports[0].1).unwrap();
    assert_eq!(
        (saved.msgid.as_str(), saved.sender.as_str()),
        ("msg-1", "zhangsan")
    );

    // A later attempt with the saved state polls the same task: no second send task.
    server.script(
        "externalcontact/get_groupmsg_send_result",
        vec![unsent, sent],
    );
    let mut again = wecom_delivery("send_message", json!({}));
    again.attempt = 2;
    again.resume_state = reports[0].1.clone();
    adapter.deliver(&again).await.unwrap();
    assert_eq!(server.calls("externalcontact/add_msg_template").len(), 1);
}

#[tokio::test]
async fn a_task_the_member_never_sends_fails_at_the_confirm_timeout() {
    let (server, url) = Server::start(Duration::ZERO).await;
    let mut config = config(&url);
    config.confirm_timeout = Duration::from_millis(300);
    let adapter = WecomAdapter::new("wecom", config).unwrap();
    server.script(
        "externalcontact/add_msg_template",
        vec![json!({ "errcode": 0, "msgid": "msg-9" })],
    );
    let started = std::time::Instant::now();
    let error = adapter
        .deliver(&wecom_delivery("send_message", json!({})))
        .await
        .unwrap_err();
    assert!(!error.is_retryable());
    assert!(
        error.detail().starts_with("not confirmed within 300ms"),
        "{error:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Refused by WeCom: status 2 fails at once.
    server.script(
        "externalcontact/add_msg_template",
        vec![json!({ "errcode": 0, "msgid": "msg-10" })],
    );
    server.script(
        "externalcontact/get_groupmsg_send_result",
        vec![
            json!({ "errcode": 0, "detail_list": [{ "external_userid": "wmXXXX", "status": 2 }] }),
        ],
    );
    let error = adapter
        .deliver(&wecom_delivery("send_message", json!({})))
        .await
        .unwrap_err();
    assert!(error.detail().contains("status 2"), "{error:?}");
}

#[tokio::test]
async fn rate_limits_and_used_codes_are_told_apart() {
    let (server, url) = Server::start(Duration::ZERO).await;
    let adapter = WecomAdapter::new("wecom", config(&url)).unwrap();
    server.script(
        "externalcontact/send_welcome_msg",
        vec![
            json!({ "errcode": 45009, "errmsg": "api freq out of limit" }),
            json!({ "errcode": 41050, "errmsg": "invalid welcome_code" }),
        ],
    );
    let welcome = wecom_delivery("send_welcome", json!({ "welcome_code": "CODE-2" }));
    let limited = adapter.deliver(&welcome).await.unwrap_err();
    assert!(limited.is_rate_limited());
    assert_eq!(limited.retry_after(), Some(Duration::from_secs(2)));
    let used = adapter.deliver(&welcome).await.unwrap_err();
    assert_eq!(
        used,
        Error::permanent("errcode 41050: invalid welcome_code (welcome code refused)")
    );
    for detail in [limited.detail(), used.detail()] {
        assert!(
            !detail.contains("CODE-2") && !detail.contains("token"),
            "{detail}"
        );
    }
}

#[tokio::test]
async fn invite_to_group_creates_the_join_way_once_per_chat() {
    let (server, url) = Server::start(Duration::ZERO).await;
    let adapter = WecomAdapter::new("wecom", config(&url)).unwrap();
    server.script(
        "externalcontact/groupchat/add_join_way",
        vec![json!({ "errcode": 0, "config_id": "cfg-1" })],
    );
    server.script(
        "externalcontact/groupchat/get_join_way",
        vec![json!({ "errcode": 0, "join_way": { "config_id": "cfg-1", "qr_code": "https://qr/group-1" } })],
    );
    let sent =
        json!({ "errcode": 0, "detail_list": [{ "external_userid": "wmXXXX", "status": 1 }] });
    server.script(
        "externalcontact/add_msg_template",
        vec![
            json!({ "errcode": 0, "msgid": "m-1" }),
            json!({ "errcode": 0, "msgid": "m-2" }),
        ],
    );
    server.script(
        "externalcontact/get_groupmsg_send_result",
        vec![sent.clone(), sent],
    );
    let invite = wecom_delivery("invite_to_group", json!({ "chat_id": "wrOgAAA" }));
    adapter.deliver(&invite).await.unwrap();
    adapter.deliver(&invite).await.unwrap();
    let ways = server.calls("externalcontact/groupchat/add_join_way");
    assert_eq!(
        ways,
        [json!({ "scene": 2, "chat_id_list": ["wrOgAAA"], "auto_create_room": 0 })]
    );
    let tasks = server.calls("externalcontact/add_msg_template");
    assert_eq!(tasks.len(), 2);
    assert_eq!(
        tasks[0]["attachments"][0]["link"]["url"],
        "https://qr/group-1"
    );
}

#[tokio::test]
async fn add_contact_sends_the_contact_way_link_on_the_fallback_channel() {
    let (server, url) = Server::start(Duration::ZERO).await;
    let adapter = WecomAdapter::new("wecom", config(&url)).unwrap();
    server.script(
        "externalcontact/add_contact_way",
        vec![json!({ "errcode": 0, "config_id": "way-1", "qr_code": "https://qr/way-1" })],
    );
    // A webhook channel to a real receiver records what the fallback delivered.
    let received = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sink = Arc::clone(&received);
    let app = Router::new().route(
        "/hook",
        post(move |axum::Json(body): axum::Json<Value>| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let webhook = crate::channel::webhook::WebhookAdapter::new(crate::channel::webhook::Config {
        url: hook.parse().unwrap(),
        secret: None,
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let mut others = Registry::default();
    others.insert("sms", Arc::new(webhook));
    adapter.bind_fallbacks(others).unwrap();

    let mut step = wecom_delivery("add_contact", json!({ "fallback_channel": "sms" }));
    step.run_id = "0190a3c4e5f67890abcdef0123456789-12".to_owned();
    step.message = "加企业微信领券：{link}".to_owned();
    let delivered = adapter.deliver(&step).await.unwrap();
    assert_eq!(
        delivered.detail,
        "contact way created; link sent via sms: HTTP 200"
    );
    let ways = server.calls("externalcontact/add_contact_way");
    assert_eq!(ways.len(), 1);
    let state = ways[0]["state"].as_str().unwrap();
    assert_eq!(
        run_id_from_state(state).as_deref(),
        Some(step.run_id.as_str())
    );
    assert_eq!(
        (ways[0]["type"].clone(), ways[0]["scene"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(ways[0]["user"], json!(["zhangsan"]));
    let bodies = received.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["message"], "加企业微信领券：https://qr/way-1");
    assert_eq!(bodies[0]["run_id"], step.run_id);

    // An unknown fallback fails the step.
    let error = adapter
        .deliver(&wecom_delivery(
            "add_contact",
            json!({ "fallback_channel": "fax" }),
        ))
        .await
        .unwrap_err();
    assert!(error.detail().contains("\"fax\""), "{error:?}");
}

#[tokio::test]
async fn unknown_actions_and_missing_identities_fail_the_step() {
    let (_server, url) = Server::start(Duration::ZERO).await;
    let adapter = WecomAdapter::new("wecom", config(&url)).unwrap();
    let error = adapter
        .deliver(&wecom_delivery("fax", json!({})))
        .await
        .unwrap_err();
    assert!(error.detail().starts_with("unsupported action \"fax\""));
    let mut stranger = wecom_delivery("send_message", json!({}));
    stranger.contact.identities.clear();
    let error = adapter.deliver(&stranger).await.unwrap_err();
    assert_eq!(
        error,
        Error::permanent("the contact has no wecom identity (external userid)")
    );
}
