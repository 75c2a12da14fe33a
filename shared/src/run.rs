//! A whole run of a sync in one process: lock → check the account → finish an abandoned run →
//! field definitions → plan → row cap → write → fold → record, each phase from `pipeline`. The
//! Lambdas schedule the same phases one step per function (`steps`).

use crate::lock;
use crate::pipeline::{
    check_account, check_cap, finish_unfinished, plan_run, read_schema, write_and_finalize, Base,
    PlanInputs,
};
use crate::record::{failed_record, save_record, FailedRun, Phases, RowCounts, RunErrorInfo};
use std::time::Instant;

pub use crate::errors::RunError;
pub use crate::pipeline::{
    needs_schema, new_run_id, saved_schema, write_all, RunContext, RunOptions, SavedSchema,
};
pub use crate::record::{
    build_record, history, InvalidSample, RecordParts, Requests, RunRecord, RunStatus,
};

/// What one `run` did: the run it finished for a crashed process (if any), then its own; and
/// the error that stopped it, if one did.
#[derive(Debug)]
pub struct RunOutcome {
    pub records: Vec<RunRecord>,
    pub error: Option<RunError>,
}

impl RunOutcome {
    /// The run was stopped by a signal (its record says `interrupted`).
    pub fn interrupted(&self) -> bool {
        self.records
            .last()
            .is_some_and(|r| r.status == RunStatus::Interrupted)
    }
}

/// Run a sync once. Config, credential and preflight problems fail before any write; a run
/// that fails after its plan still folds what Zendesk confirmed into the state. Every run that
/// got past the lock leaves a run record, failed ones included.
pub async fn run(ctx: &RunContext, opts: &RunOptions) -> RunOutcome {
    let cfg = &ctx.config;
    let run_id = opts.run_id.clone().unwrap_or_else(new_run_id);
    let guard = match lock::acquire(
        ctx.store.clone(),
        &cfg.name,
        &run_id,
        opts.lock_ttl,
        opts.lock_wait,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            return RunOutcome {
                records: Vec::new(),
                error: Some(e.into()),
            }
        }
    };
    let mut records = Vec::new();
    let result = run_locked(ctx, opts, &run_id, guard.taken_over.clone(), &mut records).await;
    guard.release().await;
    RunOutcome {
        records,
        error: result.err(),
    }
}

async fn run_locked(
    ctx: &RunContext,
    opts: &RunOptions,
    run_id: &str,
    taken_over: Option<lock::LockInfo>,
    records: &mut Vec<RunRecord>,
) -> Result<(), RunError> {
    let cfg = &ctx.config;
    let mut base = Base::now(ctx);
    let mut phases = Phases::default();
    let mut t = Instant::now();
    let fail = |phases: &Phases, e: &RunError, rows: RowCounts, base: &Base| {
        failed_record(FailedRun {
            run_id,
            sync: &cfg.name,
            object: cfg.object,
            mode: cfg.mode,
            trigger: &opts.trigger,
            started: base.started,
            seconds: base.clock.elapsed().as_secs_f64(),
            phases: phases.clone(),
            rows,
            requests: ctx.client.stats().since(&base.requests),
            error: RunErrorInfo::from(e),
        })
    };

    // Preflight: credentials, subdomain and scopes (and tagging, for an audience) before
    // anything is read or written.
    if let Err(e) = check_account(&ctx.client, cfg).await {
        phases.preflight = t.elapsed().as_secs_f64();
        let rec = fail(&phases, &e, RowCounts::default(), &base);
        save_record(ctx.store.clone(), &rec).await?;
        records.push(rec);
        return Err(e);
    }
    phases.preflight = t.elapsed().as_secs_f64();

    // A run a crashed or interrupted process left between plan and finalize is finished
    // first, so nothing it created is created again. Its work goes to its own record; this
    // run's figures start after it.
    let mut resumed_run = None;
    {
        let before = Base::now(ctx);
        if let Some(rec) = finish_unfinished(ctx, opts, run_id, taken_over).await? {
            resumed_run = Some(rec.run_id.clone());
            let interrupted = rec.status == RunStatus::Interrupted;
            records.push(rec);
            if interrupted {
                return Ok(());
            }
            // This run's figures: its preflight and what follows, not the finished run's part.
            let after = Base::now(ctx);
            base.requests.add(&after.requests.since(&before.requests));
            base.jobs += after.jobs.saturating_sub(before.jobs);
            base.started = after.started;
            base.clock = after.clock;
        }
    }

    t = Instant::now();
    let schema = match read_schema(&ctx.client, cfg, Some((&ctx.store, run_id))).await {
        Ok(s) => s,
        Err(e) => {
            phases.schema = t.elapsed().as_secs_f64();
            let rec = fail(&phases, &e, RowCounts::default(), &base);
            save_record(ctx.store.clone(), &rec).await?;
            records.push(rec);
            return Err(e);
        }
    };
    phases.schema = t.elapsed().as_secs_f64();

    // A tickets sync without its state, or asked to resync in full, learns from Zendesk which
    // ticket carries each key before anything is created.
    t = Instant::now();
    let inputs = PlanInputs {
        run_id: run_id.to_string(),
        schema,
        samples: opts.samples,
        full_resync: opts.full_resync,
        export_rpm: opts.export_rpm,
    };
    let planned = plan_run(&ctx.store, cfg, Some(&ctx.client), &inputs).await;
    phases.plan = t.elapsed().as_secs_f64();
    let report = match planned {
        Ok(r) => r,
        Err(e) => {
            let rec = fail(&phases, &e, RowCounts::default(), &base);
            save_record(ctx.store.clone(), &rec).await?;
            records.push(rec);
            return Err(e);
        }
    };
    if let Err(e) = check_cap(
        &report.manifest,
        opts.max_rows.or(cfg.max_rows_per_run),
        cfg.rate_limit_rpm(),
    ) {
        let c = &report.manifest.counts;
        let rows = RowCounts {
            read: c.rows_read,
            invalid: c.invalid,
            unchanged: c.unchanged,
            ..RowCounts::default()
        };
        let rec = fail(&phases, &e, rows, &base);
        save_record(ctx.store.clone(), &rec).await?;
        records.push(rec);
        return Err(e);
    }

    let (mut rec, error) = write_and_finalize(
        ctx,
        opts,
        &report.manifest,
        Some(&report),
        phases,
        &base,
        run_id,
    )
    .await?;
    if resumed_run.is_some() {
        rec.resumed_run = resumed_run;
        save_record(ctx.store.clone(), &rec).await?;
    }
    records.push(rec);
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
