//! The object-store port: the bucket layout of ARCHITECTURE.md on a local folder (here) or S3.
//!
//! The port is blocking on purpose: plan streams and parses exports on a CPU-bound thread, so a
//! `Read`/`Write` pair is the natural shape; async adapters bridge into it.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

/// Where exports are read from and change sets, state and run records are written to.
pub trait ObjectStore: Send + Sync {
    /// A streaming reader over one object.
    fn open(&self, key: &str) -> io::Result<Box<dyn Read + Send>>;
    /// A local file path holding the object, for formats that need random access (Parquet).
    /// Adapters for remote stores download to a temporary file first.
    fn local_path(&self, key: &str) -> io::Result<LocalObject>;
    /// Objects whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectMeta>>;
    /// Size of one object, or `None` when it does not exist.
    fn head(&self, key: &str) -> io::Result<Option<ObjectMeta>>;
    /// Write a whole object atomically (readers never see a partial object).
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()>;
    /// Stream a large object; it becomes visible when the writer is committed.
    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>>;
    /// Remove every object under `prefix` (used to clear a half-written change set).
    fn delete_prefix(&self, prefix: &str) -> io::Result<()>;
    /// Write an object only if none has this key yet (S3: `If-None-Match: *`); `false` when
    /// one exists. Locks rely on it.
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> io::Result<bool>;
    /// Remove one object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// Where keys resolve, for messages (`the folder /data/zdsync`, `s3://bucket`).
    fn describe(&self) -> String {
        "the store".into()
    }
    /// A small object's bytes with its version tag (S3: the ETag), or `None` when absent. The
    /// tag is what `put_if_match` and `delete_if_match` compare against.
    fn get_tagged(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>>;
    /// Replace an object only while it is still the version `tag` names (S3: `If-Match`);
    /// `false` when another writer changed or removed it first.
    fn put_if_match(&self, key: &str, bytes: &[u8], tag: &str) -> io::Result<bool>;
    /// Remove an object only while it is still the version `tag` names; `false` otherwise.
    fn delete_if_match(&self, key: &str, tag: &str) -> io::Result<bool>;
}

/// A streamed object upload that becomes visible only on `commit`.
pub trait ObjectWriter: Write + Send {
    fn commit(self: Box<Self>) -> io::Result<()>;
}

/// A path to a readable local copy of an object; a temporary copy is removed on drop.
pub struct LocalObject {
    path: PathBuf,
    _temp: Option<Box<dyn Send + Sync>>,
}

impl LocalObject {
    pub fn borrowed(path: PathBuf) -> Self {
        Self { path, _temp: None }
    }
    pub fn owned(path: PathBuf, guard: Box<dyn Send + Sync>) -> Self {
        Self {
            path,
            _temp: Some(guard),
        }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ObjectStore for Box<dyn ObjectStore> {
    fn open(&self, key: &str) -> io::Result<Box<dyn Read + Send>> {
        (**self).open(key)
    }
    fn local_path(&self, key: &str) -> io::Result<LocalObject> {
        (**self).local_path(key)
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
        (**self).list(prefix)
    }
    fn head(&self, key: &str) -> io::Result<Option<ObjectMeta>> {
        (**self).head(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        (**self).put(key, bytes)
    }
    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        (**self).create(key)
    }
    fn delete_prefix(&self, prefix: &str) -> io::Result<()> {
        (**self).delete_prefix(prefix)
    }
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> io::Result<bool> {
        (**self).put_if_absent(key, bytes)
    }
    fn delete(&self, key: &str) -> io::Result<()> {
        (**self).delete(key)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn get_tagged(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        (**self).get_tagged(key)
    }
    fn put_if_match(&self, key: &str, bytes: &[u8], tag: &str) -> io::Result<bool> {
        (**self).put_if_match(key, bytes, tag)
    }
    fn delete_if_match(&self, key: &str, tag: &str) -> io::Result<bool> {
        (**self).delete_if_match(key, tag)
    }
}

/// The bucket layout on a local folder: key `a/b/c` is the file `<root>/a/b/c`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> io::Result<PathBuf> {
        let rel = Path::new(key);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("object key `{key}` must be relative to the store root and stay inside it"),
            ));
        }
        Ok(self.root.join(rel))
    }

    fn temp_path(path: &Path) -> PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        path.with_file_name(name)
    }
}

impl ObjectStore for LocalStore {
    fn open(&self, key: &str) -> io::Result<Box<dyn Read + Send>> {
        let path = self.path_of(key)?;
        let file = fs::File::open(&path).map_err(|e| with_path(e, &path))?;
        Ok(Box::new(file))
    }

