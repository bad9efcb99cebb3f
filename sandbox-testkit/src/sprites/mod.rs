//! A stateful emulator of the Sprites API (sprites.dev) on `127.0.0.1:0`.
//!
//! It serves the endpoints the `sprites` provider uses with the real wire formats: sprite
//! CRUD (`/v1/sprites`, snake_case JSON, 201/204/404/409); exec over WebSocket (binary frames
//! `[stream_id, ...payload]`: `1` stdout, `2` stderr, `3` exit from the server; `0` stdin, `4`
//! stdin EOF from the client; JSON text control messages) and over HTTP (`POST`, the same
//! frames without length, one per chunk); exec session list and kill; the filesystem API
//! (`fs/write` raw bytes with `mkdirParents`/`mkdir`, `fs/read` with `ENOENT` bodies); and
//! checkpoints (NDJSON `info`/`complete`/`error` streams, the list as a bare JSON array).
//! Every request must carry `Authorization: Bearer <token>`.
//!
//! Commands run for real through the `local` provider (`sandbox-local`): each sprite is a
//! local sandbox whose workspace is the sprite's `/` (with `/home/sprite` created), so commands
//! run with the strongest isolation the machine offers (`SANDBOX_LOCAL_ISOLATION` chooses), a
//! file written by a command is read back through `fs/read`, and a restored checkpoint (the
//! local provider's workspace snapshot) really brings files back. Paths in requests are
//! translated; paths a command prints are host paths.
//!
//! Fault switches: [`SpritesEmulator::fail_next`],
//! [`SpritesEmulator::fail_next_after_handling`], [`SpritesEmulator::rate_limit_next`],
//! [`SpritesEmulator::drop_next_exec`], [`SpritesEmulator::truncate_next_exec`],
//! [`SpritesEmulator::corrupt_next_json`], [`SpritesEmulator::fail_next_checkpoint`],
//! [`SpritesEmulator::set_latency`]; every request is logged ([`SpritesEmulator::requests`]).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let emulator = sandbox_testkit::sprites::SpritesEmulator::start("test-token").await?;
//! // SPRITES_API_BASE_URL=<this> SPRITES_API_TOKEN=test-token sandbox run --provider sprites -- ls
//! println!("{}", emulator.base_url());
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

use sandbox_core::{
    CreateRequest, Env, ExecControl, ExecEvent, ExecRequest, ExitStatus, FileWrite, Provider,
    SandboxConfig, SandboxHandle, SandboxId, StopMode,
};
use sandbox_local::LocalProvider;

/// One logged request: method, path (without query) and when it arrived.
pub type RequestLogEntry = (String, String, Instant);

/// Largest `fs/write` body, as the real API.
const MAX_FS_WRITE: usize = 16 * 1024 * 1024;
/// Largest HTTP exec stdin, as the real API.
const MAX_EXEC_STDIN: usize = 10 * 1024 * 1024;

/// A running Sprites API emulator. Dropping it stops the server and kills every command it
/// started.
pub struct SpritesEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl fmt::Debug for SpritesEmulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpritesEmulator")
            .field("base_url", &self.base_url())
            .finish_non_exhaustive()
    }
}

struct Shared {
    token: String,
    /// Holds the local sandboxes; removed with the emulator.
    _root: tempfile::TempDir,
    sprites: Mutex<BTreeMap<String, Sprite>>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<RequestLogEntry>>,
    latency: Mutex<Duration>,
    next_id: AtomicU64,
    local: LocalProvider,
}

#[derive(Default)]
struct Faults {
    fail: VecDeque<u16>,
    fail_after: VecDeque<u16>,
    rate_limit: VecDeque<Duration>,
    drop_exec: u32,
    truncate_exec: u32,
    corrupt_json: u32,
    checkpoint_error: Option<String>,
    hide_checkpoint_ids: bool,
    /// Status of a create whose name is taken, when not 409.
    exists_status: Option<u16>,
}

struct Sprite {
    id: String,
    name: String,
    url_auth: String,
    /// The JSON body of the `POST /v1/sprites` that made it.
    create_body: Value,
    created_at: String,
    status: &'static str,
    /// The local sandbox whose workspace is this sprite's `/`.
    handle: Arc<dyn SandboxHandle>,
    root: PathBuf,
    checkpoints: Vec<CheckpointState>,
    sessions: BTreeMap<u64, Session>,
}

struct CheckpointState {
    id: String,
    create_time: String,
    comment: Option<String>,
    local_id: String,
}

struct Session {
    command: String,
    workdir: String,
    created: String,
    control: Option<Arc<dyn ExecControl>>,
    kill: Arc<Notify>,
}

