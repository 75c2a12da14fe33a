//! Caps on what one read pass takes from an export (`source.max_rows_read`,
//! `source.max_bytes_read`): a small gzip that expands without end, or an unload that ran away,
//! must stop the run with a clear error before it exhausts a Lambda's time, memory or disk.
//!
//! A [`ReadBudget`] is shared by every part file of one pass. Decompressed bytes are counted on
//! the decoded stream, one add per `read` call (on the decompression thread, which then stops);
//! rows are counted as the readers hand them out. Past either cap the reader fails with
//! [`ExportError::TooLarge`], naming the part it was reading.

use super::{ExportError, Next, ReadOptions, Record, RecordReader};
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Rows one run reads from its export unless `source.max_rows_read` says otherwise.
pub const DEFAULT_MAX_ROWS_READ: u64 = 500_000_000;
/// Decompressed bytes one run reads from its export unless `source.max_bytes_read` says
/// otherwise (256 GiB).
pub const DEFAULT_MAX_BYTES_READ: u64 = 256 << 30;
/// The planner numbers the rows it reads in 32 bits: `max_rows_read` stays below this.
pub const MAX_ROWS_READ_LIMIT: u64 = u32::MAX as u64 - 1;

/// Which cap a read pass went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadCap {
    Rows,
    Bytes,
}

impl ReadCap {
    /// The config key that sets the cap.
    pub fn key(self) -> &'static str {
        match self {
            ReadCap::Rows => "source.max_rows_read",
            ReadCap::Bytes => "source.max_bytes_read",
        }
    }
}

/// A read pass over the cap: what was read when it stopped, the cap, and the config to raise it
/// in (the message of [`ExportError::TooLarge`] after the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapExceeded {
    pub cap: ReadCap,
    /// Rows, or decompressed bytes, read across the pass's part files when it stopped.
    pub read: u64,
    pub max: u64,
    /// The sync config that sets the cap.
    pub config_file: String,
}

impl fmt::Display for CapExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.cap.key();
        match self.cap {
            ReadCap::Rows => write!(
                f,
                "this run has read {} rows from the export (its part files so far), more than its cap of {} rows (`{key}`)",
                self.read, self.max
            )?,
            ReadCap::Bytes => write!(
                f,
                "this run has read {} bytes of decompressed data from the export (its part files so far), more than its cap of {} bytes ({}, `{key}`)",
                self.read,
                self.max,
                size_text(self.max)
            )?,
        }
        let suspect = match self.cap {
            ReadCap::Rows => "an unload that ran away, or a join that multiplied the rows",
            ReadCap::Bytes => {
                "an unload that ran away, or a small compressed file that expands without end"
            }
        };
        write!(
            f,
            "; nothing was written to Zendesk. Check the export ({suspect}); if it is meant to be this large, raise `{key}` in {}",
            self.config_file
        )
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub(crate) fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// What one read pass over an export may still take, shared by all its part files (clones
/// share the counts). Parts of one pass are read one after another.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    rows: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    max_rows: u64,
    max_bytes: u64,
    config_file: Arc<str>,
}

impl ReadBudget {
    /// A fresh budget with the caps of `options` (rows at most [`MAX_ROWS_READ_LIMIT`]).
    pub fn new(options: &ReadOptions) -> Self {
        ReadBudget {
            rows: Arc::default(),
            bytes: Arc::default(),
            max_rows: options.max_rows_read.clamp(1, MAX_ROWS_READ_LIMIT),
            max_bytes: options.max_bytes_read.max(1),
            config_file: options.config_file.as_str().into(),
        }
    }

    /// Rows handed out by the readers of this pass (those of a reader still open included
    /// once it is dropped).
    pub fn rows_read(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Decompressed bytes read by this pass (a decompression thread reads a few blocks ahead
    /// of the parser).
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn exceeded(&self, cap: ReadCap, read: u64) -> CapExceeded {
        CapExceeded {
            cap,
            read,
            max: match cap {
                ReadCap::Rows => self.max_rows,
                ReadCap::Bytes => self.max_bytes,
            },
            config_file: self.config_file.to_string(),
        }
    }

    fn over_bytes(&self) -> Option<u64> {
        let read = self.bytes_read();
        (read > self.max_bytes).then_some(read)
    }

    /// The error a reader of `file` failed with, told as the byte cap when that is what
    /// stopped it (the counting stream's error reaches the parsers as an unreadable file).
    pub(crate) fn explain(&self, file: &str, e: ExportError) -> ExportError {
        match (e, self.over_bytes()) {
            (ExportError::Unreadable { .. }, Some(read)) => ExportError::TooLarge {
                file: file.to_string(),
                exceeded: self.exceeded(ReadCap::Bytes, read),
            },
            (e, _) => e,
        }
    }

    /// Count `n` bytes read from `file` outside a counted stream (a Parquet file).
    pub(crate) fn charge(&self, file: &str, n: u64) -> Result<(), ExportError> {
        let read = self.bytes.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        if read > self.max_bytes {
            return Err(ExportError::TooLarge {
                file: file.to_string(),
                exceeded: self.exceeded(ReadCap::Bytes, read),
            });
        }
        Ok(())
    }

    /// The decoded stream of a part, counted against the byte cap.
    pub(crate) fn count_bytes<R: Read>(&self, inner: R) -> CountedBytes<R> {
        CountedBytes {
            inner,
            bytes: self.bytes.clone(),
            max: self.max_bytes,
        }
    }

    /// A part's reader, its rows counted against the row cap (and its errors explained).
    pub(crate) fn count_rows<R: RecordReader>(&self, inner: R, file: &str) -> CountedRows<R> {
        let before = self.rows_read();
        CountedRows {
            inner,
            file: file.to_string(),
            before,
            rows: 0,
            left: self.max_rows.saturating_sub(before),
            budget: self.clone(),
        }
    }
}

/// A decoded stream that fails once its pass has read more bytes than the cap: one atomic add
/// per `read` call, and nothing more is read from the decoder after that.
pub(crate) struct CountedBytes<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
    max: u64,
}

impl<R> CountedBytes<R> {
    fn over(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "more than {} of decompressed data read (`source.max_bytes_read`)",
                size_text(self.max)
            ),
        )
    }
}

