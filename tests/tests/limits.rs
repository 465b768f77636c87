//! Oversized input gets a clear error naming what is too big, and the scheduler stays up.

use std::time::Duration;

use tonic::Code;
use touchpoint_proto::v1::{ApplyPlaybookRequest, Contact, EnrollRequest, ListPlaybooksRequest};
use touchpoint_tests::{Stack, to_map};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");

fn steps(n: usize) -> String {
    let mut yaml = String::from("name: many\nsteps:\n");
    for i in 0..n {
        yaml.push_str(&format!("  - {{id: s{i}, wait: 1s}}\n"));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_clearly_and_the_server_stays_up() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let apply = |yaml: String| ApplyPlaybookRequest {
        yaml,
        dry_run: true,
    };
    let cases: Vec<(ApplyPlaybookRequest, Code, &str)> = vec![
        (
            apply(steps(201)),
            Code::InvalidArgument,
            "steps: 201 steps (at most 200)",
        ),
        (
            apply(format!(
                "name: big\ndescription: {}\nsteps: [{{id: a, wait: 1s}}]\n",
                "x".repeat(300_000)
            )),
            Code::InvalidArgument,
            "playbook is ",
        ),
        (
            apply(format!(
                "name: t\nsteps:\n  - {{id: a, action: send, channel: c, template: \"{}\"}}\n",
                "x".repeat(20_000)
            )),
            Code::InvalidArgument,
            "steps[0].template: longer than",
        ),
    ];
    for (request, code, prefix) in cases {
        let err = stack
            .client
            .playbooks
            .apply_playbook(request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(
            err.message().starts_with(prefix),
            "expected {prefix:?}, got {:?}",
            err.message()
        );
    }

    // Beyond the gRPC message limit (16 MiB): refused before any parsing.
    let huge = apply("x".repeat(17 * 1024 * 1024));
    let err = stack
        .client
        .playbooks
        .apply_playbook(huge)
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(err.message().contains("message"), "{err:?}");

    let many_attrs: Vec<(String, String)> =
        (0..300).map(|i| (format!("a{i}"), "v".into())).collect();
    let err = stack
        .client
        .enrollments
        .enroll(EnrollRequest {
            playbook: "whatever".into(),
            contact: Some(Contact {
                id: "c-1".into(),
                attrs: many_attrs.into_iter().collect(),
                ..Contact::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("contact.attrs: 300 attributes (at most 256)"),
        "{err:?}"
    );

    let err = stack
        .client
        .enrollments
        .enroll(EnrollRequest {
            playbook: "whatever".into(),
            contact: Some(Contact {
                id: "c-1".into(),
                attrs: to_map(&[("note", &"x".repeat(5000))]),
                ..Contact::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("contact.attrs.note: longer than"),
        "{err:?}"
    );

    // Still serving.
    tokio::time::timeout(
        Duration::from_secs(10),
        stack
            .client
            .playbooks
            .list_playbooks(ListPlaybooksRequest {}),
    )
    .await
    .expect("answers")
    .expect("still serving after oversized input");
}