impl Sprite {
    fn fs(&self) -> PathBuf {
        self.root.clone()
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "organization": "emulator",
            "url": format!("https://{}-emu.sprites.app", self.name),
            "url_settings": { "auth": self.url_auth },
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.created_at,
        })
    }

    /// Tells every session to kill its command (for `Drop`, which cannot wait).
    fn signal_sessions(&self) {
        for s in self.sessions.values() {
            s.kill.notify_one();
        }
    }

    fn controls(&self) -> Vec<Arc<dyn ExecControl>> {
        self.sessions
            .values()
            .filter_map(|s| s.control.clone())
            .collect()
    }
}

/// Kills every command running in a sprite and waits until each is killed.
async fn kill_all(controls: Vec<Arc<dyn ExecControl>>) {
    for c in controls {
        let _ = c.kill().await;
    }
}

impl SpritesEmulator {
    /// Starts an emulator that accepts `token` as its only valid bearer token.
    ///
    /// # Errors
    /// Binding 127.0.0.1:0 or creating its temporary directory failed.
    pub async fn start(token: impl Into<String>) -> io::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("sprites-emulator-")
            .tempdir()?;
        // Sprites have the network; the isolation mode follows SANDBOX_LOCAL_ISOLATION (auto).
        let local_config = SandboxConfig::from_json(
            &json!({ "local": { "root": root.path().join("local"), "network": true } }).to_string(),
        )
        .map_err(io::Error::other)?;
        let local =
            LocalProvider::from_config(&local_config, &Env::process()).map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            token: token.into(),
            _root: root,
            sprites: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            latency: Mutex::new(Duration::ZERO),
            next_id: AtomicU64::new(1),
            local,
        });
        let app = Router::new()
            .route("/v1/sprites", post(create_sprite).get(list_sprites))
            .route("/v1/sprites/{name}", get(get_sprite).delete(delete_sprite))
            .route(
                "/v1/sprites/{name}/exec",
                get(exec_or_sessions).post(http_exec),
            )
            .route("/v1/sprites/{name}/exec/{session}/kill", post(kill_session))
            .route("/v1/sprites/{name}/fs/write", put(fs_write))
            .route("/v1/sprites/{name}/fs/read", get(fs_read))
            .route("/v1/sprites/{name}/checkpoint", post(create_checkpoint))
            .route("/v1/sprites/{name}/checkpoints", get(list_checkpoints))
            .route("/v1/sprites/{name}/checkpoints/{id}", get(get_checkpoint))
            .route(
                "/v1/sprites/{name}/checkpoints/{id}/restore",
                post(restore_checkpoint),
            )
            .layer(axum::extract::DefaultBodyLimit::max(MAX_FS_WRITE + 1))
            .layer(middleware::from_fn_with_state(shared.clone(), gatekeeper))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(SpritesEmulator {
            shared,
            addr,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:<port>`: the value for `SPRITES_API_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token the emulator accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The next `n` requests fail with `status` (a JSON error body) before doing anything.
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut f = lock(&self.shared.faults);
        f.fail.extend(std::iter::repeat_n(status, n as usize));
    }

    /// The next `n` requests are handled (a create creates, a delete deletes) and then
    /// answered with `status` instead of their response, as when a gateway fails late.
    pub fn fail_next_after_handling(&self, n: u32, status: u16) {
        let mut f = lock(&self.shared.faults);
        f.fail_after.extend(std::iter::repeat_n(status, n as usize));
    }

    /// The next `n` requests get 429 with `Retry-After: <retry_after>` (seconds, fractions
    /// allowed) before doing anything.
    pub fn rate_limit_next(&self, n: u32, retry_after: Duration) {
        let mut f = lock(&self.shared.faults);
        f.rate_limit
            .extend(std::iter::repeat_n(retry_after, n as usize));
    }

    /// The next exec drops its connection (no close frame) after its first output frame, or
    /// just before its exit frame when it prints nothing. Its command is killed.
    pub fn drop_next_exec(&self) {
        lock(&self.shared.faults).drop_exec += 1;
    }

    /// The next exec ends with a truncated exit frame (`[3]`, no code).
    pub fn truncate_next_exec(&self) {
        lock(&self.shared.faults).truncate_exec += 1;
    }

    /// The next `n` JSON responses get a malformed body (same status).
    pub fn corrupt_next_json(&self, n: u32) {
        lock(&self.shared.faults).corrupt_json += n;
    }

    /// The next checkpoint creation answers 200 with an NDJSON `error` event.
    pub fn fail_next_checkpoint(&self, message: impl Into<String>) {
        lock(&self.shared.faults).checkpoint_error = Some(message.into());
    }

    /// Checkpoint `complete` messages no longer carry the id (clients must list to find it).
    pub fn hide_checkpoint_ids(&self, hide: bool) {
        lock(&self.shared.faults).hide_checkpoint_ids = hide;
    }

    /// Creating a sprite whose name is taken answers `status` with `{"error":"already_exists"}`:
    /// 409 (the default, per Fly's guides) or 400 (per the generated API page).
    pub fn answer_taken_names_with(&self, status: u16) {
        lock(&self.shared.faults).exists_status = Some(status);
    }

    /// Adds `latency` before every request is handled.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }

    /// Every request so far: method, path, arrival time.
    pub fn requests(&self) -> Vec<RequestLogEntry> {
        lock(&self.shared.log).clone()
    }

    /// How many requests arrived so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.log).len()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Names of the sprites that exist.
    pub fn sprite_names(&self) -> Vec<String> {
        lock(&self.shared.sprites).keys().cloned().collect()
    }

    /// The JSON body of the create request that made sprite `name` (`wait_for_capacity`,
    /// `url_settings`, ... as the client sent them).
    pub fn create_body(&self, name: &str) -> Option<Value> {
        lock(&self.shared.sprites)
            .get(name)
            .map(|s| s.create_body.clone())
    }

    /// The host directory holding sprite `name`'s `/`.
    pub fn sprite_root(&self, name: &str) -> Option<PathBuf> {
        lock(&self.shared.sprites).get(name).map(Sprite::fs)
    }

    /// Number of commands running in sprite `name`.
    pub fn running_commands(&self, name: &str) -> usize {
        lock(&self.shared.sprites)
            .get(name)
            .map_or(0, |s| s.sessions.len())
    }
}

