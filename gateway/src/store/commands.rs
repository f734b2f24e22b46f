//! The per-device command queue of the downlink (`crate::downlink`): commands from
//! upstream waiting for their device, in the `COMMANDS` table keyed by (device, seq).
//!
//! Owns the row layout of a queued command, the changes the owner thread makes to the
//! queue (queue, bound, done) and the read queries. Every change of a command's state
//! appends its status message to the outbox's event lane in the same write transaction,
//! so the queue and the status reported upstream never disagree, also after `kill -9`.
//!
//! Invariants:
//! - `seq` comes from `META.commands.next`, committed with the row: a device's commands
//!   are read in the order they were queued, across restarts;
//! - a device has at most `max_per_device` commands; queueing one more removes the oldest,
//!   reported `dropped` and counted (`commands.dropped`);
//! - a command leaves the queue only as `delivered` (its device PUBACKed it), `expired`,
//!   or `dropped` (the bound, or an operator dropping the device's queue); each is
//!   reported once: removing a command that is gone already does nothing.

use redb::{ReadableDatabase, ReadableTable};

use super::fresh::Outbox;
use super::journal::Logged;
use super::stats::Counter;
use super::tables::{Cursor, COMMANDS};
use super::writer::Owner;
use super::{OutboxEntry, StoreError};
use crate::reading::Millis;

/// A command waiting for its device.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedCommand {
    /// Position in the device's queue; 0 until the store has queued it.
    pub seq: u64,
    pub device: String,
    pub command: String,
    /// The id its status messages carry: the MQTT 5 correlation data of the upstream
    /// message, or one the gateway gave it.
    pub id: String,
    /// Where its status messages go, under the upstream prefix.
    pub status_topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 content type and user properties of the upstream message, passed on.
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub queued_at: Millis,
    /// Unix ms after which it is not delivered.
    pub expires_at: Millis,
}

/// Where a command's life ended, as its status message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandState {
    Queued,
    Delivered,
    Expired,
    Dropped,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Delivered => "delivered",
            CommandState::Expired => "expired",
            CommandState::Dropped => "dropped",
        }
    }

    fn counter(self) -> Counter {
        match self {
            CommandState::Queued => Counter::CommandsQueued,
            CommandState::Delivered => Counter::CommandsDelivered,
            CommandState::Expired => Counter::CommandsExpired,
            CommandState::Dropped => Counter::CommandsDropped,
        }
    }
}

/// The status message of `cmd` entering `state` at `time`: an outbox event.
pub fn status_entry(cmd: &QueuedCommand, state: CommandState, time: Millis) -> OutboxEntry {
    let json = serde_json::json!({
        "id": cmd.id,
        "state": state.as_str(),
        "device": cmd.device,
        "command": cmd.command,
        "time": time,
    });
    OutboxEntry::on_event_lane(
        &cmd.status_topic,
        &cmd.device,
        json.to_string().as_bytes(),
        time,
    )
}

/// Row layout: `queued_at i64 | expires_at i64 | command | id | status_topic |
/// content_type (empty: none) | user property count u16 | (name, value)* | payload`,
/// strings with a u16 length.
pub(super) fn encode(out: &mut Vec<u8>, c: &QueuedCommand) {
    use super::tables::put_str;
    out.clear();
    out.extend_from_slice(&c.queued_at.to_le_bytes());
    out.extend_from_slice(&c.expires_at.to_le_bytes());
    put_str(out, &c.command);
    put_str(out, &c.id);
    put_str(out, &c.status_topic);
    put_str(out, c.content_type.as_deref().unwrap_or(""));
    let n = c.user_properties.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    for (k, v) in &c.user_properties[..n] {
        put_str(out, k);
        put_str(out, v);
    }
    out.extend_from_slice(&c.payload);
}

pub(super) fn decode(device: &str, seq: u64, buf: &[u8]) -> Option<QueuedCommand> {
    let mut c = Cursor { buf };
    let queued_at = c.i64()?;
    let expires_at = c.i64()?;
    let command = c.str()?.to_owned();
    let id = c.str()?.to_owned();
    let status_topic = c.str()?.to_owned();
    let content_type = Some(c.str()?.to_owned()).filter(|s| !s.is_empty());
    let n = u16::from_le_bytes(c.take(2)?.try_into().ok()?);
    let mut user_properties = Vec::with_capacity(n as usize);
    for _ in 0..n {
        user_properties.push((c.str()?.to_owned(), c.str()?.to_owned()));
    }
    Some(QueuedCommand {
        seq,
        device: device.to_owned(),
        command,
        id,
        status_topic,
        payload: c.buf.to_vec(),
        content_type,
        user_properties,
        queued_at,
        expires_at,
    })
}

