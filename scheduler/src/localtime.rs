//! Wall-clock arithmetic in a contact's time zone.
//!
//! Instants are Unix milliseconds (`i64`); clock readings and calendar days are local to
//! the zone passed in. Daylight saving time follows one rule everywhere in this module:
//!
//! - A local time that does not exist (the spring-forward gap) resolves to the first
//!   instant after the gap, the moment the clock jumps: on 2026-03-08 in New York,
//!   02:30 resolves to 03:00 EDT.
//! - A local time that exists twice (fall back) resolves to its first occurrence: on
//!   2026-11-01 in New York, 01:30 resolves to 01:30 EDT, not 01:30 EST.
//!
//! The same rule gives the start of a day in zones that skip midnight (Chile, for one):
//! the day starts at the first instant it has, 01:00. So every local day yields exactly
//! one instant for a given `HH:MM` ([`next_local_time`]), and the calendar windows of a
//! zone follow each other without gaps or overlaps ([`window_start`], [`window_end`]).
//!
//! Instants are clamped to the years 1 through 9999 before any conversion.

use chrono::{
    DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta,
    TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

const DAY_MS: i64 = 86_400_000;
/// 0001-01-01T00:00:00Z.
const MIN_MS: i64 = -62_135_596_800_000;
/// 9999-12-31T23:59:59.999Z.
const MAX_MS: i64 = 253_402_300_799_999;

/// Reads an IANA time zone name such as `Asia/Shanghai` or `UTC` (case-sensitive).
pub fn parse_tz(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name such as Asia/Shanghai)")
    })
}

/// The first instant strictly after `now_ms` at which the local clock in `tz` shows
/// `hour:minute`: today if that is still ahead, else tomorrow. A time in the
/// spring-forward gap means the moment the clock jumps; a time that exists twice means
/// its first occurrence, so a day whose first occurrence has passed yields nothing more
/// (see the module docs). `hour` above 23 and `minute` above 59 are read as 23 and 59.
pub fn next_local_time(tz: Tz, now_ms: i64, hour: u8, minute: u8) -> i64 {
    next_reading(tz, now_ms, hour, minute, false)
}

/// Like [`next_local_time`], but the repeat of `hour:minute` in a fall-back fold counts
/// too: the first instant strictly after `now_ms` at which the clock shows it at all.
/// This is the end of a period that is defined by clock readings, such as quiet hours:
/// when the clock has gone back into them, they end when it shows their end again, not
/// a day later.
pub fn next_clock_reading(tz: Tz, now_ms: i64, hour: u8, minute: u8) -> i64 {
    next_reading(tz, now_ms, hour, minute, true)
}

/// Minutes since local midnight in `tz` (0..1440), as the clock shows them.
pub fn local_minutes(tz: Tz, now_ms: i64) -> u16 {
    let local = utc(now_ms).with_timezone(&tz);
    // At most 23 * 60 + 59, so the conversion cannot fail.
    u16::try_from(local.hour() * 60 + local.minute()).unwrap_or(0)
}

/// `at_ms` as the clock in `tz` shows it, with the zone's abbreviation, for messages:
/// `2026-03-09 08:00 CST`. The abbreviation tells the two passes of a fold apart.
pub fn describe(tz: Tz, at_ms: i64) -> String {
    utc(at_ms)
        .with_timezone(&tz)
        .format("%Y-%m-%d %H:%M %Z")
        .to_string()
}

/// A calendar window in a contact's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Calendar {
    /// From local midnight to the next.
    Day,
    /// From Monday 00:00 to the next Monday 00:00.
    Week,
    /// From the 1st of the month 00:00 to the 1st of the next.
    Month,
}

impl Calendar {
    /// `day`, `week` or `month`, as written in policies.
    pub fn name(self) -> &'static str {
        match self {
            Calendar::Day => "day",
            Calendar::Week => "week",
            Calendar::Month => "month",
        }
    }
}

/// The first instant of the calendar window holding `now_ms` in `tz`: local midnight
/// today, Monday 00:00 of this week, or the 1st of this month at 00:00. When local
/// midnight does not exist, the first instant of that day.
pub fn window_start(cal: Calendar, tz: Tz, now_ms: i64) -> i64 {
    let today = local_date(tz, now_ms);
    first_instant(tz, start_date(cal, today).and_time(NaiveTime::MIN))
}

