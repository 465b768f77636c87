//! Every Lua script keeps to one Redis Cluster slot: watched with `MONITOR` while a real
//! scheduler and worker go through every feature that runs a script (enrollment, claims
//! and completions, waits for events, goals, reentry, the contact budget, recurring
//! ticks, rate limits, progress, cancels, pauses, dead letters and their retry), each
//! script's declared keys and every key its commands touch must share one hash tag.
//!
//! Checked on a single redis-server, whatever `TOUCHPOINT_TEST_REDIS` says (MONITOR
//! watches one server): the property (one hash tag per script) is what makes the scripts
//! run on Redis Cluster, where a script whose keys span slots fails. `cluster.rs` runs
//! them on a real cluster.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::Digest as _;

use touchpoint_proto::v1::{
    ApplyPolicyRequest, CancelRunRequest, PausePlaybookRequest, RecordEventRequest,
    ResumePlaybookRequest, RetryDeadLettersRequest, UpsertContactRequest,
    retry_dead_letters_request::Target,
};
use touchpoint_tests::{
    ChannelConfig, RedisServer, Reply, SECRET_ENV, Stack, TestRedis, WorkerConfig, contact,
    request_id,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");

/// Every script the store runs, by name, as the store loads it (`claim`, `complete`,
/// `enroll` and `event` after the shared `counts.lua` and `later.lua`).
const SCRIPTS: &[(&str, &str)] = &[
    (
        "apply_playbook",
        include_str!("../../scheduler/src/store/lua/apply_playbook.lua"),
    ),
    (
        "cancel",
        include_str!("../../scheduler/src/store/lua/cancel.lua"),
    ),
    (
        "claim",
        concat!(
            include_str!("../../scheduler/src/store/lua/counts.lua"),
            include_str!("../../scheduler/src/store/lua/later.lua"),
            include_str!("../../scheduler/src/store/lua/claim.lua")
        ),
    ),
    (
        "complete",
        concat!(
            include_str!("../../scheduler/src/store/lua/counts.lua"),
            include_str!("../../scheduler/src/store/lua/later.lua"),
            include_str!("../../scheduler/src/store/lua/complete.lua")
        ),
    ),
    (
        "enroll",
        concat!(
            include_str!("../../scheduler/src/store/lua/counts.lua"),
            include_str!("../../scheduler/src/store/lua/later.lua"),
            include_str!("../../scheduler/src/store/lua/enroll.lua")
        ),
    ),
    (
        "event",
        concat!(
            include_str!("../../scheduler/src/store/lua/counts.lua"),
            include_str!("../../scheduler/src/store/lua/later.lua"),
            include_str!("../../scheduler/src/store/lua/event.lua")
        ),
    ),
    (
        "extend",
        include_str!("../../scheduler/src/store/lua/extend.lua"),
    ),
    (
        "moved_on",
        include_str!("../../scheduler/src/store/lua/moved_on.lua"),
    ),
    (
        "progress",
        include_str!("../../scheduler/src/store/lua/progress.lua"),
    ),
    (
        "rate_penalize",
        include_str!("../../scheduler/src/store/lua/rate_penalize.lua"),
    ),
    (
        "rate_take",
        include_str!("../../scheduler/src/store/lua/rate_take.lua"),
    ),
    (
        "resume",
        include_str!("../../scheduler/src/store/lua/resume.lua"),
    ),
    (
        "retry_dead",
        include_str!("../../scheduler/src/store/lua/retry_dead.lua"),
    ),
    (
        "schedule_skip",
        include_str!("../../scheduler/src/store/lua/schedule_skip.lua"),
    ),
    (
        "spend",
        include_str!("../../scheduler/src/store/lua/spend.lua"),
    ),
    (
        "tick_claim",
        include_str!("../../scheduler/src/store/lua/tick_claim.lua"),
    ),
    (
        "tick_progress",
        include_str!("../../scheduler/src/store/lua/tick_progress.lua"),
    ),
    (
        "upsert_contact",
        include_str!("../../scheduler/src/store/lua/upsert_contact.lua"),
    ),
];

/// `redis-cli monitor`, its lines collected as they come; killed on drop.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(port: u16) -> Self {
        let mut child = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-cli monitor");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("monitor lines").push(line);
            }
        });
        Self { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("monitor lines").clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One MONITOR line: who ran it (`lua` for a script's own commands) and its words.
fn parse(line: &str) -> Option<(bool, Vec<String>)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let from_lua = line[open..close].ends_with(" lua");
    let mut words = Vec::new();
    let mut chars = line[close + 1..].chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut word = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => {
                    if let Some(escaped) = chars.next() {
                        word.push(escaped);
                    }
                }
                c => word.push(c),
            }
        }
        words.push(word);
    }
    Some((from_lua, words))
}

