//! The contact budget: one check before every send, across all playbooks.
//!
//! A policy caps how many marketing messages a contact gets and keeps them out of the
//! contact's night. Steps marked `transactional` bypass it.
//!
//! ```yaml
//! caps:
//!   - { channel: "*", max: 2, per: 1d }          # all marketing messages (rolling 24 h)
//!   - { channel: wecom, max: 4, per: month }     # WeCom's own monthly limit
//! quiet_hours: { start: "22:00", end: "08:00" }  # in each contact's time zone; omitted = none
//! default_tz: Asia/Shanghai                      # for contacts without a tz; default UTC
//! ```
//!
//! - `per` is a duration (`1d`, `12h`, `7d`: a rolling window ending now) or `day`, `week`
//!   or `month`: a calendar window in the contact's time zone, weeks starting on Monday
//!   (see [`localtime`] for how days start around daylight saving time).
//! - A send counts against every cap whose `channel` is `*` or its own channel; it is
//!   refused when any of them is full.
//! - Quiet hours run from `start` (inclusive) to `end` (exclusive) on the contact's clock;
//!   a start later than the end means overnight.
//!
//! This module holds the rules. Counting sends is the store's job: a cap's window starts
//! at [`Cap::window_start`], a counted send is kept [`Cap::keep_ms`], and a refused send
//! may try again at [`room_at`].

use std::{collections::HashMap, fmt, time::Duration};

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::{
    localtime::{self, Calendar},
    playbook::{Violation, Violations, parse_duration, read_document},
};

/// Most caps one policy may have.
pub const MAX_CAPS: usize = 32;
/// Largest YAML source accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;
/// Largest `max` of a cap.
pub const MAX_SENDS: u32 = 10_000;
/// Shortest rolling window.
pub const MIN_ROLLING: Duration = Duration::from_secs(60);
/// Longest rolling window.
pub const MAX_ROLLING: Duration = Duration::from_secs(366 * 86_400);

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    pub caps: Vec<Cap>,
    /// No quiet hours when `None`.
    pub quiet_hours: Option<QuietHours>,
    /// The zone of contacts without a (valid) time zone of their own.
    #[serde(serialize_with = "tz_name")]
    pub default_tz: Tz,
}

/// No caps, no quiet hours, contacts without a time zone in UTC.
impl Default for Policy {
    fn default() -> Self {
        Self {
            caps: Vec::new(),
            quiet_hours: None,
            default_tz: Tz::UTC,
        }
    }
}

/// At most `max` sends `per` window, on `channel` or (`*`) on every channel together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cap {
    /// `*` or a channel name.
    pub channel: String,
    /// 1 to [`MAX_SENDS`].
    pub max: u32,
    pub per: Window,
}

/// The window a cap counts sends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// The last so long, ending now: [`MIN_ROLLING`] to [`MAX_ROLLING`], whole seconds.
    Rolling(Duration),
    /// The calendar day, week or month in the contact's time zone.
    Calendar(Calendar),
}

/// Quiet hours on the contact's clock: from `start` (inclusive) to `end` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuietHours {
    pub start: TimeOfDay,
    /// Differs from `start`; earlier than it for overnight quiet hours.
    pub end: TimeOfDay,
}

/// A clock reading, `HH:MM` on a 24-hour clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    /// 0 to 23.
    pub hour: u8,
    /// 0 to 59.
    pub minute: u8,
}

impl Policy {
    /// The zone a contact's clock is read in: its own `tz` when that is a valid IANA
    /// name, else the policy's default.
    pub fn tz_of(&self, contact_tz: &str) -> Tz {
        localtime::parse_tz(contact_tz).unwrap_or(self.default_tz)
    }

    /// When `now_ms` falls in the quiet hours in `tz`, the instant they end; else `None`.
    ///
    /// The end is the next time the clock shows `end`: when that time does not exist
    /// that day, the moment the clock jumps past it; when the clock has gone back into
    /// the quiet hours (fall back), the repeat of `end` ([`localtime::next_clock_reading`]).
    pub fn quiet_until(&self, tz: Tz, now_ms: i64) -> Option<i64> {
        let quiet = self.quiet_hours?;
        quiet
            .contains(localtime::local_minutes(tz, now_ms))
            .then(|| localtime::next_clock_reading(tz, now_ms, quiet.end.hour, quiet.end.minute))
    }

