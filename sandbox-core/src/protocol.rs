//! The process-log protocol, wire-compatible with the TypeScript package.
//!
//! A log is NDJSON: one [`ProcessChunk`] per line,
//! `{"version":1,"at":"<ISO-8601>","seq":N,"type":"stdout","sandboxId":"…","processId":"…","data":{…}}`.
//!
//! Output text is always valid UTF-8: [`OutputDecoder`] carries a character split across two
//! reads over to the next chunk instead of replacing it with U+FFFD. Bytes that are not UTF-8
//! (or NUL bytes, which InstantDB rejects and are removed from `text`) are kept losslessly in an
//! additive `data.base64` field holding the exact raw bytes; old readers ignore it.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::id::{ProcessId, SandboxId};
use crate::record::now_ms;

/// The only protocol version.
pub const PROTOCOL_VERSION: u64 = 1;

/// Type of a chunk (upstream `SANDBOX_PROCESS_STREAM_CHUNK_TYPES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkType {
    /// `{status, command, args, cwd}` when the process starts.
    Status,
    /// `{text[, base64]}`.
    Stdout,
    /// `{text[, base64]}`.
    Stderr,
    /// `{exitCode, status[, signal]}`: the last chunk of a process that ended.
    Exit,
    /// `{message}`.
    Error,
    /// Free-form keep-alive.
    Heartbeat,
    /// Free-form metadata.
    Metadata,
}

impl ChunkType {
    /// Every type.
    pub const ALL: [ChunkType; 7] = [
        ChunkType::Status,
        ChunkType::Stdout,
        ChunkType::Stderr,
        ChunkType::Exit,
        ChunkType::Error,
        ChunkType::Heartbeat,
        ChunkType::Metadata,
    ];

    /// The wire string.
    pub fn as_str(&self) -> &'static str {
        match self {
            ChunkType::Status => "status",
            ChunkType::Stdout => "stdout",
            ChunkType::Stderr => "stderr",
            ChunkType::Exit => "exit",
            ChunkType::Error => "error",
            ChunkType::Heartbeat => "heartbeat",
            ChunkType::Metadata => "metadata",
        }
    }

    /// Parses the wire string.
    ///
    /// # Errors
    /// Unknown type: invalid input.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "invalid_chunk_type",
                    format!(
                        "unknown chunk type {s:?}; expected one of: stdout, stderr, status, exit, error, heartbeat, metadata"
                    ),
                )
            })
    }
}

impl fmt::Display for ChunkType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a process log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessChunk {
    /// Always 1.
    pub version: u64,
    /// ISO-8601 time with milliseconds, UTC (`2026-01-05T10:30:00.000Z`).
    pub at: String,
    /// 1-based sequence number.
    pub seq: u64,
    /// Chunk type.
    #[serde(rename = "type")]
    pub kind: ChunkType,
    /// Sandbox id (kept as text so foreign logs still parse).
    pub sandbox_id: String,
    /// Process id.
    pub process_id: String,
    /// Payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
}

impl ProcessChunk {
    /// A chunk stamped with the current time; string values in `data` are NUL-stripped.
    pub fn new(
        seq: u64,
        kind: ChunkType,
        sandbox_id: SandboxId,
        process_id: ProcessId,
        data: Option<Map<String, Value>>,
    ) -> Self {
        ProcessChunk {
            version: PROTOCOL_VERSION,
            at: iso8601_ms(now_ms()),
            seq,
            kind,
            sandbox_id: sandbox_id.to_string(),
            process_id: process_id.to_string(),
            data: data.map(|m| match strip_nul_value(Value::Object(m)) {
                Value::Object(m) => m,
                _ => unreachable!("an object stays an object"),
            }),
        }
    }

    /// The NDJSON line, with its trailing `\n`.
    pub fn encode(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a chunk always serialises");
        s.push('\n');
        s
    }