/// The part of `key` Redis Cluster hashes: the first `{...}` with something inside, or
/// the whole key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The keys a command inside a script touches (these scripts only use commands whose
/// first argument is their key, and DEL/EXISTS, whose arguments all are).
fn keys_of(words: &[String]) -> Vec<&str> {
    let Some((command, args)) = words.split_first() else {
        return Vec::new();
    };
    match command.to_ascii_uppercase().as_str() {
        "TIME" => Vec::new(),
        "DEL" | "EXISTS" | "UNLINK" => args.iter().map(String::as_str).collect(),
        _ => args.first().map(String::as_str).into_iter().collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_script_touches_two_slots() {
    // MONITOR watches one server; on a cluster, Redis itself refuses a cross-slot script.
    let redis = TestRedis::Server(RedisServer::start());
    // Sends after a wait are handed out ahead (claim.lua with a horizon, moved_on.lua).
    let flags = ["--lease", "2s", "--hand-out-ahead", "1s"];
    let mut stack = Stack::start_on(redis, NODE, &flags, &[]).await;
    let monitor = Monitor::start(stack.redis.server().port());
    // One delivery fails for good (a dead letter to retry), one is rate-limited (the
    // channel's bucket is penalized), one takes long enough to be heartbeated (its
    // lease extended); the rest succeed.
    stack.receiver.script([
        Reply::status(400),
        Reply::status(429).retry_after(1),
        Reply::status(200).held_for(Duration::from_millis(1500)),
    ]);
    let mut config = WorkerConfig::new();
    for channel in ["wecom", "sms", "crm"] {
        let mut c = ChannelConfig::webhook(channel, &stack.receiver.url(), SECRET_ENV);
        if channel == "sms" {
            c = c.with_rate("50/s", None);
        }
        config = config.channel(c);
    }
    let _worker = touchpoint_tests::WorkerNode::start(
        NODE,
        &stack.scheduler.endpoint(),
        "w-1",
        &config,
        &[(SECRET_ENV, &stack.secret)],
    );
    let mut client = stack.client.clone();
    client
        .policy
        .apply_policy(ApplyPolicyRequest {
            yaml: "caps:\n  - { channel: \"*\", max: 20, per: 1d }\n".to_owned(),
            dry_run: false,
        })
        .await
        .expect("apply policy");
    for yaml in [
        include_str!("../../examples/welcome-journey.yaml"),
        include_str!("../../examples/lottery.yaml"),
        "name: every-second\nschedule: {cron: \"* * * * * *\", tz: UTC, audience: {tags: [paid]}}\n\
         steps:\n  - {id: ping, action: send_message, channel: crm}\n",
        "name: plain\nsteps:\n  - {id: one, action: send_message, channel: crm}\n  \
         - {id: pause, wait: 2s}\n  - {id: two, action: send_message, channel: sms}\n  \
         - {id: later, wait: 2s}\n  - {id: three, action: send_message, channel: crm}\n",
    ] {
        stack.apply(yaml).await;
    }
    let mut plain = Vec::new();
    for n in 0..6 {
        let c = contact(&format!("p-{n}"), &[], &[]);
        plain.push(stack.enroll("plain", c, &request_id()).await.run_id);
    }
    // The scripted replies go to the first requests: the plain runs' first sends.
    let receiver = &stack.receiver;
    let replied =
        touchpoint_tests::eventually(
            Duration::from_secs(20),
            || async move { receiver.count() >= 3 },
        )
        .await;
    assert!(replied, "{}", stack.receiver.summary());
    for n in 0..4 {
        let mut c = contact(&format!("c-{n}"), &[("name", "王芳")], &["paid"]);
        c.tz = "Asia/Shanghai".to_owned();
        client
            .contacts
            .upsert_contact(UpsertContactRequest {
                contact: Some(c),
                ..UpsertContactRequest::default()
            })
            .await
            .expect("upsert contact");
        for event in ["contact.added", "lottery.entered", "order.placed"] {
            client
                .events
                .record_event(RecordEventRequest {
                    contact_id: format!("c-{n}"),
                    name: event.to_owned(),
                    request_id: request_id(),
                    ..RecordEventRequest::default()
                })
                .await
                .expect("record event");
        }
    }
    // Any plain run still going (the scripted 400 fails whichever's send came first,
    // and on a loaded machine the quickest may be done).
    let mut cancelled = false;
    for run_id in plain.iter().rev() {
        let request = CancelRunRequest {
            run_id: run_id.clone(),
        };
        if client.runs.cancel_run(request).await.is_ok() {
            cancelled = true;
            break;
        }
    }
    assert!(
        cancelled,
        "every plain run finished before one could be cancelled"
    );
    let name = "plain".to_owned();
    client
        .playbooks
        .pause_playbook(PausePlaybookRequest { name: name.clone() })
        .await
        .expect("pause");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client
        .playbooks
        .resume_playbook(ResumePlaybookRequest { name })
        .await
        .expect("resume");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for playbook in ["plain"] {
        client
            .dead_letters
            .retry_dead_letters(RetryDeadLettersRequest {
                target: Some(Target::Playbook(playbook.to_owned())),
            })
            .await
            .expect("retry dead letters");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let lines = monitor.lines();
    let mut scripts = 0;
    let mut distinct = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    let mut current: Option<(String, String)> = None; // (hash tag, the script's call)
    for line in &lines {
        let Some((from_lua, words)) = parse(line) else {
            continue;
        };
        let Some(command) = words.first().map(|w| w.to_ascii_uppercase()) else {
            continue;
        };
        if !from_lua {
            current = None;
            if command == "EVALSHA" || command == "EVAL" {
                scripts += 1;
                distinct.insert(words.get(1).cloned().unwrap_or_default());
                let count: usize = words.get(2).and_then(|n| n.parse().ok()).unwrap_or(0);
                let declared: Vec<&str> = words
                    .iter()
                    .skip(3)
                    .take(count)
                    .map(String::as_str)
                    .collect();
                let tags: Vec<&str> = declared.iter().map(|k| hash_tag(k)).collect();
                if tags.windows(2).any(|pair| pair[0] != pair[1]) {
                    problems.push(format!("declared keys in two slots: {declared:?}"));
                }
                if let Some(tag) = tags.first() {
                    current = Some(((*tag).to_owned(), line.chars().take(160).collect()));
                }
            }
            continue;
        }
        let Some((tag, call)) = &current else {
            continue;
        };
        for key in keys_of(&words) {
            if hash_tag(key) != tag {
                problems.push(format!(
                    "{command} {key} (slot tag {:?}) inside a script on {tag:?}: {call}",
                    hash_tag(key)
                ));
            }
        }
    }
    // Every script but progress.lua (only long WeCom sends report progress) and
    // schedule_skip.lua (only ticks missed while every scheduler was down) ran.
    let missing: Vec<&str> = SCRIPTS
        .iter()
        .filter(|(name, code)| {
            let sha = hex::encode(sha1::Sha1::digest(code.as_bytes()));
            !distinct.contains(&sha) && !["progress", "schedule_skip"].contains(name)
        })
        .map(|(name, _)| *name)
        .collect();
    assert!(
        missing.is_empty(),
        "scripts the scenario did not run: {missing:?}"
    );
    assert!(
        scripts > 50,
        "too few scripts seen ({scripts}) for the check to mean anything:\n{}",
        lines
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{scripts} script calls, {} distinct scripts",
        distinct.len()
    );
    problems.dedup();
    assert!(
        problems.is_empty(),
        "{} script commands leave their slot, e.g.:\n{}",
        problems.len(),
        problems
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