/// The start of the next calendar window: where the one holding `now_ms` ends.
pub fn window_end(cal: Calendar, tz: Tz, now_ms: i64) -> i64 {
    let start = start_date(cal, local_date(tz, now_ms));
    let next = match cal {
        Calendar::Day => start.checked_add_days(Days::new(1)),
        Calendar::Week => start.checked_add_days(Days::new(7)),
        Calendar::Month => start.checked_add_months(chrono::Months::new(1)),
    };
    match next {
        Some(next) => first_instant(tz, next.and_time(NaiveTime::MIN)),
        // Past the end of chrono's calendar: unreachable for clamped instants.
        None => now_ms.saturating_add(DAY_MS),
    }
}

/// The first day of the window holding `day`.
fn start_date(cal: Calendar, day: NaiveDate) -> NaiveDate {
    let start = match cal {
        Calendar::Day => Some(day),
        Calendar::Week => {
            day.checked_sub_days(Days::new(day.weekday().num_days_from_monday().into()))
        }
        Calendar::Month => day.with_day(1),
    };
    start.unwrap_or(day)
}

fn next_reading(tz: Tz, now_ms: i64, hour: u8, minute: u8, repeats: bool) -> i64 {
    let time = NaiveTime::from_hms_opt(hour.min(23).into(), minute.min(59).into(), 0)
        .unwrap_or(NaiveTime::MIN);
    let today = local_date(tz, now_ms);
    // Yesterday too: after a fall back across midnight the clock may show an earlier
    // date than the one whose readings are still ahead.
    let mut day = today.pred_opt().unwrap_or(today);
    for _ in 0..4 {
        let (first, repeat) = resolve(tz, day.and_time(time));
        if first > now_ms {
            return first;
        }
        if repeats && let Some(repeat) = repeat.filter(|&repeat| repeat > now_ms) {
            return repeat;
        }
        let Some(next) = day.succ_opt() else { break };
        day = next;
    }
    // Past the end of chrono's calendar: unreachable for clamped instants.
    now_ms.saturating_add(DAY_MS)
}

/// `ms` as a UTC date-time, clamped to the years 1 through 9999.
fn utc(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms.clamp(MIN_MS, MAX_MS)).unwrap_or(DateTime::UNIX_EPOCH)
}

fn local_date(tz: Tz, ms: i64) -> NaiveDate {
    utc(ms).with_timezone(&tz).date_naive()
}

/// The instant the local clock shows `local` by the module's rule.
fn first_instant(tz: Tz, local: NaiveDateTime) -> i64 {
    resolve(tz, local).0
}

/// Where `local` falls: its first instant (the gap's end when it does not exist), and
/// the repeat when it exists twice.
fn resolve(tz: Tz, local: NaiveDateTime) -> (i64, Option<i64>) {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(at) => (at.timestamp_millis(), None),
        LocalResult::Ambiguous(first, second) => {
            (first.timestamp_millis(), Some(second.timestamp_millis()))
        }
        LocalResult::None => (gap_end(tz, local), None),
    }
}

