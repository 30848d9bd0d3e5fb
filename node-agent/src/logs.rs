//! Per-task log files: both output streams drained into size-capped, rotated files, each
//! line handed on (the agent keeps a short tail of them for exit events and rules).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

/// Bounds of one stream's log files.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// A file is rotated to `.1` when it would pass this size; disk use per stream is at
    /// most twice this.
    pub max_file_bytes: u64,
    /// Lines longer than this are split for matching and tails (the file keeps the bytes).
    pub max_line_bytes: usize,
    pub tail_lines: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_file_bytes: 8 * 1024 * 1024,
            max_line_bytes: 8 * 1024,
            tail_lines: 20,
        }
    }
}

/// Path of a stream's current log file inside a task directory.
pub fn log_path(task_dir: &Path, stream: &str) -> PathBuf {
    task_dir.join(format!("{stream}.log"))
}

/// Appends to a log file, rotating it when it passes its cap.
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    limits: LogLimits,
    /// Bytes lost because the file could not be written (disk full, ...).
    pub dropped: u64,
    /// The first write error, kept for the one event that reports dropping.
    pub error: Option<String>,
}

impl LogFile {
    pub fn open(path: PathBuf, limits: LogLimits) -> LogFile {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        LogFile {
            path,
            file,
            size,
            limits,
            dropped: 0,
            error: None,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        if self.size + bytes.len() as u64 > self.limits.max_file_bytes && self.size > 0 {
            self.rotate();
        }
        let written = match self.file.as_mut().map(|f| f.write_all(bytes)) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                self.error.get_or_insert_with(|| e.to_string());
                false
            }
            None => {
                self.error
                    .get_or_insert_with(|| format!("cannot open {}", self.path.display()));
                false
            }
        };
        if written {
            self.size += bytes.len() as u64;
        } else {
            self.dropped += bytes.len() as u64;
        }
    }

    fn rotate(&mut self) {
        let old = self.path.with_extension("log.1");
        let _ = std::fs::rename(&self.path, old);
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&self.path)
            .ok();
        self.size = 0;
    }
}

/// Splits a byte stream into lines of bounded length, lossily decoded.
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            partial: Vec::new(),
            max,
        }
    }

    /// Feeds bytes; calls `line` for each complete line (or each `max`-byte piece).
    pub fn feed(&mut self, mut bytes: &[u8], mut line: impl FnMut(String)) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.push(&bytes[..i], &mut line);
                    line(String::from_utf8_lossy(&self.partial).into_owned());
                    self.partial.clear();
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.push(bytes, &mut line);
                    bytes = &[];
                }
            }
        }
    }

    fn push(&mut self, mut bytes: &[u8], line: &mut impl FnMut(String)) {
        while self.partial.len() + bytes.len() > self.max {
            let take = self.max - self.partial.len();
            self.partial.extend_from_slice(&bytes[..take]);
            line(format!(
                "{} [line split]",
                String::from_utf8_lossy(&self.partial)
            ));
            self.partial.clear();
            bytes = &bytes[take..];
        }
        self.partial.extend_from_slice(bytes);
    }
}

/// Drains one output pipe until it closes: every byte goes to the log file, every line to
/// `on_line` (the agent keeps the tail for exit events). Never stops reading, so the child
/// never blocks on a pipe.
pub async fn drain(
    pipe: impl Into<std::os::fd::OwnedFd>,
    mut file: LogFile,
    mut on_line: impl FnMut(&str),
    on_first_drop: impl FnOnce(&str),
) -> io::Result<u64> {
    let mut on_first_drop = Some(on_first_drop);
    let mut reader = pipe::Receiver::from_owned_fd(pipe.into())?;
    let mut splitter = LineSplitter::new(file.limits.max_line_bytes);
    // Small: the keeper holds two of these per child, and memory per child is what a node
    // with thousands of children pays; a flood only costs more reads.
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        file.write(&buf[..n]);
        if file.dropped > 0 {
            if let Some(report) = on_first_drop.take() {
                report(file.error.as_deref().unwrap_or("write failed"));
            }
        }
        splitter.feed(&buf[..n], |line| on_line(&line));
    }
    Ok(file.dropped)
}

/// Reads up to `max` bytes of a log file from `offset`; a negative offset counts from the
/// end. Returns the bytes, their offset, and the offset to continue from.
pub fn read_chunk(path: &Path, offset: i64, max: usize) -> io::Result<(Vec<u8>, u64, u64)> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0, 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = if offset < 0 {
        len.saturating_sub(offset.unsigned_abs())
    } else if offset as u64 > len {
        // The file was rotated since the reader's last call: start over.
        0
    } else {
        offset as u64
    };
    file.seek(SeekFrom::Start(start))?;
    let mut data = Vec::with_capacity(max.min(1 << 20));
    file.take(max as u64).read_to_end(&mut data)?;
    let next = start + data.len() as u64;
    Ok((data, start, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_splits_long_lines_and_keeps_partials() {
        let mut lines = Vec::new();
        let mut s = LineSplitter::new(4);

        s.feed(b"ab", |l| lines.push(l));
        s.feed(b"c\nabcdefg\n", |l| lines.push(l));

        assert_eq!(lines, ["abc", "abcd [line split]", "efg"]);
    }

    #[test]
    fn invalid_utf8_is_carried_lossily() {
        let mut lines = Vec::new();
        let mut s = LineSplitter::new(100);

        s.feed(b"ok \xff\xfe end\n", |l| lines.push(l));

        assert_eq!(lines, ["ok \u{fffd}\u{fffd} end"]);
    }

    #[test]
    fn log_file_rotates_within_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_file_bytes: 10,
            ..Default::default()
        };
        let mut log = LogFile::open(dir.path().join("stdout.log"), limits);

        log.write(b"0123456789");
        log.write(b"abc");

        assert_eq!(
            std::fs::read(dir.path().join("stdout.log")).unwrap(),
            b"abc"
        );
        assert_eq!(
            std::fs::read(dir.path().join("stdout.log.1")).unwrap(),
            b"0123456789"
        );
    }

    #[test]
    fn a_full_disk_drops_bytes_and_keeps_the_error() {
        let mut log = LogFile::open(PathBuf::from("/dev/full"), LogLimits::default());

        log.write(b"hello");

        assert_eq!(log.dropped, 5);
        assert!(
            log.error
                .as_deref()
                .unwrap_or_default()
                .contains("No space"),
            "{:?}",
            log.error
        );
    }

    #[test]
    fn read_chunk_from_end_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, b"hello world").unwrap();

        assert_eq!(
            read_chunk(&path, -5, 100).unwrap(),
            (b"world".to_vec(), 6, 11)
        );
        assert_eq!(read_chunk(&path, 0, 5).unwrap(), (b"hello".to_vec(), 0, 5));
        assert_eq!(read_chunk(&path, 99, 5).unwrap().1, 0);
    }
}
