//! The actions of a `wecom` channel, each mapped to the external-contact API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::api::{Api, no_guard};
use super::state::state_for_run;
use super::{CallbackConfig, Config};
use crate::channel::{ChannelAdapter, Delivered, Delivery, Error, Registry};

/// The actions a WeCom channel performs.
pub const ACTIONS: [&str; 5] = [
    "send_welcome",
    "send_message",
    "invite_to_group",
    "add_contact",
    "tag",
];

/// How long WeCom accepts a welcome code after the contact was added.
pub(crate) const WELCOME_CODE_TTL: Duration = Duration::from_secs(20);
/// Longest wait between two confirmation polls.
const MAX_CONFIRM_POLL: Duration = Duration::from_secs(60);
/// Text of an `invite_to_group` task whose step has no template.
const DEFAULT_INVITE_TEXT: &str = "扫码加入群聊";
/// Title of the group QR link when params give no `link_title`.
const DEFAULT_LINK_TITLE: &str = "加入群聊";

/// Delivers steps through WeCom's customer-contact API.
#[derive(Debug)]
pub struct WecomAdapter {
    name: String,
    config: Config,
    api: Api,
    /// Group join ways created, by chat id: (config_id, qr_code).
    join_ways: Mutex<HashMap<String, (String, String)>>,
    /// Contact ways created, by (member, state): the QR link, so a retry reuses it.
    contact_ways: Mutex<HashMap<(String, String), String>>,
    /// The worker's other channels, for `add_contact`'s link; set once the registry is built.
    fallbacks: Arc<OnceLock<Registry>>,
    /// Welcome codes the callback endpoint received, by external userid.
    pub(crate) welcome_codes: WelcomeCodes,
}

/// Recent welcome codes by external userid, each usable for [`WELCOME_CODE_TTL`].
#[derive(Debug, Default)]
pub(crate) struct WelcomeCodes(Mutex<HashMap<String, (String, Instant)>>);

impl WelcomeCodes {
    pub(crate) fn insert(&self, external_userid: &str, code: &str) {
        let mut codes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        codes.retain(|_, (_, at)| at.elapsed() < WELCOME_CODE_TTL);
        codes.insert(
            external_userid.to_owned(),
            (code.to_owned(), Instant::now()),
        );
    }

    pub(crate) fn get(&self, external_userid: &str) -> Option<String> {
        let codes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        codes
            .get(external_userid)
            .filter(|(_, at)| at.elapsed() < WELCOME_CODE_TTL)
            .map(|(code, _)| code.clone())
    }
}

/// What `send_message` and `invite_to_group` save for a later attempt (as
/// [`Delivery::resume_state`]): the send task to keep polling.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SendTask {
    pub(crate) msgid: String,
    pub(crate) sender: String,
    /// When the task was created (ms since the epoch): `confirm_timeout` counts from it.
    pub(crate) created_ms: u64,
}

impl WecomAdapter {
    /// An adapter with its own connection pool and token cache.
    pub fn new(name: &str, config: Config) -> Result<Self, reqwest::Error> {
        Ok(Self {
            name: name.to_owned(),
            api: Api::new(&config)?,
            config,
            join_ways: Mutex::default(),
            contact_ways: Mutex::default(),
            fallbacks: Arc::default(),
            welcome_codes: WelcomeCodes::default(),
        })
    }

    /// The channel name it serves.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its callback endpoint settings, when it has one.
    pub fn callback(&self) -> Option<&CallbackConfig> {
        self.config.callback.as_ref()
    }

    /// The corp id callbacks must be addressed to.
    pub fn corp_id(&self) -> &str {
        &self.config.corp_id
    }

    /// Hands over the worker's other channels (once; later calls are ignored). Fails when
    /// the configured `fallback_channel` is not among them.
    pub fn bind_fallbacks(&self, others: Registry) -> anyhow::Result<()> {
        if let Some(fallback) = &self.config.fallback_channel
            && others.get(fallback).is_none()
        {
            anyhow::bail!(
                "channel {}: fallback_channel {fallback:?} is not another (non-wecom) channel of this worker",
                self.name
            );
        }
        let _ = self.fallbacks.set(others);
        Ok(())
    }

    /// How many access tokens were fetched so far.
    pub fn token_fetches(&self) -> u64 {
        self.api.token_fetches()
    }

