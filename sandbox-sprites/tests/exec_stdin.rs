//! Stdin is sent while output is read: a server that echoes each stdin frame before reading
//! the next (as a streaming server does once its buffers are full) never deadlocks the client.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sandbox_core::{
    Env, ExecEvent, ExecRequest, Provider, ResumeRequest, SandboxConfig, SandboxId,
};
use sandbox_sprites::SpritesProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Serves `GET /v1/sprites/echo` and, on `/exec`, a WebSocket that answers every stdin frame
/// `[0, ..]` with the same bytes as stdout `[1, ..]` before reading on, and `[4]` with exit 0.
async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = [0u8; 2048];
                let n = tcp.peek(&mut head).await.unwrap();
                let first_line = String::from_utf8_lossy(&head[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                if !first_line.contains("/exec") {
                    let _ = tcp.read(&mut head).await;
                    let body = r#"{"id":"s-1","name":"echo","url":"https://echo.sprites.app","status":"warm"}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(resp.as_bytes()).await;
                    return;
                }
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                let info = r#"{"type":"session_info","session_id":"1","tty":false}"#;
                ws.send(Message::Text(info.into())).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Binary(data) = msg else { continue };
                    match data.first() {
                        Some(0) => {
                            let mut out = data.to_vec();
                            out[0] = 1;
                            if ws.send(Message::Binary(out.into())).await.is_err() {
                                return;
                            }
                        }
                        Some(4) => {
                            let _ = ws.send(Message::Binary(vec![3u8, 0].into())).await;
                            return;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_stdin_is_sent_while_output_is_read() {
    let base_url = echo_server().await;
    let env = Env::from_pairs([
        ("SPRITES_API_TOKEN", "t".to_string()),
        ("SPRITES_API_BASE_URL", base_url),
    ]);
    let p = SpritesProvider::from_config(&SandboxConfig::default(), &env).unwrap();
    let sb = p
        .resume(&ResumeRequest {
            sandbox_id: SandboxId::new(),
            external_id: "echo".into(),
            url: None,
            params: serde_json::Value::Null,
        })
        .await
        .unwrap();
    // More than the socket buffers of both ends can hold.
    let input: Vec<u8> = (0..=255u8).cycle().take(48 << 20).collect();
    let run = async {
        let mut exec = sb
            .exec(ExecRequest::new(["cat"]).stdin(input.clone()))
            .await?;
        let mut out = Vec::with_capacity(input.len());
        let mut exit = None;
        while let Some(ev) = exec.events.next().await {
            match ev? {
                ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                ExecEvent::Stderr(_) => {}
                ExecEvent::Exit(e) => exit = Some(e),
            }
        }
        Ok::<_, sandbox_core::Error>((out, exit))
    };
    let (out, exit) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("stdin and stdout flow at the same time")
        .unwrap();
    assert!(exit.expect("an exit frame").success());
    assert_eq!(out.len(), input.len());
    assert!(out == input, "the echo differs from the input");
}
