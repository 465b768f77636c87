//! Static checks of `deploy/` and `docs/operations.md`, without a Docker engine or helm:
//!
//! - `compose.yaml` parses; every image is pinned (a tag, not `latest`) or built from
//!   `deploy/Dockerfile`, whose own base images are pinned; every file a service mounts
//!   from `deploy/` exists; the scheduler and worker services publish or expose exactly
//!   the ports their `TOUCHPOINT_LISTEN` / `TOUCHPOINT_METRICS_LISTEN` name; workers dial
//!   a scheduler service on its listen port; the auth file, the worker config and the
//!   demo tokens work with the real parsers of the binaries.
//! - Prometheus scrapes services and ports that exist, every scheduler and worker on its
//!   metrics port; its alert rules are mounted and loaded; the collector's pipelines only
//!   name components it defines and send traces to Jaeger's OTLP port.
//! - Every metric named by an alert or by the Grafana dashboard is in the metrics table of
//!   `docs/operations.md` (parsed from there: the one list of what the binaries export),
//!   and every alert has its runbook section.
//! - The Helm chart, rendered here by a small renderer for the subset of Helm's template
//!   language the chart restricts itself to (paths, `quote`, `toYaml`, `nindent`,
//!   `sha256sum`, `if`/`else`), parses as YAML; ports, probes, Services, PDBs, the HPA,
//!   the worker ConfigMap and the Secret references agree with each other and the flags.
//! - Every environment variable compose or Helm sets on a scheduler or worker container
//!   is one the binary reads: its clap arguments' `env`, a `secret_env` of its
//!   `worker.toml`, or a short allow-list of variables read outside clap, each checked to
//!   be read in the source.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use serde_json::{Value, json};
use touchpoint_scheduler::{SchedulerArgs, auth};
use touchpoint_worker::{WorkerArgs, WorkerConfig};

// ---------------------------------------------------------------------------------------
// Files

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

fn parse_yaml(text: &str, what: &str) -> Value {
    serde_saphyr::from_str::<Value>(text).unwrap_or_else(|error| panic!("{what}: {error}"))
}

fn yaml_file(relative: &str) -> Value {
    parse_yaml(&read(relative), relative)
}

fn s(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value}"))
}

/// A YAML value that may be a string or a number (ports, `expose`), as a string.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        other => panic!("expected a scalar, got {other}"),
    }
}

fn port_of(address: &str) -> u16 {
    let (_, port) = address
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{address:?} has no :port"));
    port.parse()
        .unwrap_or_else(|_| panic!("{address:?}: bad port"))
}

/// `scheme://host:port[/...]` → (host, port).
fn url_host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url:?} names no port"));
    (
        host.to_owned(),
        port.parse().unwrap_or_else(|_| panic!("{url:?}: bad port")),
    )
}

// ---------------------------------------------------------------------------------------
// What the binaries read

/// Variables read outside clap, with a piece of source that shows each is read: the
/// name itself, or the call that reads it (`EnvFilter::*_default_env` reads `RUST_LOG`;
/// opentelemetry_sdk's `Resource::builder()` applies `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES`).
const READ_OUTSIDE_CLAP: &[(&str, &[&str])] = &[
    ("RUST_LOG", &["RUST_LOG", "from_default_env"]),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        &["OTEL_EXPORTER_OTLP_ENDPOINT"],
    ),
    (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        &["OTEL_EXPORTER_OTLP_PROTOCOL"],
    ),
    (
        "OTEL_SERVICE_NAME",
        &["OTEL_SERVICE_NAME", "Resource::builder()"],
    ),
    (
        "OTEL_RESOURCE_ATTRIBUTES",
        &["OTEL_RESOURCE_ATTRIBUTES", "Resource::builder()"],
    ),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binary {
    Scheduler,
    Worker,
}

impl Binary {
    fn from_command(command: &str) -> Option<Self> {
        match command {
            "touchpoint-scheduler" => Some(Self::Scheduler),
            "touchpoint-worker" => Some(Self::Worker),
            _ => None,
        }
    }

    fn clap_env(self) -> BTreeSet<String> {
        let command = match self {
            Self::Scheduler => SchedulerArgs::command(),
            Self::Worker => WorkerArgs::command(),
        };
        command
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .collect()
    }

    /// The Rust source compiled into the binary (its crate and touchpoint-proto).
    fn source(self) -> String {
        let own = match self {
            Self::Scheduler => "scheduler/src",
            Self::Worker => "worker/src",
        };
        let mut text = String::new();
        for dir in [own, "proto/src"] {
            collect_rust(&repo().join(dir), &mut text);
        }
        text
    }

    /// Every variable the binary reads, plus `extra` (a worker's `secret_env`s).
    fn reads(self, extra: &BTreeSet<String>) -> BTreeSet<String> {
        let mut names = self.clap_env();
        names.extend(READ_OUTSIDE_CLAP.iter().map(|(name, _)| (*name).to_owned()));
        names.extend(extra.iter().cloned());
        names
    }
}

fn collect_rust(dir: &Path, into: &mut String) {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|error| panic!("read {}: {error}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rust(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push_str(&fs::read_to_string(&path).expect("read a source file"));
            into.push('\n');
        }
    }
}

fn assert_reads_all(binary: Binary, set: &[String], extra: &BTreeSet<String>, at: &str) {
    let reads = binary.reads(extra);
    let unknown: Vec<&String> = set.iter().filter(|name| !reads.contains(*name)).collect();
    assert!(
        unknown.is_empty(),
        "{at} sets {unknown:?} on the {binary:?}, which reads none of them; it reads {reads:?}"
    );
}

/// Parses `text` as a worker's `worker.toml` with the real parser, looking secrets up in
/// `set` (the variables the manifest sets); returns the variables the file names.
fn worker_config_env(text: &str, set: &BTreeSet<String>, at: &str) -> BTreeSet<String> {
    let asked = RefCell::new(BTreeSet::new());
    // A valid Standard Webhooks secret, for whatever secret_env the file names.
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned();
    WorkerConfig::from_toml(text, |name| {
        asked.borrow_mut().insert(name.to_owned());
        set.contains(name).then(|| secret.clone())
    })
    .unwrap_or_else(|error| panic!("{at}: worker.toml is refused by the worker: {error}"));
    asked.into_inner()
}

// ---------------------------------------------------------------------------------------
// Metric names

struct MetricsTable {
    names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

/// The table under `## Metrics` in docs/operations.md: `| \`name\` | type | ...`.
fn metrics_table() -> MetricsTable {
    let doc = read("docs/operations.md");
    let section = doc
        .split("\n## Metrics\n")
        .nth(1)
        .expect("docs/operations.md has a `## Metrics` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut table = MetricsTable {
        names: BTreeSet::new(),
        histograms: BTreeSet::new(),
    };
    for line in section.lines().filter(|line| line.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        if cells[2].starts_with("histogram") {
            table.histograms.insert(name.clone());
        }
        table.names.insert(name);
    }
    assert!(
        table.names.len() >= 18,
        "the metrics table of docs/operations.md is too short: {:?}",
        table.names
    );
    table
}

impl MetricsTable {
    fn knows(&self, series: &str) -> bool {
        self.names.contains(series)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                series
                    .strip_suffix(suffix)
                    .is_some_and(|base| self.histograms.contains(base))
            })
    }
}