    async fn send_welcome(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let code = self.welcome_code(delivery)?;
        let mut body = json!({ "welcome_code": code });
        if !delivery.message.is_empty() {
            body["text"] = json!({ "content": delivery.message });
        }
        if let Some(attachments) = delivery.params.get("attachments").filter(|a| a.is_array()) {
            body["attachments"] = attachments.clone();
        }
        if body.get("text").is_none() && body.get("attachments").is_none() {
            return Err(Error::permanent(
                "send_welcome needs a template or params.attachments",
            ));
        }
        let guard = deadline_guard(delivery);
        self.api
            .post("/cgi-bin/externalcontact/send_welcome_msg", &body, &guard)
            .await?;
        Ok(Delivered::new("welcome message sent"))
    }

    /// `params.welcome_code` once rendered, else the code this worker's callback endpoint
    /// received for the contact in the last 20 s.
    fn welcome_code(&self, delivery: &Delivery) -> Result<String, Error> {
        let param = delivery
            .params
            .get("welcome_code")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|code| !code.is_empty() && !code.contains("{{"));
        if let Some(code) = param {
            return Ok(code.to_owned());
        }
        let contact = &delivery.contact;
        [contact.identities.get("wecom"), Some(&contact.id)]
            .into_iter()
            .flatten()
            .find_map(|id| self.welcome_codes.get(id))
            .ok_or_else(|| {
                Error::permanent(
                    "no welcome_code: params.welcome_code is empty or unrendered and no \
                     contact-added callback for this contact reached this worker in the last 20s",
                )
            })
    }

    async fn send_message(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        if let Some(task) = resumed(delivery) {
            return self.confirm(delivery, &task).await;
        }
        if delivery.message.is_empty() && delivery.params.get("attachments").is_none() {
            return Err(Error::permanent(
                "send_message needs a template or params.attachments",
            ));
        }
        let attachments = delivery
            .params
            .get("attachments")
            .filter(|a| a.is_array())
            .cloned()
            .unwrap_or_else(|| json!([]));
        let task = self
            .create_send_task(delivery, &delivery.message, attachments)
            .await?;
        self.confirm(delivery, &task).await
    }

    async fn invite_to_group(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        if let Some(task) = resumed(delivery) {
            return self.confirm(delivery, &task).await;
        }
        let chat_id = param(delivery, "chat_id")
            .ok_or_else(|| Error::permanent("invite_to_group needs params.chat_id"))?;
        let qr_code = self.join_way(&chat_id).await?;
        let title = param(delivery, "link_title").unwrap_or_else(|| DEFAULT_LINK_TITLE.to_owned());
        let attachments =
            json!([{ "msgtype": "link", "link": { "title": title, "url": qr_code } }]);
        let text = if delivery.message.is_empty() {
            DEFAULT_INVITE_TEXT
        } else {
            &delivery.message
        };
        let task = self.create_send_task(delivery, text, attachments).await?;
        self.confirm(delivery, &task).await
    }

    /// The QR code of a scene-2 join way for `chat_id`, created once per adapter.
    async fn join_way(&self, chat_id: &str) -> Result<String, Error> {
        if let Some((_, qr_code)) = lock(&self.join_ways).get(chat_id) {
            return Ok(qr_code.clone());
        }
        let created = self
            .api
            .post(
                "/cgi-bin/externalcontact/groupchat/add_join_way",
                &json!({ "scene": 2, "chat_id_list": [chat_id], "auto_create_room": 0 }),
                &no_guard,
            )
            .await?;
        let config_id = text_field(&created, "/config_id", "add_join_way")?;
        let way = self
            .api
            .post(
                "/cgi-bin/externalcontact/groupchat/get_join_way",
                &json!({ "config_id": config_id }),
                &no_guard,
            )
            .await?;
        let qr_code = text_field(&way, "/join_way/qr_code", "get_join_way")?;
        lock(&self.join_ways).insert(chat_id.to_owned(), (config_id, qr_code.clone()));
        Ok(qr_code)
    }

    /// `add_msg_template` for this one customer; reports `awaiting_confirmation`.
    async fn create_send_task(
        &self,
        delivery: &Delivery,
        text: &str,
        attachments: Value,
    ) -> Result<SendTask, Error> {
        let external_userid = external_userid(delivery)?;
        let sender = self.sender(delivery)?;
        let mut body = json!({
            "chat_type": "single",
            "external_userid": [external_userid],
            "sender": sender,
            "attachments": attachments,
        });
        if !text.is_empty() {
            body["text"] = json!({ "content": text });
        }
        let guard = deadline_guard(delivery);
        let answer = self
            .api
            .post("/cgi-bin/externalcontact/add_msg_template", &body, &guard)
            .await?;
        let failed = answer
            .get("fail_list")
            .and_then(Value::as_array)
            .is_some_and(|list| !list.is_empty());
        if failed {
            return Err(Error::permanent(
                "add_msg_template: the customer cannot receive it (fail_list)",
            ));
        }
        let task = SendTask {
            msgid: text_field(&answer, "/msgid", "add_msg_template")?,
            sender,
            created_ms: now_ms(),
        };
        let state = serde_json::to_string(&task).unwrap_or_default();
        delivery.progress.report("awaiting_confirmation", &state);
        Ok(task)
    }

    /// Polls `get_groupmsg_send_result` with backoff until the member sent the task,
    /// WeCom says it will not be sent, or `confirm_timeout` (from the task's creation).
    async fn confirm(&self, delivery: &Delivery, task: &SendTask) -> Result<Delivered, Error> {
        let external_userid = external_userid(delivery)?;
        let limit = self.config.confirm_timeout;
        let deadline = SystemTime::now()
            .checked_add(limit.saturating_sub(Duration::from_millis(
                now_ms().saturating_sub(task.created_ms),
            )))
            .unwrap_or_else(SystemTime::now);
        let mut wait = self.config.confirm_poll;
        loop {
            let answer = self
                .api
                .post(
                    "/cgi-bin/externalcontact/get_groupmsg_send_result",
                    &json!({ "msgid": task.msgid, "userid": task.sender, "limit": 1000 }),
                    &no_guard,
                )
                .await;
            match answer {
                Ok(answer) => match send_status(&answer, &external_userid) {
                    Some(1) => {
                        return Ok(Delivered::new(format!(
                            "sent by the member (msgid {})",
                            task.msgid
                        )));
                    }
                    Some(2) => {
                        return Err(Error::permanent(
                            "not sent: the customer is no longer a contact (status 2)",
                        ));
                    }
                    Some(3) => {
                        return Err(Error::permanent(
                            "not sent: the customer already received a group message (status 3)",
                        ));
                    }
                    _ => {}
                },
                // Busy, rate-limited or unreachable: poll again later.
                Err(error) if error.is_retryable() => {
                    tracing::debug!(
                        detail = error.detail(),
                        "confirmation poll failed; polling again"
                    );
                }
                Err(error) => return Err(error),
            }
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if left.is_zero() {
                return Err(Error::permanent(format!(
                    "not confirmed within {}: the member did not send the task (msgid {})",
                    humantime::format_duration(limit),
                    task.msgid
                )));
            }
            tokio::time::sleep(wait.min(left)).await;
            wait = (wait * 2).min(MAX_CONFIRM_POLL.max(self.config.confirm_poll));
        }
    }

    async fn add_contact(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let fallback_name = param(delivery, "fallback_channel")
            .or_else(|| self.config.fallback_channel.clone())
            .ok_or_else(|| {
                Error::permanent(
                    "add_contact needs params.fallback_channel or the channel's fallback_channel",
                )
            })?;
        let fallback = self
            .fallbacks
            .get()
            .and_then(|others| others.get(&fallback_name))
            .cloned()
            .ok_or_else(|| {
                Error::permanent(format!(
                    "fallback_channel {fallback_name:?} is not another (non-wecom) channel of this worker"
                ))
            })?;
        let user = param(delivery, "user")
            .map(Ok)
            .unwrap_or_else(|| self.sender(delivery))?;
        let state = state_for_run(&delivery.run_id);
        let key = (user.clone(), state.clone());
        let cached = lock(&self.contact_ways).get(&key).cloned();
        let link = match cached {
            Some(link) => link,
            None => {
                let created = self
                    .api
                    .post(
                        "/cgi-bin/externalcontact/add_contact_way",
                        &json!({
                            "type": 1,
                            "scene": 2,
                            "state": state,
                            "user": [user],
                            "skip_verify": true,
                        }),
                        &no_guard,
                    )
                    .await?;
                let link = text_field(&created, "/qr_code", "add_contact_way")?;
                lock(&self.contact_ways).insert(key, link.clone());
                link
            }
        };
        deadline_guard(delivery)()?;
        let mut forwarded = delivery.clone();
        forwarded.channel.clone_from(&fallback_name);
        forwarded.message = with_link(&delivery.message, &link);
        match fallback.deliver(&forwarded).await {
            Ok(delivered) => Ok(Delivered::new(format!(
                "contact way created; link sent via {fallback_name}: {}",
                delivered.detail
            ))),
            Err(error) => Err(prefixed(
                &format!("contact way created; {fallback_name} failed"),
                error,
            )),
        }
    }

    async fn tag(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let external_userid = external_userid(delivery)?;
        let user = param(delivery, "user")
            .map(Ok)
            .unwrap_or_else(|| self.sender(delivery))?;
        let add = string_list(delivery.params.get("add_tag"));
        let remove = string_list(delivery.params.get("remove_tag"));
        if add.is_empty() && remove.is_empty() {
            return Err(Error::permanent(
                "tag needs params.add_tag or params.remove_tag (tag ids)",
            ));
        }
        self.api
            .post(
                "/cgi-bin/externalcontact/mark_tag",
                &json!({
                    "userid": user,
                    "external_userid": external_userid,
                    "add_tag": add,
                    "remove_tag": remove,
                }),
                &no_guard,
            )
            .await?;
        Ok(Delivered::new(format!(
            "tags marked: {} added, {} removed",
            add.len(),
            remove.len()
        )))
    }

    /// `params.sender`, else the channel's `sender`.
    fn sender(&self, delivery: &Delivery) -> Result<String, Error> {
        param(delivery, "sender")
            .or_else(|| self.config.sender.clone())
            .ok_or_else(|| Error::permanent("no sender: set params.sender or the channel's sender"))
    }
}

