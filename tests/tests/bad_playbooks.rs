//! Applying a bad playbook changes nothing and says what is wrong, with the field's path;
//! good playbooks are versioned.

use tonic::Code;
use touchpoint_proto::v1::{
    ApplyPlaybookRequest, ApplyPlaybookResponse, ApplyStatus, GetPlaybookRequest,
    ListPlaybooksRequest, Playbook, RunStatus, StepStatus,
};
use touchpoint_tests::{Stack, TouchpointClient, contact, request_id};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");

/// A playbook as data, so each bad case is one small mutation of a valid base.
#[derive(Debug, Clone)]
struct Doc {
    name: Option<String>,
    description: String,
    /// Each step: its keys and raw YAML values, in order.
    steps: Vec<Vec<(String, String)>>,
}

impl Doc {
    /// A valid playbook: 0 `add`, 1 `coupon` (template), 2 `invite` (if), 3 `pause` (wait),
    /// 4 `remind`.
    fn base() -> Self {
        let step = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<Vec<_>>()
        };
        Self {
            name: Some("validation-base".to_owned()),
            description: "新客欢迎".to_owned(),
            steps: vec![
                step(&[
                    ("id", "add"),
                    ("action", "add_contact"),
                    ("channel", "wecom"),
                ]),
                step(&[
                    ("id", "coupon"),
                    ("action", "send_message"),
                    ("channel", "wecom"),
                    (
                        "template",
                        r#""{{ contact.attrs.name }}，欢迎！新人券 {{ params.coupon }} 已到账""#,
                    ),
                    ("params", "{ coupon: WELCOME10 }"),
                ]),
                step(&[
                    ("id", "invite"),
                    ("action", "invite_to_group"),
                    ("channel", "wecom"),
                    ("params", "{ group: vip-club }"),
                    ("if", r#"'"paid" in contact.tags'"#),
                ]),
                step(&[("id", "pause"), ("wait", "2h")]),
                step(&[
                    ("id", "remind"),
                    ("action", "send_message"),
                    ("channel", "sms"),
                    ("template", r#""您的新人券还有 4 天到期""#),
                ]),
            ],
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Some(name) = &self.name {
            out.push_str(&format!("name: {name}\n"));
        }
        out.push_str(&format!("description: {}\n", self.description));
        if self.steps.is_empty() {
            out.push_str("steps: []\n");
            return out;
        }
        out.push_str("steps:\n");
        for step in &self.steps {
            for (i, (key, value)) in step.iter().enumerate() {
                let lead = if i == 0 { "  - " } else { "    " };
                out.push_str(&format!("{lead}{key}: {value}\n"));
            }
        }
        out
    }

    /// Sets `key` of step `index` (replacing it in place, or appending it).
    fn set(mut self, index: usize, key: &str, value: &str) -> Self {
        let step = &mut self.steps[index];
        match step.iter_mut().find(|(k, _)| k == key) {
            Some(pair) => pair.1 = value.to_owned(),
            None => step.push((key.to_owned(), value.to_owned())),
        }
        self
    }

    fn remove(mut self, index: usize, key: &str) -> Self {
        let before = self.steps[index].len();
        self.steps[index].retain(|(k, _)| k != key);
        assert_eq!(
            self.steps[index].len(),
            before - 1,
            "no key {key} in step {index}"
        );
        self
    }

    fn rename(mut self, index: usize, key: &str, new_key: &str) -> Self {
        let pair = self.steps[index]
            .iter_mut()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no key {key} in step {index}"));
        pair.0 = new_key.to_owned();
        self
    }
}

enum Expect {
    /// The message starts with this (the field path, and usually what is wrong).
    Prefix(&'static str),
    /// The message contains this.
    Contains(&'static str),
}

struct Case {
    what: &'static str,
    yaml: String,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    use Expect::{Contains, Prefix};
    let base = Doc::base;
    let case = |what, doc: Doc, expect| Case {
        what,
        yaml: doc.render(),
        expect,
    };
    vec![
        case(
            "invalid duration",
            base().set(3, "wait", "3x"),
            Prefix(r#"steps[3].wait: invalid duration "3x""#),
        ),
        case(
            "duplicate step id",
            base().set(2, "id", "coupon"),
            Prefix(r#"steps[2].id: duplicate step id "coupon""#),
        ),
        case(
            "misspelt key",
            base().rename(0, "channel", "chanel"),
            Prefix("steps[0].chanel: unknown field"),
        ),
        case(
            "name with a space and capitals",
            Doc {
                name: Some("Welcome New".to_owned()),
                ..base()
            },
            Prefix(r#"name: invalid name "Welcome New""#),
        ),
        case(
            "name longer than 63 characters",
            Doc {
                name: Some("a".repeat(64)),
                ..base()
            },
            Prefix("name: invalid name"),
        ),
        case(
            "bad if expression",
            base().set(2, "if", r#"'"paid" in'"#),
            Prefix("steps[2].if:"),
        ),
        case(
            "unclosed template",
            base().set(1, "template", r#""{{ contact.attrs.name ""#),
            Prefix("steps[1].template:"),
        ),
        case(
            "action without channel",
            base().remove(0, "channel"),
            Prefix("steps[0].channel: required"),
        ),
        case(
            "action and wait in one step",
            base().set(0, "wait", "1h"),
            Prefix("steps[0]:"),
        ),
        case(
            "no steps",
            Doc {
                steps: Vec::new(),
                ..base()
            },
            Prefix("steps:"),
        ),
        case(
            "missing name",
            Doc {
                name: None,
                ..base()
            },
            Prefix("name:"),
        ),
        Case {
            what: "YAML syntax error",
            yaml: "name: broken\nsteps: [\n".to_owned(),
            expect: Contains("line"),
        },
    ]
}

async fn apply(
    client: &mut TouchpointClient,
    yaml: &str,
    dry_run: bool,
) -> Result<ApplyPlaybookResponse, tonic::Status> {
    client
        .playbooks
        .apply_playbook(ApplyPlaybookRequest {
            yaml: yaml.to_owned(),
            dry_run,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn list(client: &mut TouchpointClient) -> Vec<Playbook> {
    client
        .playbooks
        .list_playbooks(ListPlaybooksRequest {})
        .await
        .expect("ListPlaybooks")
        .into_inner()
        .playbooks
}

async fn get(
    client: &mut TouchpointClient,
    name: &str,
    version: u32,
) -> Result<Playbook, tonic::Status> {
    client
        .playbooks
        .get_playbook(GetPlaybookRequest {
            name: name.to_owned(),
            version,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_playbooks_are_rejected_with_the_field_path_and_nothing_is_stored() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let client = &mut stack.client;

    // The base is valid, so each case fails for its one mutation only.
    let base = Doc::base().render();
    let valid = apply(client, &base, true).await;
    assert!(
        matches!(&valid, Ok(r) if r.status() == ApplyStatus::Valid),
        "the base playbook should be valid: {valid:?}\n{base}"
    );

    let mut failures = Vec::new();
    for case in cases() {
        for dry_run in [false, true] {
            let label = format!("{} (dry_run={dry_run})", case.what);
            match apply(client, &case.yaml, dry_run).await {
                Ok(response) => {
                    failures.push(format!("{label}: accepted ({response:?}):\n{}", case.yaml))
                }
                Err(status) => {
                    let message = status.message();
                    let ok = match case.expect {
                        Expect::Prefix(prefix) => message.starts_with(prefix),
                        Expect::Contains(part) => message.contains(part),
                    };
                    if status.code() != Code::InvalidArgument || !ok {
                        let expected = match case.expect {
                            Expect::Prefix(p) => format!("INVALID_ARGUMENT starting with {p:?}"),
                            Expect::Contains(p) => format!("INVALID_ARGUMENT containing {p:?}"),
                        };
                        failures.push(format!(
                            "{label}: expected {expected}, got {:?} {message:?}",
                            status.code()
                        ));
                    }
                }
            }
            let stored = list(client).await;
            if !stored.is_empty() {
                let names: Vec<_> = stored.iter().map(|p| (&p.name, p.version)).collect();
                failures.push(format!("{label}: something was stored: {names:?}"));
            }
        }
    }
    match get(client, "validation-base", 0).await {
        Err(status) if status.code() == Code::NotFound => {}
        other => failures.push(format!(
            "GetPlaybook validation-base: expected NOT_FOUND, got {other:?}"
        )),
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n{}",
        failures.len(),
        cases().len() * 2,
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbooks_are_versioned_and_runs_keep_their_version() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let name = "validation-base";
    let v1 = Doc::base().render();
    let mut changed = Doc::base();
    changed.description = "新客欢迎（第二版）".to_owned();
    let changed = changed.set(4, "template", r#""券还有 3 天到期""#);
    let v2 = changed.render();

    // A dry run validates and stores nothing.
    let dry = apply(&mut stack.client, &v1, true).await.expect("dry run");
    assert_eq!(dry.status(), ApplyStatus::Valid, "{dry:?}");
    assert_eq!(
        (dry.name.as_str(), dry.version, dry.step_count),
        (name, 1, 5)
    );
    assert!(
        list(&mut stack.client).await.is_empty(),
        "a dry run stored something"
    );
    let missing = get(&mut stack.client, name, 0).await;
    assert!(
        matches!(&missing, Err(s) if s.code() == Code::NotFound),
        "after a dry run: {missing:?}"
    );

    let created = stack.apply(&v1).await;
    assert_eq!(
        (created.status(), created.version),
        (ApplyStatus::Created, 1),
        "{created:?}"
    );
    let unchanged = stack.apply(&v1).await;
    assert_eq!(
        (unchanged.status(), unchanged.version),
        (ApplyStatus::Unchanged, 1),
        "{unchanged:?}"
    );

    // A run started on version 1 (no worker runs here, so it stays active).
    let run_v1 = stack
        .enroll(
            name,
            contact("c-4001", &[("name", "王芳")], &[]),
            &request_id(),
        )
        .await;
    assert_eq!(run_v1.version, 1);

    let dry2 = apply(&mut stack.client, &v2, true)
        .await
        .expect("dry run v2");
    assert_eq!(
        (dry2.status(), dry2.version),
        (ApplyStatus::Valid, 2),
        "{dry2:?}"
    );
    let still_v1 = get(&mut stack.client, name, 0)
        .await
        .expect("latest after dry run");
    assert_eq!(still_v1.version, 1, "a dry run made a new version");

    let second = stack.apply(&v2).await;
    assert_eq!(
        (second.status(), second.version),
        (ApplyStatus::Created, 2),
        "{second:?}"
    );

    let old = get(&mut stack.client, name, 1)
        .await
        .expect("GetPlaybook v1");
    assert_eq!(old.version, 1);
    assert_eq!(old.yaml, v1, "version 1 must keep its source exactly");
    assert_eq!(old.latest_version, 2);
    assert_eq!(old.step_ids, ["add", "coupon", "invite", "pause", "remind"]);
    let latest = get(&mut stack.client, name, 0)
        .await
        .expect("GetPlaybook latest");
    assert_eq!((latest.version, latest.latest_version), (2, 2));
    assert_eq!(latest.yaml, v2);
    assert_eq!(latest.description, "新客欢迎（第二版）");
    let missing = get(&mut stack.client, name, 3).await;
    assert!(
        matches!(&missing, Err(s) if s.code() == Code::NotFound),
        "GetPlaybook v3: {missing:?}"
    );
    let listed: Vec<(String, u32)> = list(&mut stack.client)
        .await
        .into_iter()
        .map(|p| (p.name, p.version))
        .collect();
    assert_eq!(listed, [(name.to_owned(), 2)]);

    // Runs stay on the version they started with; new runs take the latest.
    let run_v2 = stack
        .enroll(
            name,
            contact("c-4002", &[("name", "李雷")], &[]),
            &request_id(),
        )
        .await;
    assert_eq!(run_v2.version, 2);
    let first = stack.client.run(&run_v1.run_id).await;
    assert_eq!(first.version, 1);
    assert_eq!(first.status(), RunStatus::Active);
    assert_eq!(first.steps.len(), 5);
    assert_ne!(
        first.steps[0].status(),
        StepStatus::Done,
        "no worker, nothing done"
    );
}