const PROMQL_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects (Grafana's `$variables` allowed).
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    fn skip_string(chars: &[char], mut i: usize) -> usize {
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            if chars[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    }
    fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> usize {
        let mut depth = 0;
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => {
                    i = skip_string(chars, i);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    }
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_group(&chars, i, '[', ']');
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            let lower = word.to_ascii_lowercase();
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&lower.as_str())
            {
                if call {
                    i = skip_group(&chars, next, '(', ')');
                }
            } else if !call && !PROMQL_KEYWORDS.contains(&lower.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_extraction() {
    let expr = r#"histogram_quantile(0.99, sum by (le, channel) (rate(a_seconds_bucket{channel=~"$channel", x="b c"}[$__rate_interval]))) / on (channel) group_left max without (x) (b_total offset 5m) > 1e3 and c"#;
    let found: Vec<String> = promql_metrics(expr).into_iter().collect();
    assert_eq!(found, ["a_seconds_bucket", "b_total", "c"]);
}

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Compose

struct Service<'a> {
    name: &'a str,
    spec: &'a Value,
}

impl<'a> Service<'a> {
    fn command(&self) -> Vec<String> {
        match &self.spec["command"] {
            Value::String(line) => line.split_whitespace().map(str::to_owned).collect(),
            Value::Array(words) => words.iter().map(scalar).collect(),
            _ => Vec::new(),
        }
    }

    fn binary(&self) -> Option<Binary> {
        self.command()
            .first()
            .and_then(|command| Binary::from_command(command))
    }

    fn env(&self) -> BTreeMap<String, String> {
        match &self.spec["environment"] {
            Value::Object(map) => map
                .iter()
                .map(|(key, value)| (key.clone(), scalar(value)))
                .collect(),
            Value::Array(list) => list
                .iter()
                .map(|item| {
                    let item = s(item);
                    let (key, value) = item.split_once('=').unwrap_or((item, ""));
                    (key.to_owned(), value.to_owned())
                })
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    /// Container ports the service publishes (`ports`) or exposes (`expose`).
    fn container_ports(&self) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        for entry in self.spec["ports"].as_array().into_iter().flatten() {
            let port = match entry {
                Value::Object(long) => scalar(&long["target"]),
                short => {
                    let short = scalar(short);
                    short.rsplit(':').next().unwrap_or_default().to_owned()
                }
            };
            let port = port.split('/').next().unwrap_or_default();
            ports.insert(port.parse().expect("a port number"));
        }
        for entry in self.spec["expose"].as_array().into_iter().flatten() {
            let port = scalar(entry);
            let port = port.split('/').next().unwrap_or_default();
            ports.insert(port.parse().expect("a port number"));
        }
        ports
    }

    /// Bind mounts `(source relative to deploy/, target)`; named volumes are left out.
    fn bind_mounts(&self) -> Vec<(String, String)> {
        let mut mounts = Vec::new();
        for entry in self.spec["volumes"].as_array().into_iter().flatten() {
            let (source, target) = match entry {
                Value::Object(long) => {
                    (s(&long["source"]).to_owned(), s(&long["target"]).to_owned())
                }
                short => {
                    let parts: Vec<&str> = s(short).split(':').collect();
                    (parts[0].to_owned(), parts[1].to_owned())
                }
            };
            if source.starts_with('.') || source.starts_with('/') {
                mounts.push((source, target));
            }
        }
        mounts
    }

    fn named_volumes(&self) -> Vec<String> {
        self.spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.as_str())
            .map(|short| short.split(':').next().unwrap_or_default().to_owned())
            .filter(|source| !source.starts_with('.') && !source.starts_with('/'))
            .collect()
    }

    /// The file under deploy/ mounted at `target` (a file, or inside a mounted folder).
    fn mounted_file(&self, target: &str) -> Option<PathBuf> {
        self.bind_mounts().into_iter().find_map(|(source, mount)| {
            let rest = target.strip_prefix(&mount)?;
            if !rest.is_empty() && !rest.starts_with('/') {
                return None;
            }
            let file = repo().join("deploy").join(source);
            let rest = rest.trim_start_matches('/');
            Some(if rest.is_empty() {
                file
            } else {
                file.join(rest)
            })
        })
    }
}

fn compose() -> Value {
    yaml_file("deploy/compose.yaml")
}

fn services(compose: &Value) -> Vec<Service<'_>> {
    compose["services"]
        .as_object()
        .expect("compose.yaml has services")
        .iter()
        .map(|(name, spec)| Service { name, spec })
        .collect()
}

fn service<'a>(services: &'a [Service<'a>], name: &str) -> &'a Service<'a> {
    services
        .iter()
        .find(|service| service.name == name)
        .unwrap_or_else(|| panic!("compose.yaml has no service {name:?}"))
}

fn assert_pinned(image: &str, at: &str) {
    if image.contains("@sha256:") {
        return;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = last.split_once(':').map(|(_, tag)| tag);
    assert!(
        tag.is_some_and(|tag| !tag.is_empty() && tag != "latest"),
        "{at}: image {image:?} is not pinned to a tag (and `latest` is no pin)"
    );
}

#[test]
fn compose_has_the_whole_stack_and_pins_every_image() {
    let compose = compose();
    let services = services(&compose);
    let binaries: Vec<(&str, Binary)> = services
        .iter()
        .filter_map(|service| service.binary().map(|binary| (service.name, binary)))
        .collect();
    let count = |kind| {
        binaries
            .iter()
            .filter(|(_, binary)| *binary == kind)
            .count()
    };
    assert_eq!(count(Binary::Scheduler), 2, "two schedulers: {binaries:?}");
    assert_eq!(count(Binary::Worker), 2, "two workers: {binaries:?}");
    for name in [
        "redis",
        "redis-exporter",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
    ] {
        service(&services, name);
    }
    for service in &services {
        if let Some(build) = service.spec.get("build") {
            assert_eq!(
                s(&build["dockerfile"]),
                "deploy/Dockerfile",
                "{}",
                service.name
            );
            let context = repo().join("deploy").join(s(&build["context"]));
            assert!(
                context.join("deploy/Dockerfile").is_file(),
                "{}: build context {} has no deploy/Dockerfile",
                service.name,
                context.display()
            );
            assert!(
                !service.command().is_empty(),
                "{}: built from deploy/Dockerfile, so name the binary in `command`",
                service.name
            );
            let command = &service.command()[0];
            assert!(
                ["touchpoint-scheduler", "touchpoint-worker", "tp"].contains(&command.as_str()),
                "{}: the image has no command {command:?}",
                service.name
            );
        } else {
            let image = service.spec["image"]
                .as_str()
                .unwrap_or_else(|| panic!("{} has neither image nor build", service.name));
            assert_pinned(image, service.name);
        }
        for dependency in service.spec["depends_on"]
            .as_object()
            .map(|map| map.keys().cloned().collect::<Vec<_>>())
            .or_else(|| {
                service.spec["depends_on"]
                    .as_array()
                    .map(|list| list.iter().map(|item| s(item).to_owned()).collect())
            })
            .unwrap_or_default()
        {
            assert!(
                services.iter().any(|other| other.name == dependency),
                "{} depends on {dependency:?}, which is not a service",
                service.name
            );
        }
    }
    // Redis: AOF, and never evict Touchpoint's state.
    let redis = service(&services, "redis").command().join(" ");
    assert!(redis.contains("--appendonly yes"), "{redis}");
    assert!(redis.contains("--maxmemory-policy noeviction"), "{redis}");
    assert!(
        redis.contains("--maxmemory "),
        "set maxmemory: the memory alert divides by it: {redis}"
    );
}

#[test]
fn dockerfile_pins_its_base_images_and_runs_as_non_root() {
    let dockerfile = read("deploy/Dockerfile");
    let mut args = BTreeMap::new();
    let mut stages = BTreeSet::new();
    let mut froms = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        if let Some(arg) = line.strip_prefix("ARG ") {
            if let Some((name, default)) = arg.split_once('=') {
                args.insert(format!("${{{name}}}"), default.trim_matches('"').to_owned());
            }
        } else if let Some(from) = line.strip_prefix("FROM ") {
            let words: Vec<&str> = from.split_whitespace().collect();
            let image = args
                .get(words[0])
                .cloned()
                .unwrap_or_else(|| words[0].to_owned());
            if !stages.contains(&image) {
                froms.push(image);
            }
            if let [_, as_, name] = words.as_slice()
                && as_.eq_ignore_ascii_case("as")
            {
                stages.insert((*name).to_owned());
            }
        }
    }
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    for image in &froms {
        assert_pinned(image, "deploy/Dockerfile");
    }
    let runtime = dockerfile.rsplit("\nFROM ").next().expect("a last stage");
    assert!(
        runtime.contains("ca-certificates"),
        "the runtime has CA certificates"
    );
    let user = runtime
        .lines()
        .find_map(|line| line.trim().strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap_or(user);
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER must be a numeric non-root uid (runAsNonRoot checks it): {user}"
    );
    for binary in ["touchpoint-scheduler", "touchpoint-worker", "tp"] {
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "the image has {binary}"
        );
    }
    // The compose health check's script is in the image.
    assert!(dockerfile.contains("deploy/healthz.sh /usr/local/bin/touchpoint-healthz"));
    assert!(repo().join("deploy/healthz.sh").is_file());
}