#[async_trait]
impl ChannelAdapter for WecomAdapter {
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        match delivery.action.as_str() {
            "send_welcome" => self.send_welcome(delivery).await,
            "send_message" => self.send_message(delivery).await,
            "invite_to_group" => self.invite_to_group(delivery).await,
            "add_contact" => self.add_contact(delivery).await,
            "tag" => self.tag(delivery).await,
            other => Err(Error::permanent(format!(
                "unsupported action {other:?} for a wecom channel (supported: {})",
                ACTIONS.join(", ")
            ))),
        }
    }
}

/// Refuses once the step's deadline has passed: nothing is sent late.
fn deadline_guard(delivery: &Delivery) -> impl Fn() -> Result<(), Error> + Send + Sync + use<'_> {
    move || {
        if delivery.past_step_deadline() {
            Err(Error::skipped("deadline passed before sending"))
        } else {
            Ok(())
        }
    }
}

fn resumed(delivery: &Delivery) -> Option<SendTask> {
    serde_json::from_str::<SendTask>(&delivery.resume_state)
        .ok()
        .filter(|task| !task.msgid.is_empty() && !task.sender.is_empty())
}

/// `contact.identities["wecom"]`, the customer's external userid.
fn external_userid(delivery: &Delivery) -> Result<String, Error> {
    delivery
        .contact
        .identities
        .get("wecom")
        .filter(|id| !id.is_empty())
        .cloned()
        .ok_or_else(|| Error::permanent("the contact has no wecom identity (external userid)"))
}

