//! The callback endpoint: WeCom's encrypted event pushes in, `contact.added` events out
//! to the scheduler (`EventService/RecordEvent`, with the link's address, TLS and token).
//!
//! GET is the URL verification (the decrypted `echostr` is the answer); POST carries an
//! event. A bad signature is answered 401 and logged without the payload. A
//! `change_external_contact` event of type `add_external_contact` or
//! `add_half_external_contact` is recorded before "success" is answered (a failure
//! answers 503 so WeCom pushes it again; the request id makes that idempotent).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use touchpoint_proto::security::{self, BearerToken};
use touchpoint_proto::v1::contact_service_client::ContactServiceClient;
use touchpoint_proto::v1::event_service_client::EventServiceClient;
use touchpoint_proto::v1::{Contact, RecordEventRequest, UpsertContactRequest};
use tracing::{debug, info, warn};

use super::WecomAdapter;
use super::crypto::verify_signature;
use super::state::run_id_from_state;
use crate::config::WorkerConfig;

/// The event recorded for a new external contact.
pub const CONTACT_ADDED: &str = "contact.added";
/// How long recording one event at the scheduler may take (WeCom waits 5 s for an answer).
const RECORD_TIMEOUT: Duration = Duration::from_secs(4);

/// Starts one callback endpoint per `wecom` channel that has `callback_listen`; they stop
/// when `stop` is cancelled. Fails when an address cannot be bound.
pub async fn serve_callbacks(
    adapters: &[Arc<WecomAdapter>],
    config: &WorkerConfig,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    for adapter in adapters {
        let Some(callback) = adapter.callback() else {
            continue;
        };
        let listener = tokio::net::TcpListener::bind(callback.listen)
            .await
            .with_context(|| {
                format!(
                    "channel {}: cannot listen on callback_listen {}",
                    adapter.name(),
                    callback.listen
                )
            })?;
        let scheduler = security::client_endpoint(&config.server, &config.tls)?
            .connect_timeout(Duration::from_secs(3))
            .connect_lazy();
        let state = Endpoint {
            adapter: Arc::clone(adapter),
            events: EventServiceClient::new(scheduler.clone()),
            contacts: ContactServiceClient::new(scheduler),
            token: config.token.clone(),
            identity_refused: Arc::new(AtomicBool::new(false)),
        };
        let app = Router::new()
            .route(
                &callback.path,
                axum::routing::get(verify_url).post(receive_event),
            )
            .with_state(state);
        info!(
            channel = adapter.name(),
            listen = %callback.listen,
            path = %callback.path,
            "wecom callback endpoint listening"
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                warn!(%error, "wecom callback endpoint failed");
            }
        });
    }
    Ok(())
}

#[derive(Clone)]
struct Endpoint {
    adapter: Arc<WecomAdapter>,
    events: EventServiceClient<Channel>,
    contacts: ContactServiceClient<Channel>,
    token: Option<BearerToken>,
    /// Set once the scheduler refused to set a contact's wecom identity (logged once).
    identity_refused: Arc<AtomicBool>,
}

/// The query WeCom signs every callback with.
#[derive(Deserialize)]
struct Signed {
    msg_signature: String,
    timestamp: String,
    nonce: String,
    echostr: Option<String>,
}

