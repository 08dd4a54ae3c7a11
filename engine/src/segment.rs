//! Segment file format: header, frames, entries. Byte layout in `docs/format.md`.
//!
//! A frame holds one commit group: every entry that one fdatasync made durable in
//! this segment. Only the last commit group of a segment can be unsynced at a crash,
//! so a torn write can damage only the last frame; any page of it may be lost while a
//! later page survives, which is why the unit of framing is the group and not the
//! entry. Inside a frame each entry carries its own checksum so a point read verifies
//! exactly the bytes it read.

use repl_wire::{Dot, Entry, Incarnation, StreamId};

use crate::error::{Corruption, Error};

/// Identifies a segment file as ours.
pub(crate) const MAGIC: [u8; 8] = *b"REPLSEG\0";
/// The segment format this code writes and reads.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Bytes of the fixed segment header.
pub(crate) const HEADER_BYTES: u64 = 64;
/// Bytes of a frame header: length and checksum.
pub(crate) const FRAME_HEADER_BYTES: u64 = 8;
/// Bytes of an entry header inside a frame: length and checksum.
pub(crate) const ENTRY_HEADER_BYTES: u64 = 8;
/// Bytes of the entry count that opens a frame's payload.
pub(crate) const FRAME_COUNT_BYTES: u64 = 4;
/// Largest frame payload; a commit group larger than this is split across commits.
pub(crate) const FRAME_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// Seeds of the two checksums. Distinct seeds keep an entry header from ever passing
/// as a frame header when recovery scans a damaged segment at every offset.
const FRAME_CRC_SEED: u32 = 0x5250_4c46;
const ENTRY_CRC_SEED: u32 = 0x5250_4c45;
const HEADER_CRC_SEED: u32 = 0x5250_4c48;

/// What a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentKind {
    /// Part of the replication log, in apply order.
    Log,
    /// Live records copied out of compacted log segments.
    Compacted,
}

/// The fixed header of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) kind: SegmentKind,
    pub(crate) stream: StreamId,
    pub(crate) incarnation: Incarnation,
    pub(crate) number: u64,
}

fn crc(seed: u32, parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

impl SegmentHeader {
    pub(crate) fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut out = [0u8; HEADER_BYTES as usize];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10] = match self.kind {
            SegmentKind::Log => 1,
            SegmentKind::Compacted => 2,
        };
        out[11] = self.stream.code();
        out[16..24].copy_from_slice(&self.incarnation.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.number.to_le_bytes());
        let c = crc(HEADER_CRC_SEED, &[&out[0..60]]);
        out[60..64].copy_from_slice(&c.to_le_bytes());
        out
    }

    /// Decodes a header; `file` names the segment in errors.
    pub(crate) fn decode(bytes: &[u8], file: &str) -> Result<SegmentHeader, Error> {
        let corrupt =
            |what: &'static str| Error::Corrupt(Corruption { file: file.to_string(), offset: 0, what });
        let head =
            bytes.get(..HEADER_BYTES as usize).ok_or_else(|| corrupt("segment shorter than its header"))?;
        if head.get(0..8) != Some(&MAGIC[..]) {
            return Err(corrupt("bad magic: not a repl segment"));
        }
        // The version comes before the checksum: another format may checksum differently.
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedFormat { file: file.to_string(), version });
        }
        let stored = read_u32(head, 60).ok_or_else(|| corrupt("header truncated"))?;
        if crc(HEADER_CRC_SEED, &[head.get(0..60).unwrap_or_default()]) != stored {
            return Err(corrupt("header checksum mismatch"));
        }
        let kind = match head[10] {
            1 => SegmentKind::Log,
            2 => SegmentKind::Compacted,
            _ => return Err(corrupt("unknown segment kind")),
        };
        let stream = StreamId::from_code(head[11]).ok_or_else(|| corrupt("unknown stream code"))?;
        let incarnation = Incarnation(read_u64(head, 16).ok_or_else(|| corrupt("header truncated"))?);
        let number = read_u64(head, 24).ok_or_else(|| corrupt("header truncated"))?;
        Ok(SegmentHeader { kind, stream, incarnation, number })
    }
}

/// Builds one frame from already-encoded entries; returns the frame bytes and, for
/// each entry, its offset and length (header included) relative to the frame start.
pub(crate) fn build_frame(entries: &[&[u8]]) -> (Vec<u8>, Vec<(u32, u32)>) {
    let mut out = Vec::new();
    let mut spans = Vec::new();
    build_frame_into(entries, &mut out, &mut spans);
    (out, spans)
}