    /// The caps a send on `channel` counts against, with their index in [`Policy::caps`]:
    /// those for `*` and those for `channel` itself.
    pub fn caps_for(&self, channel: &str) -> impl Iterator<Item = (usize, &Cap)> {
        self.caps
            .iter()
            .enumerate()
            .filter(move |(_, cap)| cap.channel == "*" || cap.channel == channel)
    }
}

impl Cap {
    /// The first instant whose sends count in the window holding `now_ms` (inclusive):
    /// `now_ms` minus the duration plus 1 ms for a rolling window, so a send leaves it
    /// exactly one duration later; the start of the calendar window in `tz` otherwise.
    pub fn window_start(&self, tz: Tz, now_ms: i64) -> i64 {
        match self.per {
            Window::Rolling(duration) => now_ms.saturating_sub(millis(duration)).saturating_add(1),
            Window::Calendar(calendar) => localtime::window_start(calendar, tz, now_ms),
        }
    }

    /// How long a counted send matters: the rolling duration, or 1 day, 7 days or 31 days
    /// for a calendar window, plus a day's margin for time zone offsets and daylight
    /// saving time.
    pub fn keep_ms(&self) -> i64 {
        let span = match self.per {
            Window::Rolling(duration) => millis(duration),
            Window::Calendar(Calendar::Day) => DAY_MS,
            Window::Calendar(Calendar::Week) => 7 * DAY_MS,
            Window::Calendar(Calendar::Month) => 31 * DAY_MS,
        };
        span.saturating_add(DAY_MS)
    }

    /// For people: `at most 2 per 1d on every channel`, `at most 4 per calendar month on wecom`.
    pub fn describe(&self) -> String {
        let per = match self.per {
            Window::Rolling(_) => self.per.to_string(),
            Window::Calendar(calendar) => format!("calendar {}", calendar.name()),
        };
        let on = if self.channel == "*" {
            "every channel"
        } else {
            &self.channel
        };
        format!("at most {} per {per} on {on}", self.max)
    }
}

/// When a send refused by `cap` may try again: for a rolling window, when the oldest send
/// counted in it leaves it (`oldest_counted_ms` plus the duration; a minute from now when
/// that is unknown); for a calendar window, when the next window starts. Never sooner
/// than a second from now.
pub fn room_at(cap: &Cap, tz: Tz, now_ms: i64, oldest_counted_ms: Option<i64>) -> i64 {
    let at = match cap.per {
        Window::Rolling(duration) => oldest_counted_ms
            .map_or(now_ms.saturating_add(MINUTE_MS), |oldest| {
                oldest.saturating_add(millis(duration))
            }),
        Window::Calendar(calendar) => localtime::window_end(calendar, tz, now_ms),
    };
    at.max(now_ms.saturating_add(1000))
}

impl QuietHours {
    /// Whether a clock showing `minutes` since midnight is in the quiet hours.
    pub fn contains(&self, minutes: u16) -> bool {
        let (start, end) = (self.start.minutes(), self.end.minutes());
        if start < end {
            start <= minutes && minutes < end
        } else {
            minutes >= start || minutes < end
        }
    }
}

impl TimeOfDay {
    /// Minutes since midnight.
    pub fn minutes(self) -> u16 {
        u16::from(self.hour) * 60 + u16::from(self.minute)
    }

    /// Reads `HH:MM` (or `H:MM`) on a 24-hour clock.
    pub fn parse(text: &str) -> Option<Self> {
        let (hour, minute) = text.trim().split_once(':')?;
        let digits = |part: &str, len: std::ops::RangeInclusive<usize>| {
            len.contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
        };
        if !digits(hour, 1..=2) || !digits(minute, 2..=2) {
            return None;
        }
        let (hour, minute) = (hour.parse().ok()?, minute.parse().ok()?);
        (hour < 24 && minute < 60).then_some(Self { hour, minute })
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour, self.minute)
    }
}

