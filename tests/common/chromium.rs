//! Headless Chromium (Debian's `chromium` package) for page tests, and a small PNG decoder for
//! its screenshots.
//!
//! - [`dump_dom`] loads a URL (`file://` or `http://127.0.0.1:…`) and returns the DOM as
//!   serialised after loading (scripts run);
//! - [`screenshot`] loads a URL and returns the rendered viewport as an [`Image`];
//! - [`with_box_script`] / [`boxes`] find where elements were laid out, so a test can count
//!   pixels of a colour inside one element ([`Image::count`]).
//!
//! Each run gets a fresh profile directory and is killed (with its helper processes) after
//! [`TIMEOUT`]. A missing browser is a test failure, not a skip: `scripts/test` installs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's launcher.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest a single browser run may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Viewport used for both DOM dumps and screenshots, so element boxes match screenshot pixels.
pub const WINDOW: (u32, u32) = (1280, 2400);

/// Flags for every run: headless, no sandbox (tests run as root), nothing fetched in the
/// background, one device pixel per CSS pixel.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
];

/// Panics with instructions when the browser is not installed.
pub fn require() -> PathBuf {
    let p = PathBuf::from(CHROMIUM);
    assert!(
        p.exists(),
        "{CHROMIUM} not found: these tests need Debian's chromium package \
         (`apt-get install --no-install-recommends chromium`; scripts/test installs it)"
    );
    p
}

/// `file://` URL of a local path.
pub fn file_url(path: &Path) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut url = String::from("file://");
    for b in abs.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// Runs chromium with `args` and the standard flags; returns stdout. Panics (with the tail of
/// stderr) on a non-zero exit or a timeout.
fn run(args: &[String]) -> Vec<u8> {
    use std::os::unix::process::CommandExt;
    let bin = require();
    let work = tempfile::tempdir().expect("temp dir for chromium");
    let profile = work.path().join("profile");
    let out_path = work.path().join("stdout");
    let err_path = work.path().join("stderr");
    let mut cmd = Command::new(&bin);
    cmd.args(FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .args(args)
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        // Own process group, so a timeout kills the renderer and helpers too.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let pgid = child.id();
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for chromium") {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        // Timed out: kill the browser and its helpers (its own process group, whose leader is
        // not reaped yet, so the id cannot have been reused).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
    }
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let tail: String = {
        let start = stderr.len().saturating_sub(3000);
        let mut i = start;
        while !stderr.is_char_boundary(i) {
            i += 1;
        }
        stderr[i..].to_string()
    };
    match status {
        None => panic!("chromium {args:?} did not finish within {TIMEOUT:?}; stderr:\n{tail}"),
        Some(s) if !s.success() => panic!("chromium {args:?} failed ({s}); stderr:\n{tail}"),
        Some(_) => std::fs::read(&out_path).expect("read chromium stdout"),
    }
}

/// The DOM of `url` after loading, as Chromium serialises it.
pub fn dump_dom(url: &str) -> String {
    let out = run(&["--dump-dom".to_string(), url.to_string()]);
    String::from_utf8_lossy(&out).into_owned()
}

/// A screenshot of `url` ([`WINDOW`] sized), also kept at `path`.
pub fn screenshot_to(url: &str, path: &Path) -> Image {
    run(&[format!("--screenshot={}", path.display()), url.to_string()]);
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", path.display()));
    decode_png(&bytes).unwrap_or_else(|e| panic!("screenshot {}: {e}", path.display()))
}

/// A screenshot of `url` ([`WINDOW`] sized).
pub fn screenshot(url: &str) -> Image {
    let dir = tempfile::tempdir().expect("temp dir");
    screenshot_to(url, &dir.path().join("shot.png"))
}

/// A rectangle in CSS pixels (= screenshot pixels at scale factor 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// `html` with a script added at the end of its body that writes each element matching the
/// CSS `selector` its layout box (document coordinates) as `data-box="x,y,w,h"`; read the
/// boxes back from [`dump_dom`]'s output with [`boxes`].
pub fn with_box_script(html: &str, selector: &str) -> String {
    let sel = selector.replace('\\', "\\\\").replace('\'', "\\'");
    let script = format!(
        "<script>for (const e of document.querySelectorAll('{sel}')) {{\
         const r = e.getBoundingClientRect();\
         e.setAttribute('data-box', [r.left + scrollX, r.top + scrollY, r.width, r.height].join(','));\
         }}</script>"
    );
    match html.rfind("</body>") {
        Some(i) => format!("{}{script}{}", &html[..i], &html[i..]),
        None => format!("{html}{script}"),
    }
}

