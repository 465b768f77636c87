//! The WeCom channel end to end, on real processes: a scheduler, a worker with a `wecom`
//! channel (pointed at the local WeCom API of `touchpoint_tests::WecomServer`) and an
//! `sms` webhook channel to the test receiver, and WeCom's encrypted callbacks sent to the
//! worker's endpoint by `CallbackSender` (its own implementation of the scheme).

use std::time::Duration;

use touchpoint_proto::v1::{
    Contact, ListRunsRequest, Run, RunStatus, StepStatus, UpsertContactRequest,
};
use touchpoint_tests::{
    CallbackSender, ChannelConfig, SECRET_ENV, Stack, WecomServer, WorkerConfig, WorkerNode,
    contact, eventually, eventually_some, free_port, generate_encoding_aes_key, request_id, stays,
    to_map,
};
use touchpoint_worker::channel::wecom::run_id_from_state;

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);
const CORP_ID: &str = "ww-test-corp";
const CORP_SECRET: &str = "corp-secret-for-tests";
const CALLBACK_TOKEN: &str = "cbToken123";

/// The acquisition step: a contact way whose link goes out by SMS.
const ACQUIRE: &str = r#"
name: wecom-acquire
steps:
  - id: add-contact
    action: add_contact
    channel: wecom
    template: "加企业微信领新人券：{link}"
    params: { fallback_channel: sms }
"#;

/// What a new contact gets: the welcome within WeCom's 20 s, the VIP group for tagged
/// contacts, and a reminder the member sends.
const WELCOME: &str = r#"
name: wecom-welcome
entry: { event: contact.added }
steps:
  - id: welcome
    action: send_welcome
    channel: wecom
    deadline: 20s
    template: "欢迎！新人券 WELCOME10 已到账"
    params: { welcome_code: "{{ event.attrs.welcome_code }}" }
    retry: { max_attempts: 3, initial: 200ms, max: 1s }
  - id: vip-group
    if: '"vip" in contact.tags'
    action: invite_to_group
    channel: wecom
    template: "VIP 专属群，扫码加入"
    params: { chat_id: wr-vip-group }
  - id: reminder
    action: send_message
    channel: wecom
    template: "提醒：新人券三天后过期"
"#;

/// A whole WeCom setup for one test.
struct Setup {
    stack: Stack,
    wecom: WecomServer,
    callbacks: CallbackSender,
    _worker: WorkerNode,
}

async fn setup() -> Setup {
    let stack = Stack::start(NODE, &[], &[]).await;
    let wecom = WecomServer::start(CORP_ID, CORP_SECRET).await;
    let aes_key = generate_encoding_aes_key();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let config = WorkerConfig::new()
        .channel(ChannelConfig::webhook(
            "sms",
            &stack.receiver.url(),
            SECRET_ENV,
        ))
        .channel(ChannelConfig::wecom(
            "wecom",
            &[
                ("corp_id", CORP_ID),
                ("secret_env", "WECOM_SECRET"),
                ("base_url", &wecom.url()),
                ("timeout", "5s"),
                ("confirm_poll", "100ms"),
                ("confirm_timeout", "20s"),
                ("rate_limit_retry_after", "1s"),
                ("sender", "zhangsan"),
                ("callback_listen", &listen),
                ("callback_path", "/wecom/callback"),
                ("token_env", "WECOM_CALLBACK_TOKEN"),
                ("encoding_aes_key_env", "WECOM_AES_KEY"),
            ],
        ));
    let worker = WorkerNode::start(
        NODE,
        &stack.scheduler.endpoint(),
        "w-wecom",
        &config,
        &[
            (SECRET_ENV, &stack.secret),
            ("WECOM_SECRET", CORP_SECRET),
            ("WECOM_CALLBACK_TOKEN", CALLBACK_TOKEN),
            ("WECOM_AES_KEY", &aes_key),
        ],
    );
    let callbacks = CallbackSender::new(
        &format!("http://{listen}/wecom/callback"),
        CALLBACK_TOKEN,
        &aes_key,
        CORP_ID,
    );
    // The endpoint answers WeCom's URL verification once the worker is up.
    let verified = eventually(TIMEOUT, || async {
        tokio::time::timeout(
            Duration::from_secs(2),
            callbacks.verify_url("1616140317555161061"),
        )
        .await
        .ok()
        .flatten()
        .is_some_and(|answer| answer == (200, "1616140317555161061".to_owned()))
    });
    let verified = tokio::time::timeout(TIMEOUT + Duration::from_secs(5), verified)
        .await
        .unwrap_or(false);
    assert!(
        verified,
        "the worker's callback endpoint never passed URL verification"
    );
    Setup {
        stack,
        wecom,
        callbacks,
        _worker: worker,
    }
}

