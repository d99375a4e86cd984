//! Journal segments: the on-disk format the spool keeps small messages in while they make
//! their first delivery pass.
//!
//! One file per message costs the file system an inode allocation, a directory update and a
//! sync of each, for every message, and deleting the file costs as much again. A segment is
//! one preallocated file that messages are appended to as records; the committer syncs it once
//! for every message written since its last sync (group commit), and a message leaves by having
//! its record marked dead in place. A segment whose records are all dead gets its header
//! cleared and is written again from the start, so in steady state the spool overwrites blocks
//! the file system has already allocated: one data sync per batch, no metadata at all.
//!
//! Layout. A segment starts with a 64-byte header: `MOATSEG1`, the generation (u64, little
//! endian), and the CRC-32 of those 16 bytes; an all-zero header marks a free segment. Records
//! follow, each starting on an 8-byte boundary:
//!
//! ```text
//! 0  "MREC"
//! 4  state: 'L' live, 'D' dead
//! 5  three zero bytes
//! 8  generation of the segment when the record was written (u64 LE)
//! 16 payload length (u32 LE)
//! 20 CRC-32 of id, payload, generation and length (u32 LE)
//! 24 queue id (16 bytes)
//! 40 payload (the spool's text envelope, a blank line, the message)
//! ```
//!
//! Reading a segment takes every whole record of the segment's generation whose CRC matches,
//! looking past damaged ones at each record boundary; records of older generations are left
//! over from the segment's previous use and never read. Generations are random, so no message
//! body can carry a record that passes for a real one. The state byte is outside the CRC so
//! that marking a record dead is a one-byte write.

/// Size of the segment header.
pub const SEG_HEADER: u64 = 64;
/// Size of a record's fixed header.
pub const REC_HEADER: usize = 40;
/// Offset of the state byte in a record.
pub const STATE_AT: u64 = 4;
pub const LIVE: u8 = b'L';
pub const DEAD: u8 = b'D';

const SEG_MAGIC: &[u8; 8] = b"MOATSEG1";
const REC_MAGIC: &[u8; 4] = b"MREC";
const ID_LEN: usize = 16;

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), continuing from `crc` (0 to start):
/// `crc32(crc32(0, a), b) == crc32(0, a ++ b)`. `crc32fast` picks the hardware path (PCLMULQDQ,
/// ARMv8 CRC) when the CPU has it.
pub fn crc32(crc: u32, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(crc);
    h.update(data);
    h.finalize()
}

/// Rounds a record length up to the next record boundary.
pub fn aligned(n: u64) -> u64 {
    (n + 7) & !7
}