impl Drop for SpritesEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for s in lock(&self.shared.sprites).values() {
            s.signal_sessions();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- responses -----------------------------------------------------------------------------

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

fn fs_error(status: StatusCode, code: &str, path: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({ "error": message.into(), "code": code, "path": path })),
    )
        .into_response()
}

fn no_sprite(name: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("sprite {name} not found"),
    )
}

fn ndjson(lines: Vec<Value>) -> Response {
    let mut body = String::new();
    for l in lines {
        body.push_str(&l.to_string());
        body.push('\n');
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// Logs, delays, injects faults and checks the token, in that order.
async fn gatekeeper(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    lock(&shared.log).push((
        req.method().to_string(),
        req.uri().path().to_string(),
        Instant::now(),
    ));
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (limited, failed) = {
        let mut f = lock(&shared.faults);
        let limited = f.rate_limit.pop_front();
        let failed = if limited.is_none() {
            f.fail.pop_front()
        } else {
            None
        };
        (limited, failed)
    };
    if let Some(wait) = limited {
        let mut resp = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "sprite_creation_rate_limited",
            "rate limit exceeded",
        );
        let v = format!("{}", wait.as_secs_f64());
        if let Ok(h) = HeaderValue::from_str(&v) {
            resp.headers_mut().insert(header::RETRY_AFTER, h);
        }
        return resp;
    }
    if let Some(status) = failed {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return api_error(status, "injected_failure", "injected failure");
    }
    let expected = format!("Bearer {}", shared.token);
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !authorized {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        );
    }
    let resp = next.run(req).await;
    let late = lock(&shared.faults).fail_after.pop_front();
    if let Some(status) = late {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return api_error(
            status,
            "injected_failure",
            "injected failure after handling",
        );
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        let corrupt = {
            let mut f = lock(&shared.faults);
            let c = f.corrupt_json > 0;
            if c {
                f.corrupt_json -= 1;
            }
            c
        };
        if corrupt {
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, Body::from("{\"name\": \"trunc"));
        }
    }
    resp
}

// ---- sprites -------------------------------------------------------------------------------

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

async fn create_sprite(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body is not JSON",
        );
    };
    let Some(name) = v.get("name").and_then(Value::as_str).map(str::to_string) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "name is required",
        );
    };
    if !valid_name(&name) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            "names are lowercase letters, digits and hyphens",
        );
    }
    let auth = v
        .pointer("/url_settings/auth")
        .and_then(Value::as_str)
        .unwrap_or("sprite")
        .to_string();
    if auth != "sprite" && auth != "public" {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "url_settings.auth",
        );
    }
    let exists_status = lock(&shared.faults)
        .exists_status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CONFLICT);
    let exists = || {
        api_error(
            exists_status,
            "already_exists",
            format!("sprite {name} already exists"),
        )
    };
    if lock(&shared.sprites).contains_key(&name) {
        return exists();
    }
    let made = shared
        .local
        .create(&CreateRequest {
            sandbox_id: SandboxId::new(),
            config: SandboxConfig::default(),
        })
        .await;
    let handle = match made {
        Ok(p) => p.handle,
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let root = PathBuf::from(handle.workspace());
    if let Err(e) = tokio::fs::create_dir_all(root.join("home/sprite")).await {
        let _ = handle.stop(StopMode::Delete).await;
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    }
    let n = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let sprite = Sprite {
        id: format!("sprite-{n:08x}"),
        name: name.clone(),
        url_auth: auth,
        create_body: v,
        created_at: rfc3339_now(),
        status: "cold",
        handle: handle.clone(),
        root,
        checkpoints: Vec::new(),
        sessions: BTreeMap::new(),
    };
    let body = sprite.json();
    {
        let mut sprites = lock(&shared.sprites);
        // A concurrent create of the same name won while this one provisioned.
        if let std::collections::btree_map::Entry::Vacant(slot) = sprites.entry(name.clone()) {
            slot.insert(sprite);
            return (StatusCode::CREATED, axum::Json(body)).into_response();
        }
    }
    let _ = handle.stop(StopMode::Delete).await;
    exists()
}

