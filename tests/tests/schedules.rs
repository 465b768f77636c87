//! Recurring campaigns against a real redis-server (or a Redis Cluster with
//! `TOUCHPOINT_TEST_REDIS=cluster`), with the clock injected (`now`
//! arguments) instead of waiting: two schedulers racing for the same tick enroll every
//! contact of the audience exactly once per tick; a scheduler that dies mid-tick is taken
//! over after its lease; ticks across America/New_York's daylight-saving changes; missed
//! ticks skipped beyond `catch_up` and caught up within it.

use std::collections::HashMap;

use touchpoint_scheduler::{
    campaigns::{TICK_LEASE, TickReport, run_due_ticks},
    enrollment::{Enrollment, new_run},
    playbook::{Playbook, parse},
    run::partition_of_contact,
    store::{
        ContactChange, ContactRecord, Enrolled, Keys, Store, TickClaim, TickCounts, TickProgress,
    },
};
use touchpoint_tests::TestRedis;

const PARTITIONS: u16 = 8;
const PREFIX: &str = "t";

async fn store(redis: &TestRedis) -> Store {
    Store::connect(&redis.url(), PREFIX, PARTITIONS, 60)
        .await
        .expect("connect to the test redis")
}

/// A recurring playbook that only waits, so nothing is delivered.
fn playbook(name: &str, schedule: &str) -> Playbook {
    let yaml = format!("name: {name}\nschedule: {schedule}\nsteps:\n  - {{id: w, wait: 1d}}\n");
    parse(&yaml).unwrap_or_else(|err| panic!("{yaml}: {err}"))
}

/// Milliseconds of an RFC 3339 time.
fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|err| panic!("{rfc3339}: {err}"))
        .timestamp_millis()
}

/// Creates contacts `<prefix>-0 ..` carrying `tags`.
async fn contacts(store: &Store, prefix: &str, count: usize, tags: &[&str]) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("{prefix}-{n}");
        store
            .upsert_contact(&ContactChange {
                contact: ContactRecord {
                    id: id.clone(),
                    tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                    ..ContactRecord::default()
                },
                ..ContactChange::default()
            })
            .await
            .expect("upsert a contact");
        ids.push(id);
    }
    ids
}

/// How many runs of `playbook` each contact has.
async fn runs_per_contact(
    redis: &TestRedis,
    store: &Store,
    playbook: &str,
) -> HashMap<String, usize> {
    let mut conn = redis.connection().await;
    let mut run_ids: Vec<String> = Vec::new();
    for partition in 0..store.partitions() {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(Keys::new(PREFIX).playbook_runs(partition, playbook))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("list the playbook's runs");
        run_ids.extend(
            entries
                .into_iter()
                .filter_map(|(_, fields)| fields.get(1).cloned()),
        );
    }
    let mut counts = HashMap::new();
    for chunk in run_ids.chunks(500) {
        for run in store.get_runs(chunk).await.expect("read runs") {
            let run = run.expect("every indexed run exists");
            assert_eq!(run.playbook, playbook);
            *counts.entry(run.contact_id).or_insert(0) += 1;
        }
    }
    counts
}

/// Asserts that each of `contacts`, and nobody else, has `runs` runs of `playbook`.
async fn assert_runs(
    redis: &TestRedis,
    store: &Store,
    playbook: &str,
    contacts: &[String],
    runs: usize,
) {
    let counts = runs_per_contact(redis, store, playbook).await;
    assert_eq!(
        counts.len(),
        contacts.len(),
        "contacts with runs of {playbook}"
    );
    for contact in contacts {
        assert_eq!(
            counts.get(contact),
            Some(&runs),
            "runs of {playbook} for {contact}"
        );
    }
}

fn worked(report: &TickReport) -> Vec<i64> {
    report.worked.iter().map(|tick| tick.tick_ms).collect()
}

