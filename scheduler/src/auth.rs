//! Who may call what: bearer tokens with roles, checked by one tower layer ([`AuthLayer`])
//! in front of every Touchpoint service.
//!
//! - [`RPC_ROLES`] is the one table of which role may call which RPC (docs/security.md
//!   copies it; a test checks it covers every RPC of the protos).
//! - [`Tokens`] is the auth file (`TOUCHPOINT_AUTH_FILE`): names, roles and SHA-256 hashes
//!   of tokens, never the tokens. A presented token is hashed and compared with every
//!   hash in constant time.
//! - Without an auth file ([`Policy::LoopbackOnly`]) only loopback peers get in.
//!
//! Health and reflection stay open, so probes and grpcurl work either way. A call with no
//! or an unknown token gets UNAUTHENTICATED; a known token whose role may not call the
//! method gets PERMISSION_DENIED naming the role and the method. Tokens never reach a log.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::{
    Status,
    body::Body,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::Layer;
use tracing::warn;

/// A token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Playbooks, enrollment, runs (including cancel), dead letters (list and retry).
    Marketer,
    /// Enrollment (and contacts and events, once they exist): a system feeding contacts in.
    Service,
    /// The worker stream only.
    Worker,
    /// Read only: get and list playbooks, runs and dead letters.
    Viewer,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Marketer,
        Role::Service,
        Role::Worker,
        Role::Viewer,
    ];

    /// The name used in the auth file and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Marketer => "marketer",
            Role::Service => "service",
            Role::Worker => "worker",
            Role::Viewer => "viewer",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

use Role::{Admin, Marketer, Service, Viewer, Worker};

/// Every Touchpoint RPC (`package.Service/Method`) and the roles that may call it. The one
/// place to change who may do what; docs/security.md shows the same table. An RPC missing
/// here is admin-only (and a unit test fails until it is added).
pub const RPC_ROLES: &[(&str, &[Role])] = &[
    (
        "touchpoint.v1.PlaybookService/ApplyPlaybook",
        &[Admin, Marketer],
    ),
    (
        "touchpoint.v1.PlaybookService/GetPlaybook",
        &[Admin, Marketer, Viewer],
    ),
    (
        "touchpoint.v1.PlaybookService/ListPlaybooks",
        &[Admin, Marketer, Viewer],
    ),
    (
        "touchpoint.v1.EnrollmentService/Enroll",
        &[Admin, Marketer, Service],
    ),
    (
        "touchpoint.v1.RunService/GetRun",
        &[Admin, Marketer, Viewer],
    ),
    (
        "touchpoint.v1.RunService/ListRuns",
        &[Admin, Marketer, Viewer],
    ),
    ("touchpoint.v1.RunService/CancelRun", &[Admin, Marketer]),
    (
        "touchpoint.v1.DeadLetterService/ListDeadLetters",
        &[Admin, Marketer, Viewer],
    ),
    (
        "touchpoint.v1.DeadLetterService/RetryDeadLetters",
        &[Admin, Marketer],
    ),
    (
        "touchpoint.v1.PlaybookService/PausePlaybook",
        &[Admin, Marketer],
    ),
    (
        "touchpoint.v1.PlaybookService/ResumePlaybook",
        &[Admin, Marketer],
    ),
    (
        "touchpoint.v1.PlaybookService/GetStats",
        &[Admin, Marketer, Viewer],
    ),
    (
        "touchpoint.v1.EnrollmentService/EnrollBatch",
        &[Admin, Marketer, Service],
    ),
    ("touchpoint.v1.RunService/CancelRuns", &[Admin, Marketer]),
    (
        "touchpoint.v1.ContactService/UpsertContact",
        &[Admin, Marketer, Service, Worker],
    ),
    (
        "touchpoint.v1.ContactService/GetContact",
        &[Admin, Marketer, Viewer, Service],
    ),
    (
        "touchpoint.v1.EventService/RecordEvent",
        &[Admin, Marketer, Service, Worker],
    ),
    (
        "touchpoint.v1.PolicyService/ApplyPolicy",
        &[Admin, Marketer],
    ),
    (
        "touchpoint.v1.PolicyService/GetPolicy",
        &[Admin, Marketer, Viewer],
    ),
    ("touchpoint.v1.WorkerService/Attach", &[Admin, Worker]),
];