fn corrupt(device: &str, seq: u64) -> StoreError {
    StoreError::CorruptRow {
        table: "commands".into(),
        key: format!("({device}, {seq})"),
    }
}

type CommandTable<'l, 't> = Logged<'l, 't, (&'static str, u64), &'static [u8]>;

impl Owner {
    /// Queues `cmd` (reported `queued`), then drops the device's oldest beyond the bound.
    pub(super) fn queue_command(
        &mut self,
        commands: &mut CommandTable<'_, '_>,
        events: &mut Outbox<'_, '_>,
        mut cmd: QueuedCommand,
        max_per_device: usize,
    ) -> Result<(), StoreError> {
        let seq = self.get(Counter::CommandsNext).max(1);
        self.set(Counter::CommandsNext, seq + 1);
        cmd.seq = seq;
        let mut row = Vec::new();
        encode(&mut row, &cmd);
        commands.insert((cmd.device.as_str(), seq), row.as_slice())?;
        self.add(Counter::CommandsPending, 1);
        self.command_status(events, &cmd, CommandState::Queued)?;
        let device = cmd.device.as_str();
        let queued = commands.range((device, 0)..=(device, u64::MAX))?.count();
        for _ in max_per_device..queued {
            let oldest = commands
                .range((device, 0)..=(device, u64::MAX))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().1);
            match oldest {
                Some(seq) => {
                    self.command_done(commands, events, device, seq, CommandState::Dropped)?
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Removes a device's command as `state` and reports it; nothing when it is gone.
    pub(super) fn command_done(
        &mut self,
        commands: &mut CommandTable<'_, '_>,
        events: &mut Outbox<'_, '_>,
        device: &str,
        seq: u64,
        state: CommandState,
    ) -> Result<(), StoreError> {
        let Some(row) = commands.remove((device, seq))? else {
            return Ok(());
        };
        let cmd = decode(device, seq, row.value()).ok_or_else(|| corrupt(device, seq))?;
        drop(row);
        self.sub(Counter::CommandsPending, 1);
        self.command_status(events, &cmd, state)
    }

    fn command_status(
        &mut self,
        events: &mut Outbox<'_, '_>,
        cmd: &QueuedCommand,
        state: CommandState,
    ) -> Result<(), StoreError> {
        self.add(state.counter(), 1);
        self.append_row(
            events,
            status_entry(cmd, state, crate::reading::now_millis()),
        )
    }
}

/// `gateway commands list`: the queued commands of the database at `path` (read-only, so
/// also while the gateway runs), oldest first per device.
pub fn list_commands_file(
    path: &std::path::Path,
    device: Option<&str>,
) -> Result<Vec<QueuedCommand>, StoreError> {
    pending(&super::read::open_read_only(path)?, device, usize::MAX)
}

/// `gateway commands drop`: removes every queued command of `device` as `dropped` (their
/// status messages are forwarded on the next run). Needs the database for itself: fails
/// while the gateway runs. Returns how many were dropped.
pub fn drop_commands_file(
    config: &crate::config::Config,
    device: &str,
) -> Result<usize, StoreError> {
    let store = super::Store::open(
        &config.storage.path,
        super::StoreConfig::from_config(config),
    )?;
    let queue = store.pending_commands(Some(device), usize::MAX)?;
    for cmd in &queue {
        store.command_done(device, cmd.seq, CommandState::Dropped);
    }
    store.flush_blocking()?;
    store.shutdown()?;
    Ok(queue.len())
}

/// The queued commands of `device` (every device when `None`), oldest first per device,
/// at most `limit`.
pub(super) fn pending(
    db: &impl ReadableDatabase,
    device: Option<&str>,
    limit: usize,
) -> Result<Vec<QueuedCommand>, StoreError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(COMMANDS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let rows = match device {
        Some(d) => table.range((d, 0)..=(d, u64::MAX))?,
        None => table.range::<(&str, u64)>(..)?,
    };
    let mut out = Vec::new();
    for row in rows.take(limit) {
        let (k, v) = row?;
        let (device, seq) = k.value();
        out.push(decode(device, seq, v.value()).ok_or_else(|| corrupt(device, seq))?);
    }
    Ok(out)
}
