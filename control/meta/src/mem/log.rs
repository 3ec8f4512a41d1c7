//! The log file: every mutation since the last snapshot, one record each, appended and
//! fsynced before the mutation becomes visible.
//!
//! Format: a header (`SHOALMLOG` magic, `u16` format version, `u64` base sequence number, `u64`
//! XXH3-64 of the preceding 19 bytes; little-endian), then frames. A frame is `u32` payload
//! length, `u32` check of the length (the low half of its XXH3-64), `u64` XXH3-64 of the
//! payload, then the payload: a postcard [`Record`]. Records carry consecutive sequence
//! numbers from `base + 1`.
//!
//! Reading ([`scan`]) stops at the first frame that is not whole and intact, and decides:
//! - **torn tail** (a write interrupted by a crash; the bytes are dropped): the frame is cut
//!   short by the end of the file, or it is damaged, no intact frame follows it, and it holds
//!   a zero-filled run of at least [`MIN_ZERO_RUN`] bytes on a 512-byte boundary (what a file
//!   whose size reached the disk before its data looks like);
//! - **corrupt** (refused): any other damage, in particular a damaged frame followed by an
//!   intact one (a committed record was lost) or a damaged last frame without the zero-filled
//!   trace of an interrupted write (a bit flip), or an intact frame whose record does not
//!   decode or is out of sequence.
//!
//! Because every append is fsynced before the next one starts, only the last frame can be
//! the victim of a crash; everything before it was durable.
use super::change::Record;
use super::image::{StoreFile, StoreFileError};
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 9] = b"SHOALMLOG";
const FORMAT_VERSION: u16 = 1;
/// Bytes of the log header.
pub(super) const HEADER_LEN: usize = MAGIC.len() + 2 + 8 + 8;
const FRAME_HEADER: usize = 4 + 4 + 8;
/// Largest record payload; larger mutations are persisted by a compaction instead.
pub(super) const MAX_RECORD: usize = 256 << 20;
const SECTOR: u64 = 512;
/// Shortest zero-filled run that counts as the trace of an interrupted write.
const MIN_ZERO_RUN: usize = 8;
const FILE: StoreFile = StoreFile::Log;

/// A log header for a log that follows the snapshot of sequence number `base`.
pub(super) fn encode_header(base: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&base.to_le_bytes());
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn decode_header(bytes: &[u8]) -> Result<u64, StoreFileError> {
    if bytes.len() < HEADER_LEN {
        return Err(StoreFileError::ShortHeader {
            file: FILE,
            len: bytes.len(),
            need: HEADER_LEN,
        });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(StoreFileError::BadMagic { file: FILE });
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let stored = u64_at(HEADER_LEN - 8);
    let computed = xxh3_64(&bytes[..HEADER_LEN - 8]);
    if stored != computed {
        return Err(StoreFileError::Checksum {
            file: FILE,
            stored,
            computed,
        });
    }
    let version = u16::from_le_bytes([bytes[MAGIC.len()], bytes[MAGIC.len() + 1]]);
    if version != FORMAT_VERSION {
        return Err(StoreFileError::Version {
            file: FILE,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(u64_at(MAGIC.len() + 2))
}

fn len_check(len: u32) -> u32 {
    xxh3_64(&len.to_le_bytes()) as u32
}

/// Appends one frame holding `payload` (at most [`MAX_RECORD`] bytes) to `out`.
pub(super) fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_RECORD);
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&len_check(len).to_le_bytes());
    out.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

enum Frame<'a> {
    /// An intact frame: its payload and its whole length.
    Whole(&'a [u8], usize),
    /// Cut short by the end of the buffer (its header, if whole, is intact).
    Incomplete,
    /// A header or payload that fails its check.
    Damaged,
}

fn frame_at(buf: &[u8]) -> Frame<'_> {
    if buf.len() < FRAME_HEADER {
        return Frame::Incomplete;
    }
    let u32_at = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let len = u32_at(0);
    if len_check(len) != u32_at(4) || len as usize > MAX_RECORD {
        return Frame::Damaged;
    }
    let total = FRAME_HEADER + len as usize;
    if buf.len() < total {
        return Frame::Incomplete;
    }
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&buf[8..16]);
    let payload = &buf[FRAME_HEADER..total];
    if xxh3_64(payload) != u64::from_le_bytes(sum) {
        return Frame::Damaged;
    }
    Frame::Whole(payload, total)
}