/// The `data-box` of every element that has an `id`, by id, from a dumped DOM.
pub fn boxes(dom: &str) -> HashMap<String, Rect> {
    let mut out = HashMap::new();
    let mut rest = dom;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..end];
        if let (Some(id), Some(b)) = (attr(tag, "id"), attr(tag, "data-box")) {
            let v: Vec<f64> = b.split(',').filter_map(|x| x.parse().ok()).collect();
            if v.len() == 4 {
                out.insert(
                    id.to_string(),
                    Rect {
                        x: v[0],
                        y: v[1],
                        w: v[2],
                        h: v[3],
                    },
                );
            }
        }
    }
    out
}

/// The value of a double-quoted attribute in a start tag's text.
pub fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=\"");
    let i = tag.find(&pat)? + pat.len();
    let len = tag[i..].find('"')?;
    Some(&tag[i..i + len])
}

/// The outer HTML of the element of type `tag` with `id="…"`, from a dumped DOM (no nesting
/// of the same tag inside it).
pub fn element<'a>(dom: &'a str, tag: &str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!(" id=\"{id}\""))?;
    let start = dom[..at].rfind(&format!("<{tag}"))?;
    let close = format!("</{tag}>");
    let end = start + dom[start..].find(&close)? + close.len();
    Some(&dom[start..end])
}

// ---------------------------------------------------------------------------------------------
// PNG
// ---------------------------------------------------------------------------------------------

/// A decoded image, 8-bit RGBA, rows top to bottom.
#[derive(Debug, Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

impl Image {
    /// The pixel at (x, y).
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 4] {
        let i = (y as usize * self.width as usize + x as usize) * 4;
        [
            self.rgba[i],
            self.rgba[i + 1],
            self.rgba[i + 2],
            self.rgba[i + 3],
        ]
    }

    /// Pixels inside `r` (clipped to the image) whose RGB is within `tolerance` of `rgb` on
    /// every channel.
    pub fn count(&self, r: Rect, rgb: [u8; 3], tolerance: u8) -> usize {
        let x0 = r.x.max(0.0).floor() as u32;
        let y0 = r.y.max(0.0).floor() as u32;
        let x1 = ((r.x + r.w).ceil().max(0.0) as u32).min(self.width);
        let y1 = ((r.y + r.h).ceil().max(0.0) as u32).min(self.height);
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                let p = self.pixel(x, y);
                if (0..3).all(|c| p[c].abs_diff(rgb[c]) <= tolerance) {
                    n += 1;
                }
            }
        }
        n
    }
}

