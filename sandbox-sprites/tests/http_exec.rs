//! The emulator's HTTP exec (`POST /v1/sprites/{name}/exec`): frames without length, one per
//! HTTP chunk, as the API defines it. The provider uses the WebSocket; this pins the
//! emulator's fidelity for clients that use HTTP.

use futures::StreamExt;
use sandbox_core::{CreateRequest, Env, Provider, SandboxConfig, SandboxId};
use sandbox_sprites::SpritesProvider;
use sandbox_testkit::sprites::SpritesEmulator;

async fn sprite(emu: &SpritesEmulator) -> String {
    let env = Env::from_pairs([
        ("SPRITES_API_TOKEN", emu.token().to_string()),
        ("SPRITES_API_BASE_URL", emu.base_url()),
    ]);
    let p = SpritesProvider::from_config(&SandboxConfig::default(), &env).unwrap();
    p.create(&CreateRequest {
        sandbox_id: SandboxId::new(),
        config: SandboxConfig::default(),
    })
    .await
    .unwrap()
    .external_id
}

/// Each body chunk is one frame, as the official SDK reads it.
async fn frames(
    emu: &SpritesEmulator,
    name: &str,
    query: &[(&str, &str)],
    stdin: &[u8],
) -> (Vec<Vec<u8>>, bool) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sprites/{name}/exec", emu.base_url()))
        .bearer_auth(emu.token())
        .query(query)
        .header("content-type", "application/octet-stream")
        .body(stdin.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut out = Vec::new();
    let mut broken = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => out.push(c.to_vec()),
            Err(_) => broken = true,
        }
    }
    (out, broken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_exec_streams_one_frame_per_chunk_and_ends_with_the_exit_frame() {
    let emu = SpritesEmulator::start("t").await.unwrap();
    let name = sprite(&emu).await;
    let (frames, broken) = frames(
        &emu,
        &name,
        &[
            ("cmd", "sh"),
            ("cmd", "-c"),
            ("cmd", "cat; sleep 0.1; echo err >&2; exit 5"),
            ("path", "sh"),
            ("stdin", "true"),
        ],
        b"from stdin",
    )
    .await;
    assert!(!broken);
    assert_eq!(
        frames,
        vec![
            b"\x01from stdin".to_vec(),
            b"\x02err\n".to_vec(),
            vec![3, 5]
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_http_exec_ends_without_an_exit_frame() {
    let emu = SpritesEmulator::start("t").await.unwrap();
    let name = sprite(&emu).await;
    emu.drop_next_exec();
    let (frames, broken) = frames(
        &emu,
        &name,
        &[
            ("cmd", "sh"),
            ("cmd", "-c"),
            ("cmd", "echo one; sleep 5; echo two"),
        ],
        b"",
    )
    .await;
    assert!(broken, "the body must end in an error, not cleanly");
    assert!(!frames.iter().any(|f| f.first() == Some(&3)), "{frames:?}");
}
