//! A local WeCom API, written from WeCom's public documentation: tokens that expire,
//! errcodes injected per endpoint, welcome codes (unknown or used twice: refused), send
//! tasks the test confirms or refuses, join ways, contact ways and tags. And
//! [`CallbackSender`], which encrypts and signs callbacks with its own implementation of
//! WeCom's scheme (not the worker's) and posts them to a worker's endpoint.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use sha1::{Digest as _, Sha1};
use tokio::task::JoinHandle;

/// `send_welcome_msg`'s errcode for an invalid (unknown, expired or used) welcome code.
pub const INVALID_WELCOME_CODE: i64 = 41050;
/// `get_groupmsg_send_result` statuses.
pub const UNSENT: i64 = 0;
pub const SENT: i64 = 1;
pub const NOT_A_CONTACT: i64 = 2;

/// A welcome message WeCom accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub code: String,
    pub text: String,
}

/// A single-customer send task (`add_msg_template`).
#[derive(Debug, Clone, PartialEq)]
pub struct SendTask {
    pub msgid: String,
    pub sender: String,
    pub external_userid: String,
    pub text: String,
    pub attachments: Value,
    /// [`UNSENT`] until the test confirms ([`SENT`]) or refuses it.
    pub status: i64,
}

/// A contact way (`add_contact_way`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactWay {
    pub config_id: String,
    pub state: String,
    pub users: Vec<String>,
    pub qr_code: String,
}

#[derive(Default)]
struct Data {
    /// Issued tokens and when each stops being accepted.
    tokens: HashMap<String, Instant>,
    tokens_issued: u32,
    token_ttl: Duration,
    /// Errcodes to answer instead, by endpoint (`externalcontact/send_welcome_msg`).
    injected: HashMap<String, VecDeque<i64>>,
    /// Welcome codes WeCom issued, and whether each was used.
    welcome_codes: HashMap<String, bool>,
    welcomes: Vec<Welcome>,
    tasks: Vec<SendTask>,
    join_ways: HashMap<String, Vec<String>>,
    contact_ways: Vec<ContactWay>,
    tags: Vec<Value>,
    /// Every call that carried a token, by endpoint, in order (injected answers included).
    calls: Vec<String>,
}

/// The server; drops with its task.
#[derive(Debug)]
pub struct WecomServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    corp_id: String,
    secret: String,
    data: Mutex<Data>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl Drop for WecomServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WecomServer {
    /// Serves corp `corp_id` whose customer-contact secret is `secret`, on a free port.
    /// Tokens last two hours unless [`WecomServer::set_token_ttl`] says otherwise.
    pub async fn start(corp_id: &str, secret: &str) -> Self {
        let shared = Arc::new(Shared {
            corp_id: corp_id.to_owned(),
            secret: secret.to_owned(),
            data: Mutex::new(Data {
                token_ttl: Duration::from_secs(7200),
                ..Data::default()
            }),
        });
        let app = Router::new()
            .route("/cgi-bin/gettoken", get(gettoken))
            .route("/cgi-bin/{*endpoint}", post(call))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the WeCom server");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:<port>`: a channel's `base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.shared.data.lock().expect("WeCom server state")
    }

    /// How long tokens issued from now on are accepted (`expires_in` still says 7200).
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.data().token_ttl = ttl;
    }

    /// Expires every token issued so far: the next call with one answers 42001.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for expiry in self.data().tokens.values_mut() {
            *expiry = now;
        }
    }

    /// Every access token `gettoken` issued (secrets that must never reach a log).
    pub fn access_tokens(&self) -> Vec<String> {
        self.data().tokens.keys().cloned().collect()
    }

    /// How many tokens `gettoken` issued.
    pub fn tokens_issued(&self) -> u32 {
        self.data().tokens_issued
    }

    /// The next `times` calls of `endpoint` (e.g. `externalcontact/send_welcome_msg`)
    /// answer `errcode` (e.g. 45009) instead.
    pub fn inject(&self, endpoint: &str, errcode: i64, times: usize) {
        self.data()
            .injected
            .entry(endpoint.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(errcode, times));
    }

    /// A new welcome code, as WeCom puts in a contact-added callback.
    pub fn issue_welcome_code(&self) -> String {
        let code = format!("WC{}", uuid::Uuid::new_v4().simple());
        self.data().welcome_codes.insert(code.clone(), false);
        code
    }

    /// Marks `code` used (as if another system sent a welcome with it).
    pub fn use_welcome_code(&self, code: &str) {
        self.data().welcome_codes.insert(code.to_owned(), true);
    }

    /// The welcome messages accepted, in order.
    pub fn welcomes(&self) -> Vec<Welcome> {
        self.data().welcomes.clone()
    }

    /// The send tasks created, in order.
    pub fn tasks(&self) -> Vec<SendTask> {
        self.data().tasks.clone()
    }

    /// The member sent task `msgid` (status 1); false when there is no such task.
    pub fn confirm(&self, msgid: &str) -> bool {
        self.set_status(msgid, SENT)
    }

    /// Task `msgid` cannot be sent (status 2: not a contact).
    pub fn refuse(&self, msgid: &str) -> bool {
        self.set_status(msgid, NOT_A_CONTACT)
    }

    fn set_status(&self, msgid: &str, status: i64) -> bool {
        let mut data = self.data();
        match data.tasks.iter_mut().find(|task| task.msgid == msgid) {
            Some(task) => {
                task.status = status;
                true
            }
            None => false,
        }
    }

    /// The group join ways created: config id → chat ids.
    pub fn join_ways(&self) -> HashMap<String, Vec<String>> {
        self.data().join_ways.clone()
    }

    /// The contact ways created, in order.
    pub fn contact_ways(&self) -> Vec<ContactWay> {
        self.data().contact_ways.clone()
    }

    /// The `mark_tag` bodies, in order.
    pub fn tags(&self) -> Vec<Value> {
        self.data().tags.clone()
    }

    /// How many calls (with a token) reached `endpoint`.
    pub fn calls(&self, endpoint: &str) -> usize {
        self.data().calls.iter().filter(|c| *c == endpoint).count()
    }
}