/// `#rrggbb` as bytes.
pub fn hex_rgb(s: &str) -> [u8; 3] {
    let s = s.trim_start_matches('#');
    let v = u32::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad colour {s}"));
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

/// Decodes a PNG as Chromium writes them: 8-bit greyscale, grey+alpha, RGB or RGBA,
/// not interlaced. Chunk CRCs and the zlib checksum are verified.
pub fn decode_png(data: &[u8]) -> Result<Image, String> {
    const SIG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !data.starts_with(SIG) {
        return Err("not a PNG".into());
    }
    let mut pos = SIG.len();
    let mut header = None;
    let mut idat = Vec::new();
    loop {
        let len = be32(data, pos)? as usize;
        let kind = data.get(pos + 4..pos + 8).ok_or("truncated chunk")?;
        let body = data.get(pos + 8..pos + 8 + len).ok_or("truncated chunk")?;
        let crc = be32(data, pos + 8 + len)?;
        if crc32(&data[pos + 4..pos + 8 + len]) != crc {
            return Err(format!("bad CRC in {}", String::from_utf8_lossy(kind)));
        }
        match kind {
            b"IHDR" => {
                let (w, h) = (be32(body, 0)?, be32(body, 4)?);
                let (depth, colour, interlace) = (body[8], body[9], body[12]);
                if depth != 8 || interlace != 0 {
                    return Err(format!("unsupported depth {depth} / interlace {interlace}"));
                }
                let channels = match colour {
                    0 => 1,
                    4 => 2,
                    2 => 3,
                    6 => 4,
                    _ => return Err(format!("unsupported colour type {colour}")),
                };
                header = Some((w, h, channels));
            }
            b"IDAT" => idat.extend_from_slice(body),
            b"IEND" => break,
            _ => {}
        }
        pos += 12 + len;
    }
    let (w, h, ch) = header.ok_or("no IHDR")?;
    let raw = zlib_decompress(&idat)?;
    let stride = w as usize * ch;
    if raw.len() != h as usize * (stride + 1) {
        return Err(format!(
            "image data is {} bytes, expected {}",
            raw.len(),
            h as usize * (stride + 1)
        ));
    }
    let mut pixels = vec![0u8; h as usize * stride];
    for y in 0..h as usize {
        let filter = raw[y * (stride + 1)];
        let src = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        let (done, cur) = pixels.split_at_mut(y * stride);
        let prev = if y > 0 {
            &done[(y - 1) * stride..]
        } else {
            &[][..]
        };
        let cur = &mut cur[..stride];
        for i in 0..stride {
            let a = if i >= ch { cur[i - ch] } else { 0 };
            let b = prev.get(i).copied().unwrap_or(0);
            let c = if i >= ch {
                prev.get(i - ch).copied().unwrap_or(0)
            } else {
                0
            };
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((u16::from(a) + u16::from(b)) / 2) as u8,
                4 => paeth(a, b, c),
                f => return Err(format!("bad filter {f} in row {y}")),
            };
            cur[i] = src[i].wrapping_add(pred);
        }
    }
    let mut rgba = Vec::with_capacity(w as usize * h as usize * 4);
    for px in pixels.chunks_exact(ch) {
        match ch {
            1 => rgba.extend_from_slice(&[px[0], px[0], px[0], 255]),
            2 => rgba.extend_from_slice(&[px[0], px[0], px[0], px[1]]),
            3 => rgba.extend_from_slice(&[px[0], px[1], px[2], 255]),
            _ => rgba.extend_from_slice(px),
        }
    }
    Ok(Image {
        width: w,
        height: h,
        rgba,
    })
}

fn be32(d: &[u8], at: usize) -> Result<u32, String> {
    let b = d.get(at..at + 4).ok_or("truncated")?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = i16::from(a) + i16::from(b) - i16::from(c);
    let (pa, pb, pc) = (
        (p - i16::from(a)).abs(),
        (p - i16::from(b)).abs(),
        (p - i16::from(c)).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------------
// zlib / DEFLATE (RFC 1950 / 1951), decoding only: stored, fixed and dynamic Huffman blocks.
// Canonical Huffman codes are decoded one bit at a time (as zlib's `puff` does): slow next to
// a table decoder but short, and a screenshot decodes in well under a second.
// ---------------------------------------------------------------------------------------------

/// Decompresses a zlib stream (header, DEFLATE data, Adler-32 checked).
pub fn zlib_decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    if data.len() < 6 {
        return Err("zlib stream too short".into());
    }
    let (cmf, flg) = (data[0], data[1]);
    if cmf & 0x0f != 8 || (u16::from(cmf) * 256 + u16::from(flg)) % 31 != 0 || flg & 0x20 != 0 {
        return Err("bad zlib header".into());
    }
    let mut bits = Bits {
        data,
        pos: 2,
        buf: 0,
        n: 0,
    };
    let out = inflate(&mut bits)?;
    let at = bits.pos;
    let want = be32(data, at).map_err(|_| "missing Adler-32".to_string())?;
    if adler32(&out) != want {
        return Err("Adler-32 mismatch".into());
    }
    Ok(out)
}

fn adler32(d: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in d.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65_521;
        b %= 65_521;
    }
    (b << 16) | a
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u32,
    n: u32,
}

impl Bits<'_> {
    fn bits(&mut self, need: u32) -> Result<u32, String> {
        while self.n < need {
            let b = *self.data.get(self.pos).ok_or("DEFLATE data ends early")?;
            self.pos += 1;
            self.buf |= u32::from(b) << self.n;
            self.n += 8;
        }
        let v = self.buf & ((1u32 << need) - 1);
        self.buf >>= need;
        self.n -= need;
        Ok(v)
    }

    /// Drops the bits left in the current byte (before a stored block).
    fn align(&mut self) {
        self.buf = 0;
        self.n = 0;
    }
}

