//! `tp stats NAME`: a playbook's per-step funnel, its runs' outcomes and its conversion rate.

use clap::Args;
use serde::Serialize;
use touchpoint_proto::v1::{GetStatsRequest, PlaybookStats, StepStats};

use crate::client::Client;
use crate::output::{self, Format, Tabular, fields};

/// Columns of a funnel bar in table output.
const BAR_WIDTH: usize = 20;

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// The playbook's name.
    name: String,
    /// Only this version (default: every version, summed; steps matched by id).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    version: Option<u32>,
}

pub(crate) async fn run(args: StatsArgs, client: &Client, format: Format) -> anyhow::Result<()> {
    let request = GetStatsRequest {
        name: args.name,
        version: args.version.unwrap_or(0),
    };
    let stats = client
        .playbooks()
        .get_stats(request)
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    output::print(format, &StatsView::from(stats))
}

/// A playbook's counters, as the scheduler keeps them.
#[derive(Debug, Serialize)]
struct StatsView {
    name: String,
    /// 0 when summed over every version.
    version: u32,
    entered: u64,
    active: u64,
    completed: u64,
    converted: u64,
    failed: u64,
    cancelled: u64,
    /// converted / entered.
    conversion_rate: f64,
    steps: Vec<StepView>,
}

/// One step's counters.
#[derive(Debug, Serialize)]
struct StepView {
    step_id: String,
    kind: String,
    entered: u64,
    done: u64,
    skipped: u64,
    capped: u64,
    deferred: u64,
    failed: u64,
    waiting: u64,
    timed_out: u64,
    left: u64,
}

impl From<PlaybookStats> for StatsView {
    fn from(stats: PlaybookStats) -> Self {
        Self {
            name: stats.name,
            version: stats.version,
            entered: stats.entered,
            active: stats.active,
            completed: stats.completed,
            converted: stats.converted,
            failed: stats.failed,
            cancelled: stats.cancelled,
            conversion_rate: stats.conversion_rate,
            steps: stats.steps.into_iter().map(StepView::from).collect(),
        }
    }
}

impl From<StepStats> for StepView {
    fn from(step: StepStats) -> Self {
        Self {
            step_id: step.step_id,
            kind: step.kind,
            entered: step.entered,
            done: step.done,
            skipped: step.skipped,
            capped: step.capped,
            deferred: step.deferred,
            failed: step.failed,
            waiting: step.waiting,
            timed_out: step.timed_out,
            left: step.left,
        }
    }
}

impl Tabular for StatsView {
    fn table(&self) -> String {
        let version = match self.version {
            0 => "all versions".to_owned(),
            n => format!("version {n}"),
        };
        let header = fields(&[
            ("playbook", format!("{} ({version})", self.name)),
            (
                "runs",
                format!(
                    "{} entered: {} active, {} completed, {} converted, {} failed, {} cancelled",
                    self.entered,
                    self.active,
                    self.completed,
                    self.converted,
                    self.failed,
                    self.cancelled
                ),
            ),
            (
                "conversion rate",
                format!(
                    "{:.1}% ({} of {})",
                    self.conversion_rate * 100.0,
                    self.converted,
                    self.entered
                ),
            ),
        ]);
        if self.steps.is_empty() {
            return header;
        }
        // Bars are relative to the first step (or to the busiest, should a later step
        // have seen more runs, as can happen when versions are summed).
        let base = self
            .steps
            .iter()
            .map(|step| step.entered)
            .max()
            .unwrap_or(0);
        let mut table = output::table([
            "STEP",
            "KIND",
            "ENTERED",
            "DONE",
            "SKIPPED",
            "CAPPED",
            "DEFERRED",
            "FAILED",
            "WAITING",
            "TIMED OUT",
            "LEFT",
            "FUNNEL",
        ]);
        for step in &self.steps {
            table.add_row([
                step.step_id.clone(),
                step.kind.clone(),
                step.entered.to_string(),
                step.done.to_string(),
                step.skipped.to_string(),
                step.capped.to_string(),
                step.deferred.to_string(),
                step.failed.to_string(),
                step.waiting.to_string(),
                step.timed_out.to_string(),
                step.left.to_string(),
                format!(
                    "{} {:>4}",
                    bar(step.entered, base, BAR_WIDTH),
                    percent(step.entered, base)
                ),
            ]);
        }
        format!("{header}\n\n{}", table.trim_fmt())
    }
}

/// A bar of unicode blocks, `width` columns wide (padded with spaces), as long as
/// `value` is of `max`, in eighths of a column; any value above 0 shows at least a sliver.
pub(crate) fn bar(value: u64, max: u64, width: usize) -> String {
    const PARTIAL: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let cells = u128::try_from(width).unwrap_or(u128::MAX);
    let eighths = match max {
        0 => 0,
        _ => u128::from(value.min(max)) * cells * 8 / u128::from(max),
    };
    let eighths = if value > 0 && max > 0 {
        eighths.max(1)
    } else {
        eighths
    };
    let eighths = usize::try_from(eighths).unwrap_or(width * 8);
    let (full, rest) = (eighths / 8, eighths % 8);
    let mut bar = "█".repeat(full);
    let mut used = full;
    if rest > 0 {
        bar.push(PARTIAL[rest]);
        used += 1;
    }
    bar.extend(std::iter::repeat_n(' ', width.saturating_sub(used)));
    bar
}

