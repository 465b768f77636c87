//! A worker speaking the raw worker protocol, for tests of what the scheduler does with
//! what a worker sends (or does not send).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use touchpoint_proto::v1::{
    Hello, Outcome, SchedulerMessage, Task, TaskProgress, TaskResult, WorkerMessage,
    scheduler_message, worker_message,
};

use crate::Stack;

/// How long to wait for the scheduler's next message.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A worker speaking the raw protocol: what it sends goes out on `out`.
#[derive(Debug)]
pub struct RawWorker {
    out: mpsc::UnboundedSender<WorkerMessage>,
    inbound: Streaming<SchedulerMessage>,
}

impl RawWorker {
    /// Attaches as `worker_id` serving `channels` (4 slots) and reads the Welcome.
    pub async fn attach(stack: &Stack, worker_id: &str, channels: &[&str]) -> Self {
        Self::attach_holding_ahead(stack, worker_id, channels, 0).await
    }

    /// The same, taking up to `hold_ahead` steps handed out ahead of their due time.
    pub async fn attach_holding_ahead(
        stack: &Stack,
        worker_id: &str,
        channels: &[&str],
        hold_ahead: u32,
    ) -> Self {
        let (out, rx) = mpsc::unbounded_channel();
        let worker = Self::send_on(&out);
        worker(worker_message::Kind::Hello(Hello {
            worker_id: worker_id.to_owned(),
            channels: channels.iter().map(|&c| c.to_owned()).collect(),
            capacity: 4,
            hold_ahead,
            ..Hello::default()
        }));
        let mut inbound = stack
            .client
            .clone()
            .workers
            .attach(UnboundedReceiverStream::new(rx))
            .await
            .expect("Attach")
            .into_inner();
        match next_message(&mut inbound).await {
            scheduler_message::Kind::Welcome(_) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        Self { out, inbound }
    }

    fn send_on(
        out: &mpsc::UnboundedSender<WorkerMessage>,
    ) -> impl Fn(worker_message::Kind) + use<> {
        let out = out.clone();
        move |kind| {
            out.send(WorkerMessage { kind: Some(kind) })
                .expect("the stream is open");
        }
    }

    /// Sends one message.
    pub fn send(&self, kind: worker_message::Kind) {
        Self::send_on(&self.out)(kind);
    }

    /// The scheduler's next message other than `Peers`.
    pub async fn message(&mut self) -> scheduler_message::Kind {
        next_message(&mut self.inbound).await
    }

    /// The next task (other messages but `Peers` fail the test).
    pub async fn task(&mut self) -> Task {
        match next_message(&mut self.inbound).await {
            scheduler_message::Kind::Task(task) => task,
            other => panic!("expected a Task, got {other:?}"),
        }
    }

    /// Reports progress of `task` under `fencing_token`.
    pub fn progress(&self, task: &Task, fencing_token: u64, detail: &str, state: &str) {
        self.send(worker_message::Kind::Progress(TaskProgress {
            run_id: task.run_id.clone(),
            fencing_token,
            detail: detail.to_owned(),
            state: state.to_owned(),
        }));
    }

    /// Reports the outcome of `task`.
    pub fn result(&self, task: &Task, outcome: Outcome, detail: &str) {
        self.send(worker_message::Kind::Result(TaskResult {
            run_id: task.run_id.clone(),
            fencing_token: task.fencing_token,
            outcome: outcome.into(),
            detail: detail.to_owned(),
            ..TaskResult::default()
        }));
    }
}

/// The scheduler's next message other than `Peers` (the live schedulers).
pub async fn next_message(inbound: &mut Streaming<SchedulerMessage>) -> scheduler_message::Kind {
    loop {
        let kind = tokio::time::timeout(TIMEOUT, inbound.message())
            .await
            .expect("a message from the scheduler in time")
            .expect("the stream is healthy")
            .and_then(|m| m.kind)
            .expect("a message, not the end of the stream");
        if !matches!(kind, scheduler_message::Kind::Peers(_)) {
            return kind;
        }
    }
}
