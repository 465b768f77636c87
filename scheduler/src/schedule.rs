//! Recurring campaigns: a playbook's `schedule:` (cron, time zone, audience) and its ticks.
//!
//! A tick is an instant at which the playbook enrolls its audience. The cron expression
//! names local wall-clock times in `tz`; [`Schedule::ticks`] turns them into instants:
//!
//! - a local time that happens once is that instant;
//! - a local time that happens twice (the clock goes back, e.g. 01:30 on the day
//!   daylight-saving time ends) fires once, at its first occurrence: the repeated hour
//!   fires nothing;
//! - a local time that does not happen (the clock jumps forward, e.g. 02:30 on the day
//!   daylight-saving time starts) fires at the first instant after the gap (03:00 in
//!   America/New_York). Several skipped times, and a time right at the end of the gap,
//!   fire once together.
//!
//! The rule is the same for every cron expression (fixed times, lists, steps), so an
//! hourly campaign neither enrolls twice in the repeated hour nor loses the day's run
//! that falls into the gap.

use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime, TimeZone, Timelike};
use chrono_tz::Tz;
use croner::{
    Cron,
    parser::{CronParser, Seconds},
};
use serde::{Deserialize, Serialize};

/// Most ticks one call of [`Schedule::ticks`] returns.
pub const MAX_TICKS: usize = 1000;

/// Longest audience tag, in characters.
const MAX_TAG_CHARS: usize = 63;

/// Default of `catch_up`.
const DEFAULT_CATCH_UP: Duration = Duration::from_secs(60);

/// A validated `schedule:` block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    /// The cron expression as written (5 fields, or 6 with seconds first).
    pub cron: String,
    /// IANA time zone the cron expression is read in.
    pub tz: String,
    /// Contacts carrying every one of these tags are enrolled on each tick.
    pub audience_tags: Vec<String>,
    /// Ticks noticed later than this after their time are skipped.
    #[serde(serialize_with = "millis")]
    pub catch_up: Duration,
    /// `cron` and `tz`, parsed. Not serialized: the serialization is the content digest.
    #[serde(skip)]
    parsed: Parsed,
}

#[derive(Debug, Clone, PartialEq)]
struct Parsed {
    cron: Cron,
    tz: Tz,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_millis())
}

/// `schedule:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    pub cron: String,
    pub tz: Option<String>,
    pub audience: RawAudience,
    pub catch_up: Option<String>,
}

/// `schedule.audience` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudience {
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Checks a raw schedule: `Err` lists (field under `schedule.`, problem).
pub(crate) fn check(raw: RawSchedule) -> Result<Schedule, Vec<(String, String)>> {
    let mut problems = Vec::new();
    let cron = match parse_cron(&raw.cron) {
        Ok(cron) => Some(cron),
        Err(problem) => {
            problems.push(("cron".to_owned(), problem));
            None
        }
    };
    let tz_name = raw.tz.unwrap_or_else(|| "UTC".to_owned());
    let tz = match tz_name.parse::<Tz>() {
        Ok(tz) => Some(tz),
        Err(_) => {
            problems.push((
                "tz".to_owned(),
                format!(
                    "unknown time zone {tz_name:?} (expected an IANA name such as Asia/Shanghai or America/New_York)"
                ),
            ));
            None
        }
    };
    let mut tags: Vec<String> = Vec::with_capacity(raw.audience.tags.len());
    if raw.audience.tags.is_empty() {
        problems.push((
            "audience.tags".to_owned(),
            "an audience needs at least one tag (e.g. tags: [paid])".to_owned(),
        ));
    }
    for (index, tag) in raw.audience.tags.into_iter().enumerate() {
        let chars = tag.chars().count();
        if chars == 0 || chars > MAX_TAG_CHARS || tag.chars().any(char::is_control) {
            problems.push((
                format!("audience.tags[{index}]"),
                format!(
                    "invalid tag {tag:?} (expected 1-{MAX_TAG_CHARS} characters without control characters)"
                ),
            ));
        } else if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    let catch_up = match raw.catch_up.as_deref().map(crate::playbook::parse_duration) {
        None => Some(DEFAULT_CATCH_UP),
        Some(Ok(catch_up)) if catch_up >= Duration::from_secs(1) => Some(catch_up),
        Some(Ok(_)) => {
            problems.push((
                "catch_up".to_owned(),
                "too short (expected at least 1s, e.g. 10m)".to_owned(),
            ));
            None
        }
        Some(Err(problem)) => {
            problems.push(("catch_up".to_owned(), problem));
            None
        }
    };
    match (cron, tz, catch_up) {
        (Some(cron), Some(tz), Some(catch_up)) if problems.is_empty() => Ok(Schedule {
            cron: raw.cron,
            tz: tz_name,
            audience_tags: tags,
            catch_up,
            parsed: Parsed { cron, tz },
        }),
        _ => Err(problems),
    }
}

/// Parses a cron expression of 5 fields, or 6 with seconds first, that fires at all.
fn parse_cron(text: &str) -> Result<Cron, String> {
    const EXPECTED: &str = "expected 5 fields \"minute hour day-of-month month day-of-week\", or 6 with seconds first, such as \"0 0 20 * * Mon,Wed,Fri\"";
    let fields = text.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "invalid cron {text:?}: {fields} fields ({EXPECTED})"
        ));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(text)
        .map_err(|err| format!("invalid cron {text:?}: {err} ({EXPECTED})"))?;
    // Five or six fields repeat every 400 years at most, so any starting point will do.
    let reference = NaiveDate::from_ymd_opt(2026, 1, 1)
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .unwrap_or_default();
    if cron.find_next_occurrence(&reference, false).is_err() {
        return Err(format!(
            "cron {text:?} never fires (e.g. February 30th); expected a date that exists"
        ));
    }
    Ok(cron)
}