/// As written: `"22:00"`.
impl Serialize for TimeOfDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// As written in a policy: `1d`, `1d12h`, `90m`; `day`, `week`, `month`.
impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Calendar(calendar) => f.write_str(calendar.name()),
            Window::Rolling(duration) => {
                let mut rest = duration.as_secs();
                if rest == 0 {
                    return f.write_str("0s");
                }
                for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
                    if rest >= size {
                        write!(f, "{}{unit}", rest / size)?;
                        rest %= size;
                    }
                }
                Ok(())
            }
        }
    }
}

/// As written (see [`Window`]'s `Display`), so a serialized policy parses back to itself.
impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn tz_name<S: serde::Serializer>(tz: &Tz, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(tz.name())
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    caps: Option<Vec<RawCap>>,
    quiet_hours: Option<RawQuietHours>,
    default_tz: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCap {
    channel: String,
    max: i64,
    per: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuietHours {
    start: String,
    end: String,
}

/// Parses and validates a policy's YAML source, reporting every problem with its field
/// path (`caps[1].per`).
pub fn parse(yaml: &str) -> Result<Policy, Violations> {
    let raw: RawPolicy = read_document(
        yaml,
        "policy",
        MAX_SOURCE_BYTES,
        "expected a mapping with caps, quiet_hours and default_tz (`{}` for no limits)",
    )?;
    check(raw)
}

fn check(raw: RawPolicy) -> Result<Policy, Violations> {
    let mut violations = Vec::new();
    let mut fail = |field: String, description: String| {
        violations.push(Violation { field, description });
    };
    let raw_caps = raw.caps.unwrap_or_default();
    if raw_caps.len() > MAX_CAPS {
        fail(
            "caps".to_owned(),
            format!("{} caps (at most {MAX_CAPS})", raw_caps.len()),
        );
    }
    let mut caps = Vec::with_capacity(raw_caps.len());
    let mut first_of: HashMap<(String, Window), usize> = HashMap::new();
    for (index, raw) in raw_caps.into_iter().enumerate() {
        let path = format!("caps[{index}]");
        let channel_ok = raw.channel == "*" || is_channel(&raw.channel);
        if !channel_ok {
            fail(
                format!("{path}.channel"),
                format!(
                    "invalid channel {:?} (expected * for every channel, or 1-63 characters of a-z, A-Z, 0-9, - and _)",
                    raw.channel
                ),
            );
        }
        let max = u32::try_from(raw.max)
            .ok()
            .filter(|max| (1..=MAX_SENDS).contains(max));
        if max.is_none() {
            fail(
                format!("{path}.max"),
                format!("{} is out of range (expected 1 to {MAX_SENDS})", raw.max),
            );
        }
        let per = parse_window(&raw.per)
            .map_err(|problem| fail(format!("{path}.per"), problem))
            .ok();
        let (Some(max), Some(per), true) = (max, per, channel_ok) else {
            continue;
        };
        match first_of.get(&(raw.channel.clone(), per)) {
            Some(first) => fail(
                path,
                format!("duplicate of caps[{first}] (same channel and per: keep one)"),
            ),
            None => {
                first_of.insert((raw.channel.clone(), per), index);
            }
        }
        caps.push(Cap {
            channel: raw.channel,
            max,
            per,
        });
    }
    let quiet_hours = raw.quiet_hours.and_then(|raw| {
        let mut time = |key: &str, text: &str| {
            let parsed = TimeOfDay::parse(text);
            if parsed.is_none() {
                fail(
                    format!("quiet_hours.{key}"),
                    format!("invalid time {text:?} (expected HH:MM, such as \"22:00\")"),
                );
            }
            parsed
        };
        let (start, end) = (time("start", &raw.start), time("end", &raw.end));
        let (start, end) = (start?, end?);
        if start == end {
            fail(
                "quiet_hours".to_owned(),
                format!(
                    "start and end are both {start} (expected different times; omit quiet_hours for none)"
                ),
            );
            return None;
        }
        Some(QuietHours { start, end })
    });
    let default_tz = match raw.default_tz.as_deref().map(localtime::parse_tz) {
        None => Tz::UTC,
        Some(Ok(tz)) => tz,
        Some(Err(problem)) => {
            fail("default_tz".to_owned(), problem);
            Tz::UTC
        }
    };
    if violations.is_empty() {
        Ok(Policy {
            caps,
            quiet_hours,
            default_tz,
        })
    } else {
        Err(Violations(violations))
    }
}

/// `per`: a duration for a rolling window, or `day`, `week`, `month`.
fn parse_window(text: &str) -> Result<Window, String> {
    let calendar = match text.trim() {
        "day" => Some(Calendar::Day),
        "week" => Some(Calendar::Week),
        "month" => Some(Calendar::Month),
        _ => None,
    };
    if let Some(calendar) = calendar {
        return Ok(Window::Calendar(calendar));
    }
    let duration = parse_duration(text).map_err(|_| {
        format!("invalid window {text:?} (expected a duration such as 1d, or day, week, month)")
    })?;
    let window = Window::Rolling(duration);
    if duration.subsec_nanos() != 0 {
        Err(format!("window {text:?} is not whole seconds"))
    } else if duration < MIN_ROLLING {
        Err(format!(
            "window {text:?} is too short (at least {})",
            Window::Rolling(MIN_ROLLING)
        ))
    } else if duration > MAX_ROLLING {
        Err(format!(
            "window {text:?} is too long (at most {}; or use day, week, month)",
            Window::Rolling(MAX_ROLLING)
        ))
    } else {
        Ok(window)
    }
}

/// Channel names as playbooks write them: 1-63 characters of a-z, A-Z, 0-9, - and _.
fn is_channel(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    const GOOD: &str = r#"
caps:
  - { channel: "*", max: 2, per: 1d }          # all marketing messages (rolling 24 h)
  - { channel: wecom, max: 4, per: month }     # WeCom's own monthly limit
  - channel: sms
    max: 1
    per: week
quiet_hours: { start: "22:00", end: "08:00" }
default_tz: Asia/Shanghai
"#;

    /// A UTC instant in ms.
    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .unwrap()
            .timestamp_millis()
    }

    fn cap(channel: &str, max: u32, per: Window) -> Cap {
        Cap {
            channel: channel.to_owned(),
            max,
            per,
        }
    }

    fn quiet(start: (u8, u8), end: (u8, u8)) -> Policy {
        let time = |(hour, minute)| TimeOfDay { hour, minute };
        Policy {
            quiet_hours: Some(QuietHours {
                start: time(start),
                end: time(end),
            }),
            ..Policy::default()
        }
    }

    /// The one violation of `yaml`, as `field: description`.
    fn refused(yaml: &str) -> String {
        let violations = parse(yaml).unwrap_err().0;
        assert_eq!(violations.len(), 1, "{violations:?}");
        violations[0].to_string()
    }

    #[test]
    fn parses_a_good_policy() {
        let policy = parse(GOOD).unwrap();
        assert_eq!(
            policy,
            Policy {
                caps: vec![
                    cap("*", 2, Window::Rolling(Duration::from_secs(86_400))),
                    cap("wecom", 4, Window::Calendar(Calendar::Month)),
                    cap("sms", 1, Window::Calendar(Calendar::Week)),
                ],
                quiet_hours: quiet((22, 0), (8, 0)).quiet_hours,
                default_tz: chrono_tz::Asia::Shanghai,
            }
        );
        assert_eq!(parse("{}").unwrap(), Policy::default());
        assert_eq!(
            parse("caps:\nquiet_hours:\ndefault_tz: UTC\n").unwrap(),
            Policy::default()
        );
        // Unquoted clock times are strings in YAML 1.2; H:MM is fine too.
        let policy = parse("quiet_hours: {start: 21:30, end: 7:00}").unwrap();
        assert_eq!(policy, quiet((21, 30), (7, 0)));
    }

    #[test]
    fn serializes_to_source_fields_that_parse_back() {
        let policy = parse(GOOD).unwrap();
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(
            json,
            r#"{"caps":[{"channel":"*","max":2,"per":"1d"},{"channel":"wecom","max":4,"per":"month"},{"channel":"sms","max":1,"per":"week"}],"quiet_hours":{"start":"22:00","end":"08:00"},"default_tz":"Asia/Shanghai"}"#
        );
        // JSON is YAML.
        assert_eq!(parse(&json).unwrap(), policy);
        let odd =
            parse("caps: [{channel: a, max: 1, per: 1d1h30m5s}, {channel: b, max: 1, per: 90m}]")
                .unwrap();
        let json = serde_json::to_string(&odd).unwrap();
        assert!(json.contains(r#""per":"1d1h30m5s""#), "{json}");
        assert!(json.contains(r#""per":"1h30m""#), "{json}");
        assert_eq!(parse(&json).unwrap(), odd);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (
                "caps: [{channel: '*', max: 2, per: 1d}, {channel: sms, max: 2, per: 1x}]",
                r#"caps[1].per: invalid window "1x" (expected a duration such as 1d, or day, week, month)"#,
            ),
            (
                "caps: [{channel: '*', max: 2, per: 1M}]",
                r#"caps[0].per: invalid window "1M" (expected a duration such as 1d, or day, week, month)"#,
            ),
            (
                "caps: [{channel: '*', max: 2, per: 30s}]",
                r#"caps[0].per: window "30s" is too short (at least 1m)"#,
            ),
            (
                "caps: [{channel: '*', max: 2, per: 400d}]",
                r#"caps[0].per: window "400d" is too long (at most 366d; or use day, week, month)"#,
            ),
            (
                "caps: [{channel: '*', max: 2, per: 90500ms}]",
                r#"caps[0].per: window "90500ms" is not whole seconds"#,
            ),
            (
                "caps: [{channel: 'we com', max: 2, per: day}]",
                r#"caps[0].channel: invalid channel "we com" (expected * for every channel, or 1-63 characters of a-z, A-Z, 0-9, - and _)"#,
            ),
            (
                "caps: [{channel: '', max: 2, per: day}]",
                r#"caps[0].channel: invalid channel "" (expected * for every channel, or 1-63 characters of a-z, A-Z, 0-9, - and _)"#,
            ),
            (
                "caps: [{channel: sms, max: 0, per: day}]",
                "caps[0].max: 0 is out of range (expected 1 to 10000)",
            ),
            (
                "caps: [{channel: sms, max: 10001, per: day}]",
                "caps[0].max: 10001 is out of range (expected 1 to 10000)",
            ),
            (
                "caps: [{channel: sms, max: -1, per: day}]",
                "caps[0].max: -1 is out of range (expected 1 to 10000)",
            ),
            ("caps: [{channel: sms, per: day}]", "caps[0].max: required"),
            (
                "caps: [{channel: sms, max: 1, per: day, every: 2}]",
                r#"caps[0].every: unknown field "every" (expected one of channel, max, per)"#,
            ),
            (
                "caps: [{channel: sms, max: 1, per: day}, {channel: sms, max: 3, per: day}]",
                "caps[1]: duplicate of caps[0] (same channel and per: keep one)",
            ),
            (
                "caps: [{channel: sms, max: 1, per: 1d}, {channel: sms, max: 3, per: 24h}]",
                "caps[1]: duplicate of caps[0] (same channel and per: keep one)",
            ),
            (
                "quiet_hours: {start: '22:00', end: '24:00'}",
                r#"quiet_hours.end: invalid time "24:00" (expected HH:MM, such as "22:00")"#,
            ),
            (
                "quiet_hours: {start: '10pm', end: '08:00'}",
                r#"quiet_hours.start: invalid time "10pm" (expected HH:MM, such as "22:00")"#,
            ),
            (
                "quiet_hours: {start: '22:00', end: '22:00'}",
                "quiet_hours: start and end are both 22:00 (expected different times; omit quiet_hours for none)",
            ),
            ("quiet_hours: {start: '22:00'}", "quiet_hours.end: required"),
            (
                "default_tz: Mars/Base",
                r#"default_tz: unknown time zone "Mars/Base" (expected an IANA name such as Asia/Shanghai)"#,
            ),
            (
                "cap: []",
                r#"cap: unknown field "cap" (expected one of caps, quiet_hours, default_tz)"#,
            ),
        ];
        for (yaml, expected) in cases {
            assert_eq!(refused(yaml), expected, "{yaml}");
        }
    }

    #[test]
    fn every_problem_is_reported_and_whole_document_problems_have_no_field() {
        let violations = parse(
            "caps: [{channel: '!', max: 0, per: 1x}]\nquiet_hours: {start: '1', end: '2'}\ndefault_tz: X",
        )
        .unwrap_err()
        .0;
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "caps[0].channel",
                "caps[0].max",
                "caps[0].per",
                "quiet_hours.start",
                "quiet_hours.end",
                "default_tz"
            ]
        );
        let many = format!(
            "caps: [{}]",
            (0..=MAX_CAPS)
                .map(|i| format!("{{channel: c{i}, max: 1, per: day}}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(refused(&many), "caps: 33 caps (at most 32)");
        for bad in ["", "- a", "caps: [", "42"] {
            let violations = parse(bad).unwrap_err().0;
            assert_eq!(violations[0].field, "", "{bad}");
        }
        let huge = format!("# {}", "x".repeat(MAX_SOURCE_BYTES));
        assert!(refused(&huge).contains("at most 65536"));
    }

    #[test]
    fn contacts_use_their_own_zone_when_valid() {
        let policy = parse(GOOD).unwrap();
        assert_eq!(
            policy.tz_of("America/New_York"),
            chrono_tz::America::New_York
        );
        assert_eq!(policy.tz_of(""), chrono_tz::Asia::Shanghai);
        assert_eq!(policy.tz_of("Mars/Base"), chrono_tz::Asia::Shanghai);
        assert_eq!(Policy::default().tz_of(""), Tz::UTC);
    }

    #[test]
    fn quiet_hours_across_midnight() {
        let policy = quiet((22, 0), (8, 0));
        let shanghai = chrono_tz::Asia::Shanghai;
        // 2026-05-10 in Shanghai is UTC+8.
        let local = |d: u32, h: u32, mi: u32| at(2026, 5, d, h, mi) - 8 * 3_600_000;
        assert_eq!(policy.quiet_until(shanghai, local(10, 21, 59)), None);
        // Start inclusive.
        assert_eq!(
            policy.quiet_until(shanghai, local(10, 22, 0)),
            Some(local(11, 8, 0))
        );
        assert_eq!(
            policy.quiet_until(shanghai, local(10, 23, 59)),
            Some(local(11, 8, 0))
        );
        assert_eq!(
            policy.quiet_until(shanghai, local(11, 0, 0)),
            Some(local(11, 8, 0))
        );
        assert_eq!(
            policy.quiet_until(shanghai, local(11, 7, 59)),
            Some(local(11, 8, 0))
        );
        // End exclusive.
        assert_eq!(policy.quiet_until(shanghai, local(11, 8, 0)), None);
        assert_eq!(policy.quiet_until(shanghai, local(11, 12, 0)), None);
        // The same instant in another zone.
        assert_eq!(policy.quiet_until(Tz::UTC, local(11, 0, 0)), None);
        assert_eq!(
            Policy::default().quiet_until(shanghai, local(11, 0, 0)),
            None
        );
        // Daytime quiet hours.
        let lunch = quiet((12, 0), (13, 30));
        assert_eq!(lunch.quiet_until(shanghai, local(11, 11, 59)), None);
        assert_eq!(
            lunch.quiet_until(shanghai, local(11, 12, 0)),
            Some(local(11, 13, 30))
        );
        assert_eq!(lunch.quiet_until(shanghai, local(11, 13, 30)), None);
    }

    #[test]
    fn quiet_hours_around_daylight_saving_time() {
        let ny = chrono_tz::America::New_York;
        // 2026-03-08: 02:00 EST (07:00Z) jumps to 03:00 EDT. An end in the gap ends at the jump.
        let policy = quiet((22, 0), (2, 30));
        assert_eq!(
            policy.quiet_until(ny, at(2026, 3, 8, 6, 59)),
            Some(at(2026, 3, 8, 7, 0))
        );
        assert_eq!(policy.quiet_until(ny, at(2026, 3, 8, 7, 0)), None);
        // A usual night that spans the jump is an hour shorter in UTC.
        let policy = quiet((22, 0), (8, 0));
        assert_eq!(
            policy.quiet_until(ny, at(2026, 3, 8, 3, 0)), // 22:00 EST
            Some(at(2026, 3, 8, 12, 0))                   // 08:00 EDT
        );
        // 2026-11-01: 02:00 EDT (06:00Z) goes back to 01:00 EST.
        let policy = quiet((22, 0), (1, 30));
        assert_eq!(
            policy.quiet_until(ny, at(2026, 11, 1, 5, 0)), // 01:00 EDT
            Some(at(2026, 11, 1, 5, 30))                   // 01:30 EDT
        );
        assert_eq!(policy.quiet_until(ny, at(2026, 11, 1, 5, 45)), None); // 01:45 EDT
        // The clock went back into the quiet hours: they end at the repeat of 01:30,
        // not a day later.
        assert_eq!(
            policy.quiet_until(ny, at(2026, 11, 1, 6, 10)), // 01:10 EST
            Some(at(2026, 11, 1, 6, 30))                    // 01:30 EST
        );
        assert_eq!(policy.quiet_until(ny, at(2026, 11, 1, 6, 30)), None);
    }

    #[test]
    fn caps_for_a_channel_include_the_catch_all() {
        let policy = parse(GOOD).unwrap();
        let indexes = |channel| {
            policy
                .caps_for(channel)
                .map(|(index, _)| index)
                .collect::<Vec<_>>()
        };
        assert_eq!(indexes("wecom"), [0, 1]);
        assert_eq!(indexes("sms"), [0, 2]);
        assert_eq!(indexes("email"), [0]);
        assert_eq!(indexes("WeCom"), [0]);
        assert_eq!(Policy::default().caps_for("sms").count(), 0);
    }

    #[test]
    fn window_starts_and_keep() {
        let shanghai = chrono_tz::Asia::Shanghai;
        let now = at(2026, 3, 4, 6, 0); // Wednesday 14:00 in Shanghai
        let rolling = cap("*", 2, Window::Rolling(Duration::from_secs(86_400)));
        assert_eq!(rolling.window_start(shanghai, now), now - DAY_MS + 1);
        assert_eq!(rolling.keep_ms(), 2 * DAY_MS);
        let day = cap("sms", 1, Window::Calendar(Calendar::Day));
        assert_eq!(day.window_start(shanghai, now), at(2026, 3, 3, 16, 0));
        assert_eq!(day.window_start(Tz::UTC, now), at(2026, 3, 4, 0, 0));
        assert_eq!(day.keep_ms(), 2 * DAY_MS);
        let week = cap("sms", 1, Window::Calendar(Calendar::Week));
        assert_eq!(week.window_start(shanghai, now), at(2026, 3, 1, 16, 0));
        assert_eq!(week.keep_ms(), 8 * DAY_MS);
        let month = cap("wecom", 4, Window::Calendar(Calendar::Month));
        assert_eq!(month.window_start(shanghai, now), at(2026, 2, 28, 16, 0));
        assert_eq!(month.keep_ms(), 32 * DAY_MS);
    }

    #[test]
    fn caps_describe_themselves() {
        let policy = parse(GOOD).unwrap();
        let described: Vec<_> = policy.caps.iter().map(Cap::describe).collect();
        assert_eq!(
            described,
            [
                "at most 2 per 1d on every channel",
                "at most 4 per calendar month on wecom",
                "at most 1 per calendar week on sms",
            ]
        );
        assert_eq!(
            cap("sms", 3, Window::Rolling(Duration::from_secs(5400))).describe(),
            "at most 3 per 1h30m on sms"
        );
    }

    #[test]
    fn room_comes_when_the_oldest_send_leaves_or_the_next_window_starts() {
        let shanghai = chrono_tz::Asia::Shanghai;
        let now = at(2026, 3, 4, 6, 0);
        let rolling = cap("*", 2, Window::Rolling(Duration::from_secs(86_400)));
        let oldest = now - 3_600_000;
        let room = room_at(&rolling, shanghai, now, Some(oldest));
        assert_eq!(room, oldest + DAY_MS);
        // At that instant the oldest send is out of the window, a millisecond before it is in.
        assert!(rolling.window_start(shanghai, room) > oldest);
        assert!(rolling.window_start(shanghai, room - 1) <= oldest);
        assert_eq!(room_at(&rolling, shanghai, now, None), now + 60_000);
        // Never sooner than a second from now.
        assert_eq!(
            room_at(&rolling, shanghai, now, Some(now - DAY_MS)),
            now + 1000
        );
        let month = cap("wecom", 4, Window::Calendar(Calendar::Month));
        assert_eq!(
            room_at(&month, shanghai, now, Some(oldest)),
            at(2026, 3, 31, 16, 0)
        );
        let day = cap("sms", 1, Window::Calendar(Calendar::Day));
        assert_eq!(room_at(&day, Tz::UTC, now, None), at(2026, 3, 5, 0, 0));
    }
}
