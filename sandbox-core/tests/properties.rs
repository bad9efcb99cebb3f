//! Properties of the codecs, shell quoting and path rules, over arbitrary input.

use std::process::Command;

use proptest::collection::vec;
use proptest::prelude::*;
use sandbox_core::paths::confine;
use sandbox_core::protocol::{output_data, OutputDecoder};
use sandbox_core::shell::sh_quote;
use sandbox_core::{ChunkType, ProcessChunk, ProcessId, SandboxId};
use serde_json::{Map, Value};

fn chunk_type() -> impl Strategy<Value = ChunkType> {
    proptest::sample::select(ChunkType::ALL.to_vec())
}

/// JSON values that survive a text round trip exactly (no floats: their last digit may move).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn data() -> impl Strategy<Value = Option<Map<String, Value>>> {
    proptest::option::of(
        proptest::collection::btree_map(any::<String>(), json_value(), 0..5)
            .prop_map(|m| m.into_iter().collect()),
    )
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Bytes that are sometimes arbitrary and sometimes valid UTF-8 full of multi-byte characters,
/// so both the invalid-byte and the split-character paths are exercised.
fn output_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..64),
        any::<String>().prop_map(String::into_bytes),
        "[a\u{0}é€😀\u{FFFD}]{0,24}".prop_map(String::into_bytes),
    ]
}

/// Splits `bytes` at the (sorted, clamped) cut points.
fn split_at<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for c in cuts {
        pieces.push(&bytes[start..c]);
        start = c;
    }
    pieces.push(&bytes[start..]);
    pieces
}

proptest! {
    #[test]
    fn chunks_survive_encode_then_decode(
        seq in 1u64..u64::MAX,
        kind in chunk_type(),
        data in data(),
    ) {
        let chunk = ProcessChunk::new(seq, kind, SandboxId::new(), ProcessId::new(), data);
        let line = chunk.encode();
        prop_assert!(line.ends_with('\n'));
        prop_assert_eq!(line.matches('\n').count(), 1, "one line: {}", line);
        let back = ProcessChunk::decode(&line).unwrap();
        prop_assert_eq!(&back, &chunk);
        // NUL is stripped from every string of the payload (InstantDB rejects it).
        let payload = Value::Object(back.data.unwrap_or_default());
        prop_assert!(!has_nul(&payload));
    }

    #[test]
    fn output_split_anywhere_decodes_to_the_same_bytes(
        bytes in output_bytes(),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        let mut decoder = OutputDecoder::new();
        let mut chunks = Vec::new();
        for piece in split_at(&bytes, &cuts) {
            let ready = decoder.push(piece);
            if !ready.is_empty() {
                chunks.push(output_data(&ready));
            }
        }
        let rest = decoder.finish();
        if !rest.is_empty() {
            chunks.push(output_data(&rest));
        }

        let sid = SandboxId::new();
        let pid = ProcessId::new();
        let mut joined = Vec::new();
        let mut texts = String::new();
        for (i, data) in chunks.into_iter().enumerate() {
            let line = ProcessChunk::new(i as u64 + 1, ChunkType::Stdout, sid, pid, Some(data)).encode();
            let chunk = ProcessChunk::decode(&line).unwrap();
            let text = chunk.text().unwrap().to_string();
            prop_assert!(!text.contains('\0'), "NUL in {:?}", text);
            texts.push_str(&text);
            joined.extend(chunk.output_bytes().unwrap());
        }
        prop_assert_eq!(&joined, &bytes);

        if let Ok(input) = std::str::from_utf8(&bytes) {
            // Valid input: the text is the input minus NUL, so no U+FFFD was introduced and no
            // character was cut at a split point.
            prop_assert_eq!(texts, input.replace('\0', ""));
        }
    }

    #[test]
    fn confine_never_leaves_the_root(
        root in proptest::sample::select(vec!["/", "/w", "/w/", "/home/user/ws", "/a/./b/../c"]),
        absolute in any::<bool>(),
        parts in vec(
            proptest::sample::select(vec!["", ".", "..", "a", "b", "w", "home", "user", "ws", "c", "..."]),
            0..8,
        ),
    ) {
        let path = format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"));
        let root_norm = lexical(root);
        if let Ok(p) = confine(root, &path) {
            prop_assert!(p.starts_with('/'));
            prop_assert!(
                p == root_norm || root_norm == "/" || p.starts_with(&format!("{root_norm}/")),
                "{} escaped {} as {}", path, root, p
            );
            prop_assert!(
                p.split('/').skip(1).all(|c| c != "." && c != ".." && (c.is_empty() == (p == "/"))),
                "{} is not normalised", p
            );
            // A confined path is a fixed point.
            prop_assert_eq!(confine(root, &p).unwrap(), p);
        }
    }
}

/// Lexical normalisation of an absolute path, for the property above.
fn lexical(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

proptest! {
    // Each case starts a shell: keep the count small.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sh_quote_round_trips_through_a_real_shell(s in "[^\u{0}]{0,32}") {
        if !std::path::Path::new("/bin/sh").exists() {
            eprintln!("skipping: /bin/sh is not available");
            return Ok(());
        }
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", sh_quote(&s)))
            .output()
            .unwrap();
        prop_assert!(out.status.success(), "{:?}", out);
        prop_assert_eq!(String::from_utf8(out.stdout).unwrap(), s);
    }
}

#[test]
fn sh_quote_handles_shell_metacharacters() {
    for s in [
        "'", "''", "$(id)", "`id`", "a\nb", "\\", "%s %d", "-n", "*", "\"'\"", "!x",
    ] {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", sh_quote(s)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), s, "{s:?}");
    }
}
