//! Security for a test system: a throwaway PKI made with rcgen (a CA and the scheduler's
//! certificate; a client CA and a client certificate for mutual TLS; a client certificate
//! from a CA nobody trusts), one bearer token per role in an auth file, and [`Security`],
//! which turns them into scheduler flags, worker flags and client settings.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use touchpoint_proto::security::ClientTls;

/// Every role of the scheduler, as the auth file spells them.
pub const ROLES: [&str; 5] = ["admin", "marketer", "service", "worker", "viewer"];

/// PEM files of a throwaway PKI in a temporary folder (removed on drop).
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

/// A CA: its parameters and key sign leaves.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        Self { params, key }
    }

    fn pem(&self) -> String {
        self.params.self_signed(&self.key).expect("self-sign").pem()
    }

    /// A certificate for `names` (DNS names or IP addresses) with `usage`, and its key.
    fn sign(&self, name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|&n| n.to_owned()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    }
}

impl TestPki {
    /// Generates the CA and server certificate (for `localhost` and `127.0.0.1`), the
    /// client CA and a client certificate it signed, and a client certificate signed by
    /// an unrelated CA.
    ///
    /// # Panics
    /// When a certificate cannot be made or written.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-pki-")
            .tempdir()
            .expect("create a temporary folder for certificates");
        let write = |name: &str, pem: &str| {
            std::fs::write(dir.path().join(name), pem).expect("write a PEM file");
        };
        let ca = Ca::new("Touchpoint test CA");
        let (cert, key) = ca.sign(
            "touchpoint-scheduler",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        write("ca.pem", &ca.pem());
        write("server.pem", &cert);
        write("server-key.pem", &key);

        let client_ca = Ca::new("Touchpoint test client CA");
        let (cert, key) = client_ca.sign("worker-1", &[], ExtendedKeyUsagePurpose::ClientAuth);
        write("client-ca.pem", &client_ca.pem());
        write("client.pem", &cert);
        write("client-key.pem", &key);

        let rogue = Ca::new("Somebody else's CA");
        let (cert, key) = rogue.sign("intruder", &[], ExtendedKeyUsagePurpose::ClientAuth);
        write("rogue.pem", &cert);
        write("rogue-key.pem", &key);
        Self { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA clients trust (`TOUCHPOINT_CA`).
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// The scheduler's certificate (`TOUCHPOINT_TLS_CERT`).
    pub fn server_cert(&self) -> PathBuf {
        self.file("server.pem")
    }

    /// The scheduler's key (`TOUCHPOINT_TLS_KEY`).
    pub fn server_key(&self) -> PathBuf {
        self.file("server-key.pem")
    }

    /// The CA client certificates must be signed by (`TOUCHPOINT_TLS_CLIENT_CA`).
    pub fn client_ca(&self) -> PathBuf {
        self.file("client-ca.pem")
    }

    /// A client certificate signed by [`TestPki::client_ca`].
    pub fn client_cert(&self) -> PathBuf {
        self.file("client.pem")
    }

    /// The key of [`TestPki::client_cert`].
    pub fn client_key(&self) -> PathBuf {
        self.file("client-key.pem")
    }

    /// A client certificate signed by a CA the scheduler does not know.
    pub fn rogue_cert(&self) -> PathBuf {
        self.file("rogue.pem")
    }

    /// The key of [`TestPki::rogue_cert`].
    pub fn rogue_key(&self) -> PathBuf {
        self.file("rogue-key.pem")
    }
}

/// One random bearer token per role (named `<role>-token`) and the auth file holding
/// their SHA-256 hashes.
pub struct TestTokens {
    dir: TempDir,
    tokens: BTreeMap<&'static str, String>,
}

impl fmt::Debug for TestTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestTokens")
            .field("auth_file", &self.path())
            .finish_non_exhaustive()
    }
}

