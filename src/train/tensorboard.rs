//! TensorBoard event files, written by a small writer of our own.
//!
//! The Rust crates for this are unmaintained, and the format is small: a file of TFRecord
//! frames, each holding one serialized `tensorflow.Event` protobuf. Only the few fields a
//! scalar log needs are encoded, by hand:
//!
//! ```text
//! Event         { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary       { repeated Value value = 1; }
//! Summary.Value { string tag = 1; float simple_value = 2; }
//! ```
//!
//! A TFRecord frame is `u64 LE length, u32 LE masked_crc32c(length bytes), data,
//! u32 LE masked_crc32c(data)`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Appends scalar summaries to one `events.out.tfevents.*` file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

/// Distinguishes writers opened by one process within the same second, as PyTorch's
/// `SummaryWriter` does with its global uid (the first file of a process ends in `.0`).
static NEXT_WRITER_ID: AtomicU64 = AtomicU64::new(0);

impl EventWriter {
    /// Creates `log_dir` if needed and a new event file in it, named as PyTorch names them
    /// (`events.out.tfevents.{unix_secs}.{hostname}.{pid}.{n}`) so that TensorBoard orders and
    /// groups runs the same way; the first record declares the format version.
    pub fn create(log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating log directory {}", log_dir.display()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            now.as_secs(),
            hostname(),
            std::process::id(),
            NEXT_WRITER_ID.fetch_add(1, Ordering::Relaxed)
        );
        let path = log_dir.join(name);
        // create_new: never append to, or truncate, another writer's file.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating event file {}", path.display()))?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        // Flushed at once so that TensorBoard sees a valid (if empty) run straight away.
        writer.flush()?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs `value` under `tag` at global step `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_float(&mut summary_value, 2, value);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &summary_value);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Pushes buffered records to the file, so that a running TensorBoard picks them up.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("flushing event file {}", self.path.display()))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let frame = tfrecord_frame(data);
        self.out
            .write_all(&frame)
            .with_context(|| format!("writing event file {}", self.path.display()))
    }
}

/// One TFRecord frame around `data`.
pub fn tfrecord_frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut frame = Vec::with_capacity(data.len() + 16);
    frame.extend_from_slice(&len);
    frame.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    frame.extend_from_slice(data);
    frame.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    frame
}

/// TFRecord's checksum: CRC32C rotated and offset, because a CRC of data that itself holds
/// CRCs is weak (the mask is TensorFlow's `crc32c::Mask`).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup per byte: event
/// records are a few dozen bytes, so a hardware or slicing implementation would buy nothing.
pub fn crc32c(data: &[u8]) -> u32 {
    let crc = data.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8)
    });
    !crc
}

const CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name, as Python's `socket.gethostname()` would give it. Read
/// from procfs rather than through a crate or libc: the file name only has to be unique and
/// recognisable, so a fallback is acceptable where procfs is missing.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    // A '/' would turn the name into a path; '.' is fine (FQDNs are common there).
    let name: String = name.trim().chars().filter(|&c| c != '/').collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

// Protobuf wire format: a key (field number << 3 | wire type), then the payload.
const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(buf, (field << 3) | wire);
}

/// An int64 field: negative values are sign-extended to ten bytes, as protobuf does.
fn put_varint_field(buf: &mut Vec<u8>, field: u64, v: u64) {
    put_key(buf, field, WIRE_VARINT);
    put_varint(buf, v);
}

fn put_double(buf: &mut Vec<u8>, field: u64, v: f64) {
    put_key(buf, field, WIRE_FIXED64);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_float(buf: &mut Vec<u8>, field: u64, v: f32) {
    put_key(buf, field, WIRE_FIXED32);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// A string, bytes or embedded-message field.
fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // The CRC-32C check value and RFC 3720's (iSCSI) all-zero 32-byte vector.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    #[allow(clippy::manual_rotate)] // the point is to spell the mask as TensorFlow does
    fn mask_matches_tensorflow() {
        // ((crc >> 15) | (crc << 17)) + 0xa282ead8, spelled out.
        let crc = crc32c(b"123456789");
        let expected = ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), expected);
    }

    #[test]
    fn varints_encode_like_protobuf() {
        let enc = |v: u64| {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            b
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(1), [0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(
            enc(-1i64 as u64),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn fields_carry_their_keys() {
        let mut b = Vec::new();
        put_bytes(&mut b, 3, b"ab");
        put_float(&mut b, 2, 1.0);
        assert_eq!(b, [0x1a, 2, b'a', b'b', 0x15, 0x00, 0x00, 0x80, 0x3f]);
    }

    #[test]
    fn hostname_is_a_single_path_component() {
        let h = hostname();
        assert!(!h.is_empty() && !h.contains('/') && !h.contains('\n'));
    }
}
