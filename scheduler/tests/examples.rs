//! Every playbook and policy in `examples/` is valid, so the README's commands work.

use touchpoint_scheduler::{playbook, policy};

const PLAYBOOKS: [(&str, &str); 6] = [
    ("welcome.yaml", include_str!("../../examples/welcome.yaml")),
    (
        "welcome-journey.yaml",
        include_str!("../../examples/welcome-journey.yaml"),
    ),
    ("lottery.yaml", include_str!("../../examples/lottery.yaml")),
    (
        "flash-sale.yaml",
        include_str!("../../examples/flash-sale.yaml"),
    ),
    (
        "wecom-acquire.yaml",
        include_str!("../../examples/wecom-acquire.yaml"),
    ),
    (
        "wecom-journey.yaml",
        include_str!("../../examples/wecom-journey.yaml"),
    ),
];

#[test]
fn example_playbooks_parse() {
    for (file, yaml) in PLAYBOOKS {
        if let Err(violations) = playbook::parse(yaml) {
            panic!("examples/{file}: {violations}");
        }
    }
    let sale = playbook::parse(PLAYBOOKS[3].1).unwrap();
    let schedule = sale.schedule.expect("the flash sale is recurring");
    assert_eq!(schedule.audience_tags, ["paid"]);
    let lottery = playbook::parse(PLAYBOOKS[2].1).unwrap();
    assert_eq!(
        lottery.entry.reentry,
        playbook::Reentry::After(std::time::Duration::from_secs(3 * 86_400))
    );
}

#[test]
fn example_policy_parses() {
    let policy = policy::parse(include_str!("../../examples/policy.yaml"))
        .unwrap_or_else(|v| panic!("examples/policy.yaml: {v}"));
    assert_eq!(policy.caps.len(), 2);
    assert!(policy.quiet_hours.is_some());
}
