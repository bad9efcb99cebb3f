//! Exec over the Sprites WebSocket: binary frames `[stream_id, ...payload]`.
//!
//! Server to client: `1` stdout, `2` stderr, `3` exit (`[3, code]`). Client to server: `0`
//! stdin, `4` stdin EOF. Text frames are JSON control messages (`session_info` first,
//! `error` when the command cannot start; `{"type":"signal"}` from the client kills).
//! WebSocket messages are framed, so output survives any re-chunking on the way.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use sandbox_core::{Error, ExecControl, ExecEvent, ExecRequest, Execution, ExitStatus, Result};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{ExecSocket, SpritesClient};
use crate::error;
use crate::SPRITES;

/// Stream ids of exec frames.
pub mod frame {
    /// Client to server: stdin bytes.
    pub const STDIN: u8 = 0;
    /// Server to client: stdout bytes.
    pub const STDOUT: u8 = 1;
    /// Server to client: stderr bytes.
    pub const STDERR: u8 = 2;
    /// Server to client: exit, one byte of exit code.
    pub const EXIT: u8 = 3;
    /// Client to server: end of stdin.
    pub const STDIN_EOF: u8 = 4;
}

/// Largest stdin frame sent.
const STDIN_FRAME: usize = 64 * 1024;
/// How long `exec` waits for the server to confirm the start before returning anyway.
const START_CONFIRMATION: Duration = Duration::from_secs(2);
/// How long a killed command may take to report its exit before we stop waiting.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// A decoded server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(u8),
    /// A stream id this client does not know (ignored, for forward compatibility).
    Unknown(u8),
}

/// Decodes one binary WebSocket message.
pub(crate) fn decode(msg: &[u8]) -> std::result::Result<Frame, String> {
    let (&id, payload) = msg.split_first().ok_or("empty frame")?;
    match id {
        frame::STDOUT => Ok(Frame::Stdout(Bytes::copy_from_slice(payload))),
        frame::STDERR => Ok(Frame::Stderr(Bytes::copy_from_slice(payload))),
        frame::EXIT => match payload {
            [code] => Ok(Frame::Exit(*code)),
            [] => Err("truncated exit frame (no exit code)".into()),
            _ => Err(format!("exit frame of {} bytes", msg.len())),
        },
        other => Ok(Frame::Unknown(other)),
    }
}

/// The query of an exec request: argv, program, cwd and env passed natively.
pub(crate) fn query(req: &ExecRequest) -> Vec<(&'static str, String)> {
    let mut q: Vec<(&'static str, String)> = req.argv.iter().map(|a| ("cmd", a.clone())).collect();
    if let Some(p) = req.argv.first() {
        q.push(("path", p.clone()));
    }
    if let Some(d) = &req.cwd {
        q.push(("dir", d.clone()));
    }
    for (k, v) in &req.env {
        q.push(("env", format!("{k}={v}")));
    }
    if req.stdin.is_some() {
        q.push(("stdin", "true".into()));
    }
    q
}

/// Starts a command in sprite `name`.
pub(crate) async fn start(
    client: &SpritesClient,
    name: &str,
    req: ExecRequest,
) -> Result<Execution> {
    if req.argv.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::invalid(
            "sandbox_command_required",
            "a command is required",
        ));
    }
    sandbox_core::shell::validate_env(&req.env)?;
    let socket = client.connect_exec(name, &query(&req)).await?;
    // Stdin goes out from its own task while output is read here: a server that stops
    // taking stdin until its output is read would otherwise wait on us forever.
    let (sink, mut socket) = socket.split();
    let (outgoing, outgoing_rx) = mpsc::channel(4);
    let (session_alive, session_gone) = oneshot::channel();
    tokio::spawn(write_loop(
        sink,
        req.stdin.clone(),
        outgoing_rx,
        session_gone,
        name.to_string(),
    ));

    // The first message tells whether the command started: `session_info`, output, or an
    // `error` control message (missing program, bad directory). A server that says nothing
    // for a while runs a silent command: do not hold the caller longer than that.
    let mut session_id = None;
    let mut early = None;
    match tokio::time::timeout(START_CONFIRMATION, socket.next()).await {
        Err(_) => {}
        Ok(Some(Ok(Message::Text(text)))) => match control(&text) {
            Ok(Control::SessionInfo(id)) => session_id = id,
            Ok(Control::Error(message)) => return Err(Error::StartFailed { message }),
            Ok(Control::Other) => {}
            Err(e) => return Err(error::malformed("exec", name, e)),
        },
        Ok(Some(Ok(msg))) => early = Some(msg),
        Ok(Some(Err(e))) => return Err(error::from_websocket("exec", name, &e)),
        Ok(None) => {
            return Err(Error::Transient {
                provider: SPRITES.into(),
                message: format!(
                    "exec (sprite {name}): connection closed before the command started"
                ),
            })
        }
    }

    let (events_tx, events_rx) = mpsc::channel(64);
    let (kill_tx, kill_rx) = mpsc::channel(1);
    let session = Session {
        name: name.to_string(),
        socket,
        outgoing,
        _alive: session_alive,
        events: events_tx,
        kills: kill_rx,
        timeout: req.timeout,
    };
    tokio::spawn(session.run(early));
    let events = futures::stream::unfold(events_rx, |mut rx| async move {
        rx.recv().await.map(|ev| (ev, rx))
    })
    .boxed();
    Ok(Execution {
        events,
        control: Some(Arc::new(Kill { tx: kill_tx })),
        external_id: session_id,
    })
}

