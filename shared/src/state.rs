//! The last confirmed state of a sync: primary key → fingerprint of the payload Zendesk has,
//! Zendesk id, and flags (failed last run, absent from the latest export).
//!
//! On disk it is one zstd stream, sorted by key hash, so it is written and read sequentially:
//! `ZDSTATE1`, a length-prefixed JSON header, then records
//! `[1][key hash u64][fingerprint u64][zendesk id u64][flags u8][key len u16][key bytes]`,
//! then `[0]` as the end marker (a missing marker means a truncated file).
//! For diffing, [`StateIndex`] keeps only the fixed-size part in memory (32 bytes a key,
//! including the diff's own scratch) plus a radix directory over the sorted hashes.

use crate::store::ObjectStore;
use serde::{Deserialize, Serialize};
use std::io::{self, BufReader, BufWriter, Read, Write};

const MAGIC: &[u8; 8] = b"ZDSTATE1";

/// The last write of this key failed: resend it even if unchanged.
pub const FLAG_FAILED: u8 = 1;
/// The key was missing from an export after it had been confirmed.
pub const FLAG_ABSENT: u8 = 2;
/// A create of the key may have happened without its outcome being recorded (an answer lost,
/// a run stopped mid-job): the key is looked up in Zendesk before it is created again.
pub const FLAG_UNKNOWN: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHeader {
    pub version: u32,
    pub sync: String,
    pub object: String,
    /// The mapping the fingerprints were computed with (hex).
    pub mapping_hash: String,
    /// Upper bound of the record count, to size buffers.
    pub count_hint: u64,
    pub written_at: String,
    /// The run whose outcomes produced this state.
    pub run_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub key_hash: u64,
    pub fingerprint: u64,
    /// 0 when Zendesk's id is unknown.
    pub zendesk_id: u64,
    pub flags: u8,
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state `{key}` is unreadable: {reason}; move it aside to start from an empty state (every row is then sent again)")]
    Corrupt { key: String, reason: String },
    #[error("state `{key}`: {source}")]
    Io { key: String, source: io::Error },
}

fn io_err(key: &str) -> impl Fn(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        key: key.to_string(),
        source,
    }
}

/// Sequential reader over a state file.
pub struct StateReader {
    key: String,
    input: BufReader<zstd::stream::read::Decoder<'static, BufReader<Box<dyn Read + Send>>>>,
    pub header: StateHeader,
    done: bool,
}