/// [`build_frame`] into buffers the caller keeps: the commit path reuses one pair
/// per stream, so a group's frame does not fault in fresh pages every time.
pub(crate) fn build_frame_into(entries: &[&[u8]], out: &mut Vec<u8>, spans: &mut Vec<(u32, u32)>) {
    let payload_len: usize = FRAME_COUNT_BYTES as usize
        + entries.iter().map(|e| ENTRY_HEADER_BYTES as usize + e.len()).sum::<usize>();
    out.clear();
    spans.clear();
    out.reserve(FRAME_HEADER_BYTES as usize + payload_len);
    spans.reserve(entries.len());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        let start = out.len();
        let len = (e.len() as u32).to_le_bytes();
        out.extend_from_slice(&len);
        out.extend_from_slice(&crc(ENTRY_CRC_SEED, &[&len, e]).to_le_bytes());
        out.extend_from_slice(e);
        spans.push((start as u32, (out.len() - start) as u32));
    }
    let c = crc(FRAME_CRC_SEED, &[&out[0..4], &out[8..]]);
    out[4..8].copy_from_slice(&c.to_le_bytes());
}

/// Bytes a frame of these entry sizes takes.
pub(crate) fn frame_bytes(entry_sizes: impl Iterator<Item = usize>) -> u64 {
    FRAME_HEADER_BYTES + FRAME_COUNT_BYTES + entry_sizes.map(|s| ENTRY_HEADER_BYTES + s as u64).sum::<u64>()
}

/// Checks the frame starting at `at`; returns its total length when valid.
fn valid_frame_at(bytes: &[u8], at: usize, frame_max: u64) -> Option<usize> {
    let len = read_u32(bytes, at)? as u64;
    if len == 0 || len > frame_max {
        return None;
    }
    let end = at.checked_add(FRAME_HEADER_BYTES as usize + len as usize)?;
    let payload = bytes.get(at + FRAME_HEADER_BYTES as usize..end)?;
    let stored = read_u32(bytes, at + 4)?;
    (crc(FRAME_CRC_SEED, &[bytes.get(at..at + 4)?, payload]) == stored).then_some(end - at)
}

/// One entry found in a segment.
#[derive(Debug)]
pub(crate) struct ScannedEntry {
    /// Offset of the entry header in the file.
    pub(crate) offset: u32,
    /// Entry header plus entry bytes.
    pub(crate) len: u32,
    pub(crate) entry: Entry,
}

/// One frame found in a segment.
#[derive(Debug)]
pub(crate) struct ScannedFrame {
    pub(crate) offset: u64,
    pub(crate) entries: Vec<ScannedEntry>,
}

/// A segment read back at recovery.
#[derive(Debug)]
pub(crate) struct ScannedSegment {
    pub(crate) header: SegmentHeader,
    pub(crate) frames: Vec<ScannedFrame>,
    /// Where the valid records end: the next append goes here.
    pub(crate) end: u64,
    /// When the tail was torn: the end of the damaged bytes, to be zeroed.
    pub(crate) torn_until: Option<u64>,
}

/// Parses a whole segment image. A damaged frame is a torn tail only when no valid
/// frame starts at any later offset; anything else is corruption naming the offset.
pub(crate) fn scan(bytes: &[u8], file: &str, frame_max: u64) -> Result<ScannedSegment, Error> {
    let header = SegmentHeader::decode(bytes, file)?;
    let mut frames = Vec::new();
    let mut at = HEADER_BYTES as usize;
    let corrupt = |offset: usize, what: &'static str| {
        Error::Corrupt(Corruption { file: file.to_string(), offset: offset as u64, what })
    };
    loop {
        if at + FRAME_HEADER_BYTES as usize > bytes.len() || bytes[at..].iter().all(|&b| b == 0) {
            // A zero tail (the preallocated space) or the exact end: clean.
            return Ok(ScannedSegment { header, frames, end: at as u64, torn_until: None });
        }
        match valid_frame_at(bytes, at, frame_max) {
            Some(len) => {
                frames.push(
                    parse_frame(bytes, at, len).ok_or_else(|| corrupt(at, "frame payload is malformed"))?,
                );
                at += len;
            }
            None => {
                // Rare path: try every later offset for a valid frame.
                let later = (at + 1..bytes.len()).any(|p| valid_frame_at(bytes, p, frame_max).is_some());
                if later {
                    return Err(corrupt(at, "damaged record followed by valid records (mid-log corruption)"));
                }
                let last_nonzero = bytes.iter().rposition(|&b| b != 0).map_or(at, |p| p + 1);
                return Ok(ScannedSegment {
                    header,
                    frames,
                    end: at as u64,
                    torn_until: Some(last_nonzero.max(at) as u64),
                });
            }
        }
    }
}