/// The run `playbook` started for `contact_id`.
async fn run_of(stack: &mut Stack, playbook: &str, contact_id: &str) -> Run {
    let client = &mut stack.client;
    eventually_some(TIMEOUT, || {
        let mut runs = client.runs.clone();
        async move {
            let listed = runs
                .list_runs(ListRunsRequest {
                    playbook: playbook.to_owned(),
                    page_size: 1000,
                    ..ListRunsRequest::default()
                })
                .await
                .ok()?
                .into_inner();
            listed
                .runs
                .into_iter()
                .find(|run| run.contact_id == contact_id)
        }
    })
    .await
    .unwrap_or_else(|| panic!("no run of {playbook} for {contact_id}"))
}

fn step<'a>(run: &'a Run, id: &str) -> &'a touchpoint_proto::v1::StepRecord {
    run.steps
        .iter()
        .find(|s| s.step_id == id)
        .unwrap_or_else(|| panic!("no step {id} in {run:?}"))
}

/// Confirms every send task to `external_userid` as the member would, until `count`
/// were confirmed.
async fn confirm_tasks(wecom: &WecomServer, external_userid: &str, count: usize) {
    let confirmed = eventually(TIMEOUT, || async {
        let tasks: Vec<_> = wecom
            .tasks()
            .into_iter()
            .filter(|task| task.external_userid == external_userid)
            .collect();
        for task in &tasks {
            wecom.confirm(&task.msgid);
        }
        tasks.len() >= count
    })
    .await;
    assert!(
        confirmed,
        "{count} send tasks to {external_userid}: {:?}",
        wecom.tasks()
    );
}

#[tokio::test]
async fn the_full_wecom_journey() {
    let Setup {
        mut stack,
        wecom,
        callbacks,
        _worker,
    } = setup().await;
    stack.apply(ACQUIRE).await;
    stack.apply(WELCOME).await;

    // 1. The contact way: its link reaches the customer by SMS.
    let mut lead = contact("lead-1", &[("name", "王芳")], &[]);
    lead.identities = to_map(&[("phone", "+8613800000000")]);
    let acquired = stack.enroll("wecom-acquire", lead, &request_id()).await;
    let sms = stack
        .receiver
        .wait_for_request(TIMEOUT, |r| r.run_id() == acquired.run_id)
        .await;
    let ways = wecom.contact_ways();
    assert_eq!(ways.len(), 1, "{ways:?}");
    assert_eq!(ways[0].users, ["zhangsan"]);
    assert_eq!(
        sms.field("message"),
        format!("加企业微信领新人券：{}", ways[0].qr_code)
    );
    assert_eq!(
        run_id_from_state(&ways[0].state).as_deref(),
        Some(acquired.run_id.as_str())
    );
    stack
        .client
        .wait_for_status(&acquired.run_id, RunStatus::Completed, TIMEOUT)
        .await;

    // The CRM knows the customer is a VIP before WeCom tells us they added us.
    let external = "wm-ext-vip-1";
    stack
        .client
        .contacts
        .upsert_contact(UpsertContactRequest {
            contact: Some(Contact {
                id: external.to_owned(),
                tags: vec!["vip".to_owned()],
                ..Contact::default()
            }),
            ..UpsertContactRequest::default()
        })
        .await
        .expect("UpsertContact");

    // 2. A callback with a bad signature is refused and records nothing.
    let code = wecom.issue_welcome_code();
    let (status, _) = callbacks
        .post(
            "<xml><Event>change_external_contact</Event></xml>",
            Some("0000"),
        )
        .await;
    assert_eq!(status, 401);

    // 3. WeCom says the customer added the member: contact.added → the welcome, in time.
    let (status, body) = callbacks
        .contact_added("zhangsan", external, &ways[0].state, &code)
        .await;
    assert_eq!((status, body.as_str()), (200, "success"));
    // WeCom pushes the same callback again: recorded once (one run, one welcome).
    let (status, _) = callbacks
        .contact_added("zhangsan", external, &ways[0].state, &code)
        .await;
    assert_eq!(status, 200);
    let welcomed = eventually(TIMEOUT, || async { !wecom.welcomes().is_empty() }).await;
    assert!(welcomed, "no welcome reached WeCom");
    let welcomes = wecom.welcomes();
    assert_eq!(welcomes.len(), 1);
    assert_eq!(welcomes[0].code, code);
    assert_eq!(welcomes[0].text, "欢迎！新人券 WELCOME10 已到账");
    let tokens_before = wecom.tokens_issued();
    assert_eq!(tokens_before, 1, "one token serves every call so far");

    // 4. The token expires under the worker: refreshed once, the call made again.
    wecom.expire_tokens();

    // 5. The VIP group invite and the reminder wait for the member to send them.
    confirm_tasks(&wecom, external, 2).await;
    let run = run_of(&mut stack, "wecom-welcome", external).await;
    let run = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(step(&run, "welcome").status, StepStatus::Done as i32);
    assert_eq!(step(&run, "vip-group").status, StepStatus::Done as i32);
    assert_eq!(step(&run, "reminder").status, StepStatus::Done as i32);
    assert_eq!(wecom.tokens_issued(), tokens_before + 1);
    let tasks = wecom.tasks();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    let invite = &tasks[0];
    assert_eq!(invite.text, "VIP 专属群，扫码加入");
    assert_eq!(invite.sender, "zhangsan");
    let join_ways = wecom.join_ways();
    assert_eq!(join_ways.len(), 1);
    let (config_id, chats) = join_ways.iter().next().expect("one join way");
    assert_eq!(chats, &["wr-vip-group"]);
    assert_eq!(
        invite.attachments[0]["link"]["url"],
        format!("https://wecom.test/join/{config_id}")
    );
    assert_eq!(tasks[1].text, "提醒：新人券三天后过期");

    // A second contact without the tag gets no invite.
    let code = wecom.issue_welcome_code();
    let (status, _) = callbacks
        .contact_added("zhangsan", "wm-ext-plain-2", "", &code)
        .await;
    assert_eq!(status, 200);
    confirm_tasks(&wecom, "wm-ext-plain-2", 1).await;
    let run = run_of(&mut stack, "wecom-welcome", "wm-ext-plain-2").await;
    let run = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(step(&run, "vip-group").status, StepStatus::Skipped as i32);
    assert_eq!(wecom.welcomes().len(), 2);
    assert_eq!(wecom.join_ways().len(), 1);
}