/// The status of `external_userid` in a `get_groupmsg_send_result` answer.
fn send_status(answer: &Value, external_userid: &str) -> Option<i64> {
    answer
        .get("detail_list")?
        .as_array()?
        .iter()
        .find(|entry| entry.get("external_userid").and_then(Value::as_str) == Some(external_userid))
        .and_then(|entry| entry.get("status"))
        .and_then(Value::as_i64)
}

fn param(delivery: &Delivery, name: &str) -> Option<String> {
    delivery
        .params
        .get(name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
}

/// A param given as one string or as a list of strings.
fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(one)) if !one.trim().is_empty() => vec![one.trim().to_owned()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter(|item| !item.trim().is_empty())
            .map(|item| item.trim().to_owned())
            .collect(),
        _ => Vec::new(),
    }
}

fn text_field(answer: &Value, pointer: &str, call: &str) -> Result<String, Error> {
    answer
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Error::retryable(format!("{call}: no {} in the answer", &pointer[1..])))
}

/// The message with `{link}` replaced by `link`, or `link` on a line of its own after it.
pub(crate) fn with_link(message: &str, link: &str) -> String {
    if message.contains("{link}") {
        message.replace("{link}", link)
    } else if message.is_empty() {
        link.to_owned()
    } else {
        format!("{message}\n{link}")
    }
}

fn prefixed(what: &str, error: Error) -> Error {
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |now| u64::try_from(now.as_millis()).unwrap_or(u64::MAX))
}
