//! `tp`: Touchpoint's command line for marketers and operators.
//!
//! Data goes to stdout, messages and errors to stderr. Exit codes: 0 on success,
//! 1 when a request fails, 2 on bad usage (clap's own code for parse errors, and
//! [`commands::UsageError`] for what clap cannot check).

mod client;
mod commands;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{Client, GLOBAL, ServerArgs};
use crate::commands::{UsageError, contact, dev, dlq, enroll, event, playbook, policy, run, stats};
use crate::output::Format;

/// Exit code of a failed request.
const EXIT_FAILED: u8 = 1;
/// Exit code of bad usage (clap's own).
const EXIT_USAGE: u8 = 2;

/// Touchpoint: schedule marketing touchpoint campaigns.
#[derive(Parser, Debug)]
#[command(name = "tp", version, about)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    /// Output format of the answer.
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    #[arg(value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply, list, read, pause and resume playbooks.
    #[command(subcommand)]
    Playbook(playbook::PlaybookCommand),
    /// Start runs of a playbook: for one contact, or for every contact of a file.
    Enroll(enroll::EnrollArgs),
    /// List, read and cancel runs.
    #[command(subcommand)]
    Run(run::RunCommand),
    /// Create, change and read contacts.
    #[command(subcommand)]
    Contact(contact::ContactCommand),
    /// Report what contacts did (e.g. order.placed).
    #[command(subcommand)]
    Event(event::EventCommand),
    /// Apply and read the contact budget: frequency caps and quiet hours.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// A playbook's per-step funnel and conversion rate.
    Stats(stats::StatsArgs),
    /// List and retry dead letters: runs that failed at a step.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Run a whole local stack (Redis, scheduler, console worker) until Ctrl-C.
    Dev(dev::DevArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    // Ignore the error: it only says a provider is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&format!("{err:#}")));
            if err.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        server,
        output,
        command,
    } = cli;
    match command {
        Command::Dev(args) => dev::run(args, server.timeout).await,
        Command::Playbook(command) => {
            playbook::run(command, &Client::connect(&server).await?, output).await
        }
        Command::Enroll(args) => enroll::run(args, &Client::connect(&server).await?, output).await,
        Command::Run(command) => run::run(command, &Client::connect(&server).await?, output).await,
        Command::Dlq(command) => dlq::run(command, &Client::connect(&server).await?, output).await,
        Command::Contact(command) => {
            contact::run(command, &Client::connect(&server).await?, output).await
        }
        Command::Event(command) => {
            event::run(command, &Client::connect(&server).await?, output).await
        }
        Command::Policy(command) => {
            policy::run(command, &Client::connect(&server).await?, output).await
        }
        Command::Stats(args) => stats::run(args, &Client::connect(&server).await?, output).await,
    }
}