struct Huffman {
    count: [u16; 16],
    symbol: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Result<Huffman, String> {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[l as usize] += 1;
        }
        let mut left = 1i32;
        for &c in &count[1..] {
            left = left * 2 - i32::from(c);
            if left < 0 {
                return Err("over-subscribed Huffman code".into());
            }
        }
        let mut offs = [0u16; 16];
        for l in 1..15 {
            offs[l + 1] = offs[l] + count[l];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (s, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[offs[l as usize] as usize] = s as u16;
                offs[l as usize] += 1;
            }
        }
        Ok(Huffman { count, symbol })
    }

    fn decode(&self, bits: &mut Bits) -> Result<u16, String> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.bits(1)? as i32;
            let count = i32::from(self.count[len]);
            if code - first < count {
                return Ok(self.symbol[(index + code - first) as usize]);
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err("invalid Huffman code".into())
    }
}

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

fn inflate(bits: &mut Bits) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let last = bits.bits(1)? == 1;
        match bits.bits(2)? {
            0 => {
                bits.align();
                let len = bits
                    .data
                    .get(bits.pos..bits.pos + 4)
                    .ok_or("stored block cut")?;
                let n = u16::from_le_bytes([len[0], len[1]]);
                if n != !u16::from_le_bytes([len[2], len[3]]) {
                    return Err("stored block length check failed".into());
                }
                bits.pos += 4;
                let body = bits
                    .data
                    .get(bits.pos..bits.pos + n as usize)
                    .ok_or("stored block cut")?;
                out.extend_from_slice(body);
                bits.pos += n as usize;
            }
            1 => {
                let mut l = [0u8; 288];
                l[..144].fill(8);
                l[144..256].fill(9);
                l[256..280].fill(7);
                l[280..].fill(8);
                let lit = Huffman::new(&l)?;
                let dist = Huffman::new(&[5u8; 30])?;
                codes(bits, &mut out, &lit, &dist)?;
            }
            2 => {
                let nlen = bits.bits(5)? as usize + 257;
                let ndist = bits.bits(5)? as usize + 1;
                let ncode = bits.bits(4)? as usize + 4;
                let mut cl = [0u8; 19];
                for &i in &CL_ORDER[..ncode] {
                    cl[i] = bits.bits(3)? as u8;
                }
                let clh = Huffman::new(&cl)?;
                let mut lengths = Vec::with_capacity(nlen + ndist);
                while lengths.len() < nlen + ndist {
                    let sym = clh.decode(bits)?;
                    let (value, repeat) = match sym {
                        0..=15 => (sym as u8, 1),
                        16 => (
                            *lengths.last().ok_or("repeat with no previous length")?,
                            3 + bits.bits(2)?,
                        ),
                        17 => (0, 3 + bits.bits(3)?),
                        _ => (0, 11 + bits.bits(7)?),
                    };
                    for _ in 0..repeat {
                        lengths.push(value);
                    }
                }
                if lengths.len() != nlen + ndist {
                    return Err("code lengths overrun".into());
                }
                let lit = Huffman::new(&lengths[..nlen])?;
                let dist = Huffman::new(&lengths[nlen..])?;
                codes(bits, &mut out, &lit, &dist)?;
            }
            _ => return Err("invalid block type".into()),
        }
        if last {
            break;
        }
    }
    // Whole bytes taken into the bit buffer but not used belong to the trailer.
    bits.pos -= (bits.n / 8) as usize;
    Ok(out)
}

fn codes(bits: &mut Bits, out: &mut Vec<u8>, lit: &Huffman, dist: &Huffman) -> Result<(), String> {
    loop {
        let sym = lit.decode(bits)? as usize;
        match sym {
            0..=255 => out.push(sym as u8),
            256 => return Ok(()),
            257..=285 => {
                let i = sym - 257;
                let len = LEN_BASE[i] as usize + bits.bits(u32::from(LEN_EXTRA[i]))? as usize;
                let d = dist.decode(bits)? as usize;
                if d >= 30 {
                    return Err("invalid distance code".into());
                }
                let back = DIST_BASE[d] as usize + bits.bits(u32::from(DIST_EXTRA[d]))? as usize;
                if back > out.len() {
                    return Err("distance before the start".into());
                }
                let start = out.len() - back;
                for k in 0..len {
                    let b = out[start + k];
                    out.push(b);
                }
            }
            _ => return Err("invalid literal/length code".into()),
        }
    }
}