fn parse_frame(bytes: &[u8], at: usize, len: usize) -> Option<ScannedFrame> {
    let payload_start = at + FRAME_HEADER_BYTES as usize;
    let end = at + len;
    let count = read_u32(bytes, payload_start)? as usize;
    let mut p = payload_start + FRAME_COUNT_BYTES as usize;
    let mut entries = Vec::with_capacity(count.min(len / ENTRY_HEADER_BYTES as usize));
    for _ in 0..count {
        let (entry, total) = parse_entry(bytes.get(p..end)?)?;
        entries.push(ScannedEntry { offset: p as u32, len: total as u32, entry });
        p += total;
    }
    (p == end).then_some(ScannedFrame { offset: at as u64, entries })
}

/// Parses one entry with its header from the front of `bytes`; returns it and the
/// bytes it took. `None` when the header, checksum or entry is bad.
fn parse_entry(bytes: &[u8]) -> Option<(Entry, usize)> {
    let (body, total) = checked_body(bytes)?;
    let entry = Entry::decode(body).ok()?;
    Some((entry, total))
}

/// [`entry_body`] once the entry's checksum (over its length and encoding) holds.
fn checked_body(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let (body, total) = entry_body(bytes)?;
    let stored = read_u32(bytes, 4)?;
    (crc(ENTRY_CRC_SEED, &[bytes.get(0..4)?, body]) == stored).then_some((body, total))
}

/// The encoded entry behind the header at the front of `bytes`, and the bytes header
/// and entry take; `None` when they run past the end. The checksum is not checked.
fn entry_body(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let total = ENTRY_HEADER_BYTES as usize + read_u32(bytes, 0)? as usize;
    Some((bytes.get(ENTRY_HEADER_BYTES as usize..total)?, total))
}

/// Verifies one whole frame read at file offset `at` (header included) and hands
/// `take` only the entries `want` asks for, by dot, until it says stop: shipping reads
/// frames of up to a thousand entries to send a few hundred, and the dot (the first
/// field of an entry) is read without decoding the rest. `take` gets an entry's
/// encoding (the frame's checksum covered it) and gives what to return, or `None`
/// for an encoding that does not decode.
pub(crate) fn scan_frame_wanted<T>(
    buf: &[u8],
    file: &str,
    at: u64,
    frame_max: u64,
    mut want: impl FnMut(Dot) -> Wanted,
    mut take: impl FnMut(&[u8]) -> Option<T>,
    out: &mut Vec<T>,
) -> Result<(), Error> {
    let corrupt = |what| Error::Corrupt(Corruption { file: file.to_string(), offset: at, what });
    let len = valid_frame_at(buf, 0, frame_max)
        .filter(|&l| l == buf.len())
        .ok_or_else(|| corrupt("frame checksum"))?;
    let payload_start = FRAME_HEADER_BYTES as usize;
    let count = read_u32(buf, payload_start).ok_or_else(|| corrupt("frame payload is malformed"))? as usize;
    let mut p = payload_start + FRAME_COUNT_BYTES as usize;
    for _ in 0..count {
        let bytes = buf.get(p..len).ok_or_else(|| corrupt("frame payload is malformed"))?;
        let (body, total) = entry_body(bytes).ok_or_else(|| corrupt("frame payload is malformed"))?;
        // The frame's checksum covered these bytes, so a dot that does not parse is
        // a writer's bug or a collision, reported like any malformed frame.
        let (dot, _) =
            postcard::take_from_bytes::<Dot>(body).map_err(|_| corrupt("frame payload is malformed"))?;
        match want(dot) {
            Wanted::Skip => {}
            Wanted::Take => out.push(take(body).ok_or_else(|| corrupt("frame payload is malformed"))?),
            Wanted::Stop => return Ok(()),
        }
        p += total;
    }
    if p == len {
        Ok(())
    } else {
        Err(corrupt("frame payload is malformed"))
    }
}