async fn verify_url(State(endpoint): State<Endpoint>, Query(query): Query<Signed>) -> Response {
    let Some(echostr) = query.echostr.as_deref() else {
        return (StatusCode::BAD_REQUEST, "echostr required").into_response();
    };
    match endpoint.open(&query, echostr) {
        Ok(plain) => (StatusCode::OK, plain).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn receive_event(
    State(endpoint): State<Endpoint>,
    Query(query): Query<Signed>,
    body: String,
) -> Response {
    let Some(encrypted) = xml_field(&body, "Encrypt") else {
        warn!("wecom callback without an Encrypt field; ignored");
        return (StatusCode::BAD_REQUEST, "Encrypt required").into_response();
    };
    let plain = match endpoint.open(&query, &encrypted) {
        Ok(plain) => plain,
        Err(refusal) => return refusal.into_response(),
    };
    let xml = String::from_utf8_lossy(&plain);
    let Some(added) = ContactAdded::from_xml(&xml) else {
        debug!("wecom callback that is not a contact-added event; acknowledged");
        return "success".into_response();
    };
    match endpoint.record(&added).await {
        Ok(()) => "success".into_response(),
        Err(error) => {
            warn!(error = %error, "cannot record contact.added at the scheduler; WeCom will push it again");
            (StatusCode::SERVICE_UNAVAILABLE, "retry later").into_response()
        }
    }
}

impl Endpoint {
    /// Checks the signature and decrypts; the error is the answer to send.
    fn open(&self, query: &Signed, encrypted: &str) -> Result<Vec<u8>, (StatusCode, &'static str)> {
        let Some(callback) = self.adapter.callback() else {
            return Err((StatusCode::NOT_FOUND, "no callback"));
        };
        if !verify_signature(
            callback.token.expose_secret(),
            &query.timestamp,
            &query.nonce,
            encrypted,
            &query.msg_signature,
        ) {
            warn!(
                channel = self.adapter.name(),
                "wecom callback with a bad msg_signature; refused"
            );
            return Err((StatusCode::UNAUTHORIZED, "bad signature"));
        }
        callback
            .cipher
            .decrypt(encrypted, self.adapter.corp_id())
            .map_err(|error| {
                warn!(channel = self.adapter.name(), %error, "wecom callback cannot be decrypted; refused");
                (StatusCode::BAD_REQUEST, "cannot decrypt")
            })
    }

    async fn record(&self, added: &ContactAdded) -> anyhow::Result<()> {
        if !added.welcome_code.is_empty() {
            self.adapter
                .welcome_codes
                .insert(&added.external_userid, &added.welcome_code);
        }
        let recording = async {
            self.set_identity(&added.external_userid).await;
            let mut request = tonic::Request::new(added.event());
            if let Some(token) = &self.token {
                token.apply(request.metadata_mut());
            }
            self.events
                .clone()
                .record_event(request)
                .await
                .map_err(|status| {
                    anyhow::anyhow!("RecordEvent: {:?}: {}", status.code(), status.message())
                })
        };
        let recorded = tokio::time::timeout(RECORD_TIMEOUT, recording)
            .await
            .context("RecordEvent timed out")??
            .into_inner();
        debug!(
            duplicate = recorded.duplicate,
            started = recorded.started_run_ids.len(),
            "contact.added recorded"
        );
        Ok(())
    }

    /// Sets the contact's `wecom` identity to its external userid, best effort: a
    /// scheduler that does not let workers upsert contacts is told once in the log.
    async fn set_identity(&self, external_userid: &str) {
        if self.identity_refused.load(Ordering::Relaxed) {
            return;
        }
        let mut request = tonic::Request::new(UpsertContactRequest {
            contact: Some(Contact {
                id: external_userid.to_owned(),
                identities: HashMap::from([("wecom".to_owned(), external_userid.to_owned())]),
                ..Contact::default()
            }),
            remove_tags: Vec::new(),
            remove_attrs: Vec::new(),
        });
        if let Some(token) = &self.token {
            token.apply(request.metadata_mut());
        }
        if let Err(status) = self.contacts.clone().upsert_contact(request).await {
            if status.code() == tonic::Code::PermissionDenied {
                self.identity_refused.store(true, Ordering::Relaxed);
            }
            warn!(
                code = ?status.code(),
                "cannot set the new contact's wecom identity; steps that need it fail until it is set"
            );
        }
    }
}

/// A `change_external_contact` callback of a new contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContactAdded {
    pub(crate) change_type: String,
    pub(crate) user_id: String,
    pub(crate) external_userid: String,
    pub(crate) state: String,
    pub(crate) welcome_code: String,
    pub(crate) create_time: String,
}

impl ContactAdded {
    pub(crate) fn from_xml(xml: &str) -> Option<Self> {
        if xml_field(xml, "Event").as_deref() != Some("change_external_contact") {
            return None;
        }
        let change_type = xml_field(xml, "ChangeType")?;
        if !matches!(
            change_type.as_str(),
            "add_external_contact" | "add_half_external_contact"
        ) {
            return None;
        }
        let external_userid = xml_field(xml, "ExternalUserID").filter(|id| !id.is_empty())?;
        Some(Self {
            change_type,
            user_id: xml_field(xml, "UserID").unwrap_or_default(),
            external_userid,
            state: xml_field(xml, "State").unwrap_or_default(),
            welcome_code: xml_field(xml, "WelcomeCode").unwrap_or_default(),
            create_time: xml_field(xml, "CreateTime").unwrap_or_default(),
        })
    }

    /// The `contact.added` event: the contact is the external userid.
    pub(crate) fn event(&self) -> RecordEventRequest {
        let mut attrs = HashMap::from([
            ("external_user_id".to_owned(), self.external_userid.clone()),
            ("user_id".to_owned(), self.user_id.clone()),
            ("state".to_owned(), self.state.clone()),
            ("welcome_code".to_owned(), self.welcome_code.clone()),
            ("change_type".to_owned(), self.change_type.clone()),
        ]);
        if let Some(run_id) = run_id_from_state(&self.state) {
            attrs.insert("run_id".to_owned(), run_id);
        }
        attrs.retain(|_, value| !value.is_empty());
        RecordEventRequest {
            contact_id: self.external_userid.clone(),
            name: CONTACT_ADDED.to_owned(),
            attrs,
            request_id: self.request_id(),
        }
    }

    /// The same for every push of this callback: its contact, member and welcome code
    /// (or, without one, its CreateTime).
    pub(crate) fn request_id(&self) -> String {
        let discriminator = if self.welcome_code.is_empty() {
            format!("t{}", self.create_time)
        } else {
            format!("w{}", self.welcome_code)
        };
        let digest = Sha256::digest(
            format!(
                "{}\n{}\n{discriminator}",
                self.external_userid, self.user_id
            )
            .as_bytes(),
        );
        let hex: String = digest[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!("wecom-{hex}")
    }
}

/// The text of the first `<name>` element of WeCom's flat XML, CDATA unwrapped.
pub(crate) fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    let inner = xml[start..end].trim();
    let text = inner
        .strip_prefix("<![CDATA[")
        .and_then(|rest| rest.strip_suffix("]]>"))
        .unwrap_or(inner);
    Some(text.to_owned())
}
