//! The export's state machine in one place: each transition of a shard (claim, heartbeat, finish,
//! fail, resume, sweep) and the end of a job, as pure functions of the state found and the time.
//! `jobs.rs` stores the states; the worker and the upkeep load, apply, and compare-and-swap.

use super::schema::{Change, Job, JobStatus};
pub use super::schema::{ShardState, ShardStatus};
use crate::source::Cursor;
use crate::storage::OutputFile;
use chrono::{DateTime, Duration, Utc};

/// The times and counts the transitions go by (from the settings).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A running shard silent this long is taken to have stopped.
    pub stale_after: Duration,
    /// Runs a shard gets before its export fails.
    pub max_attempts: u32,
    /// The first retry's wait (at most; doubled for each later one).
    pub retry_delay: Duration,
}

/// How long a message may wait in the queue before it expires: the Service Bus queue's
/// `defaultMessageTimeToLive` (infra). A shard queued longer than this has no message left,
/// and only then is its message sent again.
pub const QUEUED_MESSAGE_TTL: Duration = Duration::days(1);

/// The wait before the retry after failed attempt `attempt` (from 1): `retry_delay` doubled for
/// each attempt (up to 64 times), of which a random share (`jitter`, 0..1) of the upper half,
/// so that the shards of a throttled dependency do not all come back at once.
pub fn retry_wait(retry_delay: Duration, attempt: u32, jitter: f64) -> Duration {
    let ceiling = retry_delay * (1 << attempt.saturating_sub(1).min(6));
    let half = ceiling / 2;
    half + Duration::milliseconds((half.num_milliseconds() as f64 * jitter.clamp(0.0, 1.0)) as i64)
}

/// What claiming a shard found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Run it: this is its attempt number.
    Run(u32),
    Skip(&'static str),
}

/// A worker claims a shard: unless it is done, running elsewhere with a fresh heartbeat, waiting
/// for its retry, or silent at the restart cap (the sweeper fails those), it is marked running
/// and its attempt counted.
pub fn claim(state: &mut ShardState, now: DateTime<Utc>, timing: &Timing) -> Change<Claim> {
    let skip = |reason| Change::Keep(Claim::Skip(reason));
    match state.status {
        ShardStatus::Done => return skip("shard already done"),
        ShardStatus::Running if now - state.heartbeat < timing.stale_after => {
            return skip("shard is running elsewhere")
        }
        ShardStatus::Running if state.runs_since_progress() >= timing.max_attempts => {
            return skip("shard went silent at the restart cap")
        }
        ShardStatus::Waiting if state.retry_at.is_some_and(|at| at > now) => {
            return skip("shard waits for its retry")
        }
        _ => {}
    }
    state.status = ShardStatus::Running;
    state.attempts += 1;
    state.heartbeat = now;
    state.retry_at = None;
    Change::Write(Claim::Run(state.attempts))
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    Alive,
    /// The shard was given to another worker (or finished by one).
    TakenOver,
}

/// The worker running attempt `attempt` beats.
pub fn beat(state: &mut ShardState, attempt: u32, now: DateTime<Utc>) -> Change<Beat> {
    if state.status != ShardStatus::Running || state.attempts != attempt {
        return Change::Keep(Beat::TakenOver);
    }
    state.heartbeat = now;
    Change::Write(Beat::Alive)
}

/// A worker finished writing the shard's files (`outputs`: this run's, after those of the runs
/// that paused): `true` when this made it done. A shard finished already keeps its first outputs
/// (a second worker wrote the same names, with the same content).
pub fn finish(state: &mut ShardState, outputs: &[OutputFile]) -> Change<bool> {
    if state.status == ShardStatus::Done {
        return Change::Keep(false);
    }
    state.status = ShardStatus::Done;
    state.outputs.extend_from_slice(outputs);
    state.cursor = None;
    state.retry_at = None;
    Change::Write(true)
}