/// What [`scan_frame_wanted`] does with the next entry of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// Not needed: skipped without decoding.
    Skip,
    /// Handed to the caller's `take` and returned.
    Take,
    /// Nothing more is needed from this frame.
    Stop,
}

/// Verifies and decodes an entry read by a point read (header included).
pub(crate) fn decode_entry_at(bytes: &[u8], file: &str, offset: u64) -> Result<Entry, Error> {
    let body = entry_body_at(bytes, file, offset)?;
    Entry::decode(body).map_err(|_| bad_entry_at(file, offset))
}

/// Verifies the checksum of an entry read by a point read (header included) and
/// returns its encoding, not decoded.
pub(crate) fn entry_body_at<'b>(bytes: &'b [u8], file: &str, offset: u64) -> Result<&'b [u8], Error> {
    match checked_body(bytes) {
        Some((body, used)) if used == bytes.len() => Ok(body),
        _ => Err(bad_entry_at(file, offset)),
    }
}

/// An entry at `offset` of `file` whose checksum or encoding is wrong.
pub(crate) fn bad_entry_at(file: &str, offset: u64) -> Error {
    Error::Corrupt(Corruption { file: file.to_string(), offset, what: "entry checksum or encoding" })
}

#[cfg(test)]
mod tests {
    use repl_wire::{Collection, Dot, Hlc, Op, VersionVector};

    use super::*;

    fn entry(seq: u64, value: &[u8]) -> Vec<u8> {
        Entry {
            dot: Dot { origin: Incarnation(9), seq },
            hlc: Hlc { wall_ms: seq, logical: 0 },
            collection: Collection::Users,
            key: format!("k{seq}").into_bytes(),
            context: VersionVector::new(),
            op: Op::Put { value: value.to_vec(), expires_at_ms: None },
        }
        .encode()
    }

    fn segment(frames: &[Vec<Vec<u8>>]) -> Vec<u8> {
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            stream: StreamId::Enterprise,
            incarnation: Incarnation(9),
            number: 3,
        };
        let mut out = header.encode().to_vec();
        for f in frames {
            let refs: Vec<&[u8]> = f.iter().map(|e| e.as_slice()).collect();
            out.extend_from_slice(&build_frame(&refs).0);
        }
        out.resize(out.len() + 4096, 0);
        out
    }

    #[test]
    fn round_trip_with_zero_tail() {
        let img = segment(&[vec![entry(1, b"a"), entry(2, b"bb")], vec![entry(3, b"ccc")]]);
        let s = scan(&img, "seg", FRAME_BYTES_MAX).expect("clean segment");
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.frames[0].entries.len(), 2);
        assert_eq!(s.torn_until, None);
        let e = &s.frames[1].entries[0];
        let bytes = &img[e.offset as usize..(e.offset + e.len) as usize];
        assert_eq!(decode_entry_at(bytes, "seg", 0).expect("point read").dot.seq, 3);
    }

    #[test]
    fn torn_last_frame_is_cut_mid_log_damage_is_refused() {
        let img = segment(&[vec![entry(1, b"a")], vec![entry(2, &[7u8; 300])], vec![entry(3, b"c")]]);
        let clean = scan(&img, "seg", FRAME_BYTES_MAX).expect("clean");
        let last = clean.frames[2].offset as usize;
        let mut torn = img.clone();
        torn[last + 12] ^= 0xff;
        let s = scan(&torn, "seg", FRAME_BYTES_MAX).expect("torn tail is not an error");
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.end, last as u64);
        assert!(s.torn_until.is_some());

        let middle = clean.frames[1].offset as usize;
        let mut damaged = img.clone();
        damaged[middle + 40] ^= 0x01;
        match scan(&damaged, "seg", FRAME_BYTES_MAX) {
            Err(Error::Corrupt(c)) => assert_eq!(c.offset, middle as u64),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn header_errors_are_typed() {
        let mut img = segment(&[]);
        img[20] ^= 1;
        assert!(matches!(scan(&img, "s", FRAME_BYTES_MAX), Err(Error::Corrupt(_))));
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            stream: StreamId::Audit,
            incarnation: Incarnation(1),
            number: 1,
        };
        let mut raw = header.encode();
        raw[8] = 2;
        assert!(matches!(SegmentHeader::decode(&raw, "s"), Err(Error::UnsupportedFormat { version: 2, .. })));
        assert!(matches!(scan(b"garbage", "s", FRAME_BYTES_MAX), Err(Error::Corrupt(_))));
    }
}