/// Services anyone may call, token or not: probes and grpcurl need them.
const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// What calling `path` (`/package.Service/Method`) takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// Nothing: health and reflection.
    Open,
    /// A token with one of these roles.
    Roles(&'static [Role]),
}

/// What calling the gRPC method at `path` takes: [`RPC_ROLES`]; health and reflection
/// are open; anything else is admin-only.
pub fn required(path: &str) -> Required {
    let method = path.strip_prefix('/').unwrap_or(path);
    // Only a plain `/Service/Method` is open; anything odder is admin-only.
    let open = method
        .split_once('/')
        .is_some_and(|(service, name)| OPEN_SERVICES.contains(&service) && !name.contains('/'));
    if open {
        return Required::Open;
    }
    RPC_ROLES
        .iter()
        .find(|(rpc, _)| *rpc == method)
        .map_or(Required::Roles(&[Admin]), |(_, roles)| {
            Required::Roles(roles)
        })
}

/// The tokens of the auth file: who they are, never what they are.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

#[derive(Clone)]
struct TokenEntry {
    name: Arc<str>,
    role: Role,
    sha256: [u8; 32],
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and roles only: hashes are not secrets, but they are nobody's business.
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|e| format!("{} ({})", e.name, e.role)),
            )
            .finish()
    }
}

/// What is wrong with an auth file, naming the line and the field.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Read(std::io::Error),
    /// A problem at a line (and, where known, a field such as `token[1].role`).
    #[error("line {line}: {}{problem}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
    At {
        /// 1-based line of the problem.
        line: usize,
        /// Path of the field, e.g. `token[1].sha256`.
        field: Option<String>,
        /// What is wrong and what was expected.
        problem: String,
    },
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawToken>,
}

/// One `[[token]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: toml::Spanned<String>,
    role: toml::Spanned<String>,
    sha256: toml::Spanned<String>,
}