enum Control {
    SessionInfo(Option<String>),
    Error(String),
    Other,
}

fn control(text: &str) -> std::result::Result<Control, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("control message: {e}"))?;
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    Ok(match kind {
        "session_info" => Control::SessionInfo(
            ["session_id", "id"]
                .iter()
                .find_map(|k| v.get(*k))
                .map(|id| {
                    id.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| id.to_string())
                }),
        ),
        "error" => Control::Error(
            ["message", "error", "data"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str))
                .unwrap_or("the command could not be started")
                .to_string(),
        ),
        _ => Control::Other,
    })
}

struct Kill {
    tx: mpsc::Sender<()>,
}

#[async_trait]
impl ExecControl for Kill {
    async fn kill(&self) -> Result<()> {
        // A full channel means a kill is already on its way; a closed one, that it ended.
        let _ = self.tx.try_send(());
        Ok(())
    }
}

/// Sends everything the client writes on the exec socket: stdin frames and EOF, with control
/// messages (a kill, a close) taking their turn between stdin frames. Ends on a close, a send
/// failure, or once the session is gone.
async fn write_loop(
    mut sink: SplitSink<ExecSocket, Message>,
    stdin: Option<Bytes>,
    mut outgoing: mpsc::Receiver<Message>,
    mut session_gone: oneshot::Receiver<()>,
    name: String,
) {
    if let Some(stdin) = stdin {
        let frames = stdin
            .chunks(STDIN_FRAME)
            .map(|chunk| [&[frame::STDIN][..], chunk].concat())
            .chain(std::iter::once(vec![frame::STDIN_EOF]));
        for data in frames {
            loop {
                match outgoing.try_recv() {
                    Ok(msg) => {
                        if !send_one(&mut sink, &name, msg).await {
                            return;
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            tokio::select! {
                going = send_one(&mut sink, &name, Message::Binary(data.into())) => if !going { return },
                _ = &mut session_gone => return,
            }
        }
    }
    while let Some(msg) = outgoing.recv().await {
        if !send_one(&mut sink, &name, msg).await {
            return;
        }
    }
}

/// Sends `msg`; whether the loop goes on (not after a close or a failure).
async fn send_one(sink: &mut SplitSink<ExecSocket, Message>, name: &str, msg: Message) -> bool {
    let close = matches!(msg, Message::Close(_));
    match sink.send(msg).await {
        Ok(()) => !close,
        Err(e) => {
            tracing::debug!(sprite = %name, error = %e, "exec socket write failed");
            false
        }
    }
}

struct Session {
    name: String,
    socket: SplitStream<ExecSocket>,
    /// To [`write_loop`].
    outgoing: mpsc::Sender<Message>,
    /// Dropped with the session, which stops a [`write_loop`] blocked on stdin.
    _alive: oneshot::Sender<()>,
    events: mpsc::Sender<Result<ExecEvent>>,
    kills: mpsc::Receiver<()>,
    timeout: Option<Duration>,
}

enum Step {
    Continue,
    Done,
}

impl Session {
    async fn run(mut self, early: Option<Message>) {
        let mut timed_out = false;
        let mut killed = false;
        let mut kill_deadline: Option<tokio::time::Instant> = None;
        // Once every `Kill` is dropped `recv` is ready at once: stop polling it then.
        let mut kills_open = true;
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        if let Some(msg) = early {
            if let Step::Done = self.on_message(msg, killed, timed_out).await {
                return;
            }
        }
        loop {
            let timer = async {
                match (kill_deadline, deadline) {
                    (Some(k), _) => tokio::time::sleep_until(k).await,
                    (None, Some(d)) if !killed => tokio::time::sleep_until(d).await,
                    _ => futures::future::pending().await,
                }
            };
            tokio::select! {
                msg = self.socket.next() => {
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            self.lost(killed, timed_out, Some(&e)).await;
                            return;
                        }
                        None => {
                            self.lost(killed, timed_out, None).await;
                            return;
                        }
                    };
                    if let Step::Done = self.on_message(msg, killed, timed_out).await {
                        return;
                    }
                }
                kill = self.kills.recv(), if !killed && kills_open => {
                    if kill.is_some() {
                        killed = true;
                        kill_deadline = Some(tokio::time::Instant::now() + KILL_GRACE);
                        self.send_kill().await;
                    } else {
                        kills_open = false;
                    }
                }
                () = timer => {
                    if kill_deadline.is_some() {
                        // The server never confirmed the kill: we know how it ended.
                        self.finish(killed_status(timed_out)).await;
                        return;
                    }
                    timed_out = true;
                    killed = true;
                    kill_deadline = Some(tokio::time::Instant::now() + KILL_GRACE);
                    self.send_kill().await;
                }
            }
        }
    }

    async fn send_kill(&mut self) {
        let msg = r#"{"type":"signal","signal":"SIGKILL"}"#;
        if let Err(e) = self.outgoing.try_send(Message::Text(msg.into())) {
            tracing::debug!(sprite = %self.name, error = %e, "could not send the kill signal");
        }
    }

    async fn on_message(&mut self, msg: Message, killed: bool, timed_out: bool) -> Step {
        match msg {
            Message::Binary(data) => match decode(&data) {
                Ok(Frame::Stdout(b)) => self.emit(Ok(ExecEvent::Stdout(b))).await,
                Ok(Frame::Stderr(b)) => self.emit(Ok(ExecEvent::Stderr(b))).await,
                Ok(Frame::Exit(code)) => {
                    let status = if killed && (code == 137 || code == 143) {
                        killed_status(timed_out)
                    } else if killed {
                        ExitStatus {
                            code: Some(i32::from(code)),
                            signal: None,
                            timed_out,
                        }
                    } else {
                        ExitStatus::code(i32::from(code))
                    };
                    self.finish(status).await;
                    Step::Done
                }
                Ok(Frame::Unknown(id)) => {
                    tracing::debug!(sprite = %self.name, id, "ignoring exec frame of unknown stream");
                    Step::Continue
                }
                Err(what) => {
                    let _ = self
                        .events
                        .send(Err(error::malformed("exec", &self.name, what)))
                        .await;
                    self.close();
                    Step::Done
                }
            },
            Message::Text(text) => match control(&text) {
                Ok(Control::Error(message)) => {
                    let _ = self
                        .events
                        .send(Err(Error::provider(
                            SPRITES,
                            format!("exec (sprite {}): {message}", self.name),
                        )))
                        .await;
                    Step::Done
                }
                Ok(_) => Step::Continue,
                Err(what) => {
                    let _ = self
                        .events
                        .send(Err(error::malformed("exec", &self.name, what)))
                        .await;
                    Step::Done
                }
            },
            Message::Close(_) => {
                self.lost(killed, timed_out, None).await;
                Step::Done
            }
            _ => Step::Continue,
        }
    }

    async fn emit(&mut self, ev: Result<ExecEvent>) -> Step {
        if self.events.send(ev).await.is_err() {
            // Nobody listens any more.
            self.close();
            return Step::Done;
        }
        Step::Continue
    }

    async fn finish(&mut self, status: ExitStatus) {
        let _ = self.events.send(Ok(ExecEvent::Exit(status))).await;
        // The server may keep the socket open after the exit frame: do not wait for it.
        self.close();
    }

    /// Asks [`write_loop`] to send a close frame; the socket goes with the session.
    fn close(&self) {
        let _ = self.outgoing.try_send(Message::Close(None));
    }

    /// The connection ended without an exit frame.
    async fn lost(
        &mut self,
        killed: bool,
        timed_out: bool,
        e: Option<&tokio_tungstenite::tungstenite::Error>,
    ) {
        if killed {
            // We asked for the kill; the server closing the session is its confirmation.
            self.finish(killed_status(timed_out)).await;
            return;
        }
        let err = match e {
            Some(e) => error::from_websocket("exec", &self.name, e),
            None => Error::Transient {
                provider: SPRITES.into(),
                message: format!(
                    "exec (sprite {}): connection closed before the exit frame",
                    self.name
                ),
            },
        };
        let _ = self.events.send(Err(err)).await;
    }
}

fn killed_status(timed_out: bool) -> ExitStatus {
    ExitStatus {
        code: None,
        signal: Some("SIGKILL".into()),
        timed_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_by_stream_id() {
        assert_eq!(
            decode(&[1, b'h', b'i']),
            Ok(Frame::Stdout(Bytes::from_static(b"hi")))
        );
        assert_eq!(decode(&[2]), Ok(Frame::Stderr(Bytes::new())));
        assert_eq!(decode(&[3, 7]), Ok(Frame::Exit(7)));
        assert_eq!(decode(&[9, 1]), Ok(Frame::Unknown(9)));
        assert!(decode(&[]).is_err());
        assert!(decode(&[3]).unwrap_err().contains("truncated"));
        assert!(decode(&[3, 0, 0]).is_err());
    }

    #[test]
    fn query_passes_argv_cwd_env_natively() {
        let req = ExecRequest::new(["echo", "a b", "$HOME"])
            .cwd("/home/sprite/x")
            .env("K", "v=1")
            .stdin(&b"in"[..]);
        let q = query(&req);
        assert_eq!(
            q,
            vec![
                ("cmd", "echo".to_string()),
                ("cmd", "a b".into()),
                ("cmd", "$HOME".into()),
                ("path", "echo".into()),
                ("dir", "/home/sprite/x".into()),
                ("env", "K=v=1".into()),
                ("stdin", "true".into()),
            ]
        );
        assert!(!query(&ExecRequest::new(["true"]))
            .iter()
            .any(|(k, _)| *k == "stdin"));
    }

    #[test]
    fn control_messages() {
        assert!(matches!(
            control(r#"{"type":"session_info","session_id":"42","tty":false}"#),
            Ok(Control::SessionInfo(Some(id))) if id == "42"
        ));
        assert!(matches!(
            control(r#"{"type":"error","message":"exec: \"nope\": not found"}"#),
            Ok(Control::Error(m)) if m.contains("nope")
        ));
        assert!(matches!(
            control(r#"{"type":"port_opened","port":3000}"#),
            Ok(Control::Other)
        ));
        assert!(control("{oops").is_err());
    }
}