impl<R: Read> Read for CountedBytes<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.bytes.load(Ordering::Relaxed) > self.max {
            return Err(self.over());
        }
        let n = self.inner.read(buf)?;
        let read = self.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if read > self.max {
            return Err(self.over());
        }
        Ok(n)
    }
}

/// A part's reader that fails once its pass has handed out more rows than the cap. Rows are
/// counted here and added to the pass's count when the reader is dropped.
pub(crate) struct CountedRows<R: RecordReader> {
    inner: R,
    file: String,
    /// Rows of the pass before this part.
    before: u64,
    rows: u64,
    left: u64,
    budget: ReadBudget,
}

impl<R: RecordReader> RecordReader for CountedRows<R> {
    fn next(&mut self, record: &mut Record) -> Result<Next, ExportError> {
        match self.inner.next(record) {
            Ok(Next::End) => Ok(Next::End),
            Ok(next) => {
                self.rows += 1;
                if self.rows > self.left {
                    return Err(ExportError::TooLarge {
                        file: self.file.clone(),
                        exceeded: self.budget.exceeded(ReadCap::Rows, self.before + self.rows),
                    });
                }
                Ok(next)
            }
            Err(e) => Err(self.budget.explain(&self.file, e)),
        }
    }
}

impl<R: RecordReader> Drop for CountedRows<R> {
    fn drop(&mut self) {
        self.budget.rows.fetch_add(self.rows, Ordering::Relaxed);
    }
}