async fn list_sprites(State(shared): State<Arc<Shared>>) -> Response {
    let sprites = lock(&shared.sprites);
    let list: Vec<Value> = sprites.values().map(Sprite::json).collect();
    axum::Json(json!({
        "sprites": list, "has_more": false, "name": "emulator",
        "running": 0, "warm": 0, "cold": list.len(),
    }))
    .into_response()
}

async fn get_sprite(State(shared): State<Arc<Shared>>, UrlPath(name): UrlPath<String>) -> Response {
    match lock(&shared.sprites).get(&name) {
        Some(s) => axum::Json(s.json()).into_response(),
        None => no_sprite(&name),
    }
}

async fn delete_sprite(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let Some(sprite) = lock(&shared.sprites).remove(&name) else {
        return no_sprite(&name);
    };
    kill_all(sprite.controls()).await;
    if let Err(e) = sprite.handle.stop(StopMode::Delete).await {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    }
    StatusCode::NO_CONTENT.into_response()
}

// ---- paths ---------------------------------------------------------------------------------

/// A sprite path (absolute, or relative to `working_dir`) as a host path under `fs`.
/// `..` stops at the sprite's `/`, as it does at a real root.
fn host_path(fs: &Path, working_dir: Option<&str>, path: &str) -> Option<PathBuf> {
    if path.contains('\0') {
        return None;
    }
    let joined = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(working_dir.filter(|w| w.starts_with('/')).unwrap_or("/")).join(path)
    };
    let mut out = fs.to_path_buf();
    let mut depth = 0usize;
    for c in joined.components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                depth += 1;
            }
            Component::ParentDir if depth > 0 => {
                out.pop();
                depth -= 1;
            }
            _ => {}
        }
    }
    Some(out)
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn sprite_handle(shared: &Shared, name: &str) -> Option<(PathBuf, Arc<dyn SandboxHandle>)> {
    lock(&shared.sprites)
        .get(name)
        .map(|s| (s.fs(), s.handle.clone()))
}

/// A failure of the local sandbox behind a filesystem call, as a Sprites FS error.
fn local_fs_error(path: &str, e: &sandbox_core::Error) -> Response {
    if e.is_not_found() {
        return fs_error(StatusCode::NOT_FOUND, "ENOENT", path, e.to_string());
    }
    match e {
        sandbox_core::Error::InvalidInput { .. } => {
            fs_error(StatusCode::BAD_REQUEST, "EINVAL", path, e.to_string())
        }
        _ => fs_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "EIO",
            path,
            e.to_string(),
        ),
    }
}

// ---- files ---------------------------------------------------------------------------------

async fn fs_write(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    req: Request,
) -> Response {
    let Some((fs, handle)) = sprite_handle(&shared, &name) else {
        return no_sprite(&name);
    };
    let q = query_pairs(req.uri().query());
    let Some(path) = first(&q, "path").map(str::to_string) else {
        return fs_error(StatusCode::BAD_REQUEST, "EINVAL", "", "path is required");
    };
    let mkdir = ["mkdirParents", "mkdir"]
        .iter()
        .any(|k| first(&q, k) == Some("true"));
    let mode = first(&q, "mode").map(str::to_string);
    let Some(host) = host_path(&fs, first(&q, "workingDir"), &path) else {
        return fs_error(StatusCode::BAD_REQUEST, "EINVAL", &path, "invalid path");
    };
    let body = match axum::body::to_bytes(req.into_body(), MAX_FS_WRITE + 1).await {
        Ok(b) if b.len() <= MAX_FS_WRITE => b,
        _ => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "file bodies are limited to 16 MiB",
            )
        }
    };
    if host == fs {
        return fs_error(StatusCode::BAD_REQUEST, "EISDIR", &path, "is a directory");
    }
    // Without mkdirParents a missing parent is ENOENT; the local sandbox creates parents.
    if !mkdir && host.parent().is_some_and(|p| !p.is_dir()) {
        return fs_error(
            StatusCode::NOT_FOUND,
            "ENOENT",
            &path,
            "no such file or directory",
        );
    }
    if host.is_dir() {
        return fs_error(StatusCode::BAD_REQUEST, "EISDIR", &path, "is a directory");
    }
    let bits = mode
        .as_deref()
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .unwrap_or(0o644);
    let write = FileWrite {
        path: host.display().to_string(),
        content: body.clone(),
        mode: Some(bits),
    };
    if let Err(e) = handle.write_files(vec![write]).await {
        return local_fs_error(&path, &e);
    }
    axum::Json(json!({ "path": path, "size": body.len(), "mode": format!("{bits:04o}") }))
        .into_response()
}

