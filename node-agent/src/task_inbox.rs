//! A task's `MUSTER_INBOX` file: inbox lines about its descendants, in seq order, each once.
//! Lines come from the controller live and, after a reconnect, as a replay of what the file
//! missed; a line whose seq is not above the file's last is a repeat and is skipped.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use muster_proto::v1::Deliver;

use crate::Context;

/// The file is moved to `inbox.jsonl.1` beyond this size.
const ROTATE_BYTES: u64 = 16 << 20;

/// The seq of an inbox line (`{"seq":N,...}`).
fn seq_of(line: &str) -> Option<u64> {
    let rest = line.trim_start().strip_prefix("{\"seq\":")?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// The seq of the last whole line of a file, 0 if there is none.
fn last_seq_in(path: &Path) -> u64 {
    let Ok(mut file) = std::fs::File::open(path) else {
        return 0;
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(64 * 1024);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return 0;
    }
    let mut tail = String::new();
    if file.read_to_string(&mut tail).is_err() {
        return 0;
    }
    tail.lines().rev().find_map(seq_of).unwrap_or(0)
}

/// The last seq the task's inbox file holds (after a rotation: the rotated file's).
pub fn last_seq(ctx: &Context, task: &str) -> u64 {
    let mut seqs = ctx.inbox_seqs.lock().expect("inbox seqs poisoned");
    if let Some(seq) = seqs.get(task) {
        return *seq;
    }
    let path = ctx.task_inbox(task);
    let seq = match last_seq_in(&path) {
        0 => last_seq_in(&path.with_extension("jsonl.1")),
        seq => seq,
    };
    seqs.insert(task.to_string(), seq);
    seq
}

/// Appends the delivered lines that are new to the task's inbox file. Small and in order, so
/// it is written on the session's task rather than on a blocking thread that could reorder
/// two deliveries.
pub fn append(ctx: &Context, deliver: &Deliver) -> std::io::Result<()> {
    if muster_proto::spec::check_name(&deliver.task).is_err() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a task name",
        ));
    }
    let mut last = last_seq(ctx, &deliver.task);
    let mut buf = Vec::new();
    for line in &deliver.lines {
        let Some(seq) = seq_of(line) else {
            continue;
        };
        if seq <= last {
            continue;
        }
        last = seq;
        buf.extend_from_slice(line.trim_end().as_bytes());
        buf.push(b'\n');
    }
    if buf.is_empty() {
        return Ok(());
    }
    let path = ctx.task_inbox(&deliver.task);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
        std::fs::rename(&path, path.with_extension("jsonl.1"))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?
        .write_all(&buf)?;
    ctx.inbox_seqs
        .lock()
        .expect("inbox seqs poisoned")
        .insert(deliver.task.clone(), last);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_read_from_the_line_start() {
        assert_eq!(seq_of(r#"{"seq":1042,"ts":"x"}"#), Some(1042));
        assert_eq!(seq_of(r#"{"ts":"x","seq":3}"#), None);
        assert_eq!(seq_of("not json"), None);
    }

    #[test]
    fn last_whole_line_gives_the_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.jsonl");
        assert_eq!(last_seq_in(&path), 0);
        std::fs::write(&path, "{\"seq\":4,\"a\":1}\n{\"seq\":9,\"a\":2}\n").unwrap();
        assert_eq!(last_seq_in(&path), 9);
    }
}