#[test]
fn compose_mounts_only_files_that_exist() {
    let compose = compose();
    let declared: BTreeSet<String> = compose["volumes"]
        .as_object()
        .map(|map| map.keys().cloned().collect())
        .unwrap_or_default();
    for service in services(&compose) {
        for (source, target) in service.bind_mounts() {
            let path = repo().join("deploy").join(&source);
            assert!(
                path.exists(),
                "{} mounts {source} (at {target}), which does not exist under deploy/",
                service.name
            );
        }
        for volume in service.named_volumes() {
            assert!(
                declared.contains(&volume),
                "{} uses volume {volume:?}, not declared under `volumes`",
                service.name
            );
        }
    }
}

#[test]
fn compose_ports_and_addresses_match_the_flags() {
    let compose = compose();
    let services = services(&compose);
    let collector = yaml_file("deploy/otel-collector.yaml");
    for service in services.iter().filter(|service| service.binary().is_some()) {
        let binary = service.binary().expect("a touchpoint service");
        let env = service.env();
        let at = service.name;
        let metrics = env
            .get("TOUCHPOINT_METRICS_LISTEN")
            .unwrap_or_else(|| panic!("{at}: no TOUCHPOINT_METRICS_LISTEN, so nothing to scrape"));
        assert!(
            metrics.starts_with("0.0.0.0:"),
            "{at}: metrics on {metrics} cannot be reached from Prometheus"
        );
        let mut serves = BTreeSet::from([port_of(metrics)]);
        if binary == Binary::Scheduler {
            let listen = env
                .get("TOUCHPOINT_LISTEN")
                .unwrap_or_else(|| panic!("{at}: no TOUCHPOINT_LISTEN"));
            assert!(
                listen.starts_with("0.0.0.0:"),
                "{at}: {listen} is unreachable"
            );
            serves.insert(port_of(listen));
            let (redis, _) = url_host_port(&env["TOUCHPOINT_REDIS_URL"]);
            service_named(&services, &redis, at);
        }
        let ports = service.container_ports();
        assert_eq!(
            ports, serves,
            "{at}: publishes/exposes {ports:?} but listens on {serves:?}"
        );
        if binary == Binary::Worker {
            let (host, port) = url_host_port(&env["TOUCHPOINT_SERVER"]);
            let scheduler = service_named(&services, &host, at);
            assert_eq!(
                scheduler.binary(),
                Some(Binary::Scheduler),
                "{at} dials {host}"
            );
            assert_eq!(
                port_of(&scheduler.env()["TOUCHPOINT_LISTEN"]),
                port,
                "{at} dials {host}:{port}, which is not the scheduler's TOUCHPOINT_LISTEN"
            );
        }
        if let Some(endpoint) = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            let (host, port) = url_host_port(endpoint);
            let target = service_named(&services, &host, at);
            assert!(target.container_ports().contains(&port), "{at}: {endpoint}");
            let protocol = env
                .get("OTEL_EXPORTER_OTLP_PROTOCOL")
                .map_or("grpc", String::as_str);
            let receiver = match protocol {
                "grpc" => &collector["receivers"]["otlp"]["protocols"]["grpc"],
                "http/protobuf" => &collector["receivers"]["otlp"]["protocols"]["http"],
                other => panic!("{at}: OTEL_EXPORTER_OTLP_PROTOCOL {other:?}"),
            };
            assert_eq!(
                port_of(s(&receiver["endpoint"])),
                port,
                "{at}: {endpoint} is not the collector's OTLP {protocol} port"
            );
        }
        if let Some(test) = service.spec["healthcheck"]["test"].as_array() {
            let test: Vec<String> = test.iter().map(scalar).collect();
            assert!(
                test.iter().any(|word| word == "touchpoint-healthz"),
                "{at}: health check {test:?}"
            );
        }
    }
}

fn service_named<'a>(services: &'a [Service<'a>], host: &str, at: &str) -> &'a Service<'a> {
    services
        .iter()
        .find(|service| service.name == host)
        .unwrap_or_else(|| panic!("{at} points at {host:?}, which is not a compose service"))
}

#[test]
fn compose_sets_only_variables_the_binaries_read() {
    let compose = compose();
    for service in services(&compose) {
        let Some(binary) = service.binary() else {
            continue;
        };
        let env = service.env();
        let names: BTreeSet<String> = env.keys().cloned().collect();
        let mut extra = BTreeSet::new();
        if binary == Binary::Worker {
            let config = env
                .get("TOUCHPOINT_WORKER_CONFIG")
                .unwrap_or_else(|| panic!("{}: no TOUCHPOINT_WORKER_CONFIG", service.name));
            let file = service
                .mounted_file(config)
                .unwrap_or_else(|| panic!("{}: nothing is mounted at {config}", service.name));
            let text = fs::read_to_string(&file).expect("read the worker config");
            extra = worker_config_env(&text, &names, service.name);
        }
        assert_reads_all(
            binary,
            &names.into_iter().collect::<Vec<_>>(),
            &extra,
            &format!("compose.yaml service {}", service.name),
        );
    }
}