impl TestTokens {
    /// Makes the tokens and writes `auth.toml`.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-auth-")
            .tempdir()
            .expect("create a temporary folder for the auth file");
        let mut tokens = BTreeMap::new();
        let mut file = String::from("# Test tokens: one per role.\n");
        for role in ROLES {
            let token = format!(
                "tp_{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            file.push_str(&format!(
                "\n[[token]]\nname = \"{role}-token\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
                sha256_hex(&token)
            ));
            tokens.insert(role, token);
        }
        std::fs::write(dir.path().join("auth.toml"), file).expect("write auth.toml");
        Self { dir, tokens }
    }

    /// The auth file (`TOUCHPOINT_AUTH_FILE`).
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("auth.toml")
    }

    /// The token of `role`.
    ///
    /// # Panics
    /// For a role not in [`ROLES`].
    pub fn token(&self, role: &str) -> &str {
        self.tokens
            .get(role)
            .unwrap_or_else(|| panic!("no token for role {role:?}"))
    }
}

/// Lower-case hex SHA-256 of `token`, as the auth file wants it.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// How a client reaches a scheduler: TLS settings and a bearer token.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// CA to trust and, for mutual TLS, the client certificate.
    pub tls: ClientTls,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// How a test system is secured: plaintext or TLS (optionally mutual), with or without
/// tokens. Clones share the same certificates and tokens.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Certificates, when TLS is on.
    pub pki: Option<Arc<TestPki>>,
    /// Whether the scheduler requires client certificates.
    pub mutual_tls: bool,
    /// The auth file and tokens, when tokens are required.
    pub tokens: Option<Arc<TestTokens>>,
}

impl Security {
    /// Plaintext, no tokens: loopback clients only (what every other suite runs).
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// TLS with freshly made certificates.
    pub fn tls() -> Self {
        Self {
            pki: Some(Arc::new(TestPki::generate())),
            ..Self::default()
        }
    }

    /// Mutual TLS: clients need a certificate signed by the client CA.
    pub fn mutual_tls() -> Self {
        Self {
            mutual_tls: true,
            ..Self::tls()
        }
    }

    /// The same, requiring bearer tokens (one per role, see [`TestTokens`]).
    #[must_use]
    pub fn with_tokens(mut self) -> Self {
        self.tokens = Some(Arc::new(TestTokens::generate()));
        self
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.pki.is_some() { "https" } else { "http" }
    }

    /// The scheduler flags: `--auth-file`, `--tls-cert`, `--tls-key`, `--tls-client-ca`.
    pub fn scheduler_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(tokens) = &self.tokens {
            flags.extend(["--auth-file".to_owned(), path_arg(&tokens.path())]);
        }
        if let Some(pki) = &self.pki {
            flags.extend([
                "--tls-cert".to_owned(),
                path_arg(&pki.server_cert()),
                "--tls-key".to_owned(),
                path_arg(&pki.server_key()),
            ]);
            if self.mutual_tls {
                flags.extend(["--tls-client-ca".to_owned(), path_arg(&pki.client_ca())]);
            }
        }
        flags
    }

    /// The token of `role`, when tokens are on.
    pub fn token(&self, role: &str) -> Option<String> {
        self.tokens
            .as_ref()
            .map(|tokens| tokens.token(role).to_owned())
    }

    /// TLS settings of a well-behaved client: the CA, and with mutual TLS the client
    /// certificate.
    pub fn client_tls(&self) -> ClientTls {
        match &self.pki {
            None => ClientTls::default(),
            Some(pki) => ClientTls {
                ca: Some(pki.ca()),
                cert: self.mutual_tls.then(|| pki.client_cert()),
                key: self.mutual_tls.then(|| pki.client_key()),
            },
        }
    }

    /// A well-behaved client acting as `role` (the token only matters with tokens on).
    pub fn client(&self, role: &str) -> ClientOptions {
        ClientOptions {
            tls: self.client_tls(),
            token: self.token(role),
        }
    }

    /// The worker's TLS flags (`--ca`, `--tls-client-cert`, `--tls-client-key`).
    pub fn worker_flags(&self) -> Vec<String> {
        let tls = self.client_tls();
        let mut flags = Vec::new();
        for (flag, path) in [
            ("--ca", tls.ca),
            ("--tls-client-cert", tls.cert),
            ("--tls-client-key", tls.key),
        ] {
            if let Some(path) = path {
                flags.extend([flag.to_owned(), path_arg(&path)]);
            }
        }
        flags
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
