//! The table's reachability probe: what "reachable" means for the sled store.
//!
//! sled is in-process, so it cannot be "down" like a server; what can fail is the
//! disk under it. Every `every`, [`Table::probe`] writes and flushes one key on the
//! blocking pool; the result is reported to [`crate::metrics::Reachability`] (the
//! hook `/health` and `tenso_table_reachable` read). Unreachable means: the probe
//! failed (disk full, read-only, I/O error — sled then refuses every later write
//! until a restart) or did not finish within `deadline` (a hung disk). A probe that
//! hangs is not started again while it runs, so a hung disk costs one blocked thread,
//! not one per period.
//!
//! Another backend (a database) feeds the same hook from its own health checks.

use super::Table;
use std::time::Duration;

/// Probes `table` every `every`, each probe bounded by `deadline`, until the process ends.
pub async fn run(table: Table, every: Duration, deadline: Duration) {
    let state = crate::metrics::metrics().table_state();
    let mut pending: Option<tokio::task::JoinHandle<Result<(), super::TableError>>> = None;
    loop {
        let mut job = pending.take().unwrap_or_else(|| {
            let t = table.clone();
            tokio::task::spawn_blocking(move || t.probe())
        });
        let result = match tokio::time::timeout(deadline, &mut job).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("probe failed: {e}")),
            Ok(Err(e)) => Err(format!("probe task failed: {e}")),
            Err(_) => {
                pending = Some(job);
                Err(format!("probe did not finish within {deadline:?}"))
            }
        };
        state.report(result);
        tokio::time::sleep(every).await;
    }
}