#[test]
fn compose_tokens_are_admitted_by_the_auth_file() {
    let compose_text = read("deploy/compose.yaml");
    let compose = parse_yaml(&compose_text, "compose.yaml");
    let services = services(&compose);
    let peer: Option<std::net::SocketAddr> = Some("172.18.0.5:40000".parse().expect("an address"));
    let mut policy = None;
    for service in services
        .iter()
        .filter(|svc| svc.binary() == Some(Binary::Scheduler))
    {
        let path = &service.env()["TOUCHPOINT_AUTH_FILE"];
        let file = service
            .mounted_file(path)
            .unwrap_or_else(|| panic!("{}: nothing mounted at {path}", service.name));
        let tokens =
            auth::Tokens::load(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
        policy = Some(auth::Policy::Tokens(tokens));
    }
    let policy = policy.expect("the schedulers have an auth file");
    let check = |path: &str, token: &str| {
        let header = tonic::codegen::http::HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("a header value");
        policy.check(path, Some(&header), peer)
    };
    for worker in services
        .iter()
        .filter(|svc| svc.binary() == Some(Binary::Worker))
    {
        let token = &worker.env()["TOUCHPOINT_TOKEN"];
        let caller = check("/touchpoint.v1.WorkerService/Attach", token)
            .unwrap_or_else(|status| panic!("{}'s token is refused: {status}", worker.name));
        assert_eq!(caller.role, Some(auth::Role::Worker), "{}", worker.name);
    }
    // The admin token compose.yaml's header tells `tp` users to use.
    let admin = "touchpoint-dev-admin";
    assert!(compose_text.contains(&format!("TOUCHPOINT_TOKEN={admin}")));
    check("/touchpoint.v1.PlaybookService/ApplyPlaybook", admin)
        .unwrap_or_else(|status| panic!("the documented admin token is refused: {status}"));
    // Kubernetes' and compose's probes carry no token.
    assert!(matches!(
        auth::required("/grpc.health.v1.Health/Check"),
        auth::Required::Open
    ));
}

// ---------------------------------------------------------------------------------------
// Prometheus, alerts, collector, Grafana

#[test]
fn prometheus_scrapes_every_process_on_its_metrics_port() {
    let compose = compose();
    let services = services(&compose);
    let prometheus = service(&services, "prometheus");
    let command = prometheus.command();
    let config_path = command
        .iter()
        .find_map(|arg| arg.strip_prefix("--config.file="))
        .expect("prometheus --config.file=");
    let config_file = prometheus
        .mounted_file(config_path)
        .expect("prometheus.yml is mounted");
    assert!(config_file.ends_with("deploy/prometheus/prometheus.yml"));
    let config = yaml_file("deploy/prometheus/prometheus.yml");

    for rule_file in config["rule_files"].as_array().expect("rule_files") {
        let file = prometheus
            .mounted_file(s(rule_file))
            .unwrap_or_else(|| panic!("rule file {rule_file} is not mounted"));
        assert!(file.is_file(), "{}", file.display());
    }
    assert!(
        config["rule_files"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|file| prometheus
                .mounted_file(s(file))
                .is_some_and(|path| path.ends_with("deploy/prometheus/alerts.yml"))),
        "alerts.yml is loaded"
    );

    let mut scraped = BTreeSet::new();
    for job in config["scrape_configs"].as_array().expect("scrape_configs") {
        for group in job["static_configs"].as_array().into_iter().flatten() {
            for target in group["targets"].as_array().into_iter().flatten() {
                let target = s(target);
                let (host, port) = target.rsplit_once(':').expect("host:port");
                let port: u16 = port.parse().expect("a port");
                let at = format!("job {}", s(&job["job_name"]));
                let service = service_named(&services, host, &at);
                assert!(
                    service.container_ports().contains(&port),
                    "{at}: {target}, but {host} serves {:?}",
                    service.container_ports()
                );
                if service.binary().is_some() {
                    assert_eq!(
                        port_of(&service.env()["TOUCHPOINT_METRICS_LISTEN"]),
                        port,
                        "{at}: {target} is not {host}'s TOUCHPOINT_METRICS_LISTEN"
                    );
                    assert_eq!(
                        job["metrics_path"].as_str().unwrap_or("/metrics"),
                        "/metrics"
                    );
                }
                scraped.insert(host.to_owned());
            }
        }
    }
    for service in services.iter().filter(|svc| svc.binary().is_some()) {
        assert!(
            scraped.contains(service.name),
            "{} is not scraped",
            service.name
        );
    }
    assert!(
        scraped.contains("redis-exporter"),
        "redis_exporter is scraped"
    );
}

#[test]
fn alerts_use_exported_metrics_and_each_has_a_runbook() {
    let table = metrics_table();
    let runbook = read("docs/operations.md");
    let runbook_anchors = anchors(&runbook);
    let alerts = yaml_file("deploy/prometheus/alerts.yml");
    let mut names = BTreeSet::new();
    for group in alerts["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = s(&rule["alert"]);
            assert!(names.insert(name.to_owned()), "alert {name} twice");
            let expr = s(&rule["expr"]);
            let metrics = promql_metrics(expr);
            assert!(!metrics.is_empty(), "{name}: no metric in {expr}");
            for metric in metrics {
                assert!(
                    table.knows(&metric),
                    "{name} uses {metric}, which is not in docs/operations.md's metrics table"
                );
            }
            let duration = s(&rule["for"]);
            assert!(
                duration.len() > 1
                    && duration[..duration.len() - 1].parse::<u32>().is_ok()
                    && duration.ends_with(['s', 'm', 'h']),
                "{name}: for: {duration:?}"
            );
            let severity = s(&rule["labels"]["severity"]);
            assert!(
                ["warning", "critical"].contains(&severity),
                "{name}: {severity}"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            let url = s(&rule["annotations"]["runbook_url"]);
            let anchor = url
                .strip_prefix("docs/operations.md#")
                .unwrap_or_else(|| panic!("{name}: runbook_url {url}"));
            assert!(
                runbook_anchors.contains(anchor),
                "{name}: docs/operations.md has no section #{anchor}"
            );
            assert!(
                runbook.contains(name),
                "docs/operations.md never names {name}"
            );
        }
    }
    // The situations the runbook must cover.
    for expected in [
        "TouchpointDeadLettersGrowing",
        "TouchpointTimerLagHigh",
        "TouchpointRedisMemoryHigh",
        "TouchpointChannelRateLimited",
        "TouchpointWorkerDisconnected",
        "TouchpointGrpcServerErrors",
    ] {
        assert!(names.contains(expected), "no alert {expected}");
    }
}

#[test]
fn dashboard_parses_and_uses_exported_metrics() {
    let table = metrics_table();
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/touchpoint.json"))
        .expect("touchpoint.json is JSON");
    let mut exprs = Vec::new();
    collect_key(&dashboard["panels"], "expr", &mut exprs);
    assert!(
        exprs.len() >= 15,
        "a real dashboard: {} queries",
        exprs.len()
    );
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let metrics = promql_metrics(expr);
        assert!(!metrics.is_empty(), "no metric in {expr}");
        used.extend(metrics);
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(definition) = variable["definition"].as_str() {
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|rest| rest.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable query {definition}"));
            let (metric, _) = inner.rsplit_once(',').expect("label_values(metric, label)");
            used.extend(promql_metrics(metric));
        }
    }
    for metric in &used {
        assert!(
            table.knows(metric),
            "the dashboard uses {metric}, which is not in docs/operations.md's metrics table"
        );
    }
    // Throughput, timer lag, failures by channel, backlog, dead letters.
    for needed in [
        "touchpoint_scheduler_steps_dispatched_total",
        "touchpoint_scheduler_timer_lag_seconds_bucket",
        "touchpoint_worker_deliveries_total",
        "touchpoint_scheduler_due_backlog",
        "touchpoint_scheduler_dead_letters",
    ] {
        assert!(used.contains(needed), "the dashboard shows no {needed}");
    }
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel ids unique"
        );
        assert!(panel["gridPos"].is_object(), "{}: gridPos", panel["title"]);
    }
}

