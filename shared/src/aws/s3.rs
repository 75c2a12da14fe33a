//! The object-store port on an S3 bucket.
//!
//! [`ObjectStore`] is blocking, so the store owns a small multi-thread Tokio runtime and runs
//! every SDK call there with `Handle::block_on`. Call it from plain threads or from inside
//! another runtime's `spawn_blocking`, never from an async task directly.

use super::AwsConfig;
use crate::store::{LocalObject, ObjectMeta, ObjectStore, ObjectWriter};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use std::fmt;
use std::io::{self, Read, Seek, Write};
use std::sync::Arc;
use tokio::runtime::Handle;

/// Objects above this size are uploaded by `create` writers in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
/// Part size of multipart uploads (S3's minimum is 5 MiB).
pub const PART_SIZE: u64 = 8 * 1024 * 1024;
/// Parts uploaded at the same time.
const PART_CONCURRENCY: usize = 4;
/// Chunks of a streamed download buffered ahead of the reader.
const READ_AHEAD_CHUNKS: usize = 8;

/// Owns the runtime; shut down without blocking when the last store, reader or writer goes.
/// An [`ObjectStore`] over one S3 bucket (keys are object keys, no extra prefix).
#[derive(Clone)]
pub struct S3Store {
    bucket: String,
    client: Client,
    handle: Handle,
    _rt: Arc<super::OwnedRuntime>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// A store on `bucket`, with an optional endpoint override (path-style addressing is then
    /// used) and a region.
    pub fn new(bucket: &str, endpoint_url: Option<&str>, region: &str) -> io::Result<Self> {
        Self::with_config(bucket, AwsConfig::new(endpoint_url, Some(region)))
    }

    /// A store on `bucket` with full control over the SDK configuration.
    pub fn with_config(bucket: &str, config: AwsConfig) -> io::Result<Self> {
        if bucket.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "S3 bucket name is empty",
            ));
        }
        let (rt, handle, shared) = super::own_runtime(&config, "zdsync-s3", 2)?;
        let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
        if shared.endpoint_url().is_some() {
            s3 = s3.force_path_style(true);
        }
        Ok(S3Store {
            bucket: bucket.to_string(),
            client: Client::from_conf(s3.build()),
            handle,
            _rt: rt,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The SDK client, for callers that need more than the port.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Create the bucket if it does not exist yet (local emulators, first deployments).
    pub fn ensure_bucket(&self) -> io::Result<()> {
        match self.block_on(self.client.create_bucket().bucket(&self.bucket).send()) {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_bucket_already_owned_by_you()) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_err("CreateBucket", &self.bucket, "", e)),
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// A conditional request: `true` when it applied, `false` when its condition failed (a
    /// status in `lost`). A 409 (ConditionalRequestConflict: a concurrent conditional write) is
    /// retried, as S3 asks.
    fn conditional<T, E, Fut>(
        &self,
        op: &str,
        key: &str,
        lost: &[u16],
        send: impl Fn() -> Fut,
    ) -> io::Result<bool>
    where
        Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.block_on(send()) {
                Ok(_) => return Ok(true),
                Err(e) if status(&e).is_some_and(|s| lost.contains(&s)) => return Ok(false),
                Err(e) if status(&e) == Some(409) && attempt < 4 => {
                    std::thread::sleep(std::time::Duration::from_millis(50 * attempt));
                }
                Err(e) => return Err(sdk_err(op, &self.bucket, key, e)),
            }
        }
    }

    fn get_object_reader(&self, key: &str) -> io::Result<S3Reader> {
        let resp = self
            .block_on(
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send(),
            )
            .map_err(|e| sdk_err("GetObject", &self.bucket, key, e))?;
        let expected = resp.content_length().and_then(|n| u64::try_from(n).ok());
        let mut body = resp.body;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(READ_AHEAD_CHUNKS);
        let what = format!("s3://{}/{key}", self.bucket);
        self.handle.spawn(async move {
            loop {
                match body.next().await {
                    None => break,
                    Some(Ok(chunk)) => {
                        if tx.send(Ok(chunk.into())).await.is_err() {
                            break; // the reader was dropped
                        }
                    }
                    Some(Err(e)) => {
                        let _ = tx
                            .send(Err(io::Error::other(format!(
                                "reading {what} failed: {}",
                                DisplayErrorContext(&e)
                            ))))
                            .await;
                        break;
                    }
                }
            }
        });
        Ok(S3Reader {
            rx,
            chunk: Vec::new(),
            pos: 0,
            read: 0,
            expected,
            done: false,
            _rt: self._rt.clone(),
        })
    }
}

