//! The flow log on disk: JSON lines, appended, rotated by size; and reading it back, following
//! across rotations.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::Record;

/// Rotation: when the file reaches `max_bytes` it becomes `FILE.1` (older ones shift up to
/// `FILE.<keep>`, the oldest is dropped) and a new FILE starts.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: 100 << 20,
            keep: 5,
        }
    }
}

pub struct LogWriter {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    rotation: Rotation,
    /// The line being made, kept between records: a fresh one grew (allocated and copied)
    /// several times per record, a visible share of the agent's CPU at high event rates.
    line: Vec<u8>,
}

/// Bytes buffered before a write to the file. Large writes let the page cache take large folios
/// (ext4 does on recent kernels), where 8 KiB writes cost a page allocation and a block
/// reservation per 4 KiB: at 200,000 events a second those were the agent's largest cost (the
/// events benchmark: a fifth less agent CPU per event). A record still reaches the file within
/// the drain interval: the writer flushes on a timer.
const WRITE_BUFFER: usize = 256 << 10;

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// `FILE.n`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl LogWriter {
    /// Opens (creating the directory and file if needed) for appending.
    pub fn open(path: &Path, rotation: Rotation) -> io::Result<LogWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let (file, size) = open_append(path)?;
        Ok(LogWriter {
            path: path.to_owned(),
            out: BufWriter::with_capacity(WRITE_BUFFER, file),
            size,
            rotation,
            line: Vec::with_capacity(1024),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Buffers one line; [`LogWriter::flush`] makes it visible.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        self.line.clear();
        record.write_json(&mut self.line);
        self.line.push(b'\n');
        let len = self.line.len() as u64;
        if self.size > 0 && self.size + len > self.rotation.max_bytes {
            self.rotate()?;
        }
        self.out.write_all(&self.line)?;
        self.size += len;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let keep = self.rotation.keep.max(1);
        let _ = fs::remove_file(rotated(&self.path, keep));
        for n in (1..keep).rev() {
            match fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        fs::rename(&self.path, rotated(&self.path, 1))?;
        let (file, size) = open_append(&self.path)?;
        self.out = BufWriter::with_capacity(WRITE_BUFFER, file);
        self.size = size;
        Ok(())
    }
}

/// Reads complete lines from a log file and, when asked, follows it as it grows and rotates.
pub struct LogReader {
    path: PathBuf,
    file: BufReader<File>,
    ino: u64,
    pos: u64,
    partial: String,
    /// Lines of a rotated-away file, read to its end before switching to the new one.
    pending: std::collections::VecDeque<String>,
}

impl LogReader {
    pub fn open(path: &Path) -> io::Result<LogReader> {
        let file = File::open(path)?;
        let ino = file.metadata()?.ino();
        Ok(LogReader {
            path: path.to_owned(),
            file: BufReader::new(file),
            ino,
            pos: 0,
            partial: String::new(),
            pending: Default::default(),
        })
    }

    /// Skips what the file holds now: `--follow` without history starts at the end.
    pub fn seek_end(&mut self) -> io::Result<()> {
        self.pos = self.file.seek(SeekFrom::End(0))?;
        self.partial.clear();
        Ok(())
    }

    /// The next complete line, or None at the current end of the file.
    pub fn next_line(&mut self) -> io::Result<Option<String>> {
        if let Some(line) = self.pending.pop_front() {
            return Ok(Some(line));
        }
        loop {
            let n = self.file.read_line(&mut self.partial)?;
            self.pos += n as u64;
            if n == 0 {
                return Ok(None);
            }
            if self.partial.ends_with('\n') {
                let mut line = std::mem::take(&mut self.partial);
                line.pop();
                return Ok(Some(line));
            }
        }
    }

    /// At the end of the file: whether the path now names a new file (rotated) or this one was
    /// truncated; if so, continues from the start of the current one. Returns whether it switched.
    pub fn reopen_if_rotated(&mut self) -> io::Result<bool> {
        let meta = match fs::metadata(&self.path) {
            Ok(m) => m,
            // Between the rename and the new file's creation.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if meta.ino() != self.ino {
            // The writer may have added to the old file since we reached its end: finish it.
            let mut rest = std::mem::take(&mut self.pending);
            while let Some(line) = self.next_line()? {
                rest.push_back(line);
            }
            *self = LogReader::open(&self.path)?;
            self.pending = rest;
            return Ok(true);
        }
        if meta.len() < self.pos {
            self.pos = self.file.seek(SeekFrom::Start(0))?;
            self.partial.clear();
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> Record {
        // Every line the same length, so sizes count lines.
        let mut r = Record::lost(jiff::Timestamp::UNIX_EPOCH, 0, 0);
        r.kind = format!("test-{n:03}").into();
        r
    }

    #[test]
    fn rotates_by_size_and_a_follower_reads_every_line_across_rotations() {
        let dir = std::env::temp_dir().join(format!("egress-log-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("flows.jsonl");
        let mut line = Vec::new();
        record(0).write_json(&mut line);
        let line_len = line.len() as u64 + 1;
        let rotation = Rotation {
            max_bytes: line_len * 10,
            keep: 2,
        };
        let mut w = LogWriter::open(&path, rotation).expect("open");
        let mut follower = LogReader::open(&path).expect("follow");
        let mut seen = Vec::new();
        for n in 0..45 {
            w.write(&record(n)).expect("write");
            w.flush().expect("flush");
            // The follower reads now and then, so rotations happen between its reads.
            if n % 7 == 0 {
                loop {
                    while let Some(line) = follower.next_line().expect("read") {
                        seen.push(serde_json::from_str::<Record>(&line).expect("parse").kind);
                    }
                    if !follower.reopen_if_rotated().expect("reopen") {
                        break;
                    }
                }
            }
        }
        loop {
            while let Some(line) = follower.next_line().expect("read") {
                seen.push(serde_json::from_str::<Record>(&line).expect("parse").kind);
            }
            if !follower.reopen_if_rotated().expect("reopen") {
                break;
            }
        }
        let want: Vec<String> = (0..45).map(|n| format!("test-{n:03}")).collect();
        assert_eq!(seen, want, "the follower missed or repeated lines");
        // 45 lines, 10 per file: the live file has the last 5, .1 and .2 the 20 before; older
        // ones were dropped.
        let lines = |p: &Path| fs::read_to_string(p).map_or(0, |t| t.lines().count());
        assert_eq!(lines(&path), 5);
        assert_eq!(lines(&rotated(&path, 1)), 10);
        assert_eq!(lines(&rotated(&path, 2)), 10);
        assert!(!rotated(&path, 3).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