async fn fs_read(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    req: Request,
) -> Response {
    let Some((fs, handle)) = sprite_handle(&shared, &name) else {
        return no_sprite(&name);
    };
    let q = query_pairs(req.uri().query());
    let Some(path) = first(&q, "path").map(str::to_string) else {
        return fs_error(StatusCode::BAD_REQUEST, "EINVAL", "", "path is required");
    };
    let Some(host) = host_path(&fs, first(&q, "workingDir"), &path) else {
        return fs_error(StatusCode::BAD_REQUEST, "EINVAL", &path, "invalid path");
    };
    if host.is_dir() {
        return fs_error(StatusCode::BAD_REQUEST, "EISDIR", &path, "is a directory");
    }
    match handle.read_file(&host.display().to_string()).await {
        Ok(Some(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(None) => fs_error(
            StatusCode::NOT_FOUND,
            "ENOENT",
            &path,
            "no such file or directory",
        ),
        Err(e) => local_fs_error(&path, &e),
    }
}

// ---- checkpoints ---------------------------------------------------------------------------

async fn create_checkpoint(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    let comment = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("comment").and_then(Value::as_str).map(str::to_string));
    let Some((_, handle)) = sprite_handle(&shared, &name) else {
        return no_sprite(&name);
    };
    let (error, hide) = {
        let mut f = lock(&shared.faults);
        (f.checkpoint_error.take(), f.hide_checkpoint_ids)
    };
    let now = rfc3339_now();
    let mut lines = vec![json!({"type": "info", "data": "Creating checkpoint...", "time": now})];
    if let Some(message) = error {
        lines.push(json!({"type": "error", "error": message, "time": now}));
        return ndjson(lines);
    }
    let local = match handle.checkpoint(comment.clone()).await {
        Ok(c) => c,
        Err(e) => {
            lines.push(
                json!({"type": "error", "error": format!("Checkpoint failed: {e}"), "time": now}),
            );
            return ndjson(lines);
        }
    };
    let id = {
        let mut sprites = lock(&shared.sprites);
        let Some(sprite) = sprites.get_mut(&name) else {
            return no_sprite(&name);
        };
        let id = format!("v{}", sprite.checkpoints.len() + 1);
        sprite.checkpoints.push(CheckpointState {
            id: id.clone(),
            create_time: now.clone(),
            comment,
            local_id: local.id,
        });
        id
    };
    lines.push(json!({"type": "info", "data": "Saving filesystem state...", "time": now}));
    let done = if hide {
        "Checkpoint created".to_string()
    } else {
        format!("Checkpoint {id} created")
    };
    lines.push(json!({"type": "complete", "data": done, "time": now}));
    ndjson(lines)
}

fn checkpoint_json(c: &CheckpointState) -> Value {
    let mut v = json!({ "id": c.id, "create_time": c.create_time, "health": "" });
    if let Some(comment) = &c.comment {
        v["comment"] = json!(comment);
    }
    v
}

async fn list_checkpoints(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match lock(&shared.sprites).get(&name) {
        Some(s) => axum::Json(Value::Array(
            s.checkpoints.iter().map(checkpoint_json).collect(),
        ))
        .into_response(),
        None => no_sprite(&name),
    }
}

async fn get_checkpoint(
    State(shared): State<Arc<Shared>>,
    UrlPath((name, id)): UrlPath<(String, String)>,
) -> Response {
    let sprites = lock(&shared.sprites);
    let Some(s) = sprites.get(&name) else {
        return no_sprite(&name);
    };
    match s.checkpoints.iter().find(|c| c.id == id) {
        Some(c) => axum::Json(checkpoint_json(c)).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("checkpoint {id} not found"),
        ),
    }
}

async fn restore_checkpoint(
    State(shared): State<Arc<Shared>>,
    UrlPath((name, id)): UrlPath<(String, String)>,
) -> Response {
    let found = {
        let sprites = lock(&shared.sprites);
        let Some(sprite) = sprites.get(&name) else {
            return no_sprite(&name);
        };
        sprite
            .checkpoints
            .iter()
            .find(|c| c.id == id)
            .map(|c| (c.local_id.clone(), sprite.handle.clone(), sprite.controls()))
    };
    let Some((local_id, handle, controls)) = found else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("checkpoint {id} not found"),
        );
    };
    // A restore stops what runs in the sprite.
    kill_all(controls).await;
    let now = rfc3339_now();
    let mut lines = vec![
        json!({"type": "info", "data": format!("Restoring to checkpoint {id}..."), "time": now}),
    ];
    match handle.restore(&local_id).await {
        Ok(()) => lines
            .push(json!({"type": "complete", "data": format!("Restored to {id}"), "time": now})),
        Err(e) => lines
            .push(json!({"type": "error", "error": format!("Restore failed: {e}"), "time": now})),
    }
    ndjson(lines)
}