impl Tokens {
    /// Reads and checks the auth file at `path`.
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(AuthFileError::Read)?;
        Self::parse(&text)
    }

    /// Parses and checks auth file text: `[[token]]` tables of `name`, `role` and
    /// `sha256` (64 hex digits), nothing else; names and hashes unique.
    pub fn parse(text: &str) -> Result<Self, AuthFileError> {
        let line_of = |offset: usize| {
            text.get(..offset)
                .map_or(1, |before| before.matches('\n').count() + 1)
        };
        let document = toml::Deserializer::parse(text).map_err(|e| AuthFileError::At {
            line: line_of(e.span().map_or(0, |s| s.start)),
            field: None,
            problem: e.message().trim_end().to_owned(),
        })?;
        let raw: RawFile = serde_path_to_error::deserialize(document).map_err(|e| {
            let field = e.path().to_string();
            let e = e.into_inner();
            AuthFileError::At {
                line: line_of(e.span().map_or(0, |s| s.start)),
                field: (field != ".").then_some(field),
                problem: e.message().trim_end().to_owned(),
            }
        })?;
        if raw.token.is_empty() {
            return Err(AuthFileError::At {
                line: 1,
                field: Some("token".to_owned()),
                problem: "expected at least one [[token]] table (name, role, sha256)".to_owned(),
            });
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut hashes: HashMap<[u8; 32], usize> = HashMap::new();
        let mut entries = Vec::with_capacity(raw.token.len());
        for (index, token) in raw.token.into_iter().enumerate() {
            let at = |field: &str, spanned_start: usize, problem: String| AuthFileError::At {
                line: line_of(spanned_start),
                field: Some(format!("token[{index}].{field}")),
                problem,
            };
            let name = token.name.get_ref().trim();
            if name.is_empty() {
                return Err(at(
                    "name",
                    token.name.span().start,
                    "expected a name, got an empty string".to_owned(),
                ));
            }
            if let Some(first) = names.insert(name.to_owned(), index) {
                return Err(at(
                    "name",
                    token.name.span().start,
                    format!("duplicate name {name:?} (also token[{first}])"),
                ));
            }
            let role = Role::parse(token.role.get_ref()).ok_or_else(|| {
                at(
                    "role",
                    token.role.span().start,
                    format!(
                        "unknown role {:?} (expected one of {})",
                        token.role.get_ref(),
                        Role::ALL.map(Role::name).join(", ")
                    ),
                )
            })?;
            let sha256 = parse_sha256(token.sha256.get_ref())
                .map_err(|problem| at("sha256", token.sha256.span().start, problem))?;
            if let Some(first) = hashes.insert(sha256, index) {
                return Err(at(
                    "sha256",
                    token.sha256.span().start,
                    format!("the same hash as token[{first}]: give each client its own token"),
                ));
            }
            entries.push(TokenEntry {
                name: Arc::from(name),
                role,
                sha256,
            });
        }
        Ok(Self { entries })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name and role of the token whose SHA-256 matches `token`'s. Every hash is
    /// compared, each in constant time, so timing tells nothing about near misses.
    fn lookup(&self, token: &str) -> Option<&TokenEntry> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.entries.iter().fold(None, |found, entry| {
            if bool::from(entry.sha256.ct_eq(&digest)) {
                Some(entry)
            } else {
                found
            }
        })
    }
}

/// 64 hex digits (either case; `sha256sum`'s trailing `  -` is not part of it).
fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let expected = "expected the SHA-256 of the token as 64 hex digits \
                    (printf %s \"$TOKEN\" | sha256sum)";
    if text.len() != 64 {
        return Err(format!(
            "{expected}, got {} characters",
            text.chars().count()
        ));
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(text, &mut digest)
        .map_err(|_| format!("{expected}, got a character that is not a hex digit"))?;
    Ok(digest)
}

/// Who may call: the tokens of the auth file, or (with none) any loopback peer.
#[derive(Debug, Clone)]
pub enum Policy {
    /// No auth file: loopback peers may call everything, others nothing.
    LoopbackOnly,
    /// Bearer tokens with roles.
    Tokens(Tokens),
}

/// The caller of an admitted request, put in its extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name; `loopback` without an auth file; `anonymous` on open services.
    pub name: Arc<str>,
    /// The token's role (admin for loopback callers without an auth file).
    pub role: Option<Role>,
}