/// Joins the lines of a (possibly multi-line) message, so every error is one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tp").chain(args.iter().copied()))
    }

    #[test]
    fn enroll_collects_attrs_tags_and_identities() -> anyhow::Result<()> {
        let cli = parse(&[
            "enroll",
            "welcome-new-customer",
            "--contact",
            "c-1001",
            "--attr",
            "name=王芳",
            "--attr",
            "note=a=b",
            "--tag",
            "paid",
            "--phone",
            "+8613800000000",
            "-o",
            "json",
        ])?;
        assert_eq!(cli.output, Format::Json);
        let Command::Enroll(args) = cli.command else {
            panic!("expected enroll, got {:?}", cli.command);
        };
        let request = args.request().unwrap_or_default();
        assert_eq!(request.playbook, "welcome-new-customer");
        let contact = request.contact.unwrap_or_default();
        assert_eq!(contact.id, "c-1001");
        assert_eq!(contact.attrs.get("name").map(String::as_str), Some("王芳"));
        assert_eq!(contact.attrs.get("note").map(String::as_str), Some("a=b"));
        assert_eq!(contact.tags, ["paid"]);
        assert_eq!(
            contact.identities.get("phone").map(String::as_str),
            Some("+8613800000000")
        );
        Ok(())
    }

    #[test]
    fn bad_usage_exits_with_2() {
        for args in [
            &["enroll", "p", "--contact", "c-1", "--attr", "name"][..],
            &["enroll", "p", "--contact", "c-1", "--attr", "=x"],
            &["enroll", "p"],
            &["run", "list", "--status", "sleeping"],
            &["run", "list", "--limit", "0"],
            &["playbook", "get", "p", "--version", "zero"],
            &["playbook", "list", "-o", "xml"],
            &["run", "get", "r-1", "--timeout", "soon"],
            &["dlq", "retry"],
            &["dlq", "retry", "r-1", "--playbook", "p"],
            &["dlq", "list", "--limit", "0"],
            &["enroll", "p", "--contact", "c-1", "--file", "a.csv"],
            &["enroll", "p", "--file", "a.csv", "--tag", "paid"],
            &["enroll", "p", "--file", "a.csv", "--request-id", "r"],
            &["enroll", "p", "--file", "-"],
            &["enroll", "p", "--contact", "c-1", "--format", "csv"],
            &["enroll", "p", "--file", "a.txt", "--format", "xml"],
            &["run", "cancel"],
            &["run", "cancel", "r-1", "--playbook", "p"],
            &["run", "cancel", "r-1", "--step", "s"],
            &["run", "cancel", "--step", "s"],
            &["contact", "upsert"],
            &["contact", "upsert", "c-1", "--attr", "x"],
            &["contact", "get"],
            &["event", "send", "c-1"],
            &["policy", "apply"],
            &["policy", "get", "extra"],
            &["playbook", "pause"],
            &["stats"],
            &["stats", "p", "--version", "0"],
            &["nonsense"],
        ] {
            match parse(args) {
                Ok(cli) => panic!("{args:?} parsed as {cli:?}"),
                Err(err) => assert_eq!(err.exit_code(), 2, "{args:?}: {err}"),
            }
        }
    }

    #[test]
    fn new_commands_parse() -> anyhow::Result<()> {
        let Command::Enroll(args) =
            parse(&["enroll", "p", "--file", "-", "--format", "jsonl"])?.command
        else {
            panic!("expected enroll");
        };
        assert!(args.request().is_none(), "{args:?}");
        let Command::Run(run::RunCommand::Cancel {
            run_id,
            playbook,
            step_id,
        }) = parse(&["run", "cancel", "--playbook", "p", "--step", "remind"])?.command
        else {
            panic!("expected run cancel");
        };
        assert_eq!(
            (run_id, playbook.as_deref(), step_id.as_deref()),
            (None, Some("p"), Some("remind"))
        );
        for args in [
            &[
                "contact",
                "upsert",
                "c-1",
                "--attr",
                "a=1",
                "--remove-tag",
                "t",
                "--remove-attr",
                "b",
            ][..],
            &["contact", "get", "c-1", "-o", "yaml"],
            &[
                "event",
                "send",
                "c-1",
                "order.placed",
                "--attr",
                "order=o-1",
                "--request-id",
                "e-1",
            ],
            &["policy", "apply", "-f", "policy.yaml", "--dry-run"],
            &["policy", "get"],
            &["playbook", "pause", "p"],
            &["playbook", "resume", "p"],
            &["stats", "p", "--version", "2"],
            &["run", "cancel", "r-1"],
            &["run", "list", "--status", "converted"],
        ] {
            parse(args).map_err(|err| anyhow::anyhow!("{args:?}: {err}"))?;
        }
        Ok(())
    }

    #[test]
    fn global_flags_go_anywhere() -> anyhow::Result<()> {
        let cli = parse(&[
            "run",
            "get",
            "r-1",
            "--server",
            "http://10.0.0.1:50051",
            "--token",
            "s3cret",
            "--timeout",
            "5s",
            "-o",
            "yaml",
        ])?;
        assert_eq!(cli.server.server, "http://10.0.0.1:50051");
        let mut headers = tonic::metadata::MetadataMap::new();
        if let Some(token) = &cli.server.token {
            token.apply(&mut headers);
        }
        assert_eq!(
            headers
                .get("authorization")
                .map(|v| v.to_str())
                .transpose()?,
            Some("Bearer s3cret")
        );
        assert_eq!(cli.server.timeout, std::time::Duration::from_secs(5));
        assert_eq!(cli.output, Format::Yaml);
        Ok(())
    }

    #[test]
    fn dev_defaults() -> anyhow::Result<()> {
        let Command::Dev(args) = parse(&["dev"])?.command else {
            panic!("expected dev");
        };
        assert_eq!(args.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(args.channels, ["console", "wecom", "sms", "email"]);
        assert!(!args.demo);
        Ok(())
    }

    #[test]
    fn errors_print_on_one_line() {
        assert_eq!(
            one_line("steps[1].wait: invalid duration\n  steps[2].id: duplicate\n"),
            "steps[1].wait: invalid duration; steps[2].id: duplicate"
        );
    }
}