    /// Parses one NDJSON line (surrounding whitespace ignored).
    ///
    /// # Errors
    /// Not a JSON object, or missing/mistyped fields: `invalid_sandbox_process_stream_chunk`.
    /// A version other than 1: `invalid_sandbox_process_stream_version:<v>`.
    pub fn decode(line: &str) -> Result<Self> {
        let invalid = |why: String| {
            Error::protocol(
                "invalid_sandbox_process_stream_chunk",
                format!("invalid_sandbox_process_stream_chunk: {why}"),
            )
        };
        let value: Value =
            serde_json::from_str(line.trim()).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| invalid("not a JSON object".into()))?;
        match obj.get("version") {
            Some(v) if v.as_u64() == Some(PROTOCOL_VERSION) => {}
            Some(v) => {
                let shown = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                return Err(Error::protocol(
                    format!("invalid_sandbox_process_stream_version:{shown}"),
                    format!("invalid_sandbox_process_stream_version:{shown}"),
                ));
            }
            None => {
                return Err(Error::protocol(
                    "invalid_sandbox_process_stream_version:undefined",
                    "invalid_sandbox_process_stream_version:undefined",
                ))
            }
        }
        serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
    }

    /// `data.text` of an output chunk.
    pub fn text(&self) -> Option<&str> {
        self.data.as_ref()?.get("text")?.as_str()
    }

    /// The exact bytes of an output chunk: `data.base64` when present, else `data.text`.
    pub fn output_bytes(&self) -> Option<Vec<u8>> {
        let data = self.data.as_ref()?;
        if let Some(b64) = data.get("base64").and_then(Value::as_str) {
            return base64::engine::general_purpose::STANDARD.decode(b64).ok();
        }
        data.get("text")
            .and_then(Value::as_str)
            .map(|t| t.as_bytes().to_vec())
    }
}

/// The payload of an output chunk for `bytes` that are a whole number of characters (or end
/// the stream): `{text}` when they are valid UTF-8 without NUL, else
/// `{text: <lossy, NUL-stripped>, base64: <exact bytes>}`.
pub fn output_data(bytes: &[u8]) -> Map<String, Value> {
    let mut m = Map::new();
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => {
            m.insert("text".into(), Value::String(s.to_string()));
        }
        _ => {
            let lossy = String::from_utf8_lossy(bytes).replace('\0', "");
            m.insert("text".into(), Value::String(lossy));
            m.insert(
                "base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
    }
    m
}

/// Splits a byte stream into pieces that never cut a UTF-8 character in two.
///
/// Feed each read to [`OutputDecoder::push`]; it returns the bytes that are ready (everything
/// but an incomplete character at the end, which it carries to the next read). Call
/// [`OutputDecoder::finish`] at the end of the stream for whatever is left.
#[derive(Debug, Default, Clone)]
pub struct OutputDecoder {
    carry: Vec<u8>,
}

impl OutputDecoder {
    /// A decoder with nothing carried.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one read; returns the bytes ready to emit (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        let keep = incomplete_suffix_len(&buf);
        self.carry = buf.split_off(buf.len() - keep);
        buf
    }

    /// Bytes carried over, emitted at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }

    /// Whether bytes are being carried.
    pub fn has_carry(&self) -> bool {
        !self.carry.is_empty()
    }
}

/// Length of a trailing incomplete-but-valid UTF-8 prefix (0..=3 bytes).
fn incomplete_suffix_len(buf: &[u8]) -> usize {
    // Look back at most 3 bytes for the lead byte of the last character.
    let n = buf.len();
    for back in 1..=3.min(n) {
        let b = buf[n - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte
        }
        let need = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0, // ASCII or invalid lead: nothing to wait for
        };
        if need <= back {
            return 0; // complete (or over-long, which is invalid anyway)
        }
        // Only carry what could still become a valid character.
        return if plausible_prefix(&buf[n - back..]) {
            back
        } else {
            0
        };
    }
    0
}

fn plausible_prefix(tail: &[u8]) -> bool {
    let lead = tail[0];
    if let Some(&second) = tail.get(1) {
        let ok = match lead {
            0xE0 => (0xA0..=0xBF).contains(&second),
            0xED => (0x80..=0x9F).contains(&second),
            0xF0 => (0x90..=0xBF).contains(&second),
            0xF4 => (0x80..=0x8F).contains(&second),
            _ => (0x80..=0xBF).contains(&second),
        };
        if !ok {
            return false;
        }
    }
    tail[1..].iter().all(|b| b & 0b1100_0000 == 0b1000_0000)
}

/// Removes every NUL character.
pub fn strip_nul(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_string()
    }
}