fn collect_key(value: &Value, key: &str, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (name, child) in map {
                match child {
                    Value::String(text) if name == key => into.push(text.clone()),
                    _ => collect_key(child, key, into),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|child| collect_key(child, key, into)),
        _ => {}
    }
}

#[test]
fn grafana_provisioning_points_at_the_stack() {
    let compose = compose();
    let services = services(&compose);
    let grafana = service(&services, "grafana");
    let datasources = yaml_file("deploy/grafana/provisioning/datasources/datasources.yaml");
    let dashboard_text = read("deploy/grafana/dashboards/touchpoint.json");
    for source in datasources["datasources"].as_array().expect("datasources") {
        let (host, port) = url_host_port(s(&source["url"]));
        let target = service_named(&services, &host, "a Grafana data source");
        assert!(target.container_ports().contains(&port), "{source}");
    }
    let prometheus_uid = datasources["datasources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|source| source["type"] == "prometheus")
        .map(|source| s(&source["uid"]).to_owned())
        .expect("a Prometheus data source");
    assert!(dashboard_text.contains(&format!("\"value\": \"{prometheus_uid}\"")));

    let providers = yaml_file("deploy/grafana/provisioning/dashboards/touchpoint.yaml");
    for provider in providers["providers"].as_array().expect("providers") {
        let path = s(&provider["options"]["path"]);
        let folder = grafana.mounted_file(path).unwrap_or_else(|| {
            panic!("Grafana reads dashboards from {path}, nothing is mounted there")
        });
        assert!(
            folder.join("touchpoint.json").is_file(),
            "{}",
            folder.display()
        );
    }
    for provisioning in ["datasources", "dashboards"] {
        let target = format!("/etc/grafana/provisioning/{provisioning}");
        let folder = grafana
            .mounted_file(&target)
            .unwrap_or_else(|| panic!("nothing mounted at {target}"));
        assert!(folder.is_dir());
    }
}

#[test]
fn collector_pipelines_are_complete_and_reach_jaeger() {
    let compose = compose();
    let services = services(&compose);
    let collector_service = service(&services, "otel-collector");
    let config = yaml_file("deploy/otel-collector.yaml");
    for extension in config["service"]["extensions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert!(
            config["extensions"].get(s(extension)).is_some(),
            "{extension}"
        );
    }
    let pipelines = config["service"]["pipelines"]
        .as_object()
        .expect("pipelines");
    assert!(pipelines.contains_key("traces"));
    for (name, pipeline) in pipelines {
        for kind in ["receivers", "processors", "exporters"] {
            for component in pipeline[kind].as_array().into_iter().flatten() {
                assert!(
                    config[kind].get(s(component)).is_some(),
                    "pipeline {name} uses {kind} {component}, not defined"
                );
            }
        }
    }
    for (protocol, port) in [("grpc", 4317), ("http", 4318)] {
        let endpoint = s(&config["receivers"]["otlp"]["protocols"][protocol]["endpoint"]);
        assert_eq!(endpoint, format!("0.0.0.0:{port}"));
        assert!(collector_service.container_ports().contains(&port));
    }
    let traces: Vec<&str> = pipelines["traces"]["exporters"]
        .as_array()
        .expect("trace exporters")
        .iter()
        .map(s)
        .collect();
    let jaeger_config = yaml_file("deploy/jaeger.yaml");
    let jaeger_grpc = port_of(s(
        &jaeger_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    ));
    let to_jaeger = traces.iter().any(|exporter| {
        config["exporters"][*exporter]["endpoint"]
            .as_str()
            .is_some_and(|endpoint| endpoint == format!("jaeger:{jaeger_grpc}"))
    });
    assert!(
        to_jaeger,
        "traces are exported to jaeger:{jaeger_grpc}: {traces:?}"
    );
    let jaeger = service(&services, "jaeger");
    assert!(jaeger.container_ports().contains(&jaeger_grpc));
    assert!(
        jaeger
            .mounted_file("/etc/jaeger/config.yaml")
            .is_some_and(|path| path.ends_with("deploy/jaeger.yaml"))
    );
    assert!(
        s(&jaeger.spec["image"]).starts_with("jaegertracing/jaeger:2."),
        "Jaeger v2"
    );
    assert!(
        s(&collector_service.spec["image"]).contains("opentelemetry-collector-contrib:"),
        "the contrib collector (redaction, prometheus exporter)"
    );
}

// ---------------------------------------------------------------------------------------
// Helm

/// A renderer for the subset of Helm's template language the chart uses: `{{ .Path }}`
/// (`.Values`, `.Release`, `.Chart`), pipelines through `quote`, `toYaml`, `nindent N`,
/// `indent N` and `sha256sum`, `if`/`else`/`end`, comments and `{{-`/`-}}` trimming.
/// Anything else fails the test, so the chart stays within what is checked here.
mod helm {
    use std::fmt::Write as _;

    use serde_json::Value;
    use sha2::{Digest as _, Sha256};

    enum Node {
        Text(String),
        Expr(String),
        If(String, Vec<Node>, Vec<Node>),
    }

