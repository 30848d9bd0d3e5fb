//! The on-disk inbox: JSON-lines segments rotated by size, appended in groups with one
//! fsync, read back by sequence number, and broadcast to watchers once durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::event::{now_ms, rfc3339, Event};

/// Errors of the inbox files.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InboxError + '_ {
    move |source| InboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct Writer {
    file: File,
    path: PathBuf,
    size: u64,
    last_seq: u64,
}

/// The inbox of one controller.
pub struct Inbox {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    /// The last seq handed out; ahead of the writer while a batch is being committed.
    numbered: Mutex<u64>,
    live: broadcast::Sender<Arc<Event>>,
}

impl Inbox {
    /// Opens the inbox in `dir`, dropping a torn last line left by a crash, and recovers the
    /// last sequence number.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Inbox, InboxError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let segments = segments(dir).map_err(io_err(dir))?;
        let (path, last_seq) = match segments.last() {
            Some((_, path)) => (path.clone(), repair_tail(path)?),
            None => (dir.join(segment_name(1)), 0),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let (live, _) = broadcast::channel(4096);
        Ok(Inbox {
            dir: dir.to_path_buf(),
            segment_bytes,
            writer: Mutex::new(Writer {
                file,
                path,
                size,
                last_seq,
            }),
            numbered: Mutex::new(last_seq),
            live,
        })
    }

    pub fn last_seq(&self) -> u64 {
        self.writer.lock().expect("inbox writer poisoned").last_seq
    }

    /// Numbers events after the last one numbered (written or not) and stamps their time.
    pub fn number(&self, events: &mut [Event]) {
        let mut next = self.numbered.lock().expect("inbox numbering poisoned");
        let ts = rfc3339(now_ms());
        for event in events.iter_mut() {
            *next += 1;
            event.seq = *next;
            event.ts = ts.clone();
        }
    }

    /// Appends numbered events and syncs them to disk before returning. Events at or below
    /// the last written seq are skipped, so replaying a batch after a crash is harmless.
    pub fn append(&self, events: &[Event]) -> Result<(), InboxError> {
        let mut w = self.writer.lock().expect("inbox writer poisoned");
        let mut buf = Vec::with_capacity(events.len() * 256);
        let mut last = w.last_seq;
        for event in events.iter().filter(|e| e.seq > w.last_seq) {
            debug_assert_eq!(event.seq, last + 1, "inbox seqs are contiguous");
            last = event.seq;
            serde_json::to_writer(&mut buf, event).expect("events serialize");
            buf.push(b'\n');
        }
        if buf.is_empty() {
            return Ok(());
        }

        if w.size > 0 && w.size + buf.len() as u64 > self.segment_bytes {
            let path = self.dir.join(segment_name(w.last_seq + 1));
            w.file.sync_all().map_err(io_err(&w.path))?;
            w.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            w.path = path;
            w.size = 0;
        }
        let path = w.path.clone();
        w.file.write_all(&buf).map_err(io_err(&path))?;
        w.file.sync_data().map_err(io_err(&path))?;
        w.size += buf.len() as u64;
        w.last_seq = last;
        let mut numbered = self.numbered.lock().expect("inbox numbering poisoned");
        *numbered = (*numbered).max(last);
        Ok(())
    }

    /// Hands durable events to watchers.
    pub fn publish(&self, events: Vec<Event>) {
        for event in events {
            let _ = self.live.send(Arc::new(event));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// Reads events with `seq >= from`, in order, that pass `keep`, at most `limit`.
    pub fn read(
        &self,
        from: u64,
        limit: usize,
        mut keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, InboxError> {
        let segments = segments(&self.dir).map_err(io_err(&self.dir))?;
        let last = self.last_seq();
        let mut out = Vec::new();
        // Start at the last segment whose first seq is at or before `from`.
        let start = segments
            .iter()
            .rposition(|(first, _)| *first <= from.max(1))
            .unwrap_or(0);
        for (_, path) in &segments[start..] {
            let file = File::open(path).map_err(io_err(path))?;
            for line in BufReader::new(file).split(b'\n') {
                let line = line.map_err(io_err(path))?;
                let Ok(event) = serde_json::from_slice::<Event>(&line) else {
                    continue;
                };
                // Lines past the writer's last seq are being written right now.
                if event.seq > last {
                    return Ok(out);
                }
                if event.seq >= from && keep(&event) {
                    out.push(event);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("inbox-{first_seq:020}.jsonl")
}

/// Segments sorted by their first seq.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(first) = name
            .strip_prefix("inbox-")
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse().ok())
        {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Cuts a partial last line (a crash mid-append) and returns the last seq in the file.
fn repair_tail(path: &Path) -> Result<u64, InboxError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    // Scan backwards in chunks for the last newline.
    let mut end = len;
    let mut keep = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
        file.read_exact(&mut chunk[..n]).map_err(io_err(path))?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if keep < len {
        tracing::warn!(path = %path.display(), dropped = len - keep, "dropping a torn last inbox line");
        file.set_len(keep).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
    }

    // The last complete line holds the last seq.
    let start = keep.saturating_sub(1024 * 1024);
    file.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
    let mut tail = Vec::new();
    file.take(keep - start)
        .read_to_end(&mut tail)
        .map_err(io_err(path))?;
    let last = tail
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<Event>(l).ok())
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Severity;

    fn append(inbox: &Inbox, events: &mut [Event]) {
        inbox.number(events);
        inbox.append(events).unwrap();
    }

    #[test]
    fn replayed_events_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
        let mut batch = events(3);
        inbox.number(&mut batch);

        inbox.append(&batch[..2]).unwrap();
        inbox.append(&batch).unwrap();

        let seqs: Vec<u64> = inbox
            .read(0, 100, |_| true)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| Event::new("task.report", Severity::Info, format!("e{i}")))
            .collect()
    }

    #[test]
    fn seq_continues_across_reopen_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 300).unwrap();
        append(&inbox, &mut events(3));
        append(&inbox, &mut events(3));
        drop(inbox);

        let inbox = Inbox::open(dir.path(), 300).unwrap();
        let mut more = events(2);
        append(&inbox, &mut more);

        assert_eq!(more[1].seq, 8);
        let all = inbox.read(0, 100, |_| true).unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        assert!(segments(dir.path()).unwrap().len() > 1);
    }

    #[test]
    fn torn_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
        append(&inbox, &mut events(2));
        drop(inbox);
        let path = segments(dir.path()).unwrap()[0].1.clone();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":3,\"ts\"")
            .unwrap();

        let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
        let mut next = events(1);
        append(&inbox, &mut next);

        assert_eq!(next[0].seq, 3);
        assert_eq!(inbox.read(0, 100, |_| true).unwrap().len(), 3);
    }

    #[test]
    fn read_starts_at_from_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 200).unwrap();
        append(&inbox, &mut events(10));

        let got = inbox.read(7, 2, |e| e.message != "e7").unwrap();

        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [7, 9]);
    }
}
