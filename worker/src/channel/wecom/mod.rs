//! The `wecom` channel: WeCom (企业微信) customer contact.
//!
//! - actions ([`adapter`]): `send_welcome` (`send_welcome_msg` with the contact-added
//!   event's welcome code, never after the step's deadline), `send_message` and
//!   `invite_to_group` (a single-customer send task, then `awaiting_confirmation` until
//!   the member sent it; resumable from [`crate::channel::Delivery::resume_state`]),
//!   `add_contact` (a contact way whose link goes out on a fallback channel of the same
//!   worker) and `tag` (`mark_tag`);
//! - the API ([`api`]): one access token per channel shared by all deliveries, refreshed
//!   once on a refused token; errcodes classified (rate limit, busy, permanent);
//! - callbacks ([`callback`], [`crypto`]): WeCom's signed and encrypted pushes turned
//!   into `contact.added` events at the scheduler;
//! - [`state`]: the contact way `state` derived from the run id (≤ 30 characters).

mod adapter;
mod api;
mod callback;
mod config;
mod crypto;
mod state;

pub use adapter::{ACTIONS, WecomAdapter};
pub use callback::{CONTACT_ADDED, serve_callbacks};
pub use config::{CallbackConfig, Config};
pub use crypto::{CallbackCipher, CryptoError, signature, verify_signature};
pub use state::{run_id_from_state, state_for_run};

#[cfg(test)]
mod tests;