impl StateReader {
    /// Open the state at `key`; `Ok(None)` when the sync has no state yet.
    pub fn open(store: &dyn ObjectStore, key: &str) -> Result<Option<StateReader>, StateError> {
        if store.head(key).map_err(io_err(key))?.is_none() {
            return Ok(None);
        }
        let raw = store.open(key).map_err(io_err(key))?;
        let corrupt = |reason: String| StateError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let decoder = zstd::stream::read::Decoder::new(raw).map_err(io_err(key))?;
        let mut input = BufReader::with_capacity(1 << 18, decoder);
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|e| corrupt(format!("no header ({e})")))?;
        if &magic != MAGIC {
            return Err(corrupt("not a zdsync state file".into()));
        }
        let mut len = [0u8; 4];
        input
            .read_exact(&mut len)
            .map_err(|e| corrupt(e.to_string()))?;
        let mut header = vec![0u8; u32::from_le_bytes(len) as usize];
        input
            .read_exact(&mut header)
            .map_err(|e| corrupt(e.to_string()))?;
        let header: StateHeader =
            serde_json::from_slice(&header).map_err(|e| corrupt(format!("bad header: {e}")))?;
        Ok(Some(StateReader {
            key: key.to_string(),
            input,
            header,
            done: false,
        }))
    }

    /// The next record, reading its key into `key_buf` only when `want_key`.
    fn next_fixed(
        &mut self,
        key_buf: Option<&mut Vec<u8>>,
    ) -> Result<Option<(u64, u64, u64, u8)>, StateError> {
        if self.done {
            return Ok(None);
        }
        let corrupt = |reason: String| StateError::Corrupt {
            key: self.key.clone(),
            reason,
        };
        let mut rec = [0u8; 28];
        self.input
            .read_exact(&mut rec[..1])
            .map_err(|e| corrupt(format!("truncated: {e}")))?;
        if rec[0] == 0 {
            self.done = true;
            return Ok(None);
        }
        if rec[0] != 1 {
            return Err(corrupt(format!("bad record tag {}", rec[0])));
        }
        self.input
            .read_exact(&mut rec[1..28])
            .map_err(|e| corrupt(format!("truncated: {e}")))?;
        let h = u64::from_le_bytes(rec[1..9].try_into().unwrap());
        let fp = u64::from_le_bytes(rec[9..17].try_into().unwrap());
        let id = u64::from_le_bytes(rec[17..25].try_into().unwrap());
        let flags = rec[25];
        let klen = u16::from_le_bytes([rec[26], rec[27]]) as usize;
        match key_buf {
            Some(buf) => {
                buf.resize(klen, 0);
                self.input.read_exact(buf)
            }
            None => {
                let mut skip = [0u8; 256];
                let mut left = klen;
                let mut r = Ok(());
                while left > 0 && r.is_ok() {
                    let n = left.min(skip.len());
                    r = self.input.read_exact(&mut skip[..n]);
                    left -= n;
                }
                r
            }
        }
        .map_err(|e| corrupt(format!("truncated: {e}")))?;
        Ok(Some((h, fp, id, flags)))
    }

    /// The next whole entry.
    pub fn next_entry(&mut self) -> Result<Option<StateEntry>, StateError> {
        let mut buf = Vec::new();
        let Some((h, fp, id, flags)) = self.next_fixed(Some(&mut buf))? else {
            return Ok(None);
        };
        let key = String::from_utf8(buf).map_err(|_| StateError::Corrupt {
            key: self.key.clone(),
            reason: "a key is not UTF-8".into(),
        })?;
        Ok(Some(StateEntry {
            key_hash: h,
            fingerprint: fp,
            zendesk_id: id,
            flags,
            key,
        }))
    }
}

/// Writes a state file; entries must come in ascending key-hash order.
pub struct StateWriter {
    out: BufWriter<zstd::stream::write::Encoder<'static, Box<dyn crate::store::ObjectWriter>>>,
    key: String,
    last: Option<u64>,
    count: u64,
}

impl StateWriter {
    pub fn create(
        store: &dyn ObjectStore,
        key: &str,
        header: &StateHeader,
    ) -> Result<StateWriter, StateError> {
        let raw = store.create(key).map_err(io_err(key))?;
        let enc = zstd::stream::write::Encoder::new(raw, 1).map_err(io_err(key))?;
        let mut out = BufWriter::with_capacity(1 << 18, enc);
        let header = serde_json::to_vec(header).expect("header serialises");
        out.write_all(MAGIC).map_err(io_err(key))?;
        out.write_all(&(header.len() as u32).to_le_bytes())
            .map_err(io_err(key))?;
        out.write_all(&header).map_err(io_err(key))?;
        Ok(StateWriter {
            out,
            key: key.to_string(),
            last: None,
            count: 0,
        })
    }

    pub fn push(
        &mut self,
        h: u64,
        fp: u64,
        id: u64,
        flags: u8,
        key: &str,
    ) -> Result<(), StateError> {
        if self.last.is_some_and(|l| l >= h) {
            return Err(StateError::Corrupt {
                key: self.key.clone(),
                reason: format!("entries out of order or duplicated at key `{key}`"),
            });
        }
        self.last = Some(h);
        let klen = u16::try_from(key.len()).map_err(|_| StateError::Corrupt {
            key: self.key.clone(),
            reason: format!(
                "primary key longer than 65535 bytes: `{}…`",
                &key[..32.min(key.len())]
            ),
        })?;
        let mut rec = [0u8; 28];
        rec[0] = 1;
        rec[1..9].copy_from_slice(&h.to_le_bytes());
        rec[9..17].copy_from_slice(&fp.to_le_bytes());
        rec[17..25].copy_from_slice(&id.to_le_bytes());
        rec[25] = flags;
        rec[26..28].copy_from_slice(&klen.to_le_bytes());
        self.out.write_all(&rec).map_err(io_err(&self.key))?;
        self.out
            .write_all(key.as_bytes())
            .map_err(io_err(&self.key))?;
        self.count += 1;
        Ok(())
    }