    fn tokens(template: &str) -> Vec<(bool, String)> {
        let mut out = Vec::new();
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            let mut text = rest[..start].to_owned();
            let after = &rest[start + 2..];
            let end = after.find("}}").expect("an unclosed {{");
            let mut inner = &after[..end];
            if inner.starts_with("- ") {
                text = text.trim_end().to_owned();
                inner = &inner[1..];
            }
            let right_trim = inner.ends_with(" -");
            if right_trim {
                inner = &inner[..inner.len() - 1];
            }
            out.push((false, text));
            out.push((true, inner.trim().to_owned()));
            rest = &after[end + 2..];
            if right_trim {
                rest = rest.trim_start();
            }
        }
        out.push((false, rest.to_owned()));
        out
    }

    fn parse(tokens: &[(bool, String)], at: &mut usize) -> (Vec<Node>, Option<String>) {
        let mut nodes = Vec::new();
        while *at < tokens.len() {
            let (action, text) = &tokens[*at];
            *at += 1;
            if !action {
                nodes.push(Node::Text(text.clone()));
            } else if text.starts_with("/*") {
                continue;
            } else if text == "end" || text == "else" {
                return (nodes, Some(text.clone()));
            } else if let Some(condition) = text.strip_prefix("if ") {
                let (then, end) = parse(tokens, at);
                let otherwise = match end.as_deref() {
                    Some("else") => {
                        let (otherwise, end) = parse(tokens, at);
                        assert_eq!(end.as_deref(), Some("end"), "if without end");
                        otherwise
                    }
                    Some("end") => Vec::new(),
                    _ => panic!("if without end"),
                };
                nodes.push(Node::If(condition.trim().to_owned(), then, otherwise));
            } else {
                nodes.push(Node::Expr(text.clone()));
            }
        }
        (nodes, None)
    }

    fn lookup<'a>(context: &'a Value, path: &str) -> Option<&'a Value> {
        let path = path.strip_prefix('.')?;
        path.split('.')
            .try_fold(context, |value, key| value.get(key))
    }

    fn text_of(value: &Value, at: &str) -> String {
        match value {
            Value::String(text) => text.clone(),
            Value::Number(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
            other => panic!("{at}: cannot print {other}"),
        }
    }

    fn yaml_scalar(value: &Value) -> String {
        match value {
            Value::String(text) => Value::String(text.clone()).to_string(),
            other => other.to_string(),
        }
    }

    /// Block YAML, as Helm's `toYaml` writes it (strings double-quoted here).
    fn to_yaml(value: &Value) -> String {
        fn write(value: &Value, indent: usize, out: &mut String) {
            let pad = " ".repeat(indent);
            match value {
                Value::Object(map) => {
                    for (key, child) in map {
                        let key = Value::String(key.clone()).to_string();
                        match child {
                            Value::Object(inner) if !inner.is_empty() => {
                                let _ = writeln!(out, "{pad}{key}:");
                                write(child, indent + 2, out);
                            }
                            Value::Array(items) if !items.is_empty() => {
                                let _ = writeln!(out, "{pad}{key}:");
                                write(child, indent, out);
                            }
                            Value::Object(_) => {
                                let _ = writeln!(out, "{pad}{key}: {{}}");
                            }
                            Value::Array(_) => {
                                let _ = writeln!(out, "{pad}{key}: []");
                            }
                            scalar => {
                                let _ = writeln!(out, "{pad}{key}: {}", yaml_scalar(scalar));
                            }
                        }
                    }
                }
                Value::Array(items) => {
                    for item in items {
                        match item {
                            Value::Object(_) | Value::Array(_) => {
                                let mut inner = String::new();
                                write(item, indent + 2, &mut inner);
                                let inner =
                                    inner.replacen(&format!("{pad}  "), &format!("{pad}- "), 1);
                                out.push_str(&inner);
                            }
                            scalar => {
                                let _ = writeln!(out, "{pad}- {}", yaml_scalar(scalar));
                            }
                        }
                    }
                }
                scalar => {
                    let _ = writeln!(out, "{pad}{}", yaml_scalar(scalar));
                }
            }
        }
        let mut out = String::new();
        write(value, 0, &mut out);
        out.trim_end_matches('\n').to_owned()
    }

    fn indent(text: &str, width: usize) -> String {
        let pad = " ".repeat(width);
        text.lines()
            .map(|line| format!("{pad}{line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn evaluate(pipeline: &str, context: &Value, at: &str) -> Value {
        let mut value: Option<Value> = None;
        for command in pipeline.split('|').map(str::trim) {
            let words: Vec<&str> = command.split_whitespace().collect();
            let (function, args) = match words.first() {
                Some(first) if first.starts_with('.') => {
                    assert!(value.is_none() && words.len() == 1, "{at}: {pipeline}");
                    let found = lookup(context, first)
                        .unwrap_or_else(|| panic!("{at}: {first} has no value"));
                    value = Some(found.clone());
                    continue;
                }
                Some(function) => (*function, &words[1..]),
                None => panic!("{at}: empty command in {pipeline}"),
            };
            let mut args: Vec<Value> = args
                .iter()
                .map(|arg| {
                    if arg.starts_with('.') {
                        lookup(context, arg)
                            .cloned()
                            .unwrap_or_else(|| panic!("{at}: {arg} has no value"))
                    } else {
                        Value::String((*arg).to_owned())
                    }
                })
                .collect();
            if let Some(piped) = value.take() {
                args.push(piped);
            }
            let number = |arg: &Value| -> usize {
                text_of(arg, at)
                    .parse()
                    .unwrap_or_else(|_| panic!("{at}: {arg}"))
            };
            value = Some(match (function, args.as_slice()) {
                ("quote", [arg]) => Value::String(Value::String(text_of(arg, at)).to_string()),
                ("toYaml", [arg]) => Value::String(to_yaml(arg)),
                ("nindent", [width, arg]) => {
                    Value::String(format!("\n{}", indent(&text_of(arg, at), number(width))))
                }
                ("indent", [width, arg]) => Value::String(indent(&text_of(arg, at), number(width))),
                ("sha256sum", [arg]) => {
                    Value::String(hex::encode(Sha256::digest(text_of(arg, at).as_bytes())))
                }
                _ => panic!("{at}: the test's renderer does not know `{command}`"),
            });
        }
        value.unwrap_or_else(|| panic!("{at}: {pipeline} gives nothing"))
    }

    fn truthy(condition: &str, context: &Value) -> bool {
        match lookup(context, condition) {
            None | Some(Value::Null | Value::Bool(false)) => false,
            Some(Value::String(text)) => !text.is_empty(),
            Some(Value::Number(number)) => number.as_f64() != Some(0.0),
            Some(Value::Array(items)) => !items.is_empty(),
            Some(Value::Object(map)) => !map.is_empty(),
            Some(Value::Bool(true)) => true,
        }
    }

    fn emit(nodes: &[Node], context: &Value, at: &str, out: &mut String) {
        for node in nodes {
            match node {
                Node::Text(text) => out.push_str(text),
                Node::Expr(pipeline) => {
                    out.push_str(&text_of(&evaluate(pipeline, context, at), at))
                }
                Node::If(condition, then, otherwise) => {
                    assert!(condition.starts_with('.'), "{at}: if {condition}");
                    let branch = if truthy(condition, context) {
                        then
                    } else {
                        otherwise
                    };
                    emit(branch, context, at, out);
                }
            }
        }
    }

    /// Renders `template` against `context` (`{"Values", "Release", "Chart"}`).
    pub(super) fn render(template: &str, context: &Value, at: &str) -> String {
        let tokens = tokens(template);
        let mut position = 0;
        let (nodes, end) = parse(&tokens, &mut position);
        assert!(
            end.is_none(),
            "{at}: `{{{{ {} }}}}` without if",
            end.unwrap_or_default()
        );
        let mut out = String::new();
        emit(&nodes, context, at, &mut out);
        out
    }
}

const CHART: &str = "deploy/helm/touchpoint";

/// Every template of the chart rendered with `values` (the chart's own, changed by
/// `change`), as parsed YAML documents.
fn render_chart(change: impl FnOnce(&mut Value)) -> Vec<Value> {
    let chart = yaml_file(&format!("{CHART}/Chart.yaml"));
    let mut values = yaml_file(&format!("{CHART}/values.yaml"));
    change(&mut values);
    let context = json!({
        "Values": values,
        "Release": {"Name": "tp", "Namespace": "marketing", "Service": "Helm"},
        "Chart": {
            "Name": chart["name"],
            "Version": chart["version"],
            "AppVersion": chart["appVersion"],
        },
    });
    let mut documents = Vec::new();
    let dir = repo().join(CHART).join("templates");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("templates/")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "templates: {files:?}");
    for file in files {
        let at = file.display().to_string();
        let template = fs::read_to_string(&file).expect("read a template");
        let rendered = helm::render(&template, &context, &at);
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&rendered)
            .unwrap_or_else(|error| panic!("{at} renders to invalid YAML: {error}\n{rendered}"));
        let parsed: Vec<Value> = parsed.into_iter().filter(|doc| !doc.is_null()).collect();
        assert!(!parsed.is_empty(), "{at} renders to nothing");
        for document in &parsed {
            assert!(
                document["apiVersion"].is_string() && document["kind"].is_string(),
                "{at}"
            );
        }
        documents.extend(parsed);
    }
    documents
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn env_entries(container: &Value) -> Vec<&Value> {
    container["env"].as_array().expect("env").iter().collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    env_entries(container)
        .into_iter()
        .find(|entry| entry["name"] == name)
        .unwrap_or_else(|| panic!("{} sets no {name}", container["name"]))
}

fn env_literal<'a>(container: &'a Value, name: &str) -> &'a str {
    s(&env_value(container, name)["value"])
}