// ---- exec ----------------------------------------------------------------------------------

async fn exec_or_sessions(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    req: Request,
) -> Response {
    let Some((fs, handle)) = sprite_handle(&shared, &name) else {
        return no_sprite(&name);
    };
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !is_upgrade {
        return list_sessions(&shared, &name);
    }
    let q = query_pairs(req.uri().query());
    let (mut parts, _) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let Some((request, dir)) = exec_request(&fs, &q) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "cmd is required and dir must be a path",
        );
    };
    let (drop_conn, truncate) = take_exec_faults(&shared);
    let wants_stdin = first(&q, "stdin") == Some("true");
    ws.on_upgrade(move |socket| async move {
        let job = ExecJob {
            shared,
            name,
            dir,
            handle,
            drop_conn,
            truncate,
        };
        job.run(socket, request, wants_stdin).await;
    })
}

/// The command an exec query asks for (`cmd`..., `path`, `dir`, `env`...) and its sprite
/// directory; `None` without `cmd`.
fn exec_request(fs: &Path, q: &[(String, String)]) -> Option<(ExecRequest, String)> {
    let mut argv: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "cmd")
        .map(|(_, v)| v.clone())
        .collect();
    if argv.is_empty() {
        return None;
    }
    if let Some(program) = first(q, "path") {
        argv[0] = program.to_string();
    }
    let dir = first(q, "dir").unwrap_or("/home/sprite").to_string();
    let cwd = host_path(fs, None, &dir)?;
    // The sprite user's home, unless the caller sets HOME itself.
    let mut env = BTreeMap::from([(
        "HOME".to_string(),
        fs.join("home/sprite").display().to_string(),
    )]);
    for (_, v) in q.iter().filter(|(k, _)| k == "env") {
        if let Some((key, value)) = v.split_once('=') {
            env.insert(key.to_string(), value.to_string());
        }
    }
    let request = ExecRequest {
        argv,
        cwd: Some(cwd.display().to_string()),
        env,
        stdin: None,
        timeout: None,
    };
    Some((request, dir))
}

/// Consumes the exec faults armed for the next exec: (drop the connection, truncate the exit).
fn take_exec_faults(shared: &Shared) -> (bool, bool) {
    let mut f = lock(&shared.faults);
    let d = f.drop_exec > 0;
    if d {
        f.drop_exec -= 1;
    }
    let t = !d && f.truncate_exec > 0;
    if t {
        f.truncate_exec -= 1;
    }
    (d, t)
}

/// Records a running command of sprite `name`; `None` when the sprite is gone.
fn register_session(
    shared: &Shared,
    name: &str,
    command: String,
    workdir: String,
    control: Option<Arc<dyn ExecControl>>,
) -> Option<(u64, Arc<Notify>)> {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let kill = Arc::new(Notify::new());
    let mut sprites = lock(&shared.sprites);
    let s = sprites.get_mut(name)?;
    s.status = "running";
    s.sessions.insert(
        id,
        Session {
            command,
            workdir,
            created: rfc3339_now(),
            control,
            kill: kill.clone(),
        },
    );
    Some((id, kill))
}

fn unregister_session(shared: &Shared, name: &str, id: u64) {
    if let Some(s) = lock(&shared.sprites).get_mut(name) {
        s.sessions.remove(&id);
        if s.sessions.is_empty() {
            s.status = "warm";
        }
    }
}