/// `value` as a whole percentage of `base`: `52%`; `0%` when `base` is 0.
fn percent(value: u64, base: u64) -> String {
    if base == 0 {
        return "0%".to_owned();
    }
    format!("{:.0}%", value as f64 * 100.0 / base as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str, kind: &str, entered: u64, done: u64, waiting: u64) -> StepStats {
        StepStats {
            step_id: id.into(),
            kind: kind.into(),
            entered,
            done,
            waiting,
            ..StepStats::default()
        }
    }

    fn sample() -> StatsView {
        StatsView::from(PlaybookStats {
            name: "welcome".into(),
            version: 0,
            entered: 200,
            completed: 20,
            converted: 30,
            failed: 2,
            cancelled: 8,
            active: 140,
            conversion_rate: 0.15,
            steps: vec![
                step("add", "action", 200, 198, 0),
                step("three-days", "wait", 198, 60, 138),
                step("remind", "action", 60, 55, 0),
                step("bye", "exit", 0, 0, 0),
            ],
        })
    }

    #[test]
    fn bars() {
        assert_eq!(bar(10, 10, 4), "████");
        assert_eq!(bar(5, 10, 4), "██  ");
        assert_eq!(bar(0, 10, 4), "    ");
        assert_eq!(bar(0, 0, 4), "    ");
        // 3/10 of 4 columns is 1.2 columns: one full block and a quarter, rounded down
        // to an eighth (9.6 eighths → 9).
        assert_eq!(bar(3, 10, 4), "█▏  ");
        assert_eq!(bar(7, 8, 2), "█▊");
        // Tiny but not nothing: a sliver.
        assert_eq!(bar(1, 1_000_000, 4), "▏   ");
        // Never longer than the width.
        assert_eq!(bar(20, 10, 4), "████");
        assert_eq!(bar(u64::MAX, u64::MAX, 3), "███");
        for value in 0..=40 {
            assert_eq!(bar(value, 40, 7).chars().count(), 7, "{value}");
        }
    }

    #[test]
    fn percents() {
        assert_eq!(percent(0, 0), "0%");
        assert_eq!(percent(1, 3), "33%");
        assert_eq!(percent(2, 3), "67%");
        assert_eq!(percent(3, 3), "100%");
    }

    #[test]
    fn table_has_totals_then_funnel_with_bars() {
        let table = sample().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "playbook:         welcome (all versions)");
        assert_eq!(
            lines[1],
            "runs:             200 entered: 140 active, 20 completed, 30 converted, 2 failed, 8 cancelled"
        );
        assert_eq!(lines[2], "conversion rate:  15.0% (30 of 200)");
        assert_eq!(lines[3], "");
        let words = |line: &str| line.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(
            words(lines[4]),
            "STEP KIND ENTERED DONE SKIPPED CAPPED DEFERRED FAILED WAITING TIMED OUT LEFT FUNNEL"
        );
        assert_eq!(
            words(lines[5]),
            format!("add action 200 198 0 0 0 0 0 0 0 {} 100%", "█".repeat(20))
        );
        // 198 of 200: 19.8 columns, 158.4 eighths → 19 full and 6/8.
        assert_eq!(
            words(lines[6]),
            format!(
                "three-days wait 198 60 0 0 0 0 138 0 0 {}▊ 99%",
                "█".repeat(19)
            )
        );
        assert_eq!(
            words(lines[7]),
            format!("remind action 60 55 0 0 0 0 0 0 0 {} 30%", "█".repeat(6))
        );
        assert_eq!(words(lines[8]), "bye exit 0 0 0 0 0 0 0 0 0 0%");
        // The percentages line up.
        let ends: Vec<usize> = lines[5..=8]
            .iter()
            .map(|line| line.trim_end().chars().count())
            .collect();
        assert!(ends.windows(2).all(|w| w[0] == w[1]), "{table}");
    }

    #[test]
    fn json_and_yaml_give_raw_numbers() -> anyhow::Result<()> {
        let mut view = sample();
        view.version = 3;
        assert!(
            view.table()
                .starts_with("playbook:         welcome (version 3)\n")
        );
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &view)?)?;
        assert_eq!(json["version"], 3);
        assert_eq!(json["entered"], 200);
        assert_eq!(json["conversion_rate"], 0.15);
        assert_eq!(json["steps"][1]["step_id"], "three-days");
        assert_eq!(json["steps"][1]["waiting"], 138);
        assert_eq!(json["steps"][1]["timed_out"], 0);
        assert!(json["steps"][0].get("funnel").is_none());
        let yaml: serde_json::Value =
            serde_saphyr::from_str(&output::render(Format::Yaml, &view)?)?;
        assert_eq!(yaml, json);
        Ok(())
    }
}