/// Attempt `attempt` stopped at its time box, at `cursor`, having committed `outputs`: the shard
/// is queued again to go on from there (its continuation). `false`: the attempt is no longer the
/// shard's, and its files are left to the worker that now has it.
pub fn pause(
    state: &mut ShardState,
    attempt: u32,
    cursor: &Cursor,
    outputs: &[OutputFile],
    now: DateTime<Utc>,
) -> Change<bool> {
    if state.status != ShardStatus::Running || state.attempts != attempt {
        return Change::Keep(false);
    }
    state.status = ShardStatus::Queued;
    state.outputs.extend_from_slice(outputs);
    state.cursor = Some(cursor.clone());
    state.paused_at_attempt = attempt;
    state.heartbeat = now;
    state.last_error = None;
    Change::Write(true)
}

/// What a failed attempt leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Send the shard again at this time.
    RetryAt(DateTime<Utc>),
    /// The restart cap is reached: the job fails, with this message.
    FailsJob(String),
    /// Not this attempt's to decide (taken over, or finished by another worker).
    Ignored,
}

/// Attempt `attempt` of a shard (`label`: "shard 4 (Observation)") failed with `error`: it waits
/// for a retry, or at the cap its job fails.
pub fn fail(
    state: &mut ShardState,
    label: &str,
    attempt: u32,
    error: &str,
    now: DateTime<Utc>,
    timing: &Timing,
    jitter: f64,
) -> Change<Failure> {
    if state.status != ShardStatus::Running || state.attempts != attempt {
        return Change::Keep(Failure::Ignored);
    }
    state.last_error = Some(error.to_string());
    let runs = state.runs_since_progress();
    if runs >= timing.max_attempts {
        return Change::Write(Failure::FailsJob(format!(
            "{label} failed {runs} times; last error: {error}"
        )));
    }
    let at = now + retry_wait(timing.retry_delay, runs, jitter);
    state.status = ShardStatus::Waiting;
    state.retry_at = Some(at);
    state.heartbeat = now;
    Change::Write(Failure::RetryAt(at))
}

/// A restarted service (which owns its storage alone) takes back a shard it left unfinished:
/// `true` when it is to be sent again now.
pub fn resume(state: &mut ShardState, now: DateTime<Utc>) -> Change<bool> {
    if state.status == ShardStatus::Done {
        return Change::Keep(false);
    }
    state.status = ShardStatus::Queued;
    state.heartbeat = now;
    state.retry_at = None;
    Change::Write(true)
}

/// How a shard is named in a failure: `shard 4 (Observation)`.
pub fn label(index: usize, resource_type: &str) -> String {
    format!("shard {index} ({resource_type})")
}

/// What the sweeper does about one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sweep {
    Leave,
    /// Send its message (again).
    Send,
    /// Done: its done marker may be missing (a worker stopped between the two writes).
    Done,
    /// Silent at the restart cap: the job fails with this message.
    FailsJob(String),
}

/// The sweeper looks at one unfinished shard. It sends again only what has no message out: a
/// running shard gone silent, a waiting one whose retry is due, a queued one whose message
/// expired. A message waiting in the queue is never doubled.
pub fn sweep(
    state: &mut ShardState,
    label: &str,
    now: DateTime<Utc>,
    timing: &Timing,
) -> Change<Sweep> {
    let send = |state: &mut ShardState| {
        state.status = ShardStatus::Queued;
        state.heartbeat = now;
        state.retry_at = None;
        Change::Write(Sweep::Send)
    };
    match state.status {
        ShardStatus::Done => Change::Keep(Sweep::Done),
        ShardStatus::Running if now - state.heartbeat < timing.stale_after => {
            Change::Keep(Sweep::Leave)
        }
        ShardStatus::Running if state.runs_since_progress() >= timing.max_attempts => {
            Change::Keep(Sweep::FailsJob(format!(
                "{label} stopped without a heartbeat {} times (the restart cap); the export is abandoned",
                state.runs_since_progress()
            )))
        }
        ShardStatus::Running => send(state),
        ShardStatus::Waiting if state.retry_at.is_none_or(|at| at <= now) => send(state),
        ShardStatus::Queued if now - state.heartbeat >= QUEUED_MESSAGE_TTL => send(state),
        ShardStatus::Waiting | ShardStatus::Queued => Change::Keep(Sweep::Leave),
    }
}