/// Pulls a GetObject body chunk by chunk from the store's runtime.
struct S3Reader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    read: u64,
    expected: Option<u64>,
    done: bool,
    _rt: Arc<super::OwnedRuntime>,
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => {
                    self.done = true;
                    if let Some(n) = self.expected.filter(|&n| n != self.read) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("S3 object ended after {} of {n} bytes", self.read),
                        ));
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        self.read += n as u64;
        Ok(n)
    }
}

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn sdk_err<E>(op: &str, bucket: &str, key: &str, e: SdkError<E, HttpResponse>) -> io::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let kind = match status(&e) {
        Some(404) => io::ErrorKind::NotFound,
        Some(403) => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!(
            "S3 {op} s3://{bucket}/{key} failed: {}",
            DisplayErrorContext(&e)
        ),
    )
}

impl ObjectStore for S3Store {
    fn open(&self, key: &str) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.get_object_reader(key)?))
    }

    fn local_path(&self, key: &str) -> io::Result<LocalObject> {
        let mut reader = self.get_object_reader(key)?;
        let name = key.rsplit('/').next().unwrap_or_default();
        let suffix = match name.rfind('.') {
            Some(i) => &name[i..],
            None => "",
        };
        let mut file = tempfile::Builder::new()
            .prefix("zdsync-s3-")
            .suffix(suffix)
            .tempfile()?;
        io::copy(&mut reader, file.as_file_mut())?;
        file.as_file_mut().flush()?;
        let path = file.path().to_path_buf();
        Ok(LocalObject::owned(path, Box::new(file)))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        self.block_on(async {
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| sdk_err("ListObjectsV2", &self.bucket, prefix, e))?;
                for obj in page.contents() {
                    if let Some(key) = obj.key() {
                        out.push(ObjectMeta {
                            key: key.to_string(),
                            size: obj.size().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
                        });
                    }
                }
            }
            Ok::<_, io::Error>(())
        })?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn head(&self, key: &str) -> io::Result<Option<ObjectMeta>> {
        match self.block_on(
            self.client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send(),
        ) {
            Ok(resp) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: resp
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
            })),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(sdk_err("HeadObject", &self.bucket, key, e)),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        self.block_on(
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(ByteStream::from(bytes.to_vec()))
                .send(),
        )
        .map_err(|e| sdk_err("PutObject", &self.bucket, key, e))?;
        Ok(())
    }

    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        let file = tempfile::Builder::new()
            .prefix("zdsync-s3-upload-")
            .tempfile()?;
        Ok(Box::new(S3Writer {
            store: self.clone(),
            key: key.to_string(),
            file: io::BufWriter::with_capacity(256 * 1024, file),
        }))
    }

    fn delete_prefix(&self, prefix: &str) -> io::Result<()> {
        let keys = self.list(prefix)?;
        for batch in keys.chunks(1000) {
            let objects = batch
                .iter()
                .map(|o| ObjectIdentifier::builder().key(&o.key).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(io::Error::other)?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(io::Error::other)?;
            let resp = self
                .block_on(
                    self.client
                        .delete_objects()
                        .bucket(&self.bucket)
                        .delete(delete)
                        .send(),
                )
                .map_err(|e| sdk_err("DeleteObjects", &self.bucket, prefix, e))?;
            if let Some(err) = resp.errors().first() {
                return Err(io::Error::other(format!(
                    "S3 DeleteObjects under s3://{}/{prefix}: {} of {} objects not deleted, \
                     first `{}`: {} {}",
                    self.bucket,
                    resp.errors().len(),
                    batch.len(),
                    err.key().unwrap_or_default(),
                    err.code().unwrap_or_default(),
                    err.message().unwrap_or_default(),
                )));
            }
        }
        Ok(())
    }

    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> io::Result<bool> {
        // PreconditionFailed: the key exists.
        self.conditional("PutObject (If-None-Match)", key, &[412], || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .if_none_match("*")
                .body(ByteStream::from(bytes.to_vec()))
                .send()
        })
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        match self.block_on(
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(sdk_err("DeleteObject", &self.bucket, key, e)),
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    fn get_tagged(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        self.block_on(async {
            let resp = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(resp) => resp,
                Err(e) if status(&e) == Some(404) => return Ok(None),
                Err(e) => return Err(sdk_err("GetObject", &self.bucket, key, e)),
            };
            let tag = resp.e_tag().unwrap_or_default().to_string();
            if resp.content_length().unwrap_or(0) > MAX_TAGGED_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "s3://{}/{key} is larger than {MAX_TAGGED_BYTES} bytes",
                        self.bucket
                    ),
                ));
            }
            let bytes = resp
                .body
                .collect()
                .await
                .map_err(|e| {
                    io::Error::other(format!("S3 GetObject s3://{}/{key}: {e}", self.bucket))
                })?
                .into_bytes()
                .to_vec();
            Ok(Some((bytes, tag)))
        })
    }

    fn put_if_match(&self, key: &str, bytes: &[u8], tag: &str) -> io::Result<bool> {
        // PreconditionFailed: changed since read; NoSuchKey: removed since read.
        self.conditional("PutObject (If-Match)", key, &[412, 404], || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .if_match(tag)
                .body(ByteStream::from(bytes.to_vec()))
                .send()
        })
    }

    fn delete_if_match(&self, key: &str, tag: &str) -> io::Result<bool> {
        self.conditional("DeleteObject (If-Match)", key, &[412, 404], || {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .if_match(tag)
                .send()
        })
    }
}