fn named_port(container: &Value, name: &str) -> u16 {
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|port| port["name"] == name)
        .and_then(|port| port["containerPort"].as_u64())
        .and_then(|port| u16::try_from(port).ok())
        .unwrap_or_else(|| panic!("{} has no port {name}", container["name"]))
}

/// A probe's or Service's port (a number, or a container port's name) as a number.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    match port {
        Value::String(name) => named_port(container, name),
        Value::Number(number) => number
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .expect("a port"),
        other => panic!("port {other}"),
    }
}

fn pod_labels(deployment: &Value) -> &serde_json::Map<String, Value> {
    deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("pod labels")
}

fn selects(selector: &Value, deployment: &Value) -> bool {
    let labels = pod_labels(deployment);
    let selector = selector.as_object().expect("a selector");
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

fn assert_hardened(deployment: &Value, container: &Value, at: &str) {
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{at}");
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false, "{at}");
    assert_eq!(security["readOnlyRootFilesystem"], true, "{at}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{at}");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !container["resources"][kind][resource].is_null(),
                "{at}: resources.{kind}.{resource}"
            );
        }
    }
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{at}");
    assert_eq!(annotations["prometheus.io/path"], "/metrics", "{at}");
    let metrics = port_of(env_literal(container, "TOUCHPOINT_METRICS_LISTEN"));
    assert_eq!(
        s(&annotations["prometheus.io/port"]).parse::<u16>().ok(),
        Some(metrics),
        "{at}: prometheus.io/port is not TOUCHPOINT_METRICS_LISTEN's port"
    );
    assert_eq!(named_port(container, "metrics"), metrics, "{at}");
    let image = s(&container["image"]);
    assert_pinned(image, at);
}

/// Every env entry is read by `binary`; `$(VAR)` references name earlier entries.
fn assert_helm_env(container: &Value, binary: Binary, extra: &BTreeSet<String>, at: &str) {
    let mut earlier = BTreeSet::new();
    let mut names = Vec::new();
    for entry in env_entries(container) {
        let name = s(&entry["name"]).to_owned();
        if let Some(value) = entry["value"].as_str() {
            for reference in value.split("$(").skip(1) {
                let reference = reference.split(')').next().unwrap_or_default();
                assert!(
                    earlier.contains(reference),
                    "{at}: {name} refers to $({reference}), not set before it"
                );
            }
        } else {
            assert!(entry["valueFrom"].is_object(), "{at}: {name} has no value");
        }
        earlier.insert(name.clone());
        names.push(name);
    }
    assert_reads_all(binary, &names, extra, at);
}

fn assert_secret_ref(container: &Value, name: &str, at: &str) {
    let reference = &env_value(container, name)["valueFrom"]["secretKeyRef"];
    assert!(
        reference["name"].is_string() && reference["key"].is_string(),
        "{at}: {name} must come from a Secret (valueFrom.secretKeyRef)"
    );
}

