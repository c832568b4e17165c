//! The commands that change the state database, while the daemon runs or
//! not: `watch`, `unwatch`, `dead --purge`, `replay`. The daemon sees their
//! changes through the database.

use runhook::store::Location;

use runhook::store::{DeadFilter, Subscribed};

use super::open_state;

/// Labels are checked before `state` is looked up (which may read the
/// config), so that a bad label is the error reported.
pub(super) async fn watch(
    state: impl FnOnce() -> anyhow::Result<Location>,
    run_id: String,
    labels: &[String],
) -> anyhow::Result<()> {
    let labels = runhook::ingest::parse_labels(labels).map_err(anyhow::Error::msg)?;
    let store = open_state(&state()?).await?;
    match store
        .subscribe(run_id.clone(), labels, "watch", None)
        .await?
    {
        Subscribed::Watching => out!("watching {run_id}")?,
        Subscribed::Pruned(pruned) => out!(
            "{run_id} finished ({}) and was pruned after state.retain; its events were delivered, so it is not followed again (cursor {})",
            pruned.status.as_deref().unwrap_or("unknown status"),
            pruned.cursor
        )?,
    }
    Ok(())
}

pub(super) async fn unwatch(state: &Location, run_id: String) -> anyhow::Result<()> {
    let store = open_state(state).await?;
    if !store.unsubscribe(run_id.clone()).await? {
        anyhow::bail!("run {run_id} is not known to this state database");
    }
    out!("no longer watching {run_id}")?;
    Ok(())
}

pub(super) async fn purge_dead(
    state: &Location,
    sink: Option<String>,
    run: Option<String>,
) -> anyhow::Result<()> {
    let store = open_state(state).await?;
    let purged = store
        .purge_dead(DeadFilter {
            sink,
            run,
            id: None,
        })
        .await?;
    out!("purged {purged} dead letters")?;
    Ok(())
}

pub(super) async fn replay(
    state: &Location,
    sink: Option<String>,
    run: Option<String>,
    id: Option<String>,
) -> anyhow::Result<()> {
    let store = open_state(state).await?;
    let replayed = store.replay(DeadFilter { sink, run, id }).await?;
    out!("queued {replayed} dead letters again (same ids)")?;
    Ok(())
}