/// The instant the clock jumps over `local`, a time that does not exist in `tz`.
fn gap_end(tz: Tz, local: NaiveDateTime) -> i64 {
    let exists = |seconds: i64| {
        local
            .checked_add_signed(TimeDelta::seconds(seconds))
            .is_some_and(|at| !matches!(tz.from_local_datetime(&at), LocalResult::None))
    };
    // Gaps last at most a day (Samoa skipped 2011-12-30 whole); find a time after it,
    // then bisect. Offsets and transitions are whole seconds, so the bisection is exact.
    let Some(mut after) = (1..=48).map(|hours| hours * 3600).find(|&s| exists(s)) else {
        return local.and_utc().timestamp_millis();
    };
    let mut before = 0;
    while after - before > 1 {
        let middle = before + (after - before) / 2;
        if exists(middle) {
            after = middle;
        } else {
            before = middle;
        }
    }
    local
        .checked_add_signed(TimeDelta::seconds(after))
        .and_then(|at| tz.from_local_datetime(&at).earliest())
        .map_or_else(
            || local.and_utc().timestamp_millis(),
            |at| at.timestamp_millis(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UTC instant in ms.
    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .unwrap()
            .timestamp_millis()
    }

    fn tz(name: &str) -> Tz {
        parse_tz(name).unwrap()
    }

    #[test]
    fn time_zones_are_iana_names() {
        assert_eq!(tz("Asia/Shanghai"), chrono_tz::Asia::Shanghai);
        assert_eq!(tz("UTC"), Tz::UTC);
        let err = parse_tz("Mars/Base").unwrap_err();
        assert_eq!(
            err,
            "unknown time zone \"Mars/Base\" (expected an IANA name such as Asia/Shanghai)"
        );
        assert!(parse_tz("").is_err());
        assert!(parse_tz("asia/shanghai").is_err());
    }

    #[test]
    fn next_local_time_is_today_if_ahead_else_tomorrow() {
        let shanghai = tz("Asia/Shanghai");
        // 2026-05-10 08:00 in Shanghai is 00:00Z.
        let now = at(2026, 5, 10, 0, 0);
        assert_eq!(
            next_local_time(shanghai, now, 9, 30),
            at(2026, 5, 10, 1, 30)
        );
        assert_eq!(next_local_time(shanghai, now, 7, 0), at(2026, 5, 10, 23, 0));
        // Strictly after: exactly 08:00 now means 08:00 tomorrow.
        assert_eq!(next_local_time(shanghai, now, 8, 0), at(2026, 5, 11, 0, 0));
        assert_eq!(local_minutes(shanghai, now), 480);
        assert_eq!(local_minutes(shanghai, now + 59_999), 480);
        assert_eq!(local_minutes(shanghai, now + 60_000), 481);
        // Across a month and a year end.
        let new_year_eve = at(2026, 12, 31, 15, 0); // 23:00 local
        assert_eq!(
            next_local_time(shanghai, new_year_eve, 9, 0),
            at(2027, 1, 1, 1, 0)
        );
    }

    #[test]
    fn spring_forward_gap_resolves_to_the_jump() {
        let ny = tz("America/New_York");
        // 2026-03-08: 02:00 EST (07:00Z) jumps to 03:00 EDT.
        let midnight = at(2026, 3, 8, 5, 0);
        assert_eq!(next_local_time(ny, midnight, 2, 30), at(2026, 3, 8, 7, 0));
        assert_eq!(next_local_time(ny, midnight, 2, 0), at(2026, 3, 8, 7, 0));
        assert_eq!(next_local_time(ny, midnight, 3, 0), at(2026, 3, 8, 7, 0));
        assert_eq!(next_local_time(ny, midnight, 3, 30), at(2026, 3, 8, 7, 30));
        assert_eq!(next_local_time(ny, midnight, 1, 59), at(2026, 3, 8, 6, 59));
        // After the jump, tomorrow's 02:30 (EDT) is next.
        assert_eq!(
            next_local_time(ny, at(2026, 3, 8, 7, 0), 2, 30),
            at(2026, 3, 9, 6, 30)
        );
        // The day is 23 hours long.
        assert_eq!(
            window_start(Calendar::Day, ny, at(2026, 3, 8, 12, 0)),
            midnight
        );
        assert_eq!(
            window_end(Calendar::Day, ny, at(2026, 3, 8, 12, 0)),
            at(2026, 3, 9, 4, 0)
        );
        assert_eq!(local_minutes(ny, at(2026, 3, 8, 7, 0)), 180);
    }

    #[test]
    fn fall_back_fold_resolves_to_the_first_occurrence() {
        let ny = tz("America/New_York");
        // 2026-11-01: 02:00 EDT (06:00Z) goes back to 01:00 EST.
        let midnight = at(2026, 11, 1, 4, 0);
        let first = at(2026, 11, 1, 5, 30); // 01:30 EDT
        let repeat = at(2026, 11, 1, 6, 30); // 01:30 EST
        assert_eq!(next_local_time(ny, midnight, 1, 30), first);
        assert_eq!(next_clock_reading(ny, midnight, 1, 30), first);
        // Between the two: the day's 01:30 has been; the repeat counts only as a reading.
        let between = at(2026, 11, 1, 6, 10); // 01:10 EST
        assert_eq!(local_minutes(ny, between), 70);
        assert_eq!(next_local_time(ny, between, 1, 30), at(2026, 11, 2, 6, 30));
        assert_eq!(next_clock_reading(ny, between, 1, 30), repeat);
        assert_eq!(
            next_clock_reading(ny, repeat, 1, 30),
            at(2026, 11, 2, 6, 30)
        );
        // The day is 25 hours long.
        assert_eq!(window_start(Calendar::Day, ny, between), midnight);
        assert_eq!(
            window_end(Calendar::Day, ny, between),
            at(2026, 11, 2, 5, 0)
        );
    }

    #[test]
    fn a_day_without_midnight_starts_at_its_first_instant() {
        let santiago = tz("America/Santiago");
        // 2026-09-06: 00:00 -04 jumps to 01:00 -03, at 04:00Z.
        let noon = at(2026, 9, 6, 15, 0);
        assert_eq!(
            window_start(Calendar::Day, santiago, noon),
            at(2026, 9, 6, 4, 0)
        );
        assert_eq!(
            window_end(Calendar::Day, santiago, at(2026, 9, 5, 15, 0)),
            at(2026, 9, 6, 4, 0)
        );
        assert_eq!(
            next_local_time(santiago, noon - DAY_MS, 0, 0),
            at(2026, 9, 6, 4, 0)
        );
    }

    #[test]
    fn a_skipped_day_resolves_to_the_next_one() {
        // Samoa skipped 2011-12-30: 23:59:59 -10 on the 29th became 00:00 +14 on the 31st.
        let apia = tz("Pacific/Apia");
        let before = at(2011, 12, 30, 0, 0); // 14:00 on the 29th
        assert_eq!(next_local_time(apia, before, 18, 0), at(2011, 12, 30, 4, 0));
        assert_eq!(next_local_time(apia, before, 9, 0), at(2011, 12, 30, 10, 0));
    }

    #[test]
    fn described_instants_show_the_local_clock_and_its_zone() {
        let ny = tz("America/New_York");
        assert_eq!(describe(ny, at(2026, 11, 1, 5, 30)), "2026-11-01 01:30 EDT");
        assert_eq!(describe(ny, at(2026, 11, 1, 6, 30)), "2026-11-01 01:30 EST");
        assert_eq!(
            describe(tz("Asia/Shanghai"), at(2026, 5, 10, 0, 0)),
            "2026-05-10 08:00 CST"
        );
    }

    #[test]
    fn weeks_start_on_monday() {
        let shanghai = tz("Asia/Shanghai");
        // 2026-03-01 is a Sunday; its week started Monday 2026-02-23 00:00 +08.
        let sunday = at(2026, 3, 1, 12, 0);
        assert_eq!(
            window_start(Calendar::Week, shanghai, sunday),
            at(2026, 2, 22, 16, 0)
        );
        assert_eq!(
            window_end(Calendar::Week, shanghai, sunday),
            at(2026, 3, 1, 16, 0)
        );
        // Monday 00:00 local starts a new week; 23:59:59 Sunday does not.
        let monday = at(2026, 3, 1, 16, 0);
        assert_eq!(window_start(Calendar::Week, shanghai, monday), monday);
        assert_eq!(
            window_start(Calendar::Week, shanghai, monday - 1),
            at(2026, 2, 22, 16, 0)
        );
        // In UTC the same instant is still Sunday.
        assert_eq!(
            window_start(Calendar::Week, Tz::UTC, monday),
            at(2026, 2, 23, 0, 0)
        );
    }

    #[test]
    fn months_and_their_boundaries() {
        let shanghai = tz("Asia/Shanghai");
        // 2026-02-28 23:30 local is 15:30Z; 2026 is not a leap year.
        let end_of_february = at(2026, 2, 28, 15, 30);
        assert_eq!(
            window_start(Calendar::Month, shanghai, end_of_february),
            at(2026, 1, 31, 16, 0)
        );
        assert_eq!(
            window_end(Calendar::Month, shanghai, end_of_february),
            at(2026, 2, 28, 16, 0)
        );
        // 16:00Z on Feb 28 is already March 1st in Shanghai, but not in UTC.
        let march_first = at(2026, 2, 28, 16, 0);
        assert_eq!(
            window_start(Calendar::Month, shanghai, march_first),
            march_first
        );
        assert_eq!(
            window_start(Calendar::Month, Tz::UTC, march_first),
            at(2026, 2, 1, 0, 0)
        );
        // December rolls into January.
        assert_eq!(
            window_end(Calendar::Month, shanghai, at(2026, 12, 15, 0, 0)),
            at(2026, 12, 31, 16, 0)
        );
        // A New York month whose start is EST and whose end is EDT.
        let ny = tz("America/New_York");
        let march = at(2026, 3, 20, 12, 0);
        assert_eq!(
            window_start(Calendar::Month, ny, march),
            at(2026, 3, 1, 5, 0)
        );
        assert_eq!(window_end(Calendar::Month, ny, march), at(2026, 4, 1, 4, 0));
        // 12:00Z is 20:00 in Shanghai: its day started at 16:00Z the day before.
        assert_eq!(
            window_start(Calendar::Day, shanghai, march),
            at(2026, 3, 19, 16, 0)
        );
    }

    #[test]
    fn extreme_instants_do_not_panic() {
        for now in [i64::MIN, i64::MAX, MIN_MS, MAX_MS] {
            for cal in [Calendar::Day, Calendar::Week, Calendar::Month] {
                let _ = window_start(cal, Tz::UTC, now);
                let _ = window_end(cal, chrono_tz::Pacific::Kiritimati, now);
            }
            let _ = next_local_time(chrono_tz::Pacific::Kiritimati, now, 25, 61);
            let _ = local_minutes(chrono_tz::Pacific::Kiritimati, now);
        }
    }
}
