//! A headless chromium a test can click in: the DevTools protocol over
//! `--remote-debugging-pipe` (JSON messages ending in a NUL byte, commands on the browser's fd
//! 3, answers and events on its fd 4). A shell gives chromium our stdin as fd 3 and our stdout as
//! fd 4, so no descriptor juggling is needed here. Loopback pages only.

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde_json::{json, Value};

/// How long one protocol command may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// One chromium with one page open; stopped (killed) and its profile removed when dropped.
pub struct Browser {
    child: Child,
    to: ChildStdin,
    from: Receiver<Value>,
    next_id: u64,
    session: String,
    profile: PathBuf,
}

/// Debian's chromium, or `$TETHER_CHROMIUM`; `None` if neither runs.
pub fn chromium() -> Option<PathBuf> {
    let candidates = [std::env::var("TETHER_CHROMIUM").unwrap_or_default(), "chromium".into()];
    candidates.iter().filter(|c| !c.is_empty()).find_map(|c| {
        let out = Command::new(c).arg("--version").output().ok()?;
        out.status.success().then(|| PathBuf::from(c))
    })
}

impl Browser {
    /// Starts headless `chromium` with a window of `width` x `height` and opens `url`.
    pub fn open(chromium: &Path, url: &str, (width, height): (u32, u32)) -> io::Result<Browser> {
        let profile = std::env::temp_dir().join(format!(
            "tether-browser-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.display()),
                "about:blank",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let to = child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?;
        let out = child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
        let (tx, from) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                message.clear();
            }
        });
        let mut b = Browser { child, to, from, next_id: 0, session: String::new(), profile };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }), false)?;
        let target_id = target["targetId"].as_str().unwrap_or_default().to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
            false,
        )?;
        b.session = attached["sessionId"].as_str().unwrap_or_default().to_string();
        b.call("Page.navigate", json!({ "url": url }), true)?;
        Ok(b)
    }

    /// Sends one command (to the page when `page`, else to the browser) and waits for its
    /// answer; events that come meanwhile are skipped.
    fn call(&mut self, method: &str, params: Value, page: bool) -> io::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if page {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).map_err(io::Error::other)?;
        bytes.push(0);
        self.to.write_all(&bytes)?;
        let end = Instant::now() + ANSWER_WITHIN;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let v = self.from.recv_timeout(left).map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, format!("{method}: no answer"))
            })?;
            if v["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(io::Error::other(format!("{method}: {e}")));
            }
            return Ok(v["result"].clone());
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub fn eval(&mut self, expression: &str) -> io::Result<Value> {
        let params =
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let r = self.call("Runtime.evaluate", params, true)?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(io::Error::other(format!("{expression}: {e}")));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` until it is truthy (or `timeout`); returns the last value.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) -> io::Result<Value> {
        let end = Instant::now() + timeout;
        loop {
            let v = self.eval(expression).unwrap_or(Value::Null);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy || Instant::now() >= end {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(100)); // polling the page's state
        }
    }

    /// Writes a PNG of the page as it is now.
    pub fn screenshot(&mut self, path: &Path) -> io::Result<()> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }), true)?;
        let data = r["data"].as_str().ok_or_else(|| io::Error::other("no screenshot data"))?;
        std::fs::write(path, base64_decode(data)?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Standard base64 (RFC 4648, with padding), as the protocol sends images.
fn base64_decode(text: &str) -> io::Result<Vec<u8>> {
    let value = |c: u8| -> io::Result<u32> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(io::Error::other(format!("not base64: {:?}", c as char))),
        } as u32)
    };
    let clean: Vec<u8> = text.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_strings() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8hIQ==").unwrap(), b"hello!!");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert!(base64_decode("a$==").is_err());
    }
}