impl Schedule {
    /// The ticks in `(after_ms, until_ms]` (ms since the Unix epoch), oldest first, at
    /// most [`MAX_TICKS`] of them (call again after the last one for more). See the
    /// module documentation for daylight-saving changes.
    pub fn ticks(&self, after_ms: i64, until_ms: i64) -> Vec<i64> {
        self.ticks_after(after_ms)
            .take_while(|&tick| tick <= until_ms)
            .take(MAX_TICKS)
            .collect()
    }

    /// The first tick after `after_ms`.
    pub fn next_tick(&self, after_ms: i64) -> Option<i64> {
        self.ticks_after(after_ms).next()
    }

    /// Every tick after `after_ms`, oldest first.
    ///
    /// Walks the local wall clock: each local time the cron names becomes the first
    /// instant at which the clock shows it or a later time. That mapping never goes
    /// back in time, so starting from the local time of `after_ms` misses nothing, and
    /// local times that map to an instant already returned (the repeated hour, several
    /// times in one gap) are dropped.
    fn ticks_after(&self, after_ms: i64) -> impl Iterator<Item = i64> + '_ {
        let tz = self.parsed.tz;
        let mut local = chrono::DateTime::from_timestamp_millis(after_ms)
            .map(|at| at.with_timezone(&tz).naive_local())
            .and_then(|at| at.with_nanosecond(0));
        let mut last = after_ms;
        std::iter::from_fn(move || {
            loop {
                let next = self.parsed.cron.find_next_occurrence(&local?, false).ok()?;
                local = Some(next);
                let instant = first_instant_at_or_after(tz, next)?;
                if instant > last {
                    last = instant;
                    return Some(instant);
                }
            }
        })
    }
}