/// Locks and markers read with their tag are small; anything bigger is not one of ours.
const MAX_TAGGED_BYTES: i64 = 1024 * 1024;

/// Buffers to a temporary file; `commit` uploads it (multipart above [`MULTIPART_THRESHOLD`]).
/// Dropping it uncommitted uploads nothing.
struct S3Writer {
    store: S3Store,
    key: String,
    file: io::BufWriter<tempfile::NamedTempFile>,
}

impl Write for S3Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl ObjectWriter for S3Writer {
    fn commit(self: Box<Self>) -> io::Result<()> {
        let S3Writer { store, key, file } = *self;
        let mut file = file.into_inner().map_err(|e| e.into_error())?;
        let size = file.as_file_mut().seek(io::SeekFrom::End(0))?;
        let path = file.path().to_path_buf();
        let bucket = store.bucket.as_str();
        let client = &store.client;
        if size <= MULTIPART_THRESHOLD {
            store.block_on(async {
                let body = ByteStream::from_path(&path)
                    .await
                    .map_err(io::Error::other)?;
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| sdk_err("PutObject", bucket, &key, e))?;
                Ok::<_, io::Error>(())
            })?;
            return Ok(());
        }
        store.block_on(async {
            let upload = client
                .create_multipart_upload()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| sdk_err("CreateMultipartUpload", bucket, &key, e))?;
            let upload_id = upload
                .upload_id()
                .ok_or_else(|| io::Error::other("CreateMultipartUpload returned no upload id"))?
                .to_string();
            let result = upload_parts(client, bucket, &key, &upload_id, &path, size).await;
            match result {
                Ok(parts) => client
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| sdk_err("CompleteMultipartUpload", bucket, &key, e)),
                Err(e) => {
                    let _ = client
                        .abort_multipart_upload()
                        .bucket(bucket)
                        .key(&key)
                        .upload_id(&upload_id)
                        .send()
                        .await;
                    Err(e)
                }
            }
        })
    }
}

async fn upload_parts(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
    path: &std::path::Path,
    size: u64,
) -> io::Result<Vec<CompletedPart>> {
    use futures::stream::{StreamExt, TryStreamExt};
    let count = size.div_ceil(PART_SIZE);
    futures::stream::iter(0..count)
        .map(|i| async move {
            let offset = i * PART_SIZE;
            let len = PART_SIZE.min(size - offset);
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(io::Error::other)?;
            let number = i32::try_from(i + 1).map_err(io::Error::other)?;
            let resp = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| sdk_err("UploadPart", bucket, key, e))?;
            Ok::<_, io::Error>(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(resp.e_tag().map(str::to_string))
                    .build(),
            )
        })
        .buffered(PART_CONCURRENCY)
        .try_collect()
        .await
}