/// Removes NUL from every string inside a JSON value (keys included).
pub fn strip_nul_value(v: Value) -> Value {
    match v {
        Value::String(s) if s.contains('\0') => Value::String(strip_nul(&s)),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nul_value).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (strip_nul(&k), strip_nul_value(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Formats epoch milliseconds as ISO-8601 UTC with milliseconds, like JavaScript's
/// `Date.prototype.toISOString`.
pub fn iso8601_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Joins output chunks back into the exact bytes of stdout and stderr.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// stdout bytes.
    pub stdout: Vec<u8>,
    /// stderr bytes.
    pub stderr: Vec<u8>,
    /// Exit code from the `exit` chunk.
    pub exit_code: Option<i64>,
    /// Status from the `exit` chunk.
    pub status: Option<String>,
    /// Messages of `error` chunks.
    pub errors: Vec<String>,
}

impl Transcript {
    /// Adds one chunk.
    pub fn push(&mut self, chunk: &ProcessChunk) {
        match chunk.kind {
            ChunkType::Stdout => self.stdout.extend(chunk.output_bytes().unwrap_or_default()),
            ChunkType::Stderr => self.stderr.extend(chunk.output_bytes().unwrap_or_default()),
            ChunkType::Exit => {
                let data = chunk.data.as_ref();
                self.exit_code = data.and_then(|d| d.get("exitCode")).and_then(Value::as_i64);
                self.status = data
                    .and_then(|d| d.get("status"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            ChunkType::Error => {
                if let Some(m) = chunk
                    .data
                    .as_ref()
                    .and_then(|d| d.get("message"))
                    .and_then(Value::as_str)
                {
                    self.errors.push(m.to_string());
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_the_upstream_shape() {
        let sid = SandboxId::new();
        let pid = ProcessId::new();
        let c = ProcessChunk::new(
            2,
            ChunkType::Stdout,
            sid,
            pid,
            Some(output_data(b"hi\0 there")),
        );
        let line = c.encode();
        assert!(line.ends_with('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        // Keys appear in upstream's order.
        let positions: Vec<_> = [
            "version",
            "at",
            "seq",
            "type",
            "sandboxId",
            "processId",
            "data",
        ]
        .iter()
        .map(|k| line.find(&format!("\"{k}\":")).unwrap())
        .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert!(line.starts_with("{\"version\":1,\"at\":\""));
        assert_eq!(v["type"], "stdout");
        assert_eq!(v["data"]["text"], "hi there");
        assert_eq!(c.output_bytes().unwrap(), b"hi\0 there");
        assert_eq!(ProcessChunk::decode(&line).unwrap(), c);
    }

    #[test]
    fn decode_errors_use_upstream_codes() {
        assert_eq!(
            ProcessChunk::decode("[1]").unwrap_err().code(),
            "invalid_sandbox_process_stream_chunk"
        );
        assert_eq!(
            ProcessChunk::decode("nope").unwrap_err().code(),
            "invalid_sandbox_process_stream_chunk"
        );
        let v2 =
            json!({"version":2,"at":"x","seq":1,"type":"stdout","sandboxId":"a","processId":"b"});
        assert_eq!(
            ProcessChunk::decode(&v2.to_string()).unwrap_err().code(),
            "invalid_sandbox_process_stream_version:2"
        );
        let bad_type =
            json!({"version":1,"at":"x","seq":1,"type":"bogus","sandboxId":"a","processId":"b"});
        assert_eq!(
            ProcessChunk::decode(&bad_type.to_string())
                .unwrap_err()
                .code(),
            "invalid_sandbox_process_stream_chunk"
        );
    }

    #[test]
    fn split_characters_are_carried_not_replaced() {
        let text = "né€😀".as_bytes();
        for cut in 0..=text.len() {
            let mut d = OutputDecoder::new();
            let mut out = d.push(&text[..cut]);
            assert!(std::str::from_utf8(&out).is_ok(), "cut {cut}");
            out.extend(d.push(&text[cut..]));
            out.extend(d.finish());
            assert_eq!(out, text);
        }
        let mut d = OutputDecoder::new();
        assert_eq!(d.push(&[0xF0, 0x9F]), Vec::<u8>::new());
        assert!(d.has_carry());
        assert_eq!(d.push(&[0x98, 0x80]), "😀".as_bytes());
    }

    #[test]
    fn invalid_bytes_are_not_carried_forever() {
        let mut d = OutputDecoder::new();
        // 0xFF is never valid: emitted at once, preserved in base64 by output_data.
        assert_eq!(d.push(&[b'a', 0xFF]), vec![b'a', 0xFF]);
        let data = output_data(&[b'a', 0xFF]);
        assert!(data.contains_key("base64"));
        // 0xE0 0x80 can never become valid.
        assert_eq!(d.push(&[0xE0, 0x80]), vec![0xE0, 0x80]);
    }

    #[test]
    fn iso8601_matches_javascript() {
        assert_eq!(iso8601_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_ms(1_767_609_000_123), "2026-01-05T10:30:00.123Z");
        assert_eq!(iso8601_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