    /// Seal and publish the file; returns the number of entries.
    pub fn finish(mut self) -> Result<u64, StateError> {
        let key = self.key.clone();
        self.out.write_all(&[0]).map_err(io_err(&key))?;
        let enc = self
            .out
            .into_inner()
            .map_err(|e| io_err(&key)(e.into_error()))?;
        let raw = enc.finish().map_err(io_err(&key))?;
        raw.commit().map_err(io_err(&key))?;
        Ok(self.count)
    }
}

/// One state entry as the diff keeps it: 32 bytes, so a lookup costs one cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct IndexEntry {
    pub hash: u64,
    pub fingerprint: u64,
    /// Zendesk id in the low 56 bits, flags in the top 8.
    id_flags: u64,
    /// Scratch for the diff: where this run saw the key (0 = not seen).
    pub seen: u32,
    pub slot: u32,
}

impl IndexEntry {
    pub fn zendesk_id(&self) -> u64 {
        self.id_flags & ((1 << 56) - 1)
    }
    pub fn flags(&self) -> u8 {
        (self.id_flags >> 56) as u8
    }
}

/// The fixed-size part of a state, sorted by key hash, with a radix directory over the hashes
/// so a lookup scans a handful of adjacent entries.
pub struct StateIndex {
    pub header: StateHeader,
    entries: Vec<IndexEntry>,
    dir: Vec<u32>,
    shift: u32,
}

impl StateIndex {
    /// Load the state at `key`; `Ok(None)` when there is none yet.
    pub fn load(store: &dyn ObjectStore, key: &str) -> Result<Option<StateIndex>, StateError> {
        let Some(mut reader) = StateReader::open(store, key)? else {
            return Ok(None);
        };
        let hint = reader.header.count_hint.min(1 << 32) as usize;
        let mut idx = StateIndex {
            header: reader.header.clone(),
            entries: Vec::with_capacity(hint),
            dir: Vec::new(),
            shift: 64,
        };
        while let Some((h, fp, id, flags)) = reader.next_fixed(None)? {
            if id >= 1 << 56 {
                return Err(StateError::Corrupt {
                    key: key.to_string(),
                    reason: format!("Zendesk id {id} out of range"),
                });
            }
            idx.entries.push(IndexEntry {
                hash: h,
                fingerprint: fp,
                id_flags: id | (flags as u64) << 56,
                seen: 0,
                slot: 0,
            });
        }
        idx.build_dir();
        Ok(Some(idx))
    }