#[tokio::test]
async fn rate_limits_used_codes_and_deadlines() {
    let Setup {
        mut stack,
        wecom,
        callbacks,
        mut _worker,
    } = setup().await;
    stack.apply(WELCOME).await;

    // A 45009 slows the step down; the next attempt goes through.
    wecom.inject("externalcontact/send_welcome_msg", 45009, 1);
    let code = wecom.issue_welcome_code();
    let (status, _) = callbacks
        .contact_added("lisi", "wm-limited", "", &code)
        .await;
    assert_eq!(status, 200);
    let welcomed = eventually(TIMEOUT, || async {
        wecom.welcomes().iter().any(|w| w.code == code)
    })
    .await;
    assert!(welcomed, "the welcome never went through after the 45009");
    assert_eq!(wecom.calls("externalcontact/send_welcome_msg"), 2);
    let run = run_of(&mut stack, "wecom-welcome", "wm-limited").await;
    let run = stack
        .client
        .wait_for_run(&run.run_id, TIMEOUT, "welcome done", |run| {
            run.steps
                .iter()
                .any(|s| s.step_id == "welcome" && s.status == StepStatus::Done as i32)
        })
        .await;
    assert_eq!(step(&run, "welcome").attempts, 2, "{run:?}");

    // A welcome code used elsewhere fails the step for good, errcode in the timeline.
    let used = wecom.issue_welcome_code();
    wecom.use_welcome_code(&used);
    let (status, _) = callbacks.contact_added("lisi", "wm-used", "", &used).await;
    assert_eq!(status, 200);
    let run = run_of(&mut stack, "wecom-welcome", "wm-used").await;
    let run = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Failed, TIMEOUT)
        .await;
    let welcome = step(&run, "welcome");
    assert_eq!(
        welcome.attempts, 1,
        "a refused code is not retried: {welcome:?}"
    );
    assert!(
        welcome.detail.contains("errcode 41050"),
        "the timeline shows the errcode: {welcome:?}"
    );
    assert!(
        !welcome.detail.contains(&used),
        "no welcome code in the timeline"
    );

    // A step past its deadline is skipped and nothing reaches WeCom.
    let late = r#"
name: wecom-late
steps:
  - id: welcome
    action: send_welcome
    channel: wecom
    deadline: 1s
    template: "too late"
    params: { welcome_code: "WC-LATE" }
"#;
    stack.apply(late).await;
    let calls_before = wecom.calls("externalcontact/send_welcome_msg");
    _worker.process().freeze();
    let mut customer = contact("wm-late", &[], &[]);
    customer.identities = to_map(&[("wecom", "wm-late")]);
    let enrolled = stack.enroll("wecom-late", customer, &request_id()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    _worker.process().thaw();
    let run = stack
        .client
        .wait_for_run(
            &enrolled.run_id,
            TIMEOUT,
            "the late welcome settled",
            |run| run.status != RunStatus::Active as i32,
        )
        .await;
    assert_eq!(
        step(&run, "welcome").status,
        StepStatus::Skipped as i32,
        "{run:?}"
    );
    assert!(
        stays(Duration::from_secs(1), || async {
            wecom.calls("externalcontact/send_welcome_msg") == calls_before
        })
        .await,
        "a late welcome reached WeCom"
    );
}

/// The examples parse as the scheduler parses them, and use only this adapter's actions.
#[test]
fn the_wecom_examples_parse() {
    for (file, yaml) in [
        (
            "wecom-journey.yaml",
            include_str!("../../examples/wecom-journey.yaml"),
        ),
        (
            "wecom-acquire.yaml",
            include_str!("../../examples/wecom-acquire.yaml"),
        ),
    ] {
        if let Err(violations) = touchpoint_scheduler::playbook::parse(yaml) {
            panic!("examples/{file}: {violations}");
        }
        for line in yaml
            .lines()
            .filter_map(|l| l.trim().strip_prefix("action: "))
        {
            assert!(
                touchpoint_worker::channel::wecom::ACTIONS.contains(&line),
                "examples/{file}: unknown action {line}"
            );
        }
    }
}