fn answer(errcode: i64, errmsg: &str) -> axum::Json<Value> {
    axum::Json(json!({ "errcode": errcode, "errmsg": format!("{errmsg}, hint: [test]") }))
}

async fn gettoken(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    if query.get("corpid") != Some(&shared.corp_id) {
        return answer(40013, "invalid corpid");
    }
    if query.get("corpsecret") != Some(&shared.secret) {
        return answer(40001, "invalid credential");
    }
    let mut data = shared.data.lock().expect("WeCom server state");
    data.tokens_issued += 1;
    let token = format!(
        "at-{}-{}",
        data.tokens_issued,
        uuid::Uuid::new_v4().simple()
    );
    let expiry = Instant::now() + data.token_ttl;
    data.tokens.insert(token.clone(), expiry);
    axum::Json(json!({ "errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200 }))
}

async fn call(
    State(shared): State<Arc<Shared>>,
    Path(endpoint): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: String,
) -> axum::Json<Value> {
    let mut data = shared.data.lock().expect("WeCom server state");
    let Some(token) = query.get("access_token") else {
        return answer(41001, "access_token missing");
    };
    match data.tokens.get(token) {
        None => return answer(40014, "invalid access_token"),
        Some(expiry) if Instant::now() >= *expiry => {
            return answer(42001, "access_token expired");
        }
        Some(_) => {}
    }
    data.calls.push(endpoint.clone());
    if let Some(errcode) = data
        .injected
        .get_mut(&endpoint)
        .and_then(VecDeque::pop_front)
    {
        return answer(errcode, "injected");
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return answer(47001, "data format error");
    };
    let text = |body: &Value| {
        body.pointer("/text/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match endpoint.as_str() {
        "externalcontact/send_welcome_msg" => {
            let code = body["welcome_code"].as_str().unwrap_or_default().to_owned();
            match data.welcome_codes.get(&code) {
                None | Some(true) => answer(INVALID_WELCOME_CODE, "invalid welcome_code"),
                Some(false) => {
                    data.welcome_codes.insert(code.clone(), true);
                    let text = text(&body);
                    data.welcomes.push(Welcome { code, text });
                    answer(0, "ok")
                }
            }
        }
        "externalcontact/add_msg_template" => {
            if body["chat_type"] != "single" {
                return answer(40058, "chat_type must be single");
            }
            let Some(external_userid) = body.pointer("/external_userid/0").and_then(Value::as_str)
            else {
                return answer(41048, "no customer to send to");
            };
            let msgid = format!("msg{}", data.tasks.len() + 1);
            data.tasks.push(SendTask {
                msgid: msgid.clone(),
                sender: body["sender"].as_str().unwrap_or_default().to_owned(),
                external_userid: external_userid.to_owned(),
                text: text(&body),
                attachments: body["attachments"].clone(),
                status: UNSENT,
            });
            axum::Json(json!({ "errcode": 0, "errmsg": "ok", "fail_list": [], "msgid": msgid }))
        }
        "externalcontact/get_groupmsg_send_result" => {
            let msgid = body["msgid"].as_str().unwrap_or_default();
            match data.tasks.iter().find(|task| task.msgid == msgid) {
                None => answer(41047, "invalid msgid"),
                Some(task) => axum::Json(json!({
                    "errcode": 0, "errmsg": "ok", "next_cursor": "",
                    "detail_list": [{
                        "external_userid": task.external_userid,
                        "userid": task.sender,
                        "status": task.status,
                    }],
                })),
            }
        }
        "externalcontact/groupchat/add_join_way" => {
            let chats: Vec<String> = body["chat_id_list"]
                .as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(|id| id.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if body["scene"] != 2 || chats.is_empty() {
                return answer(40058, "scene and chat_id_list required");
            }
            let config_id = format!("join{}", data.join_ways.len() + 1);
            data.join_ways.insert(config_id.clone(), chats);
            axum::Json(json!({ "errcode": 0, "errmsg": "ok", "config_id": config_id }))
        }
        "externalcontact/groupchat/get_join_way" => {
            let config_id = body["config_id"].as_str().unwrap_or_default();
            match data.join_ways.get(config_id) {
                None => answer(41044, "invalid config_id"),
                Some(chats) => axum::Json(json!({
                    "errcode": 0, "errmsg": "ok",
                    "join_way": {
                        "config_id": config_id, "scene": 2, "chat_id_list": chats,
                        "qr_code": format!("https://wecom.test/join/{config_id}"),
                    },
                })),
            }
        }
        "externalcontact/add_contact_way" => {
            let state = body["state"].as_str().unwrap_or_default().to_owned();
            if state.chars().count() > 30 {
                return answer(40058, "state longer than 30 characters");
            }
            if body["type"] != 1 || body["scene"] != 2 {
                return answer(41039, "invalid type or scene");
            }
            let config_id = format!("way{}", data.contact_ways.len() + 1);
            let qr_code = format!("https://wecom.test/contact/{config_id}");
            data.contact_ways.push(ContactWay {
                config_id: config_id.clone(),
                state,
                users: body["user"]
                    .as_array()
                    .map(|u| {
                        u.iter()
                            .filter_map(|u| u.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                qr_code: qr_code.clone(),
            });
            axum::Json(
                json!({ "errcode": 0, "errmsg": "ok", "config_id": config_id, "qr_code": qr_code }),
            )
        }
        "externalcontact/mark_tag" => {
            data.tags.push(body);
            answer(0, "ok")
        }
        _ => answer(48002, "api forbidden"),
    }
}

/// Sends WeCom-style encrypted callbacks to a worker's endpoint, with its own
/// implementation of the scheme: AES-256-CBC, key = base64(EncodingAESKey + "="),
/// IV = key[..16], PKCS#7 to 32 bytes over random(16) ‖ len(4, BE) ‖ msg ‖ corp id;
/// `msg_signature` = SHA1 of the sorted token, timestamp, nonce and ciphertext.
#[derive(Debug, Clone)]
pub struct CallbackSender {
    /// The worker's callback URL, e.g. `http://127.0.0.1:8090/wecom/callback`.
    pub url: String,
    pub token: String,
    pub encoding_aes_key: String,
    pub corp_id: String,
    http: reqwest::Client,
}

/// A 43-character EncodingAESKey made of fresh random bytes.
pub fn generate_encoding_aes_key() -> String {
    let bytes: Vec<u8> = (0..2)
        .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
        .collect();
    let mut key = base64::engine::general_purpose::STANDARD.encode(bytes);
    key.truncate(43);
    key
}

impl CallbackSender {
    pub fn new(url: &str, token: &str, encoding_aes_key: &str, corp_id: &str) -> Self {
        // reqwest's rustls needs the process's provider (aws-lc-rs, as everywhere); an
        // error only means one is installed already.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        Self {
            url: url.to_owned(),
            token: token.to_owned(),
            encoding_aes_key: encoding_aes_key.to_owned(),
            corp_id: corp_id.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    fn key(&self) -> [u8; 32] {
        // The key's last character may carry bits past the 32nd byte: decode by hand.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits: u64 = 0;
        let mut count = 0;
        let mut out = Vec::with_capacity(32);
        for c in self.encoding_aes_key.bytes() {
            let value = alphabet
                .iter()
                .position(|&a| a == c)
                .expect("EncodingAESKey is base64");
            bits = (bits << 6) | value as u64;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
                bits &= (1 << count) - 1;
            }
        }
        out.truncate(32);
        out.try_into().expect("EncodingAESKey decodes to 32 bytes")
    }

    /// `Encrypt` of `message`.
    pub fn encrypt(&self, message: &str) -> String {
        use aes::cipher::{BlockCipherEncrypt as _, KeyInit as _};
        let key = self.key();
        let cipher = aes::Aes256::new(&key.into());
        let mut plain: Vec<u8> = uuid::Uuid::new_v4().as_bytes().to_vec();
        plain.extend((message.len() as u32).to_be_bytes());
        plain.extend(message.as_bytes());
        plain.extend(self.corp_id.as_bytes());
        let pad = 32 - plain.len() % 32;
        plain.resize(plain.len() + pad, pad as u8);
        // CBC by hand: each block XORed with the previous ciphertext block (the IV first).
        let mut previous: [u8; 16] = key[..16].try_into().expect("16 bytes");
        let mut out = Vec::with_capacity(plain.len());
        for chunk in plain.chunks(16) {
            let mut block = [0u8; 16];
            for (i, byte) in chunk.iter().enumerate() {
                block[i] = byte ^ previous[i];
            }
            let mut block = aes::Block::from(block);
            cipher.encrypt_block(&mut block);
            previous.copy_from_slice(&block);
            out.extend_from_slice(&block);
        }
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// `msg_signature` over `timestamp`, `nonce` and `encrypted`.
    pub fn sign(&self, timestamp: &str, nonce: &str, encrypted: &str) -> String {
        let mut parts = [self.token.as_str(), timestamp, nonce, encrypted];
        parts.sort();
        hex::encode(Sha1::digest(parts.join("").as_bytes()))
    }

    fn signed_url(&self, encrypted: &str, signature: Option<&str>, echostr: bool) -> reqwest::Url {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string();
        let nonce = (uuid::Uuid::new_v4().as_u128() % 1_000_000_000).to_string();
        let good = self.sign(&timestamp, &nonce, encrypted);
        let mut url = reqwest::Url::parse(&self.url).expect("callback URL");
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("msg_signature", signature.unwrap_or(&good))
                .append_pair("timestamp", &timestamp)
                .append_pair("nonce", &nonce);
            if echostr {
                query.append_pair("echostr", encrypted);
            }
        }
        url
    }

    /// WeCom's URL verification: GET with an encrypted `echostr`; answers (status, body),
    /// or `None` while nothing listens.
    pub async fn verify_url(&self, echo: &str) -> Option<(u16, String)> {
        let encrypted = self.encrypt(echo);
        let response = self
            .http
            .get(self.signed_url(&encrypted, None, true))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.unwrap_or_default()))
    }

    /// POSTs `inner_xml` encrypted, signed (or with `bad_signature`); answers (status, body).
    pub async fn post(&self, inner_xml: &str, bad_signature: Option<&str>) -> (u16, String) {
        let encrypted = self.encrypt(inner_xml);
        let body = format!(
            "<xml><ToUserName><![CDATA[{}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt><AgentID><![CDATA[]]></AgentID></xml>",
            self.corp_id
        );
        let response = self
            .http
            .post(self.signed_url(&encrypted, bad_signature, false))
            .body(body)
            .send()
            .await
            .expect("POST the callback");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// A `change_external_contact` / `add_external_contact` event, as WeCom pushes it.
    pub async fn contact_added(
        &self,
        user_id: &str,
        external_userid: &str,
        state: &str,
        welcome_code: &str,
    ) -> (u16, String) {
        let xml = format!(
            "<xml><ToUserName><![CDATA[{corp}]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>\
             <CreateTime>1403610513</CreateTime><MsgType><![CDATA[event]]></MsgType>\
             <Event><![CDATA[change_external_contact]]></Event><ChangeType><![CDATA[add_external_contact]]></ChangeType>\
             <UserID><![CDATA[{user_id}]]></UserID><ExternalUserID><![CDATA[{external_userid}]]></ExternalUserID>\
             <State><![CDATA[{state}]]></State><WelcomeCode><![CDATA[{welcome_code}]]></WelcomeCode></xml>",
            corp = self.corp_id
        );
        self.post(&xml, None).await
    }
}