    fn build_dir(&mut self) {
        // About four keys per directory slot: a small directory, and one or two cache lines
        // of entries to scan.
        let n = self.entries.len().max(1);
        let bits = (usize::BITS - (n / 4).max(1).leading_zeros()).clamp(1, 26);
        self.shift = 64 - bits;
        let slots = 1usize << bits;
        self.dir = Vec::with_capacity(slots + 1);
        let mut i = 0usize;
        for slot in 0..slots {
            while i < self.entries.len() && ((self.entries[i].hash >> self.shift) as usize) < slot {
                i += 1;
            }
            self.dir.push(i as u32);
        }
        self.dir.push(self.entries.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Position of `hash`, if the state has it.
    #[inline]
    pub fn find(&self, hash: u64) -> Option<usize> {
        let slot = (hash >> self.shift) as usize;
        let (lo, hi) = (self.dir[slot] as usize, self.dir[slot + 1] as usize);
        self.entries[lo..hi]
            .iter()
            .position(|e| e.hash == hash)
            .map(|p| lo + p)
    }

    /// Touch the directory slots and first entries of a batch of hashes. The loads are
    /// independent, so the CPU overlaps their cache misses; the lookups that follow then hit
    /// the cache. (A portable stand-in for prefetch instructions.)
    pub fn warm(&self, hashes: &[u64]) {
        let mut acc = 0u64;
        for &h in hashes {
            acc ^= self.dir[(h >> self.shift) as usize] as u64;
        }
        for &h in hashes {
            let lo = self.dir[(h >> self.shift) as usize] as usize;
            acc ^= self.entries.get(lo).map_or(0, |e| e.hash);
        }
        std::hint::black_box(acc);
    }

    pub fn entry(&self, i: usize) -> &IndexEntry {
        &self.entries[i]
    }

    pub fn entry_mut(&mut self, i: usize) -> &mut IndexEntry {
        &mut self.entries[i]
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn header(count: u64) -> StateHeader {
        StateHeader {
            version: 1,
            sync: "s".into(),
            object: "users".into(),
            mapping_hash: "ab".into(),
            count_hint: count,
            written_at: "2026-01-01T00:00:00Z".into(),
            run_id: None,
        }
    }

    #[test]
    fn write_read_and_index_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let mut keys: Vec<(u64, String)> = (0..5000)
            .map(|i| {
                let k = format!("user-{i}");
                (xxhash_rust::xxh3::xxh3_64(k.as_bytes()), k)
            })
            .collect();
        keys.sort();
        let mut w = StateWriter::create(&store, "state/s/state.zst", &header(5000)).unwrap();
        for (i, (h, k)) in keys.iter().enumerate() {
            w.push(*h, i as u64 * 7, i as u64 + 100, (i % 3) as u8, k)
                .unwrap();
        }
        assert_eq!(w.finish().unwrap(), 5000);

        let idx = StateIndex::load(&store, "state/s/state.zst")
            .unwrap()
            .unwrap();
        assert_eq!(idx.len(), 5000);
        for (i, (h, _)) in keys.iter().enumerate() {
            let e = idx.entry(idx.find(*h).unwrap());
            assert_eq!(
                (e.fingerprint, e.zendesk_id(), e.flags()),
                (i as u64 * 7, i as u64 + 100, (i % 3) as u8)
            );
        }
        assert!(idx.find(12345).is_none());

        let mut r = StateReader::open(&store, "state/s/state.zst")
            .unwrap()
            .unwrap();
        let first = r.next_entry().unwrap().unwrap();
        assert_eq!(
            (first.key_hash, first.key.as_str()),
            (keys[0].0, keys[0].1.as_str())
        );
        let mut n = 1;
        while r.next_entry().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 5000);
        assert!(StateIndex::load(&store, "state/none/state.zst")
            .unwrap()
            .is_none());
    }

    #[test]
    fn out_of_order_writes_and_truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let mut w = StateWriter::create(&store, "a", &header(2)).unwrap();
        w.push(5, 0, 0, 0, "x").unwrap();
        assert!(w.push(5, 0, 0, 0, "y").is_err());

        let mut w = StateWriter::create(&store, "b", &header(2)).unwrap();
        w.push(5, 0, 0, 0, "x").unwrap();
        w.push(9, 0, 0, 0, "y").unwrap();
        w.finish().unwrap();
        // Drop the end marker: decompress, cut, recompress.
        let raw = std::fs::read(dir.path().join("b")).unwrap();
        let mut plain = zstd::decode_all(&raw[..]).unwrap();
        plain.pop();
        std::fs::write(
            dir.path().join("b"),
            zstd::encode_all(&plain[..], 1).unwrap(),
        )
        .unwrap();
        let e = StateIndex::load(&store, "b").err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