/// A running job ends (completed, failed or cancelled); `false` when it had ended already.
pub fn end(
    job: &mut Job,
    status: JobStatus,
    failure: Option<(String, Option<crate::fault::Fault>)>,
    now: DateTime<Utc>,
) -> Change<bool> {
    if job.status != JobStatus::Running {
        return Change::Keep(false);
    }
    job.status = status;
    job.completed_at = Some(now);
    // The keys of a de-identified export go with it: nothing can decrypt or re-link its output.
    if let Some(pinned) = &mut job.deidentification {
        pinned.keys = None;
    }
    if let Some((message, fault)) = failure {
        job.failure = Some(message);
        job.failure_fault = fault;
    }
    Change::Write(true)
}

/// Fails a job that could not be planned: only while no plan is recorded (a planning delivered
/// again after another recorded its plan changes nothing).
pub fn fail_planning(
    job: &mut Job,
    failure: (String, Option<crate::fault::Fault>),
    now: DateTime<Utc>,
) -> Change<bool> {
    if job.planned {
        return Change::Keep(false);
    }
    end(job, JobStatus::Failed, Some(failure), now)
}

/// Cancels a job, running or ended: cancelled from now on, and the keys of a de-identified export
/// removed, as at any end. `Keep` when it was cancelled before. Gives the folder its files are in.
pub fn cancel(job: &mut Job, now: DateTime<Utc>) -> Change<Option<String>> {
    if job.status == JobStatus::Cancelled {
        return Change::Keep(None);
    }
    job.status = JobStatus::Cancelled;
    job.completed_at = Some(now);
    if let Some(pinned) = &mut job.deidentification {
        pinned.keys = None;
    }
    Change::Write(Some(job.output_folder.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    const TIMING: Timing = Timing {
        stale_after: Duration::seconds(60),
        max_attempts: 3,
        retry_delay: Duration::seconds(10),
    };

    fn state(status: ShardStatus, attempts: u32, heartbeat: i64) -> ShardState {
        ShardState {
            status,
            attempts,
            heartbeat: at(heartbeat),
            retry_at: (status == ShardStatus::Waiting).then(|| at(heartbeat + 10)),
            ..ShardState::queued_at(at(0))
        }
    }

    fn written<T>(change: Change<T>) -> (bool, T) {
        match change {
            Change::Write(out) => (true, out),
            Change::Keep(out) => (false, out),
        }
    }

    use ShardStatus::*;

    #[test]
    fn claim_table() {
        let now = 100;
        let cases = [
            (state(Queued, 0, 0), Claim::Run(1), true),
            (state(Queued, 1, 0), Claim::Run(2), true),
            (state(Done, 1, 0), Claim::Skip("shard already done"), false),
            (
                state(Running, 1, now - 59),
                Claim::Skip("shard is running elsewhere"),
                false,
            ),
            (state(Running, 1, now - 60), Claim::Run(2), true),
            (
                state(Running, 3, now - 60),
                Claim::Skip("shard went silent at the restart cap"),
                false,
            ),
            // Waiting: retry_at is 10 s after the heartbeat.
            (
                state(Waiting, 1, now - 9),
                Claim::Skip("shard waits for its retry"),
                false,
            ),
            (state(Waiting, 1, now - 10), Claim::Run(2), true),
        ];
        for (mut found, expected, writes) in cases {
            let before = found.clone();
            let (wrote, claim) = written(claim(&mut found, at(now), &TIMING));
            assert_eq!((wrote, &claim), (writes, &expected), "{before:?}");
            if wrote {
                assert_eq!(found.status, Running);
                assert_eq!(found.attempts, before.attempts + 1);
                assert_eq!((found.heartbeat, found.retry_at), (at(now), None));
            } else {
                assert_eq!(found, before);
            }
        }
    }

    #[test]
    fn beat_table() {
        let cases = [
            (state(Running, 2, 0), 2, Beat::Alive, true),
            (state(Running, 3, 0), 2, Beat::TakenOver, false),
            (state(Queued, 2, 0), 2, Beat::TakenOver, false),
            (state(Done, 2, 0), 2, Beat::TakenOver, false),
            (state(Waiting, 2, 0), 2, Beat::TakenOver, false),
        ];
        for (mut found, attempt, expected, writes) in cases {
            let before = found.clone();
            assert_eq!(
                written(beat(&mut found, attempt, at(5))),
                (writes, expected),
                "{before:?}"
            );
            assert_eq!(found.heartbeat, if writes { at(5) } else { at(0) });
        }
    }

    #[test]
    fn finish_keeps_the_first_outputs() {
        let file = |n: u64| OutputFile {
            resource_type: "Patient".into(),
            path: format!("f/Patient-{n}.ndjson"),
            count: n,
            bytes: n,
            continues_in: None,
            list: Default::default(),
            sections: Vec::new(),
        };
        let mut found = state(Running, 1, 0);
        assert_eq!(written(finish(&mut found, &[file(1)])), (true, true));
        assert_eq!((found.status, found.outputs.clone()), (Done, vec![file(1)]));
        assert_eq!(written(finish(&mut found, &[file(2)])), (false, false));
        assert_eq!(found.outputs, vec![file(1)]);
    }

    #[test]
    fn a_pause_queues_the_shard_at_its_cursor_and_restarts_the_cap() {
        let file = |n: u64| OutputFile {
            resource_type: "Patient".into(),
            path: format!("f/Patient-{n}.ndjson"),
            count: n,
            bytes: n,
            continues_in: None,
            list: Default::default(),
            sections: Vec::new(),
        };
        let cursor = Cursor::Rowid { rowid: 41 };
        // Only the attempt that holds the shard pauses it.
        for (status, attempts, attempt) in [(Running, 2, 1), (Queued, 2, 2), (Done, 2, 2)] {
            let mut found = state(status, attempts, 0);
            let before = found.clone();
            assert_eq!(
                written(pause(&mut found, attempt, &cursor, &[file(1)], at(5))),
                (false, false)
            );
            assert_eq!(found, before);
        }
        let mut found = state(Running, 3, 0);
        found.outputs = vec![file(1)];
        assert_eq!(
            written(pause(&mut found, 3, &cursor, &[file(2)], at(5))),
            (true, true)
        );
        assert_eq!(found.status, Queued);
        assert_eq!(found.outputs, vec![file(1), file(2)]);
        assert_eq!(found.cursor, Some(cursor.clone()));
        assert_eq!((found.paused_at_attempt, found.heartbeat), (3, at(5)));
        // Three runs begun, the cap, yet the next is claimed: the paused run made progress.
        assert_eq!(found.runs_since_progress(), 0);
        assert_eq!(
            written(claim(&mut found, at(6), &TIMING)),
            (true, Claim::Run(4))
        );
        // Its failures count from the pause: a first failure waits the first retry's delay.
        let failure = fail(
            &mut found,
            "shard 0 (Patient)",
            4,
            "boom",
            at(7),
            &TIMING,
            1.0,
        );
        assert_eq!(written(failure), (true, Failure::RetryAt(at(17))));
        // Finishing appends its files to those of the paused runs, and forgets the cursor.
        found.status = Running;
        assert_eq!(written(finish(&mut found, &[file(3)])), (true, true));
        assert_eq!(found.outputs, vec![file(1), file(2), file(3)]);
        assert_eq!(found.cursor, None);
    }

    #[test]
    fn fail_table() {
        let now = 100;
        let cases = [
            // attempt 1 of 3: waits 5-10 s (half to all of the first delay).
            (state(Running, 1, 90), 1, Some(Waiting), "retry"),
            (state(Running, 2, 90), 2, Some(Waiting), "retry"),
            (state(Running, 3, 90), 3, Some(Running), "fails"),
            (state(Running, 2, 90), 1, None, "ignored"),
            (state(Done, 1, 90), 1, None, "ignored"),
            (state(Queued, 1, 90), 1, None, "ignored"),
        ];
        for (mut found, attempt, status, outcome) in cases {
            let before = found.clone();
            let (wrote, failure) = written(fail(
                &mut found,
                "shard 4 (Observation)",
                attempt,
                "boom",
                at(now),
                &TIMING,
                1.0,
            ));
            match outcome {
                "retry" => {
                    let wait = TIMING.retry_delay * (1 << (attempt - 1));
                    assert_eq!(failure, Failure::RetryAt(at(now) + wait));
                    assert_eq!(found.retry_at, Some(at(now) + wait));
                }
                "fails" => assert_eq!(
                    failure,
                    Failure::FailsJob(
                        "shard 4 (Observation) failed 3 times; last error: boom".into()
                    )
                ),
                _ => assert_eq!(failure, Failure::Ignored),
            }
            assert_eq!(wrote, status.is_some(), "{before:?}");
            match status {
                Some(status) => {
                    assert_eq!(found.status, status);
                    assert_eq!(found.last_error.as_deref(), Some("boom"));
                }
                None => assert_eq!(found, before),
            }
        }
    }

    #[test]
    fn retry_waits_double_and_spread_over_the_upper_half() {
        let base = Duration::seconds(30);
        assert_eq!(retry_wait(base, 1, 0.0), Duration::seconds(15));
        assert_eq!(retry_wait(base, 1, 1.0), Duration::seconds(30));
        assert_eq!(retry_wait(base, 2, 0.5), Duration::seconds(45));
        assert_eq!(retry_wait(base, 3, 1.0), Duration::seconds(120));
        assert_eq!(retry_wait(base, 40, 1.0), Duration::seconds(30 * 64));
    }

    #[test]
    fn sweep_table() {
        let day = QUEUED_MESSAGE_TTL.num_seconds();
        let now = day + 1_000;
        let cases = [
            (state(Done, 1, 0), Sweep::Done, None),
            (state(Running, 1, now - 59), Sweep::Leave, None),
            (state(Running, 1, now - 60), Sweep::Send, Some(Queued)),
            (
                state(Running, 3, now - 60),
                Sweep::FailsJob("shard 2 (Device) stopped without a heartbeat 3 times (the restart cap); the export is abandoned".into()),
                None,
            ),
            (state(Waiting, 1, now - 9), Sweep::Leave, None),
            (state(Waiting, 1, now - 10), Sweep::Send, Some(Queued)),
            // A queued shard's message waits in the queue: never doubled until it expired.
            (state(Queued, 0, now - 3_600), Sweep::Leave, None),
            (state(Queued, 0, now - day + 1), Sweep::Leave, None),
            (state(Queued, 0, now - day), Sweep::Send, Some(Queued)),
        ];
        for (mut found, expected, status) in cases {
            let before = found.clone();
            let (wrote, swept) = written(sweep(&mut found, "shard 2 (Device)", at(now), &TIMING));
            assert_eq!((wrote, &swept), (status.is_some(), &expected), "{before:?}");
            match status {
                Some(status) => {
                    assert_eq!((found.status, found.heartbeat), (status, at(now)));
                    assert_eq!(found.attempts, before.attempts);
                }
                None => assert_eq!(found, before),
            }
        }
    }

    #[test]
    fn cancel_table() {
        let keys = crate::deid::Keys {
            date_shift: "d".into(),
            crypto_hash: "c".into(),
            encrypt: "e".into(),
        };
        for (status, cancels) in [
            (JobStatus::Running, true),
            (JobStatus::Completed, true),
            (JobStatus::Failed, true),
            (JobStatus::Cancelled, false),
        ] {
            let mut job = ended_job(status);
            job.deidentification = Some(crate::export::schema::PinnedConfig {
                etag: "\"1\"".into(),
                keys: Some(keys.clone()),
            });
            let change = cancel(&mut job, at(7));
            assert_eq!(
                matches!(change, Change::Write(Some(ref f)) if f == "f"),
                cancels,
                "{status:?}"
            );
            if cancels {
                assert_eq!(
                    (job.status, job.completed_at),
                    (JobStatus::Cancelled, Some(at(7)))
                );
                assert_eq!(
                    job.deidentification.as_ref().unwrap().keys,
                    None,
                    "{status:?}"
                );
            }
        }
    }

    #[test]
    fn planning_failure_table() {
        for (planned, status, fails) in [
            (false, JobStatus::Running, true),
            (true, JobStatus::Running, false),
            (false, JobStatus::Cancelled, false),
        ] {
            let mut job = ended_job(status);
            job.planned = planned;
            let change = fail_planning(&mut job, ("no source".into(), None), at(3));
            assert_eq!(written(change), (fails, fails), "{planned} {status:?}");
            if fails {
                assert_eq!(job.status, JobStatus::Failed);
                assert_eq!(job.failure.as_deref(), Some("no source"));
            }
        }
    }

    fn ended_job(status: JobStatus) -> Job {
        let mut job = running_job();
        job.status = status;
        job
    }

    fn running_job() -> Job {
        let request = crate::export::ExportRequest::from_query(
            crate::export::Level::System,
            "",
            false,
            false,
        )
        .unwrap();
        Job {
            id: "j".into(),
            request,
            request_url: "u".into(),
            base_url: "b".into(),
            transaction_time: at(0),
            output_folder: "f".into(),
            scope: crate::source::PatientScope::All,
            status: JobStatus::Running,
            planned: true,
            planned_at: Some(at(1)),
            shards: Vec::new(),
            failure: None,
            failure_fault: None,
            completed_at: None,
            owner: None,
            deidentification: None,
            planning_errors: Vec::new(),
        }
    }

    #[test]
    fn a_job_ends_once() {
        let mut job = running_job();
        let failure = Some(("shard 1 failed".to_string(), None));
        assert_eq!(
            written(end(&mut job, JobStatus::Failed, failure, at(5))),
            (true, true)
        );
        assert_eq!(
            (job.status, job.completed_at),
            (JobStatus::Failed, Some(at(5)))
        );
        assert_eq!(job.failure.as_deref(), Some("shard 1 failed"));
        // Ended already: a later completion or cancel changes nothing.
        for status in [JobStatus::Completed, JobStatus::Cancelled] {
            assert_eq!(written(end(&mut job, status, None, at(9))), (false, false));
            assert_eq!(
                (job.status, job.completed_at),
                (JobStatus::Failed, Some(at(5)))
            );
        }
        assert_eq!(job.unclaimed_shard(), ShardState::queued_at(at(1)));
    }

    #[test]
    fn resume_table() {
        for (status, resumed) in [
            (Queued, true),
            (Running, true),
            (Waiting, true),
            (Done, false),
        ] {
            let mut found = state(status, 1, 0);
            assert_eq!(written(resume(&mut found, at(9))), (resumed, resumed));
            if resumed {
                assert_eq!(
                    (found.status, found.heartbeat, found.retry_at),
                    (Queued, at(9), None)
                );
            }
        }
    }
}
