//! `tp contact upsert | get` against `tp dev`: attributes, tags, time zone and identities
//! are stored, changed and removed, and printed in full (phone and email included).

mod common;

use common::Dev;
use serde_json::json;

#[test]
fn contact_upsert_and_get() {
    let dev = Dev::start();
    let saved = dev.ok(&[
        "contact",
        "upsert",
        "c-1",
        "--attr",
        "name=王芳",
        "--attr",
        "city=上海",
        "--tag",
        "paid",
        "--tag",
        "vip",
        "--tz",
        "Asia/Shanghai",
        "--phone",
        "+8613800000000",
        "--email",
        "wang@example.com",
    ]);
    assert_eq!(
        saved.trim(),
        "contact/c-1 saved (2 attributes, 2 tags, 2 identities)"
    );

    let contact = dev.json(&["contact", "get", "c-1"]);
    assert_eq!(contact["id"], "c-1", "{contact:#}");
    assert_eq!(contact["tz"], "Asia/Shanghai", "{contact:#}");
    assert_eq!(
        contact["attrs"],
        json!({"city": "上海", "name": "王芳"}),
        "{contact:#}"
    );
    let mut tags: Vec<&str> = contact["tags"]
        .as_array()
        .map(|tags| tags.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    tags.sort_unstable();
    assert_eq!(tags, ["paid", "vip"], "{contact:#}");
    assert_eq!(
        contact["identities"],
        json!({"email": "wang@example.com", "phone": "+8613800000000"}),
        "{contact:#}"
    );
    let table = dev.ok(&["contact", "get", "c-1"]);
    for expected in [
        "id:    c-1",
        "tz:    Asia/Shanghai",
        "+8613800000000",
        "wang@example.com",
        "王芳",
    ] {
        assert!(table.contains(expected), "{expected:?} in\n{table}");
    }

    // Given attributes are set and others kept, tags added or removed, the time zone kept.
    let changed = dev.json(&[
        "contact",
        "upsert",
        "c-1",
        "--attr",
        "name=Wang Fang",
        "--remove-attr",
        "city",
        "--remove-tag",
        "vip",
        "--tag",
        "new",
        "--wecom",
        "wm-1",
    ]);
    assert_eq!(
        changed["attrs"],
        json!({"name": "Wang Fang"}),
        "{changed:#}"
    );
    assert_eq!(changed["tz"], "Asia/Shanghai", "{changed:#}");
    let mut tags: Vec<&str> = changed["tags"]
        .as_array()
        .map(|tags| tags.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    tags.sort_unstable();
    assert_eq!(tags, ["new", "paid"], "{changed:#}");
    assert_eq!(changed["identities"]["wecom"], "wm-1", "{changed:#}");
    assert_eq!(
        changed["identities"]["phone"], "+8613800000000",
        "{changed:#}"
    );
    let yaml = dev.ok(&["contact", "get", "c-1", "-o", "yaml"]);
    assert!(yaml.contains("name: Wang Fang"), "{yaml}");

    // A missing contact is a failed request; a missing id is bad usage.
    let stderr = dev.fails(&["contact", "get", "nobody"], 1);
    assert!(stderr.to_lowercase().contains("not found"), "{stderr}");
    dev.fails(&["contact", "upsert"], 2);
    dev.fails(&["contact", "upsert", "c-1", "--attr", "novalue"], 2);
}