/// The header of a segment in use with generation `generation`.
pub fn segment_header(generation: u64) -> [u8; SEG_HEADER as usize] {
    let mut h = [0u8; SEG_HEADER as usize];
    h[..8].copy_from_slice(SEG_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32(0, &h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The generation of a segment header, or `None` for a free or damaged one.
pub fn read_segment_header(data: &[u8]) -> Option<u64> {
    let h = data.get(..20)?;
    if &h[..8] != SEG_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(h[16..20].try_into().ok()?);
    if crc != crc32(0, &h[..16]) {
        return None;
    }
    Some(u64::from_le_bytes(h[8..16].try_into().ok()?))
}

/// A record not yet placed: its bytes with the generation left open, and the CRC of the id
/// and payload, so that only 12 bytes are checksummed once the generation is known.
pub struct Draft {
    pub bytes: Vec<u8>,
    partial: u32,
}

/// Builds the record of message `id` whose payload is the concatenation of `parts`.
/// `id` must be a queue id (16 ASCII bytes).
pub fn draft(id: &str, parts: &[&[u8]]) -> Draft {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut bytes = Vec::with_capacity(REC_HEADER + len);
    bytes.extend_from_slice(REC_MAGIC);
    bytes.extend_from_slice(&[LIVE, 0, 0, 0]);
    bytes.extend_from_slice(&[0u8; 8]);
    bytes.extend_from_slice(&(len as u32).to_le_bytes());
    bytes.extend_from_slice(&[0u8; 4]);
    bytes.extend_from_slice(id.as_bytes());
    let mut partial = crc32(0, id.as_bytes());
    for p in parts {
        bytes.extend_from_slice(p);
        partial = crc32(partial, p);
    }
    Draft { bytes, partial }
}

impl Draft {
    /// Fills in the generation and the CRC; the bytes are then ready to write.
    pub fn seal(&mut self, generation: u64) {
        let g = generation.to_le_bytes();
        self.bytes[8..16].copy_from_slice(&g);
        let crc = crc32(crc32(self.partial, &g), &self.bytes[16..20]);
        self.bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A whole record found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub offset: u64,
    /// Length of the record, header included.
    pub len: u32,
    pub id: String,
    pub live: bool,
}

/// Checks the record at the start of `data` (the bytes from its offset on). Returns its
/// total length, id and state when it is whole, of `generation`, and its CRC matches.
pub fn check_record(data: &[u8], generation: u64) -> Option<(u32, String, bool)> {
    let h = data.get(..REC_HEADER)?;
    if &h[..4] != REC_MAGIC {
        return None;
    }
    // The state byte and the three after it are outside the CRC (marking dead is a one-byte
    // write). Damage there must not lose an intact message: anything but a clean `D` counts
    // as live, so the message is delivered (at least once beats lost).
    let live = h[4] != DEAD || h[5..8] != [0, 0, 0];
    if u64::from_le_bytes(h[8..16].try_into().ok()?) != generation {
        return None;
    }
    let len = u32::from_le_bytes(h[16..20].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(h[20..24].try_into().ok()?);
    let id = &h[24..24 + ID_LEN];
    let payload = data.get(REC_HEADER..REC_HEADER.checked_add(len)?)?;
    let mut c = crc32(0, id);
    c = crc32(c, payload);
    c = crc32(c, &h[8..20]);
    if c != crc {
        return None;
    }
    let id = std::str::from_utf8(id).ok()?;
    if !crate::util::is_queue_id(id) {
        return None;
    }
    let total = u32::try_from(REC_HEADER + len).ok()?;
    Some((total, id.to_string(), live))
}

/// The payload of a checked record.
pub fn payload(record: &[u8]) -> &[u8] {
    record.get(REC_HEADER..).unwrap_or_default()
}

/// The generation of the first record after the header, whether or not the header is still
/// valid: a cleared segment keeps its old records, and new generations must not repeat theirs.
pub fn first_record_generation(data: &[u8]) -> Option<u64> {
    let at = SEG_HEADER as usize;
    let h = data.get(at..at + 16)?;
    if &h[..4] != REC_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(h[8..16].try_into().ok()?))
}

/// What a segment holds: its generation (`None` when free or damaged), its whole records in
/// order, where the next record would go, and how many bytes between records were skipped.
#[derive(Debug, Default)]
pub struct Scan {
    pub generation: Option<u64>,
    pub records: Vec<Found>,
    pub end: u64,
    pub skipped: u64,
    /// Records of this generation whose header is readable but which do not check out (a
    /// bit flip, a torn write): what can be known of each lost message.
    pub damaged: Vec<Damaged>,
}

/// A record that was written (its magic and generation are there) but fails its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub offset: u64,
    /// The queue id, when the header's id field still is one.
    pub id: Option<String>,
    /// The payload length the header claims.
    pub len: u32,
    /// The envelope's `from` line, when readable.
    pub sender: Option<String>,
}

/// What can be read of a record at the start of `data` that failed [`check_record`]: `None`
/// when it does not even start like a record of `generation`.
fn damaged_record(data: &[u8], offset: u64, generation: u64) -> Option<Damaged> {
    let h = data.get(..REC_HEADER)?;
    if &h[..4] != REC_MAGIC || u64::from_le_bytes(h[8..16].try_into().ok()?) != generation {
        return None;
    }
    let len = u32::from_le_bytes(h[16..20].try_into().ok()?);
    let id = std::str::from_utf8(&h[24..24 + ID_LEN])
        .ok()
        .filter(|id| crate::util::is_queue_id(id))
        .map(str::to_string);
    let head = data
        .get(REC_HEADER..)
        .map(|p| &p[..p.len().min(usize::try_from(len).unwrap_or(0)).min(4096)])
        .unwrap_or_default();
    let sender = String::from_utf8_lossy(head).lines().find_map(|l| {
        l.strip_prefix("from ")
            .map(|s| s.chars().take(256).collect())
    });
    Some(Damaged {
        offset,
        id,
        len,
        sender,
    })
}

/// Reads a whole segment's bytes. Where a record is damaged (a torn write, a bad block), the
/// scan looks for the next whole record of this generation at each record boundary further
/// on, so a damaged record never hides acknowledged ones behind it. (Nothing after the last
/// record is counted as skipped: that is where the next records would have gone.) A record of
/// this generation can only have been written by the spool: the generation is random.
pub fn scan(data: &[u8]) -> Scan {
    match read_segment_header(data) {
        Some(generation) => scan_records(data, generation),
        None => Scan::default(),
    }
}

/// True when the segment header is all zeros: a cleared (free) segment. Any other header that
/// does not check out is damage, not freedom.
pub fn header_is_clear(data: &[u8]) -> bool {
    data.iter().take(SEG_HEADER as usize).all(|b| *b == 0)
}

/// Reads the records of `generation` (see [`scan`]), whatever the header says: for a segment
/// whose header is damaged, with the generation its first record carries.
pub fn scan_records(data: &[u8], generation: u64) -> Scan {
    let mut records = Vec::new();
    let mut damaged = Vec::new();
    let mut at = SEG_HEADER;
    let mut end = at;
    let mut skipped = 0;
    while let Some(rest) = usize::try_from(at).ok().and_then(|a| data.get(a..)) {
        if rest.len() < REC_HEADER {
            break;
        }
        match check_record(rest, generation) {
            Some((len, id, live)) => {
                skipped += at - end;
                records.push(Found {
                    offset: at,
                    len,
                    id,
                    live,
                });
                at = aligned(at + u64::from(len));
                end = at;
            }
            None => {
                if let Some(d) = damaged_record(rest, at, generation) {
                    damaged.push(d);
                }
                at += 8
            }
        }
    }
    // A damaged record's header can be found again at later boundaries only by chance; the
    // first sighting of an id is the record.
    let mut seen = std::collections::HashSet::new();
    damaged.retain(|d| d.id.as_ref().is_none_or(|id| seen.insert(id.clone())));
    // Those found intact elsewhere (a copy in the queue dir is handled by the spool) are not lost.
    damaged.retain(|d| {
        d.id.as_ref()
            .is_none_or(|id| !records.iter().any(|r| &r.id == id))
    });
    Scan {
        generation: Some(generation),
        records,
        end,
        skipped,
        damaged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789ABCDEF";
    const B: &str = "00000000000000FF";

    fn segment(generation: u64, records: &[(&str, &[u8], u64)]) -> Vec<u8> {
        let mut data = segment_header(generation).to_vec();
        for (id, payload, g) in records {
            data.resize(aligned(data.len() as u64) as usize, 0);
            let mut d = draft(id, &[payload]);
            d.seal(*g);
            data.extend_from_slice(&d.bytes);
        }
        data
    }

    /// Bit by bit, straight from the definition.
    fn crc_reference(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc32(0, b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(crc32(0, b"1234"), b"56789"), 0xCBF4_3926);
        let data: Vec<u8> = (0..600u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in 0..data.len() {
            for split in [0, len / 3, len] {
                let (a, b) = data[..len].split_at(split);
                assert_eq!(
                    crc32(crc32(0, a), b),
                    crc_reference(&data[..len]),
                    "len {len} split {split}"
                );
            }
        }
    }

    #[test]
    fn damaged_records_are_named() {
        let payload = b"MOAT-SPOOL 1\narrived 1\nfrom alice@example.test\nrcpt b@x\n\nbody";
        let data = segment(7, &[(A, b"first", 7), (B, payload, 7), (A, b"x", 6)]);
        let s = scan(&data);
        let at = s.records[1].offset as usize;
        let mut bad = data.clone();
        bad[at + REC_HEADER + 60] ^= 0x01;
        let s = scan(&bad);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.damaged.len(), 1, "{:?}", s.damaged);
        let d = &s.damaged[0];
        assert_eq!(d.id.as_deref(), Some(B));
        assert_eq!(d.sender.as_deref(), Some("alice@example.test"));
        assert_eq!(d.len as usize, payload.len());
        assert!(scan(&data).damaged.is_empty());
    }

    #[test]
    fn damage_to_the_state_byte_alone_keeps_the_message() {
        let clean = segment(7, &[(A, b"hello", 7)]);
        let at = (SEG_HEADER + STATE_AT) as usize;
        for (byte, offset, live) in [
            (b'X', 0, true),
            (0x00, 0, true),
            (LIVE ^ 0x01, 0, true),
            // A dead mark with damage next to it: still delivered (at least once).
            (DEAD, 0, false),
            (DEAD, 1, true),
        ] {
            let mut data = clean.clone();
            if offset == 0 {
                data[at] = byte;
            } else {
                data[at] = byte;
                data[at + offset] = 0x20;
            }
            let s = scan(&data);
            assert_eq!(s.records.len(), 1, "state {byte:#x}+{offset}");
            assert_eq!(s.records[0].live, live, "state {byte:#x}+{offset}");
            assert_eq!(s.records[0].id, A);
        }
    }

    #[test]
    fn records_round_trip_and_split_payloads_match() {
        let data = segment(7, &[(A, b"hello", 7), (B, b"world!!", 7)]);
        let s = scan(&data);
        assert_eq!(s.generation, Some(7));
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.records[0].id, A);
        assert_eq!(s.records[1].offset, aligned(SEG_HEADER + 45));
        assert_eq!(s.end, aligned(s.records[1].offset + 47));
        let r = &data[s.records[1].offset as usize..];
        assert_eq!(&payload(r)[..7], b"world!!");
        let mut split = draft(A, &[b"hel", b"lo"]);
        split.seal(7);
        let mut whole = draft(A, &[b"hello"]);
        whole.seal(7);
        assert_eq!(split.bytes, whole.bytes);
    }

    #[test]
    fn scan_skips_old_generation_torn_or_corrupt_records() {
        // Records left over from the segment's previous use are never read.
        let data = segment(9, &[(A, b"new", 9), (B, b"stale", 8)]);
        let s = scan(&data);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.end, aligned(SEG_HEADER + 43));
        // A torn last record: every prefix of it leaves the first record alone.
        let data = segment(9, &[(A, b"one", 9), (B, b"two", 9)]);
        let second = scan(&data).records[1].offset as usize;
        for cut in second..data.len() {
            let s = scan(&data[..cut]);
            assert_eq!(s.records.len(), 1, "cut at {cut}");
            assert_eq!(s.end, second as u64);
        }
        // A flipped bit anywhere but the state byte and its padding (outside the CRC, see
        // `damage_to_the_state_byte_alone_keeps_the_message`) loses that record only: the
        // ones before and after it are still found.
        let c = "0000000000000ABC";
        let data = segment(9, &[(A, b"one", 9), (B, &[b'x'; 100], 9), (c, b"three", 9)]);
        let s = scan(&data);
        let (second, third) = (s.records[1].offset as usize, s.records[2].offset as usize);
        for i in second..second + s.records[1].len as usize {
            if (second + STATE_AT as usize..second + 8).contains(&i) {
                continue;
            }
            let mut bad = data.clone();
            bad[i] ^= 0x10;
            let s = scan(&bad);
            let ids: Vec<&str> = s.records.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids, vec![A, c], "flip at {i}");
            assert_eq!(s.skipped, (third - second) as u64);
        }
    }

    #[test]
    fn a_record_forged_inside_a_payload_is_not_found_unless_its_holder_is_damaged() {
        let mut forged = draft(B, &[b"evil"]);
        forged.seal(9);
        // Aligned inside the payload of a genuine record.
        let mut payload = vec![0u8; 8];
        payload.extend_from_slice(&forged.bytes);
        let data = segment(9, &[(A, &payload, 9)]);
        let s = scan(&data);
        assert_eq!(s.records.len(), 1, "the scan jumps over payloads");
        // With the generation unknown to the sender, a forged record never matches.
        let mut wrong = draft(B, &[b"evil"]);
        wrong.seal(8);
        let mut payload = vec![0u8; 8];
        payload.extend_from_slice(&wrong.bytes);
        let mut data = segment(9, &[(A, &payload, 9)]);
        data[SEG_HEADER as usize + 30] ^= 1;
        assert!(scan(&data).records.is_empty());
    }

    #[test]
    fn dead_marks_and_free_headers() {
        let mut data = segment(3, &[(A, b"x", 3), (B, b"y", 3)]);
        data[(SEG_HEADER + STATE_AT) as usize] = DEAD;
        let s = scan(&data);
        assert!(!s.records[0].live && s.records[1].live);
        data[..SEG_HEADER as usize].fill(0);
        let s = scan(&data);
        assert_eq!(s.generation, None);
        assert!(s.records.is_empty());
        assert_eq!(first_record_generation(&data), Some(3));
        assert_eq!(
            read_segment_header(&segment_header(u64::MAX)),
            Some(u64::MAX)
        );
    }

    #[test]
    fn ids_must_be_queue_ids() {
        let data = segment(1, &[("../../etc/passwd", b"x", 1)]);
        assert!(scan(&data).records.is_empty());
    }
}