fn check_chart(documents: &[Value], tls: bool) {
    let at = if tls { "Helm (TLS on)" } else { "Helm" };
    let scheduler = find(documents, "Deployment", "tp-scheduler");
    let worker = find(documents, "Deployment", "tp-worker");
    let scheduler_container = container(scheduler);
    let worker_container = container(worker);
    assert_eq!(
        scheduler_container["command"],
        json!(["touchpoint-scheduler"])
    );
    assert_eq!(worker_container["command"], json!(["touchpoint-worker"]));
    assert_hardened(scheduler, scheduler_container, &format!("{at} scheduler"));
    assert_hardened(worker, worker_container, &format!("{at} worker"));

    // Scheduler: replicas, ports, probes.
    assert!(
        scheduler["spec"]["replicas"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{at}: at least 2 schedulers"
    );
    let listen = port_of(env_literal(scheduler_container, "TOUCHPOINT_LISTEN"));
    assert!(env_literal(scheduler_container, "TOUCHPOINT_LISTEN").starts_with("0.0.0.0:"));
    assert_eq!(named_port(scheduler_container, "grpc"), listen, "{at}");
    let metrics = port_of(env_literal(
        scheduler_container,
        "TOUCHPOINT_METRICS_LISTEN",
    ));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let probe_spec = &scheduler_container[probe];
        if tls {
            assert_eq!(probe_spec["httpGet"]["path"], "/healthz", "{at}: {probe}");
            let port = resolve_port(scheduler_container, &probe_spec["httpGet"]["port"]);
            assert_eq!(port, metrics, "{at}: scheduler {probe}");
        } else {
            let port = probe_spec["grpc"]["port"]
                .as_u64()
                .unwrap_or_else(|| panic!("{at}: scheduler {probe} is not a gRPC probe"));
            assert_eq!(port, u64::from(listen), "{at}: scheduler {probe} port");
        }
        let probe_spec = &worker_container[probe];
        assert_eq!(
            probe_spec["httpGet"]["path"], "/healthz",
            "{at}: worker {probe}"
        );
        let port = resolve_port(worker_container, &probe_spec["httpGet"]["port"]);
        assert_eq!(
            port,
            port_of(env_literal(worker_container, "TOUCHPOINT_METRICS_LISTEN")),
            "{at}: worker {probe}"
        );
    }
    if tls {
        for name in ["TOUCHPOINT_TLS_CERT", "TOUCHPOINT_TLS_KEY"] {
            let path = env_literal(scheduler_container, name);
            assert!(
                is_mounted(scheduler, scheduler_container, path),
                "{at}: {path}"
            );
        }
        let ca = env_literal(worker_container, "TOUCHPOINT_CA");
        assert!(is_mounted(worker, worker_container, ca), "{at}: {ca}");
    }

    // Service: ports resolve to the scheduler's container ports; selects the schedulers.
    let service = find(documents, "Service", "tp-scheduler");
    assert!(
        selects(&service["spec"]["selector"], scheduler),
        "{at}: Service selector"
    );
    let mut grpc_port = None;
    for port in service["spec"]["ports"].as_array().expect("Service ports") {
        let target = resolve_port(scheduler_container, &port["targetPort"]);
        if target == listen {
            grpc_port = port["port"].as_u64();
        }
    }
    let grpc_port = grpc_port.expect("the Service forwards the gRPC port");
    let server = env_literal(worker_container, "TOUCHPOINT_SERVER");
    assert_eq!(server.starts_with("https://"), tls, "{at}: {server}");
    assert_eq!(
        url_host_port(server),
        (
            "tp-scheduler".to_owned(),
            u16::try_from(grpc_port).expect("a port")
        ),
        "{at}: workers dial the scheduler Service"
    );

    // PDBs and the HPA.
    for (name, deployment) in [("tp-scheduler", scheduler), ("tp-worker", worker)] {
        let pdb = find(documents, "PodDisruptionBudget", name);
        assert!(
            selects(&pdb["spec"]["selector"]["matchLabels"], deployment),
            "{at}: PDB {name} selects its pods"
        );
        assert!(!pdb["spec"]["minAvailable"].is_null() || !pdb["spec"]["maxUnavailable"].is_null());
        assert!(
            selects(&deployment["spec"]["selector"]["matchLabels"], deployment),
            "{at}: {name}'s selector matches its pod labels"
        );
    }
    let hpa = find(documents, "HorizontalPodAutoscaler", "tp-worker");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tp-worker");
    assert!(
        hpa["spec"]["minReplicas"].as_u64().is_some_and(|n| n >= 2),
        "{at}: HPA min 2"
    );
    assert!(
        hpa["spec"]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|metric| metric["resource"]["name"] == "cpu"),
        "{at}: the HPA scales on CPU"
    );
    assert!(
        worker["spec"]["replicas"].is_null(),
        "{at}: the HPA owns the worker count"
    );

    // Secrets come from Secrets.
    assert_secret_ref(scheduler_container, "TOUCHPOINT_REDIS_URL", at);
    assert_secret_ref(worker_container, "TOUCHPOINT_TOKEN", at);
    let auth_file = env_literal(scheduler_container, "TOUCHPOINT_AUTH_FILE");
    assert!(
        is_mounted(scheduler, scheduler_container, auth_file),
        "{at}: {auth_file}"
    );

    // worker.toml: mounted from the ConfigMap and accepted by the worker's parser, its
    // secret_env variables set from Secrets.
    let config_path = env_literal(worker_container, "TOUCHPOINT_WORKER_CONFIG");
    let config_map = find(documents, "ConfigMap", "tp-worker");
    let mount = worker_container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|mount| mount["mountPath"] == config_path)
        .unwrap_or_else(|| panic!("{at}: nothing mounted at {config_path}"));
    let volume = pod_volume(worker, s(&mount["name"]));
    assert_eq!(volume["configMap"]["name"], "tp-worker", "{at}");
    let key = s(&mount["subPath"]);
    let config = s(&config_map["data"][key]);
    let set: BTreeSet<String> = env_entries(worker_container)
        .iter()
        .map(|entry| s(&entry["name"]).to_owned())
        .collect();
    let secret_env = worker_config_env(config, &set, at);
    assert!(
        !secret_env.is_empty(),
        "{at}: the chart's worker.toml has a webhook channel"
    );
    for name in &secret_env {
        assert_secret_ref(worker_container, name, at);
    }

    // Every variable is one the binaries read.
    assert_helm_env(
        scheduler_container,
        Binary::Scheduler,
        &BTreeSet::new(),
        &format!("{at} scheduler"),
    );
    assert_helm_env(
        worker_container,
        Binary::Worker,
        &secret_env,
        &format!("{at} worker"),
    );
}

fn pod_volume<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Whether `path` is inside one of the container's volume mounts, backed by a volume.
fn is_mounted(deployment: &Value, container: &Value, path: &str) -> bool {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|mount| {
            let mount_path = s(&mount["mountPath"]);
            path.strip_prefix(mount_path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                && !pod_volume(deployment, s(&mount["name"])).is_null()
        })
}

#[test]
fn helm_chart_renders_and_agrees_with_the_flags() {
    check_chart(&render_chart(|_| {}), false);
}

#[test]
fn helm_chart_with_tls_and_extra_env_renders_and_agrees_with_the_flags() {
    let documents = render_chart(|values| {
        values["scheduler"]["tls"]["enabled"] = json!(true);
        values["scheduler"]["extraEnv"] =
            json!([{"name": "TOUCHPOINT_CLAIM_BATCH", "value": "512"}]);
        values["worker"]["extraEnv"] = json!([{"name": "RUST_LOG", "value": "debug"}]);
    });
    check_chart(&documents, true);
    let scheduler = container(find(&documents, "Deployment", "tp-scheduler"));
    assert_eq!(env_literal(scheduler, "TOUCHPOINT_CLAIM_BATCH"), "512");
}

#[test]
fn helm_values_hold_no_secrets_and_pin_the_image() {
    let values = yaml_file(&format!("{CHART}/values.yaml"));
    let tag = scalar(&values["image"]["tag"]);
    assert!(!tag.is_empty() && tag != "latest", "image.tag {tag:?}");
    let text = read(&format!("{CHART}/values.yaml"));
    for forbidden in ["redis://:", "whsec_", "password:"] {
        assert!(
            !text
                .lines()
                .filter(|line| !line.trim_start().starts_with('#'))
                .any(|line| line.contains(forbidden)),
            "values.yaml must reference Secrets, not hold them ({forbidden})"
        );
    }
    for document in render_chart(|_| {}) {
        assert_ne!(
            document["kind"], "Secret",
            "the chart references Secrets, never creates one"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The variables read outside clap are really read.

#[test]
fn variables_read_outside_clap_are_read_in_the_source() {
    for binary in [Binary::Scheduler, Binary::Worker] {
        let source = binary.source();
        for (name, evidence) in READ_OUTSIDE_CLAP {
            assert!(
                evidence.iter().any(|text| source.contains(text)),
                "the {binary:?}'s source (its crate and proto/) shows no sign of reading {name}: \
                 none of {evidence:?} occurs in it"
            );
        }
    }
}

/// The variables the deployments rely on are the binaries' own (clap) variables: this
/// fails until `--metrics-listen` and `--log-format` exist in both binaries.
#[test]
fn binaries_read_the_variables_the_deployments_rely_on() {
    for binary in [Binary::Scheduler, Binary::Worker] {
        let clap = binary.clap_env();
        for name in ["TOUCHPOINT_METRICS_LISTEN", "TOUCHPOINT_LOG_FORMAT"] {
            assert!(
                clap.contains(name),
                "the {binary:?} has no flag reading {name}: {clap:?}"
            );
        }
    }
    let scheduler = Binary::Scheduler.clap_env();
    for name in [
        "TOUCHPOINT_LISTEN",
        "TOUCHPOINT_REDIS_URL",
        "TOUCHPOINT_AUTH_FILE",
    ] {
        assert!(scheduler.contains(name), "{name}");
    }
    let worker = Binary::Worker.clap_env();
    for name in [
        "TOUCHPOINT_SERVER",
        "TOUCHPOINT_WORKER_CONFIG",
        "TOUCHPOINT_TOKEN",
    ] {
        assert!(worker.contains(name), "{name}");
    }
}
