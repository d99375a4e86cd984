//! Headless Chromium (Debian's `chromium` package) for page tests, and its screenshots decoded
//! with the `png` crate.
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

/// Decodes a PNG (any colour type and depth; `png` expands palettes and low depths and
/// strips 16-bit samples) into 8-bit RGBA. Chunk CRCs and the zlib checksum are verified.
pub fn decode_png(data: &[u8]) -> Result<Image, String> {
    use png::{ColorType, Transformations};
    let mut decoder = png::Decoder::new(std::io::Cursor::new(data));
    decoder.set_transformations(Transformations::EXPAND | Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let size = reader.output_buffer_size().ok_or("image too large")?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    buf.truncate(info.line_size * info.height as usize);
    let ch = match info.color_type {
        ColorType::Grayscale => 1,
        ColorType::GrayscaleAlpha => 2,
        ColorType::Rgb => 3,
        ColorType::Rgba => 4,
        ColorType::Indexed => return Err("palette not expanded".into()),
    };
    let mut rgba = Vec::with_capacity(info.width as usize * info.height as usize * 4);
    for row in buf.chunks_exact(info.line_size) {
        for px in row[..info.width as usize * ch].chunks_exact(ch) {
            match ch {
                1 => rgba.extend_from_slice(&[px[0], px[0], px[0], 255]),
                2 => rgba.extend_from_slice(&[px[0], px[0], px[0], px[1]]),
                3 => rgba.extend_from_slice(&[px[0], px[1], px[2], 255]),
                _ => rgba.extend_from_slice(px),
            }
        }
    }
    Ok(Image {
        width: info.width,
        height: info.height,
        rgba,
    })
}

/// Decompresses a zlib stream (RFC 1950; the Adler-32 checksum is verified).
pub fn zlib_decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}