impl Policy {
    /// Admits or refuses a call of `path` carrying `authorization` from `peer`.
    pub fn check(
        &self,
        path: &str,
        authorization: Option<&http::HeaderValue>,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, Status> {
        let Required::Roles(roles) = required(path) else {
            return Ok(Caller {
                name: Arc::from("anonymous"),
                role: None,
            });
        };
        let method = path.strip_prefix('/').unwrap_or(path);
        match self {
            Policy::LoopbackOnly => {
                if peer.is_some_and(|peer| peer.ip().to_canonical().is_loopback()) {
                    Ok(Caller {
                        name: Arc::from("loopback"),
                        role: Some(Admin),
                    })
                } else {
                    Err(Status::permission_denied(
                        "this scheduler has no auth file and accepts only loopback clients; \
                         to accept others, give it bearer tokens with TOUCHPOINT_AUTH_FILE \
                         (see docs/security.md)",
                    ))
                }
            }
            Policy::Tokens(tokens) => {
                let Some(token) = bearer_token(authorization) else {
                    return Err(Status::unauthenticated(
                        "missing bearer token: this scheduler requires `authorization: Bearer <token>`",
                    ));
                };
                let Some(entry) = tokens.lookup(token) else {
                    return Err(Status::unauthenticated("invalid bearer token"));
                };
                if roles.contains(&entry.role) {
                    Ok(Caller {
                        name: Arc::clone(&entry.name),
                        role: Some(entry.role),
                    })
                } else {
                    Err(Status::permission_denied(format!(
                        "role {} may not call {method} (token {:?})",
                        entry.role, entry.name
                    )))
                }
            }
        }
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(header: Option<&http::HeaderValue>) -> Option<&str> {
    let value = header?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The peer of a connection, plaintext or TLS.
fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// The tower layer applying a [`Policy`] to every request of the server.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    /// A layer enforcing `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let peer = peer_addr(request.extensions());
        let path = request.uri().path();
        match self.policy.check(
            path,
            request.headers().get(http::header::AUTHORIZATION),
            peer,
        ) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(status) => {
                // The method and who called; never the token.
                warn!(
                    method = %path.trim_start_matches('/'),
                    peer = %peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                    code = ?status.code(),
                    reason = %status.message(),
                    "call refused"
                );
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message as _;
    use tonic::Code;
    use tower::Service as _;

    use super::*;

    const TOKEN: &str = "0a3f9c2d7e5b41c8a6f0d2e4b7c9a1f3e5d7c9b1a3f5e7d9c1b3a5f7e9d1c3b5";

    fn sha256_hex(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn file_with(role: &str, sha256: &str) -> String {
        format!("[[token]]\nname = \"crm-service\"\nrole = \"{role}\"\nsha256 = \"{sha256}\"\n")
    }

    fn error_of(text: &str) -> String {
        match Tokens::parse(text) {
            Ok(tokens) => panic!("accepted {text:?} as {tokens:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn header(value: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(value).expect("a valid header value")
    }

    fn loopback() -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 40000)))
    }

    #[test]
    fn parses_the_auth_file_of_the_issue() {
        let text = format!(
            "# who may call\n{}\n[[token]]\nname = \"dash\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
            file_with("service", &sha256_hex(TOKEN)),
            sha256_hex("another").to_uppercase()
        );
        let tokens = Tokens::parse(&text).expect("a valid file");
        assert_eq!(tokens.len(), 2);
        let entry = tokens.lookup(TOKEN).expect("the token is known");
        assert_eq!((&*entry.name, entry.role), ("crm-service", Service));
        assert_eq!(
            tokens.lookup("another").map(|e| e.role),
            Some(Viewer),
            "upper-case hex is accepted"
        );
        assert!(tokens.lookup("unknown").is_none());
        assert!(tokens.lookup(&TOKEN[1..]).is_none());
        assert_eq!(
            format!("{tokens:?}"),
            "[\"crm-service (service)\", \"dash (viewer)\"]"
        );
    }

    #[test]
    fn a_bad_role_names_the_line_field_and_the_roles() {
        let text = format!("\n\n{}", file_with("root", &sha256_hex(TOKEN)));
        assert_eq!(
            error_of(&text),
            "line 5: token[0].role: unknown role \"root\" \
             (expected one of admin, marketer, service, worker, viewer)"
        );
    }

    #[test]
    fn a_bad_hash_names_the_line_and_the_field() {
        let err = error_of(&file_with("admin", "abc123"));
        assert!(
            err.starts_with(
                "line 4: token[0].sha256: expected the SHA-256 of the token as 64 hex digits"
            ),
            "{err}"
        );
        assert!(err.ends_with("got 6 characters"), "{err}");
        let not_hex = "g".repeat(64);
        let err = error_of(&file_with("admin", &not_hex));
        assert!(err.ends_with("not a hex digit"), "{err}");
        // A token pasted where its hash belongs is refused too.
        let err = error_of(&file_with("admin", "my-secret-token"));
        assert!(err.starts_with("line 4: token[0].sha256:"), "{err}");
        assert!(!err.contains("my-secret-token"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = format!(
            "{}token = \"s3cret\"\n",
            file_with("admin", &sha256_hex(TOKEN))
        );
        let err = error_of(&text);
        assert!(err.starts_with("line 5: token[0]"), "{err}");
        assert!(err.contains("unknown field `token`"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");

        let err = error_of(&format!(
            "version = 2\n{}",
            file_with("admin", &sha256_hex(TOKEN))
        ));
        assert!(err.starts_with("line 1: "), "{err}");
        assert!(err.contains("unknown field `version`"), "{err}");
    }

    #[test]
    fn missing_fields_duplicates_syntax_errors_and_empty_files_are_errors() {
        let err = error_of("[[token]]\nname = \"a\"\nrole = \"admin\"\n");
        assert!(
            err.starts_with("line 1: token[0]") && err.contains("missing field `sha256`"),
            "{err}"
        );

        let hash = sha256_hex(TOKEN);
        let twice = format!(
            "{}\n{}",
            file_with("admin", &hash),
            file_with("viewer", &hash)
        );
        assert_eq!(
            error_of(&twice),
            "line 7: token[1].name: duplicate name \"crm-service\" (also token[0])"
        );
        let same_hash = twice.replacen("crm-service", "other", 1);
        assert!(
            error_of(&same_hash).starts_with("line 9: token[1].sha256: the same hash as token[0]"),
            "{}",
            error_of(&same_hash)
        );

        let err = error_of("[[token]]\nname = \"a\nrole = \"admin\"\n");
        assert!(err.starts_with("line 2: "), "{err}");

        assert_eq!(
            error_of("# nobody\n"),
            "line 1: token: expected at least one [[token]] table (name, role, sha256)"
        );
        let err = error_of(&file_with("", &hash));
        assert!(err.contains("token[0].role: unknown role \"\""), "{err}");
    }

    #[test]
    fn the_table_covers_every_rpc_of_the_protos_and_admin_may_call_each() {
        let descriptors =
            prost_types::FileDescriptorSet::decode(touchpoint_proto::FILE_DESCRIPTOR_SET)
                .expect("the descriptor set decodes");
        let mut in_protos = BTreeSet::new();
        // The external adapter contract is served by adapters, not by the scheduler.
        for file in descriptors
            .file
            .iter()
            .filter(|f| f.package() == "touchpoint.v1")
        {
            for service in &file.service {
                for method in &service.method {
                    in_protos.insert(format!(
                        "{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        let in_table: BTreeSet<String> =
            RPC_ROLES.iter().map(|(rpc, _)| (*rpc).to_owned()).collect();
        assert_eq!(
            in_protos, in_table,
            "RPC_ROLES must list every RPC of the touchpoint.v1 protos (and docs/security.md too)"
        );
        assert_eq!(in_table.len(), RPC_ROLES.len(), "an RPC is listed twice");
        for (rpc, roles) in RPC_ROLES {
            assert!(roles.contains(&Admin), "admin may not call {rpc}");
        }
    }

    #[test]
    fn health_and_reflection_are_open_and_unknown_methods_admin_only() {
        assert_eq!(required("/grpc.health.v1.Health/Check"), Required::Open);
        assert_eq!(
            required("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Required::Open
        );
        assert_eq!(
            required("/touchpoint.v1.PlaybookService/DeletePlaybook"),
            Required::Roles(&[Admin])
        );
        assert_eq!(required("/whatever"), Required::Roles(&[Admin]));
        assert_eq!(
            required("/grpc.health.v1.Health/../touchpoint.v1.PlaybookService/ApplyPlaybook"),
            Required::Roles(&[Admin])
        );
        assert_eq!(
            required("/grpc.health.v1.Health"),
            Required::Roles(&[Admin])
        );
        assert_eq!(
            required("/touchpoint.v1.WorkerService/Attach"),
            Required::Roles(&[Admin, Worker])
        );
    }

    #[test]
    fn tokens_policy_answers_unauthenticated_or_permission_denied() {
        let tokens = Tokens::parse(&file_with("viewer", &sha256_hex(TOKEN))).expect("valid");
        let policy = Policy::Tokens(tokens);
        let apply = "/touchpoint.v1.PlaybookService/ApplyPlaybook";
        let list = "/touchpoint.v1.PlaybookService/ListPlaybooks";
        let bearer = header(&format!("Bearer {TOKEN}"));

        let caller = policy
            .check(list, Some(&bearer), loopback())
            .expect("viewer may list");
        assert_eq!((&*caller.name, caller.role), ("crm-service", Some(Viewer)));
        let lower = header(&format!("bearer {TOKEN}"));
        assert!(policy.check(list, Some(&lower), None).is_ok());

        let denied = policy
            .check(apply, Some(&bearer), loopback())
            .expect_err("a viewer may not apply");
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            denied.message(),
            "role viewer may not call touchpoint.v1.PlaybookService/ApplyPlaybook (token \"crm-service\")"
        );

        for bad in [
            None,
            Some(header("Bearer wrong")),
            Some(header(TOKEN)),
            Some(header(&format!("Basic {TOKEN}"))),
            Some(header("Bearer ")),
        ] {
            let status = policy
                .check(list, bad.as_ref(), loopback())
                .expect_err("refused");
            assert_eq!(status.code(), Code::Unauthenticated, "{bad:?}");
            assert!(!status.message().contains(TOKEN));
        }
        assert!(
            policy
                .check("/grpc.health.v1.Health/Check", None, None)
                .is_ok()
        );
    }

    #[test]
    fn without_an_auth_file_only_loopback_peers_get_in() {
        let policy = Policy::LoopbackOnly;
        let list = "/touchpoint.v1.PlaybookService/ListPlaybooks";
        let v6 = Some(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 40000)));
        let mapped: Option<SocketAddr> = "[::ffff:127.0.0.1]:40000".parse().ok();
        for peer in [loopback(), v6, mapped] {
            assert!(policy.check(list, None, peer).is_ok(), "{peer:?}");
        }
        let remote = Some(SocketAddr::from(([10, 1, 2, 3], 40000)));
        for peer in [remote, None] {
            let status = policy.check(list, None, peer).expect_err("refused");
            assert_eq!(status.code(), Code::PermissionDenied);
            assert!(
                status.message().contains("TOUCHPOINT_AUTH_FILE"),
                "{}",
                status.message()
            );
        }
        assert!(
            policy
                .check("/grpc.health.v1.Health/Check", None, remote)
                .is_ok(),
            "probes come from other hosts"
        );
    }

    struct Answer200;

    impl tower::Service<http::Request<Body>> for Answer200 {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<Body>) -> Self::Future {
            ready(Ok(http::Response::new(Body::empty())))
        }
    }

    /// The layer itself, around a service that answers 200: it reads the peer from the
    /// connection info and answers refusals as gRPC statuses.
    #[tokio::test]
    async fn the_layer_reads_the_peer_and_answers_refusals_as_grpc_statuses() {
        let mut service = AuthLayer::new(Policy::LoopbackOnly).layer(Answer200);
        let call = |peer: SocketAddr| {
            let mut request = http::Request::builder()
                .uri("http://scheduler/touchpoint.v1.RunService/ListRuns")
                .body(Body::empty())
                .expect("a request");
            request.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer),
            });
            request
        };
        let ok = service
            .call(call(SocketAddr::from(([127, 0, 0, 1], 1))))
            .await
            .expect("infallible");
        assert_eq!(ok.headers().get("grpc-status"), None);
        let refused = service
            .call(call(SocketAddr::from(([192, 0, 2, 7], 1))))
            .await
            .expect("infallible");
        assert_eq!(
            refused.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(b"7".as_slice()),
            "PERMISSION_DENIED"
        );
    }
}