/// The first call only records when the schedule was first seen: no past ticks.
async fn first_sight(store: &Store, playbook: &Playbook, now: i64) {
    let report = run_due_ticks(store, playbook, 1, "scheduler-a", now)
        .await
        .expect("run due ticks");
    assert_eq!(
        report.worked,
        [],
        "no ticks before the schedule was first seen"
    );
    assert_eq!(report.skipped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_enroll_each_contact_once_per_tick() {
    let redis = TestRedis::from_env();
    let (a, b) = (store(&redis).await, store(&redis).await);
    let promo = playbook(
        "promo",
        r#"{cron: "0 0 20 * * Mon,Wed,Fri", tz: Asia/Shanghai, audience: {tags: [paid]}}"#,
    );
    let paid = contacts(&a, "paid", 2000, &["paid"]).await;
    contacts(&a, "free", 300, &["free"]).await;
    first_sight(&a, &promo, ms("2026-03-02T12:00:00+08:00")).await;

    // Monday 20:00 and Wednesday 20:00 in Shanghai, each raced by two schedulers.
    for (round, tick) in ["2026-03-02T20:00:00+08:00", "2026-03-04T20:00:00+08:00"]
        .into_iter()
        .enumerate()
    {
        let now = ms(tick) + 500;
        let (first, second) = tokio::join!(
            tokio::spawn({
                let (store, promo) = (a.clone(), promo.clone());
                async move { run_due_ticks(&store, &promo, 1, "scheduler-a", now).await }
            }),
            tokio::spawn({
                let (store, promo) = (b.clone(), promo.clone());
                async move { run_due_ticks(&store, &promo, 1, "scheduler-b", now).await }
            }),
        );
        let (first, second) = (first.unwrap().unwrap(), second.unwrap().unwrap());
        let reports = [&first, &second];
        let worked: Vec<_> = reports.iter().flat_map(|r| r.worked.iter()).collect();
        assert_eq!(worked.len(), 1, "one scheduler works the tick: {reports:?}");
        assert_eq!(worked[0].tick_ms, ms(tick));
        assert_eq!(
            worked[0].counts,
            TickCounts {
                enrolled: 2000,
                already: 0,
                refused: 0
            }
        );
        assert_runs(&redis, &a, "promo", &paid, round + 1).await;

        // Asked again, neither scheduler enrolls anybody for that tick.
        for (store, owner) in [(&a, "scheduler-a"), (&b, "scheduler-b")] {
            let again = run_due_ticks(store, &promo, 1, owner, now + 1000)
                .await
                .unwrap();
            assert_eq!(again.worked, []);
            assert!(!again.held);
        }
        assert_runs(&redis, &a, "promo", &paid, round + 1).await;
    }

    // The tick's record expires (after a week).
    let mut conn = redis.connection().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(Keys::new(PREFIX).tick("promo", ms("2026-03-02T20:00:00+08:00")))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 6 * 24 * 3600, "ttl {ttl}");
}

#[tokio::test]
async fn a_tick_whose_owner_died_is_taken_over_after_the_lease() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let promo = playbook(
        "promo",
        r#"{cron: "0 20 * * *", tz: Asia/Shanghai, audience: {tags: [paid]}}"#,
    );
    let paid = contacts(&store, "paid", 400, &["paid"]).await;
    first_sight(&store, &promo, ms("2026-03-02T12:00:00+08:00")).await;
    let tick = ms("2026-03-02T20:00:00+08:00");

    // A scheduler claims the tick, works partitions 0 to 2, and starts on partition 3:
    // it enrolls five of its contacts, then dies before recording them.
    let claimed_at = tick + 100;
    let lease_ms = u64::try_from(TICK_LEASE.as_millis()).unwrap();
    let lease = i64::try_from(lease_ms).unwrap();
    assert_eq!(
        store
            .claim_tick("promo", tick, "dead", claimed_at, lease_ms)
            .await
            .unwrap(),
        TickClaim::Claimed { cursor: 0 }
    );
    let in_partition = |p: u16| -> Vec<String> {
        paid.iter()
            .filter(|id| partition_of_contact(id, PARTITIONS) == p)
            .cloned()
            .collect()
    };
    let mut early = Vec::new();
    for p in 0..3 {
        early.extend(in_partition(p));
    }
    for id in &early {
        enroll_for_tick(&store, &promo, tick, id, claimed_at).await;
    }
    store
        .record_tick_progress(
            "promo",
            tick,
            "dead",
            claimed_at,
            lease_ms,
            TickProgress {
                cursor: 3,
                counts: TickCounts {
                    enrolled: early.len() as u64,
                    ..TickCounts::default()
                },
                done: false,
            },
        )
        .await
        .unwrap()
        .expect("the owner records progress");
    let redone: Vec<String> = in_partition(3).into_iter().take(5).collect();
    for id in &redone {
        enroll_for_tick(&store, &promo, tick, id, claimed_at).await;
    }

    // While the lease runs, the other scheduler leaves the tick alone.
    let report = run_due_ticks(&store, &promo, 1, "alive", claimed_at + 1000)
        .await
        .unwrap();
    assert!(report.held, "{report:?}");
    assert_eq!(report.worked, []);

    // After it, the other scheduler works on from partition 3: nobody is enrolled twice.
    let report = run_due_ticks(&store, &promo, 1, "alive", claimed_at + lease + 1)
        .await
        .unwrap();
    assert_eq!(worked(&report), [tick]);
    assert_eq!(
        report.worked[0].counts,
        TickCounts {
            enrolled: 400 - redone.len() as u64,
            already: redone.len() as u64,
            refused: 0
        }
    );
    assert_runs(&redis, &store, "promo", &paid, 1).await;

    // The dead scheduler, back, finds the tick taken over and then handled.
    let progress = TickProgress {
        cursor: 4,
        counts: TickCounts::default(),
        done: false,
    };
    assert_eq!(
        store
            .record_tick_progress(
                "promo",
                tick,
                "dead",
                claimed_at + lease + 2,
                lease_ms,
                progress
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .claim_tick("promo", tick, "dead", claimed_at + lease + 3, lease_ms)
            .await
            .unwrap(),
        TickClaim::Handled
    );
}

/// Enrolls one contact as a tick does (same request id).
async fn enroll_for_tick(store: &Store, playbook: &Playbook, tick: i64, contact: &str, now: i64) {
    let enrollment = Enrollment {
        contact: ContactRecord {
            id: contact.to_owned(),
            ..ContactRecord::default()
        },
        request_id: Some(format!("tick:{}:{tick}:{contact}", playbook.name)),
        caller_trace: None,
        trigger: None,
    };
    let run = new_run(playbook, 1, enrollment, store.partitions(), now);
    assert!(matches!(
        store.enroll(&run).await.expect("enroll"),
        Enrolled::Started(_)
    ));
}

#[tokio::test]
async fn ticks_across_new_york_daylight_saving_changes() {
    let redis = TestRedis::from_env();
    let (a, b) = (store(&redis).await, store(&redis).await);
    let paid = contacts(&a, "paid", 20, &["paid"]).await;

    // 2026-03-08: 02:00 EST becomes 03:00 EDT, so 02:30 does not happen: it fires at 03:00.
    let spring = playbook(
        "spring",
        r#"{cron: "30 2 * * *", tz: America/New_York, audience: {tags: [paid]}}"#,
    );
    first_sight(&a, &spring, ms("2026-03-07T12:00:00-05:00")).await;
    let steps = [
        ("2026-03-08T01:59:59-05:00", "a", vec![]),
        (
            "2026-03-08T03:00:01-04:00",
            "b",
            vec!["2026-03-08T03:00:00-04:00"],
        ),
        ("2026-03-08T03:30:01-04:00", "a", vec![]),
        (
            "2026-03-09T02:30:01-04:00",
            "a",
            vec!["2026-03-09T02:30:00-04:00"],
        ),
    ];
    run_steps(&a, &b, &spring, &steps).await;
    assert_runs(&redis, &a, "spring", &paid, 2).await;

    // 2026-11-01: 02:00 EDT becomes 01:00 EST, so 01:30 happens twice: it fires once.
    let fall = playbook(
        "fall",
        r#"{cron: "0 30 1 * * *", tz: America/New_York, audience: {tags: [paid]}}"#,
    );
    first_sight(&a, &fall, ms("2026-10-31T12:00:00-04:00")).await;
    let steps = [
        (
            "2026-11-01T01:30:01-04:00",
            "a",
            vec!["2026-11-01T01:30:00-04:00"],
        ),
        ("2026-11-01T01:30:01-05:00", "b", vec![]),
        ("2026-11-01T01:59:59-05:00", "a", vec![]),
        (
            "2026-11-02T01:30:01-05:00",
            "b",
            vec!["2026-11-02T01:30:00-05:00"],
        ),
    ];
    run_steps(&a, &b, &fall, &steps).await;
    assert_runs(&redis, &a, "fall", &paid, 2).await;
}

/// Runs due ticks at each `now` by scheduler `a` or `b` and checks the ticks worked.
async fn run_steps(a: &Store, b: &Store, playbook: &Playbook, steps: &[(&str, &str, Vec<&str>)]) {
    for (now, who, expected) in steps {
        let (store, owner) = if *who == "a" {
            (a, "scheduler-a")
        } else {
            (b, "scheduler-b")
        };
        let report = run_due_ticks(store, playbook, 1, owner, ms(now))
            .await
            .expect("run due ticks");
        let expected: Vec<i64> = expected.iter().map(|at| ms(at)).collect();
        assert_eq!(worked(&report), expected, "at {now}");
        assert_eq!(report.skipped, 0, "at {now}");
        for tick in &report.worked {
            assert_eq!(tick.counts.enrolled, 20, "at {now}");
        }
    }
}

#[tokio::test]
async fn missed_ticks_are_skipped_beyond_catch_up_and_caught_up_within_it() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let paid = contacts(&store, "paid", 10, &["paid"]).await;
    let hourly = playbook(
        "hourly",
        r#"{cron: "0 * * * *", tz: UTC, audience: {tags: [paid]}, catch_up: 90m}"#,
    );
    first_sight(&store, &hourly, ms("2026-01-01T00:00:30Z")).await;

    // Nobody looked for five hours: 01:00, 02:00 and 03:00 are more than 90 minutes late
    // at 05:10 and are skipped; 04:00 and 05:00 are caught up, oldest first.
    let report = run_due_ticks(
        &store,
        &hourly,
        1,
        "scheduler-a",
        ms("2026-01-01T05:10:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(report.skipped, 3);
    assert_eq!(
        worked(&report),
        [ms("2026-01-01T04:00:00Z"), ms("2026-01-01T05:00:00Z")]
    );
    assert_eq!(report.next_tick_ms, Some(ms("2026-01-01T06:00:00Z")));
    let state = store
        .schedule_state("hourly", ms("2026-01-01T05:10:00Z"))
        .await
        .unwrap();
    assert_eq!(state.skipped, 3);
    assert_eq!(state.last, ms("2026-01-01T05:00:00Z"));
    assert_eq!(state.current, None);
    assert_runs(&redis, &store, "hourly", &paid, 2).await;

    // Another scheduler a little later finds nothing left to do.
    let report = run_due_ticks(
        &store,
        &hourly,
        1,
        "scheduler-b",
        ms("2026-01-01T05:20:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(report.worked, []);
    assert_eq!(report.skipped, 0);
    assert_runs(&redis, &store, "hourly", &paid, 2).await;
}

#[tokio::test]
async fn the_audience_is_the_contacts_with_every_tag_and_reentry_still_holds() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let both = contacts(&store, "both", 60, &["paid", "vip"]).await;
    contacts(&store, "paid-only", 300, &["paid"]).await;
    contacts(&store, "vip-only", 40, &["vip"]).await;
    let vip = parse(
        "name: vip\n\
         entry: {reentry: never}\n\
         schedule: {cron: \"0 12 * * *\", tz: UTC, audience: {tags: [paid, vip]}}\n\
         steps:\n  - {id: w, wait: 1d}\n",
    )
    .unwrap();
    first_sight(&store, &vip, ms("2026-01-01T00:00:00Z")).await;

    let first = run_due_ticks(&store, &vip, 1, "scheduler-a", ms("2026-01-01T12:00:01Z"))
        .await
        .unwrap();
    assert_eq!(
        first.worked[0].counts,
        TickCounts {
            enrolled: 60,
            already: 0,
            refused: 0
        }
    );
    // `reentry: never`: the next day's tick finds everybody enrolled before.
    let second = run_due_ticks(&store, &vip, 1, "scheduler-a", ms("2026-01-02T12:00:01Z"))
        .await
        .unwrap();
    assert_eq!(
        second.worked[0].counts,
        TickCounts {
            enrolled: 0,
            already: 0,
            refused: 60
        }
    );
    assert_runs(&redis, &store, "vip", &both, 1).await;
}