/// Whether an intact frame starts anywhere in `buf` after its first byte.
fn intact_frame_after(buf: &[u8]) -> bool {
    (1..buf.len()).any(|at| matches!(frame_at(&buf[at..]), Frame::Whole(..)))
}

/// Whether `region` (starting at file offset `at`) holds a zero-filled piece of at least
/// [`MIN_ZERO_RUN`] bytes, cut at 512-byte boundaries of the file.
fn has_zeroed_sector(region: &[u8], at: u64) -> bool {
    let mut i = 0usize;
    while i < region.len() {
        let to_boundary = (SECTOR - (at + i as u64) % SECTOR) as usize;
        let end = (i + to_boundary).min(region.len());
        if end - i >= MIN_ZERO_RUN && region[i..end].iter().all(|&b| b == 0) {
            return true;
        }
        i = end;
    }
    false
}

/// What [`scan`] found.
#[derive(Debug)]
pub(super) struct Scan {
    /// The sequence number of the snapshot this log follows.
    pub(super) base: u64,
    /// The intact records, with their frames' file offsets.
    pub(super) records: Vec<(u64, Record)>,
    /// Bytes of the file up to the end of the last intact frame.
    pub(super) valid_len: u64,
    /// Bytes after that: an interrupted write, to be cut off.
    pub(super) torn: u64,
}

/// Reads a log file's bytes; see the module docs for what is torn and what is corrupt.
pub(super) fn scan(log: &[u8]) -> Result<Scan, StoreFileError> {
    let base = decode_header(log)?;
    let buf = &log[HEADER_LEN..];
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut expect = base;
    let corrupt = |pos: usize, reason: String| StoreFileError::CorruptRecord {
        offset: (HEADER_LEN + pos) as u64,
        reason,
    };
    while pos < buf.len() {
        let rest = &buf[pos..];
        match frame_at(rest) {
            Frame::Whole(payload, n) => {
                let rec = match postcard::take_from_bytes::<Record>(payload) {
                    Ok((rec, [])) => rec,
                    Ok((_, extra)) => {
                        return Err(corrupt(
                            pos,
                            format!("{} bytes after the record", extra.len()),
                        ))
                    }
                    Err(e) => return Err(corrupt(pos, format!("the record does not decode: {e}"))),
                };
                expect = expect
                    .checked_add(1)
                    .ok_or_else(|| corrupt(pos, "sequence number overflows".into()))?;
                if rec.seq != expect {
                    return Err(corrupt(
                        pos,
                        format!("record {} is out of sequence (expected {expect})", rec.seq),
                    ));
                }
                records.push(((HEADER_LEN + pos) as u64, rec));
                pos += n;
            }
            Frame::Incomplete => break,
            Frame::Damaged => {
                if intact_frame_after(rest) {
                    return Err(corrupt(
                        pos,
                        "a damaged record is followed by intact ones (a committed record is \
                         lost, this is not an interrupted write)"
                            .into(),
                    ));
                }
                if !has_zeroed_sector(rest, (HEADER_LEN + pos) as u64) {
                    return Err(corrupt(
                        pos,
                        "the last record is damaged without the zero-filled trace of an \
                         interrupted write"
                            .into(),
                    ));
                }
                break;
            }
        }
    }
    Ok(Scan {
        base,
        records,
        valid_len: (HEADER_LEN + pos) as u64,
        torn: (buf.len() - pos) as u64,
    })
}
