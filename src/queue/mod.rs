//! The queue manager: which committed message is due, and handing it to delivery.
//!
//! (Scheduler under construction: this version keeps accepted messages waiting.)

use crate::spool::{Envelope, Spool, SpoolError};
use std::sync::Arc;
use tokio::sync::mpsc;

pub enum QueueMsg {
    Enqueue(Envelope, Option<Arc<Vec<u8>>>),
    Flush(Option<String>),
}

#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<QueueMsg>,
    spool: Spool,
}

impl QueueHandle {
    pub fn enqueue(&self, env: Envelope, body: Option<Arc<Vec<u8>>>) {
        let _ = self.tx.send(QueueMsg::Enqueue(env, body));
    }
    pub fn flush(&self, id: Option<String>) {
        let _ = self.tx.send(QueueMsg::Flush(id));
    }
    pub async fn remove(&self, id: &str) -> Result<(), SpoolError> {
        self.spool.remove(id).await
    }
    pub async fn set_held(&self, id: &str, held: bool) -> Result<(), SpoolError> {
        let mut env = self.spool.read_envelope(id)?;
        env.held = held;
        self.spool.update(&env).await
    }
}

pub fn start(spool: Spool, initial: Vec<Envelope>) -> QueueHandle {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut waiting: Vec<Envelope> = initial;
        while let Some(msg) = rx.recv().await {
            match msg {
                QueueMsg::Enqueue(env, _) => waiting.push(env),
                QueueMsg::Flush(_) => {}
            }
        }
    });
    QueueHandle { tx, spool }
}