/// `POST /v1/sprites/{name}/exec`: the HTTP exec. The body is stdin (with `stdin=true`); the
/// response is a stream of frames `[stream_id, ...payload]` without length, one per HTTP
/// chunk, ending with the exit frame `[3, code]`.
async fn http_exec(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    req: Request,
) -> Response {
    let Some((fs, handle)) = sprite_handle(&shared, &name) else {
        return no_sprite(&name);
    };
    let q = query_pairs(req.uri().query());
    let Some((mut request, dir)) = exec_request(&fs, &q) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "cmd is required and dir must be a path",
        );
    };
    let body = match axum::body::to_bytes(req.into_body(), MAX_EXEC_STDIN + 1).await {
        Ok(b) if b.len() <= MAX_EXEC_STDIN => b,
        _ => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "exec stdin is limited to 10 MiB",
            )
        }
    };
    if first(&q, "stdin") == Some("true") {
        request.stdin = Some(body);
    }
    let (drop_conn, truncate) = take_exec_faults(&shared);
    let command = request.argv.join(" ");
    let mut exec = match handle.exec(request).await {
        Ok(x) => x,
        Err(e) => {
            // What a shell reports for a command it cannot run.
            let mut frame = vec![2u8];
            frame.extend_from_slice(format!("{e}\n").as_bytes());
            let frames = vec![
                Ok::<_, io::Error>(Bytes::from(frame)),
                Ok(Bytes::from_static(&[3, 127])),
            ];
            return frame_response(Body::from_stream(futures::stream::iter(frames)));
        }
    };
    let Some((session, kill)) =
        register_session(&shared, &name, command, dir, exec.control.clone())
    else {
        return no_sprite(&name);
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(16);
    tokio::spawn(async move {
        use futures::StreamExt;
        let control = exec.control.clone();
        let kill_command = || async {
            if let Some(c) = &control {
                let _ = c.kill().await;
            }
        };
        loop {
            let event = tokio::select! {
                ev = exec.events.next() => ev,
                () = kill.notified() => {
                    kill_command().await;
                    continue;
                }
                () = tx.closed() => {
                    kill_command().await;
                    break;
                }
            };
            let frame = match event {
                Some(Ok(ExecEvent::Stdout(b))) => [&[1u8][..], &b].concat(),
                Some(Ok(ExecEvent::Stderr(b))) => [&[2u8][..], &b].concat(),
                Some(Ok(ExecEvent::Exit(status))) => {
                    let last = if drop_conn {
                        Err(io::Error::other("injected drop"))
                    } else if truncate {
                        Ok(Bytes::from_static(&[3]))
                    } else {
                        Ok(Bytes::from(vec![3u8, exit_code(&status)]))
                    };
                    let _ = tx.send(last).await;
                    break;
                }
                // The command was lost: the body ends without an exit frame.
                Some(Err(_)) | None => {
                    let _ = tx.send(Err(io::Error::other("command lost"))).await;
                    break;
                }
            };
            if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                kill_command().await;
                break;
            }
            if drop_conn {
                let _ = tx.send(Err(io::Error::other("injected drop"))).await;
                kill_command().await;
                break;
            }
        }
        unregister_session(&shared, &name, session);
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    frame_response(Body::from_stream(frames))
}

fn frame_response(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

fn list_sessions(shared: &Shared, name: &str) -> Response {
    let sprites = lock(&shared.sprites);
    let Some(s) = sprites.get(name) else {
        return no_sprite(name);
    };
    let list: Vec<Value> = s
        .sessions
        .iter()
        .map(|(id, sess)| {
            json!({
                "id": id, "command": sess.command, "workdir": sess.workdir,
                "created": sess.created, "bytes_per_second": 0, "is_active": true,
                "last_activity": sess.created, "tty": false,
            })
        })
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

async fn kill_session(
    State(shared): State<Arc<Shared>>,
    UrlPath((name, session)): UrlPath<(String, String)>,
) -> Response {
    let control = {
        let sprites = lock(&shared.sprites);
        let Some(s) = sprites.get(&name) else {
            return no_sprite(&name);
        };
        let Some(sess) = session
            .parse::<u64>()
            .ok()
            .and_then(|id| s.sessions.get(&id))
        else {
            return api_error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("session {session} not found"),
            );
        };
        sess.control.clone()
    };
    if let Some(c) = control {
        let _ = c.kill().await;
    }
    ndjson(vec![
        json!({"type": "signal", "message": "sent SIGKILL", "signal": "SIGKILL", "pid": 0}),
        json!({"type": "killed", "message": "process killed"}),
        json!({"type": "complete", "exit_code": 137}),
    ])
}

struct ExecJob {
    shared: Arc<Shared>,
    name: String,
    dir: String,
    handle: Arc<dyn SandboxHandle>,
    drop_conn: bool,
    truncate: bool,
}

/// How the pump ended.
enum End {
    Exit(u8),
    /// Drop the connection without exit or close frame.
    Drop,
    /// The local sandbox lost the command: report it and close without an exit frame.
    Lost(String),
}

impl ExecJob {
    async fn run(self, mut socket: WebSocket, mut request: ExecRequest, wants_stdin: bool) {
        // Stdin arrives as frames up to EOF; the local sandbox takes it whole.
        if wants_stdin {
            let mut input = Vec::new();
            loop {
                match socket.recv().await {
                    Some(Ok(Message::Binary(data))) => match data.split_first() {
                        Some((0, rest)) => input.extend_from_slice(rest),
                        Some((4, _)) => break,
                        _ => {}
                    },
                    Some(Ok(Message::Text(_)))
                    | Some(Ok(Message::Ping(_)))
                    | Some(Ok(Message::Pong(_))) => {}
                    _ => return,
                }
            }
            request.stdin = Some(input.into());
        }
        let command = request.argv.join(" ");
        let mut exec = match self.handle.exec(request).await {
            Ok(x) => x,
            Err(e) => {
                let message = match &e {
                    sandbox_core::Error::StartFailed { message } => message.clone(),
                    other => other.to_string(),
                };
                let msg = json!({"type": "error", "message": message}).to_string();
                let _ = socket.send(Message::Text(msg.into())).await;
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        };
        let registered = register_session(
            &self.shared,
            &self.name,
            command,
            self.dir.clone(),
            exec.control.clone(),
        );
        let Some((session_id, kill)) = registered else {
            if let Some(c) = &exec.control {
                let _ = c.kill().await;
            }
            return;
        };
        let info =
            json!({"type": "session_info", "session_id": session_id.to_string(), "tty": false});
        let _ = socket.send(Message::Text(info.to_string().into())).await;

        let end = self.pump(&mut socket, &mut exec, &kill).await;
        unregister_session(&self.shared, &self.name, session_id);
        match end {
            End::Exit(_) if self.truncate => {
                let _ = socket.send(Message::Binary(vec![3u8].into())).await;
                let _ = socket.send(Message::Close(None)).await;
            }
            End::Exit(code) => {
                let _ = socket.send(Message::Binary(vec![3u8, code].into())).await;
                let _ = socket.send(Message::Close(None)).await;
            }
            End::Lost(message) => {
                let msg = json!({"type": "error", "message": message}).to_string();
                let _ = socket.send(Message::Text(msg.into())).await;
                let _ = socket.send(Message::Close(None)).await;
            }
            // No exit frame, no close frame: the TCP connection just ends.
            End::Drop => drop(socket),
        }
    }

    /// Moves output to the socket and control messages to the command until it exits.
    async fn pump(
        &self,
        socket: &mut WebSocket,
        exec: &mut sandbox_core::Execution,
        kill: &Notify,
    ) -> End {
        use futures::StreamExt;
        let control = exec.control.clone();
        let kill_command = || async {
            if let Some(c) = &control {
                let _ = c.kill().await;
            }
        };
        let mut client_gone = false;
        loop {
            tokio::select! {
                ev = exec.events.next() => match ev {
                    Some(Ok(ExecEvent::Stdout(b))) | Some(Ok(ExecEvent::Stderr(b))) if b.is_empty() => {}
                    Some(Ok(ExecEvent::Stdout(b))) => {
                        if !forward(socket, 1, &b).await || self.drop_conn {
                            kill_command().await;
                            return End::Drop;
                        }
                    }
                    Some(Ok(ExecEvent::Stderr(b))) => {
                        if !forward(socket, 2, &b).await || self.drop_conn {
                            kill_command().await;
                            return End::Drop;
                        }
                    }
                    Some(Ok(ExecEvent::Exit(status))) => {
                        if self.drop_conn || client_gone {
                            return End::Drop;
                        }
                        return End::Exit(exit_code(&status));
                    }
                    Some(Err(e)) => return End::Lost(e.to_string()),
                    None => return End::Lost("the command ended without an exit status".into()),
                },
                msg = socket.recv(), if !client_gone => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                        if v.get("type").and_then(Value::as_str) == Some("signal") {
                            kill_command().await;
                        }
                    }
                    Some(Ok(_)) => {}
                    // The client went away: here the command does not outlive it.
                    Some(Err(_)) | None => {
                        client_gone = true;
                        kill_command().await;
                    }
                },
                () = kill.notified() => kill_command().await,
            }
        }
    }
}

async fn forward(socket: &mut WebSocket, stream: u8, data: &[u8]) -> bool {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(stream);
    frame.extend_from_slice(data);
    socket.send(Message::Binary(frame.into())).await.is_ok()
}

/// The exit code a shell would report: the code, or 128 + the signal number.
fn exit_code(status: &ExitStatus) -> u8 {
    if let Some(c) = status.code {
        return (c & 0xff) as u8;
    }
    let signal = match status.signal.as_deref() {
        Some("SIGHUP") => 1,
        Some("SIGINT") => 2,
        Some("SIGQUIT") => 3,
        Some("SIGABRT") => 6,
        Some("SIGSEGV") => 11,
        Some("SIGPIPE") => 13,
        Some("SIGTERM") => 15,
        _ => 9,
    };
    128 + signal
}

// ---- time ----------------------------------------------------------------------------------

fn rfc3339_now() -> String {
    sandbox_core::protocol::iso8601_ms(sandbox_core::now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sprite_paths_stay_under_the_sprite_root() {
        let fs = Path::new("/tmp/emu/s/fs");
        assert_eq!(
            host_path(fs, None, "/home/sprite/a.txt").unwrap(),
            fs.join("home/sprite/a.txt")
        );
        assert_eq!(
            host_path(fs, Some("/home/sprite"), "x/../y").unwrap(),
            fs.join("home/sprite/y")
        );
        assert_eq!(
            host_path(fs, None, "/../../etc/passwd").unwrap(),
            fs.join("etc/passwd")
        );
        assert!(host_path(fs, None, "a\0b").is_none());
    }
}