    fn local_path(&self, key: &str) -> io::Result<LocalObject> {
        let path = self.path_of(key)?;
        if !path.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such file", path.display()),
            ));
        }
        Ok(LocalObject::borrowed(path))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
        // A prefix is either a folder (`exports/users/`) or a key stem (`exports/users/part_`).
        let (dir_key, stem) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let dir = if dir_key.is_empty() {
            self.root.clone()
        } else {
            self.path_of(dir_key)?
        };
        let mut out = Vec::new();
        if !dir.is_dir() {
            return Ok(out);
        }
        // Other writers work while we list (atomic puts rename temporary files into place,
        // cleared change sets remove folders): an entry or folder that is gone by the time it
        // is read was removed concurrently and is skipped, as an S3 listing would.
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let mut stack = vec![(dir, dir_key.to_string())];
        while let Some((dir, key_base)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(with_path(e, &dir)),
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(".tmp-") {
                    continue;
                }
                let key = if key_base.is_empty() {
                    name.clone()
                } else {
                    format!("{key_base}/{name}")
                };
                if !key.starts_with(prefix) && !prefix.starts_with(&format!("{key}/")) {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(with_path(e, &entry.path())),
                };
                if meta.is_dir() {
                    stack.push((entry.path(), key));
                } else if key.starts_with(prefix) {
                    out.push(ObjectMeta {
                        key,
                        size: meta.len(),
                    });
                }
            }
        }
        let _ = stem;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn head(&self, key: &str) -> io::Result<Option<ObjectMeta>> {
        let path = self.path_of(key)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, &path)),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let mut w = self.create(key)?;
        w.write_all(bytes)?;
        w.commit()
    }

    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        let path = self.path_of(key)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| with_path(e, parent))?;
        }
        let temp = Self::temp_path(&path);
        let file = fs::File::create(&temp).map_err(|e| with_path(e, &temp))?;
        Ok(Box::new(LocalWriter {
            file: BufWriter::with_capacity(256 * 1024, file),
            temp,
            path,
        }))
    }

    fn delete_prefix(&self, prefix: &str) -> io::Result<()> {
        let trimmed = prefix.trim_end_matches('/');
        let path = self.path_of(trimmed)?;
        if prefix.ends_with('/') && path.is_dir() {
            return fs::remove_dir_all(&path).map_err(|e| with_path(e, &path));
        }
        for obj in self.list(prefix)? {
            let p = self.path_of(&obj.key)?;
            fs::remove_file(&p).map_err(|e| with_path(e, &p))?;
        }
        Ok(())
    }

    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> io::Result<bool> {
        let path = self.path_of(key)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| with_path(e, parent))?;
        }
        // Write the whole content under a unique name, then link it into place: the link fails
        // when the key exists, and a reader never sees a partial object.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let temp = path.with_file_name(name);
        fs::write(&temp, bytes).map_err(|e| with_path(e, &temp))?;
        let linked = fs::hard_link(&temp, &path);
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(with_path(e, &path)),
        }
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(with_path(e, &path)),
        }
    }

    fn describe(&self) -> String {
        let root = std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        format!("the folder {} (`--store DIR` sets it)", root.display())
    }

    fn get_tagged(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        let path = self.path_of(key)?;
        match fs::read(&path) {
            Ok(bytes) => {
                let tag = content_tag(&bytes);
                Ok(Some((bytes, tag)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, &path)),
        }
    }

    fn put_if_match(&self, key: &str, bytes: &[u8], tag: &str) -> io::Result<bool> {
        let path = self.path_of(key)?;
        let _guard = DirLock::take(&path)?;
        match self.get_tagged(key)? {
            Some((_, current)) if current == tag => {
                self.put(key, bytes)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn delete_if_match(&self, key: &str, tag: &str) -> io::Result<bool> {
        let path = self.path_of(key)?;
        let _guard = DirLock::take(&path)?;
        match self.get_tagged(key)? {
            Some((_, current)) if current == tag => {
                self.delete(key)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

struct LocalWriter {
    file: BufWriter<fs::File>,
    temp: PathBuf,
    path: PathBuf,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(mut self: Box<Self>) -> io::Result<()> {
        self.file.flush()?;
        fs::rename(&self.temp, &self.path).map_err(|e| with_path(e, &self.path))
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // An uncommitted writer leaves nothing behind; after commit the temp name is gone.
        let _ = fs::remove_file(&self.temp);
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// A local object's version tag: the SHA-256 of its bytes (equal bytes are the same version).
fn content_tag(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An exclusive `flock` on an object's folder for the span of a compare-and-swap, so processes
/// sharing a local store (a run and a `zdsync` started beside it) never both win.
struct DirLock(Option<fs::File>);

impl DirLock {
    fn take(path: &Path) -> io::Result<Self> {
        let Some(dir) = path.parent() else {
            return Ok(Self(None));
        };
        if !dir.is_dir() {
            return Ok(Self(None));
        }
        let file = fs::File::open(dir).map_err(|e| with_path(e, dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(with_path(io::Error::last_os_error(), dir));
            }
        }
        Ok(Self(Some(file)))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(file) = &self.0 {
            use std::os::unix::io::AsRawFd;
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Listing while another writer puts objects (temporary file, then rename) and clears
    /// folders never fails: what vanished mid-listing is skipped.
    #[test]
    fn listing_tolerates_concurrent_puts_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.put("runs/s/r/keep.json", b"{}").unwrap();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..400 {
                    let key = format!("runs/s/r/results/c{}/{i}.json", i % 7);
                    store.put(&key, b"{}").unwrap();
                    if i % 5 == 4 {
                        store
                            .delete_prefix(&format!("runs/s/r/results/c{}/", i % 7))
                            .unwrap();
                    }
                }
            })
        };
        while !writer.is_finished() {
            let keys = store.list("runs/s/r/").expect("a listing during writes");
            assert!(keys.iter().any(|o| o.key == "runs/s/r/keep.json"));
            assert!(keys.iter().all(|o| !o.key.contains(".tmp-")), "{keys:?}");
        }
        writer.join().unwrap();
    }

    #[test]
    fn put_list_open_and_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.put("exports/users/part-0001.csv", b"a\n1\n").unwrap();
        store.put("exports/users/part-0000.csv", b"a\n0\n").unwrap();
        store.put("exports/users_other/x.csv", b"a\n").unwrap();
        let keys: Vec<_> = store
            .list("exports/users/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            keys,
            ["exports/users/part-0000.csv", "exports/users/part-0001.csv"]
        );
        let stem: Vec<_> = store
            .list("exports/users/part-0001")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(stem, ["exports/users/part-0001.csv"]);
        let mut s = String::new();
        store
            .open("exports/users/part-0001.csv")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "a\n1\n");
        store.delete_prefix("exports/users/").unwrap();
        assert!(store.list("exports/users/").unwrap().is_empty());
        assert_eq!(store.list("exports/").unwrap().len(), 1);
    }

    #[test]
    fn uncommitted_writer_leaves_nothing_and_keys_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        {
            let mut w = store.create("runs/a/b.json").unwrap();
            w.write_all(b"{}").unwrap();
        }
        assert!(store.head("runs/a/b.json").unwrap().is_none());
        assert!(store.list("runs/").unwrap().is_empty());
        assert!(store.put("../escape", b"x").is_err());
    }

    #[test]
    fn put_if_absent_creates_once_and_delete_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        assert!(store.put_if_absent("locks/a.json", b"one").unwrap());
        assert!(!store.put_if_absent("locks/a.json", b"two").unwrap());
        let mut s = String::new();
        store
            .open("locks/a.json")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "one");
        assert_eq!(store.list("locks/").unwrap().len(), 1);
        store.delete("locks/a.json").unwrap();
        store.delete("locks/a.json").unwrap();
        assert!(store.put_if_absent("locks/a.json", b"three").unwrap());
    }

    #[test]
    fn compare_and_swap_wins_only_against_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        assert!(store.get_tagged("locks/b.json").unwrap().is_none());
        assert!(!store.put_if_match("locks/b.json", b"x", "nope").unwrap());
        store.put("locks/b.json", b"one").unwrap();
        let (bytes, tag) = store.get_tagged("locks/b.json").unwrap().unwrap();
        assert_eq!(bytes, b"one");
        assert!(store.put_if_match("locks/b.json", b"two", &tag).unwrap());
        // The tag read before the swap is spent.
        assert!(!store.put_if_match("locks/b.json", b"three", &tag).unwrap());
        assert!(!store.delete_if_match("locks/b.json", &tag).unwrap());
        let (_, tag2) = store.get_tagged("locks/b.json").unwrap().unwrap();
        assert!(store.delete_if_match("locks/b.json", &tag2).unwrap());
        assert!(store.head("locks/b.json").unwrap().is_none());
    }

    #[test]
    fn concurrent_swaps_from_one_version_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(LocalStore::new(dir.path()));
        store.put("locks/c.json", b"stale").unwrap();
        let (_, tag) = store.get_tagged("locks/c.json").unwrap().unwrap();
        let winners: usize = (0..16)
            .map(|i| {
                let (store, tag) = (store.clone(), tag.clone());
                std::thread::spawn(move || {
                    store
                        .put_if_match("locks/c.json", format!("run {i}").as_bytes(), &tag)
                        .unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(winners, 1);
    }
}