/// A byte count as written in a config: a whole number of bytes, or one with a unit (`500MB`,
/// `64GiB`, `1 TiB`; KB, MB, GB, TB count in 1000s, KiB, MiB, GiB, TiB in 1024s).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return None;
    }
    let n: u64 = t[..digits].parse().ok()?;
    let unit: u64 = match t[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{open_reader, Compression};
    use crate::store::{LocalStore, ObjectStore};
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    /// Every record of one part, or the error that stopped it.
    fn read_part(
        store: &LocalStore,
        key: &str,
        options: &ReadOptions,
        budget: &ReadBudget,
    ) -> Result<u64, ExportError> {
        let mut reader = open_reader(store, key, &["id".to_string()], options, budget)?;
        let mut record = Record::default();
        let mut rows = 0;
        while reader.next(&mut record)? != Next::End {
            rows += 1;
        }
        Ok(rows)
    }

    /// A gzip of 10 MB of one repeated line (about 20 KB compressed) against a 1 MiB cap:
    /// the read stops with the cap error naming the file, after about 1 MiB decompressed.
    #[test]
    fn a_gzip_bomb_stops_at_the_byte_cap_and_reads_no_further() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let line = b"1234567,the same row again and again\n";
        let mut plain = b"id,text\n".to_vec();
        while plain.len() < 10_000_000 {
            plain.extend_from_slice(line);
        }
        let bomb = gzip(&plain);
        assert!(bomb.len() < 100_000, "{} bytes compressed", bomb.len());
        store.put("exports/bomb/part-0.csv.gz", &bomb).unwrap();

        let cap = 1 << 20;
        for compression in [Compression::Auto, Compression::Gzip] {
            let options = ReadOptions {
                max_bytes_read: cap,
                compression,
                config_file: "config/bomb.toml".into(),
                ..ReadOptions::default()
            };
            let budget = ReadBudget::new(&options);
            let e = read_part(&store, "exports/bomb/part-0.csv.gz", &options, &budget)
                .expect_err("over the cap");
            let ExportError::TooLarge { file, exceeded } = &e else {
                panic!("not the cap error: {e}");
            };
            assert_eq!(file, "exports/bomb/part-0.csv.gz");
            assert_eq!((exceeded.cap, exceeded.max), (ReadCap::Bytes, cap));
            assert!(exceeded.read > cap, "{exceeded:?}");
            // Memory and time stay bounded: the decoder stopped within one block of the cap.
            assert!(
                budget.bytes_read() < cap + 512 * 1024,
                "read on to {} bytes",
                budget.bytes_read()
            );
            // Fewer rows than the 1 MiB holds reached the parser; nowhere near the 10 MB.
            assert!(
                budget.rows_read() <= cap / line.len() as u64,
                "{}",
                budget.rows_read()
            );
            let msg = e.to_string();
            for says in [
                "stopped reading export file `exports/bomb/part-0.csv.gz`",
                "of decompressed data",
                "more than its cap of 1048576 bytes (1.0 MiB, `source.max_bytes_read`)",
                "nothing was written to Zendesk",
                "Check the export",
                "raise `source.max_bytes_read` in config/bomb.toml",
            ] {
                assert!(msg.contains(says), "`{says}` not in: {msg}");
            }
        }

        // The default cap reads the same file to its end.
        let options = ReadOptions::default();
        let budget = ReadBudget::new(&options);
        let rows = read_part(&store, "exports/bomb/part-0.csv.gz", &options, &budget).unwrap();
        assert_eq!(rows, (plain.len() as u64 - 8) / line.len() as u64);
        assert_eq!(budget.bytes_read(), plain.len() as u64);
        assert_eq!(budget.rows_read(), rows);
    }

    /// The caps hold for a whole pass: parts under the cap one by one stop where the sum
    /// crosses it, in the part that crosses it (plain and zstd files alike).
    #[test]
    fn the_caps_are_shared_by_the_parts_of_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let mut part = String::from("id\n");
        for i in 0..1000 {
            part.push_str(&format!("{i:09}\n"));
        }
        let size = part.len() as u64;
        store.put("p/part-0.csv", part.as_bytes()).unwrap();
        let zst = zstd::encode_all(part.as_bytes(), 3).unwrap();
        store.put("p/part-1.csv.zst", &zst).unwrap();
        store.put("p/part-2.csv", part.as_bytes()).unwrap();
        let keys = ["p/part-0.csv", "p/part-1.csv.zst", "p/part-2.csv"];

        let pass = |options: &ReadOptions| -> (Vec<Result<u64, ExportError>>, ReadBudget) {
            let budget = ReadBudget::new(options);
            let mut out = Vec::new();
            for key in keys {
                let r = read_part(&store, key, options, &budget);
                let stop = r.is_err();
                out.push(r);
                if stop {
                    break;
                }
            }
            (out, budget)
        };

        // Bytes: two and a half parts' worth.
        let options = ReadOptions {
            max_bytes_read: size * 5 / 2,
            ..ReadOptions::default()
        };
        let (out, budget) = pass(&options);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap(), &1000);
        assert_eq!(out[1].as_ref().unwrap(), &1000);
        match &out[2] {
            Err(ExportError::TooLarge { file, exceeded }) => {
                assert_eq!(file, "p/part-2.csv");
                assert_eq!(exceeded.cap, ReadCap::Bytes);
            }
            other => panic!("{other:?}"),
        }
        assert!(budget.bytes_read() <= size * 3);

        // Rows: 2500 of the 3000 (a malformed row counts as a row too).
        let options = ReadOptions {
            max_rows_read: 2500,
            config_file: "people.toml".into(),
            ..ReadOptions::default()
        };
        let (out, budget) = pass(&options);
        assert_eq!(out.len(), 3);
        let e = out[2].as_ref().unwrap_err();
        let ExportError::TooLarge { file, exceeded } = e else {
            panic!("{e}");
        };
        assert_eq!(file, "p/part-2.csv");
        assert_eq!(
            (exceeded.cap, exceeded.read, exceeded.max),
            (ReadCap::Rows, 2501, 2500)
        );
        assert_eq!(budget.rows_read(), 2501);
        let msg = e.to_string();
        assert!(
            msg.contains("stopped reading export file `p/part-2.csv`: this run has read 2501 rows")
                && msg.contains("more than its cap of 2500 rows (`source.max_rows_read`)")
                && msg.contains("raise `source.max_rows_read` in people.toml"),
            "{msg}"
        );
    }

    #[test]
    fn sizes_read_with_and_without_units() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("64GiB"), Some(64 << 30));
        assert_eq!(parse_size(" 64 gib "), Some(64 << 30));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("2 KiB"), Some(2048));
        assert_eq!(parse_size("7B"), Some(7));
        for bad in [
            "",
            "GiB",
            "1.5GiB",
            "-1",
            "64 gigs",
            "99999999999TiB",
            "1e9",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(size_text(512), "512 B");
        assert_eq!(size_text(3 << 20), "3.0 MiB");
        assert_eq!(size_text(DEFAULT_MAX_BYTES_READ), "256.0 GiB");
    }
}
