//! Exec over the WebSocket under load: large output, concurrent commands, interleaving.

use std::sync::Arc;

use futures::StreamExt;
use sandbox_core::{
    CreateRequest, Env, ExecEvent, ExecRequest, Provider, SandboxConfig, SandboxHandle, SandboxId,
};
use sandbox_sprites::SpritesProvider;
use sandbox_testkit::sprites::SpritesEmulator;

struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exits: Vec<sandbox_core::ExitStatus>,
}

async fn run(sb: &dyn SandboxHandle, req: ExecRequest) -> Output {
    let mut exec = sb.exec(req).await.unwrap();
    let mut o = Output {
        stdout: vec![],
        stderr: vec![],
        exits: vec![],
    };
    while let Some(ev) = exec.events.next().await {
        match ev.unwrap() {
            ExecEvent::Stdout(b) => o.stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => o.stderr.extend_from_slice(&b),
            ExecEvent::Exit(e) => o.exits.push(e),
        }
    }
    o
}

async fn sprite(emu: &SpritesEmulator) -> Arc<dyn SandboxHandle> {
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
    .handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabytes_of_output_arrive_whole_on_both_streams() {
    let emu = SpritesEmulator::start("t").await.unwrap();
    let sb = sprite(&emu).await;
    let o = run(
        sb.as_ref(),
        ExecRequest::shell(
            "head -c 3000000 /dev/zero | tr '\\0' o; head -c 1000000 /dev/zero | tr '\\0' e >&2",
        ),
    )
    .await;
    assert_eq!(o.exits.len(), 1);
    assert!(o.exits[0].success());
    assert_eq!(o.stdout.len(), 3_000_000);
    assert!(o.stdout.iter().all(|b| *b == b'o'));
    assert_eq!(o.stderr.len(), 1_000_000);
    assert!(o.stderr.iter().all(|b| *b == b'e'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_keep_their_own_output_and_exit_codes() {
    let emu = SpritesEmulator::start("t").await.unwrap();
    let sb = sprite(&emu).await;
    let runs = (0..8).map(|i| {
        let sb = sb.clone();
        async move {
            let o = run(
                sb.as_ref(),
                ExecRequest::new(["sh", "-c", "printf \"$N\"; exit \"$N\""])
                    .env("N", i.to_string()),
            )
            .await;
            (i, o)
        }
    });
    for (i, o) in futures::future::join_all(runs).await {
        assert_eq!(o.stdout, i.to_string().as_bytes());
        assert_eq!(o.exits.len(), 1);
        assert_eq!(o.exits[0].code, Some(i));
    }
    assert_eq!(emu.running_commands(&emu.sprite_names()[0]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_binary_stdin_round_trips_through_cat() {
    let emu = SpritesEmulator::start("t").await.unwrap();
    let sb = sprite(&emu).await;
    let input: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let o = run(sb.as_ref(), ExecRequest::new(["cat"]).stdin(input.clone())).await;
    assert!(o.exits[0].success());
    assert_eq!(o.stdout, input);
}