/// The first instant (ms) at which the clock of `tz` shows `local` or a later time: the
/// instant of `local`, its first occurrence when the clock goes back over it, or the
/// end of the gap when the clock jumps over it.
fn first_instant_at_or_after(tz: Tz, local: NaiveDateTime) -> Option<i64> {
    if let Some(at) = tz.from_local_datetime(&local).earliest() {
        return Some(at.timestamp_millis());
    }
    // In a gap. Gaps start and end on whole minutes and last at most a few hours: the
    // first whole minute after `local` that exists is the end of the gap.
    let mut minute = local.with_second(0)?;
    for _ in 0..24 * 60 {
        minute += chrono::TimeDelta::minutes(1);
        if let Some(at) = tz.from_local_datetime(&minute).earliest() {
            return Some(at.timestamp_millis());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(cron: &str, tz: &str, tags: &[&str], catch_up: Option<&str>) -> RawSchedule {
        RawSchedule {
            cron: cron.to_owned(),
            tz: Some(tz.to_owned()),
            audience: RawAudience {
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            },
            catch_up: catch_up.map(str::to_owned),
        }
    }

    fn schedule(cron: &str, tz: &str) -> Schedule {
        check(raw(cron, tz, &["paid"], None)).unwrap()
    }

    /// Milliseconds of an RFC 3339 time.
    fn ms(rfc3339: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    fn rfc3339(ms: i64, tz: Tz) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .with_timezone(&tz)
            .to_rfc3339()
    }

    fn ticks_shown(schedule: &Schedule, after: &str, until: &str) -> Vec<String> {
        schedule
            .ticks(ms(after), ms(until))
            .into_iter()
            .map(|tick| rfc3339(tick, schedule.parsed.tz))
            .collect()
    }

    #[test]
    fn five_fields_and_six_with_seconds_first() {
        let five = schedule("30 2 * * *", "UTC");
        let six = schedule("0 30 2 * * *", "UTC");
        let (after, until) = ("2026-01-01T00:00:00Z", "2026-01-03T00:00:00Z");
        assert_eq!(
            five.ticks(ms(after), ms(until)),
            six.ticks(ms(after), ms(until))
        );
        assert_eq!(
            ticks_shown(&five, after, until),
            ["2026-01-01T02:30:00+00:00", "2026-01-02T02:30:00+00:00"]
        );
        let seconds = schedule("15 30 2 * * *", "UTC");
        assert_eq!(
            ticks_shown(&seconds, after, "2026-01-01T23:00:00Z"),
            ["2026-01-01T02:30:15+00:00"]
        );
    }

    #[test]
    fn mon_wed_fri_at_eight_pm_in_shanghai() {
        let schedule = check(RawSchedule {
            cron: "0 0 20 * * Mon,Wed,Fri".to_owned(),
            tz: Some("Asia/Shanghai".to_owned()),
            audience: RawAudience {
                tags: vec!["paid".to_owned()],
            },
            catch_up: None,
        })
        .unwrap();
        assert_eq!(schedule.catch_up, Duration::from_secs(60));
        // 2026-03-02 is a Monday.
        assert_eq!(
            ticks_shown(
                &schedule,
                "2026-03-02T00:00:00+08:00",
                "2026-03-09T00:00:00+08:00"
            ),
            [
                "2026-03-02T20:00:00+08:00",
                "2026-03-04T20:00:00+08:00",
                "2026-03-06T20:00:00+08:00"
            ]
        );
        // Bounds: after is exclusive, until inclusive.
        let monday = ms("2026-03-02T20:00:00+08:00");
        assert_eq!(schedule.ticks(monday, monday), Vec::<i64>::new());
        assert_eq!(schedule.ticks(monday - 1, monday), vec![monday]);
        assert_eq!(
            schedule.next_tick(monday),
            Some(ms("2026-03-04T20:00:00+08:00"))
        );
    }

    #[test]
    fn a_time_in_the_spring_forward_gap_fires_once_at_the_end_of_the_gap() {
        // America/New_York, 2026-03-08: 02:00 EST becomes 03:00 EDT.
        let at_0230 = schedule("30 2 * * *", "America/New_York");
        assert_eq!(
            ticks_shown(
                &at_0230,
                "2026-03-06T12:00:00-05:00",
                "2026-03-10T12:00:00-04:00"
            ),
            [
                "2026-03-07T02:30:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-09T02:30:00-04:00",
                "2026-03-10T02:30:00-04:00"
            ]
        );
        // 01:30 exists on that day: unchanged.
        let at_0130 = schedule("30 1 * * *", "America/New_York");
        assert_eq!(
            ticks_shown(
                &at_0130,
                "2026-03-07T12:00:00-05:00",
                "2026-03-09T12:00:00-04:00"
            ),
            ["2026-03-08T01:30:00-05:00", "2026-03-09T01:30:00-04:00"]
        );
        // Every 15 minutes: the times in the gap and 03:00 itself fire once, at 03:00.
        let quarterly = schedule("*/15 * * * *", "America/New_York");
        assert_eq!(
            ticks_shown(
                &quarterly,
                "2026-03-08T01:30:00-05:00",
                "2026-03-08T03:30:00-04:00"
            ),
            [
                "2026-03-08T01:45:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T03:15:00-04:00",
                "2026-03-08T03:30:00-04:00"
            ]
        );
    }

    #[test]
    fn a_time_repeated_at_fall_back_fires_once_at_its_first_occurrence() {
        // America/New_York, 2026-11-01: 02:00 EDT becomes 01:00 EST.
        let at_0130 = schedule("30 1 * * *", "America/New_York");
        assert_eq!(
            ticks_shown(
                &at_0130,
                "2026-10-31T00:00:00-04:00",
                "2026-11-02T12:00:00-05:00"
            ),
            [
                "2026-10-31T01:30:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-02T01:30:00-05:00"
            ]
        );
        // Asked from inside the repeated hour (01:10 EST, after the 01:30 EDT tick),
        // the next tick is the next day's.
        assert_eq!(
            ticks_shown(
                &at_0130,
                "2026-11-01T01:10:00-05:00",
                "2026-11-02T12:00:00-05:00"
            ),
            ["2026-11-02T01:30:00-05:00"]
        );
        // 02:30 happens once on that day (EST).
        let at_0230 = schedule("30 2 * * *", "America/New_York");
        assert_eq!(
            ticks_shown(
                &at_0230,
                "2026-10-31T12:00:00-04:00",
                "2026-11-01T12:00:00-05:00"
            ),
            ["2026-11-01T02:30:00-05:00"]
        );
        // Every 30 minutes: the repeated hour fires nothing.
        let halfhourly = schedule("*/30 * * * *", "America/New_York");
        assert_eq!(
            ticks_shown(
                &halfhourly,
                "2026-11-01T00:45:00-04:00",
                "2026-11-01T02:00:00-05:00"
            ),
            [
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
    }

    #[test]
    fn ticks_per_call_are_bounded() {
        let every_second = schedule("* * * * * *", "UTC");
        let ticks = every_second.ticks(ms("2026-01-01T00:00:00Z"), ms("2026-01-02T00:00:00Z"));
        assert_eq!(ticks.len(), MAX_TICKS);
        assert_eq!(ticks[0], ms("2026-01-01T00:00:01Z"));
        // Asking again after the last one goes on from there.
        let more = every_second.ticks(*ticks.last().unwrap(), ms("2026-01-02T00:00:00Z"));
        assert_eq!(more[0], ticks.last().unwrap() + 1000);
    }

    #[test]
    fn digest_covers_the_source_fields_only() {
        let schedule = check(raw(
            "0 0 20 * * Mon,Wed,Fri",
            "Asia/Shanghai",
            &["paid", "vip", "paid"],
            Some("10m"),
        ))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&schedule).unwrap(),
            serde_json::json!({
                "cron": "0 0 20 * * Mon,Wed,Fri",
                "tz": "Asia/Shanghai",
                "audience_tags": ["paid", "vip"],
                "catch_up": 600_000
            })
        );
        let utc = check(RawSchedule {
            tz: None,
            ..raw("0 9 * * *", "", &["paid"], None)
        })
        .unwrap();
        assert_eq!(utc.tz, "UTC");
    }

    #[test]
    fn invalid_input_names_the_field_and_what_is_expected() {
        let problems = |raw: RawSchedule| check(raw).unwrap_err();
        let one = |raw: RawSchedule| {
            let mut all = problems(raw);
            assert_eq!(all.len(), 1, "{all:?}");
            all.remove(0)
        };

        let (field, problem) = one(raw("0 20 * *", "UTC", &["paid"], None));
        assert_eq!(field, "cron");
        assert!(problem.contains("4 fields"), "{problem}");
        assert!(problem.contains("expected 5 fields"), "{problem}");

        let (field, problem) = one(raw("0 0 0 1 1 * 2030", "UTC", &["paid"], None));
        assert_eq!(field, "cron");
        assert!(problem.contains("7 fields"), "{problem}");

        let (field, problem) = one(raw("61 * * * *", "UTC", &["paid"], None));
        assert_eq!(field, "cron");
        assert!(
            problem.starts_with("invalid cron \"61 * * * *\""),
            "{problem}"
        );

        let (field, problem) = one(raw("0 0 30 2 *", "UTC", &["paid"], None));
        assert_eq!(field, "cron");
        assert!(problem.contains("never fires"), "{problem}");

        let (field, problem) = one(raw("0 9 * * *", "Mars/Olympus", &["paid"], None));
        assert_eq!(field, "tz");
        assert_eq!(
            problem,
            "unknown time zone \"Mars/Olympus\" (expected an IANA name such as Asia/Shanghai or America/New_York)"
        );

        let (field, problem) = one(raw("0 9 * * *", "UTC", &[], None));
        assert_eq!(field, "audience.tags");
        assert!(problem.contains("at least one tag"), "{problem}");

        let long = "x".repeat(64);
        let all = problems(raw("0 9 * * *", "UTC", &["paid", "", "a\nb", &long], None));
        let fields: Vec<&str> = all.iter().map(|(field, _)| field.as_str()).collect();
        assert_eq!(
            fields,
            ["audience.tags[1]", "audience.tags[2]", "audience.tags[3]"]
        );
        assert!(all[0].1.contains("expected 1-63 characters"), "{all:?}");

        let (field, problem) = one(raw("0 9 * * *", "UTC", &["paid"], Some("3x")));
        assert_eq!(field, "catch_up");
        assert!(problem.contains("expected e.g. 30s"), "{problem}");

        let (field, problem) = one(raw("0 9 * * *", "UTC", &["paid"], Some("0s")));
        assert_eq!(field, "catch_up");
        assert!(problem.contains("at least 1s"), "{problem}");

        // Every problem at once.
        let all = problems(raw("bad", "Nowhere", &[], Some("soon")));
        let fields: Vec<&str> = all.iter().map(|(field, _)| field.as_str()).collect();
        assert_eq!(fields, ["cron", "tz", "audience.tags", "catch_up"]);
    }
}
