//! The subcommands, each a function from parsed arguments to printed output and an exit code.

use sandbox::registry::{self, StoreBackend};
use sandbox::service::parse_env_pairs;
use sandbox::{
    CommandSpec, Env, Error, ExecRequest, ProcessFilter, ProcessId, ProviderSelector, ReadFrom,
    SandboxConfig, SandboxFilter, SandboxId, SandboxRecord, SandboxService, SandboxStatus,
    StopMode,
};
use serde_json::{json, Value};

use crate::live::{run_live, Interrupt, LogPrinter};
use crate::output::{table, time, Context, Failure, Output, EXIT_INTERRUPTED, EXIT_RUN_ERROR};
use crate::{Command, CommandArgs, CreateArgs, Global};

/// What every command works with: the resolved config, environment and store.
pub struct Ctx {
    /// Global options.
    pub global: Global,
    /// Output mode.
    pub out: Output,
    /// The environment (the process's).
    pub env: Env,
    /// The config: `--config`, with `--provider` / `SANDBOX_PROVIDER` applied.
    pub config: SandboxConfig,
    /// The store URL in use.
    pub store_url: String,
}

impl Ctx {
    fn new(global: Global, out: Output) -> Result<Self, Failure> {
        let env = Env::process();
        let mut config = match &global.config {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Failure::new(
                        format!("read config {shown}"),
                        Error::invalid("sandbox_config_unreadable", e.to_string()),
                    )
                })?;
                SandboxConfig::from_json(&text).context(|| format!("parse config {shown}"))?
            }
            None => SandboxConfig::default(),
        };
        // The flag beats the config's `provider`, which beats SANDBOX_PROVIDER (resolved by
        // `SandboxConfig::provider_name`), as in the library.
        if let Some(p) = global.provider.clone().filter(|p| !p.trim().is_empty()) {
            config.provider = Some(ProviderSelector::Name(p));
        }
        let store_url = registry::store_url(global.store.as_deref(), &env);
        Ok(Ctx {
            global,
            out,
            env,
            config,
            store_url,
        })
    }

    fn open_store(&self) -> Result<StoreBackend, Failure> {
        registry::open_store(&self.store_url, &self.env)
            .context(|| format!("open store {}", redact_url(&self.store_url)))
    }

    fn service(&self) -> Result<SandboxService, Failure> {
        let backend = self.open_store()?;
        SandboxService::builder()
            .store(backend)
            .config(self.config.clone())
            .env(self.env.clone())
            .build()
            .context(|| "build the sandbox service".into())
    }

    fn provider_name(&self) -> String {
        self.config.provider_name(&self.env)
    }

    /// Fails early, before anything is written, when the provider is not registered.
    fn check_provider(&self) -> Result<String, Failure> {
        let name = self.provider_name();
        registry::provider_registration(&name).context(|| format!("use provider {name}"))?;
        Ok(name)
    }
}

/// A store URL without its credentials (`user:pass@`, query tokens), for messages.
pub fn redact_url(url: &str) -> String {
    let mut s = url.to_string();
    if let Some(q) = s.find('?') {
        s.truncate(q);
    }
    if let Some(scheme_end) = s.find("://") {
        let rest = &s[scheme_end + 3..];
        if let Some(at) = rest.find('@') {
            let host_end = rest.find('/').unwrap_or(rest.len());
            if at < host_end {
                s = format!("{}://{}", &s[..scheme_end], &rest[at + 1..]);
            }
        }
    }
    s
}

fn parse_sandbox_id(s: &str) -> Result<SandboxId, Failure> {
    SandboxId::parse(s).context(|| "read the sandbox id".into())
}

fn parse_process_id(s: &str) -> Result<ProcessId, Failure> {
    ProcessId::parse(s).context(|| "read the process id".into())
}

/// Checks a command's arguments before anything is created or written.
fn exec_request(args: &CommandArgs) -> Result<ExecRequest, Failure> {
    let env = parse_env_pairs(&args.env).context(|| "read --env".into())?;
    if args.command.first().is_none_or(|c| c.trim().is_empty()) {
        return Err(Failure::new(
            "read the command",
            Error::invalid("sandbox_command_required", "a command is required after --"),
        ));
    }
    let mut req = ExecRequest::new(args.command.clone());
    req.env = env;
    req.cwd = args.cwd.clone();
    Ok(req)
}

/// Runs one subcommand; returns the exit code.
pub async fn dispatch(command: Command, global: Global, out: Output) -> Result<u8, Failure> {
    let ctx = Ctx::new(global, out)?;
    match command {
        Command::Run {
            keep,
            create,
            command,
        } => run(&ctx, keep, &create, &command).await,
        Command::Create { create: args } => create(&ctx, &args).await.map(|_| 0),
        Command::Ls { status, active } => ls(&ctx, status, active).await,
        Command::Show { id } => show(&ctx, &id).await,
        Command::Exec { id, command } => exec(&ctx, &id, &command).await,
        Command::Ps { id } => ps(&ctx, &id).await,
        Command::Logs {
            process_id,
            follow,
            from_seq,
        } => logs(&ctx, &process_id, follow, from_seq).await,
        Command::Cp { src, dst } => crate::copy::cp(&ctx, &src, &dst).await,
        Command::Port { id, port: number } => port(&ctx, &id, number).await,
        Command::Checkpoint { id, comment } => checkpoint(&ctx, &id, comment).await,
        Command::Checkpoints { id } => checkpoints(&ctx, &id).await,
        Command::Restore { id, checkpoint } => restore(&ctx, &id, &checkpoint).await,
        Command::Stop { id, delete } => stop(&ctx, &id, delete).await,
        Command::Reconcile => reconcile(&ctx).await,
        Command::Providers => providers(&ctx),
        Command::Doctor => doctor(&ctx).await,
    }
}

/// Opens the service for commands that act on existing sandboxes.
pub fn service(ctx: &Ctx) -> Result<SandboxService, Failure> {
    ctx.service()
}

async fn create_sandbox(
    ctx: &Ctx,
    service: &SandboxService,
    args: &CreateArgs,
) -> Result<SandboxRecord, Failure> {
    let name = ctx.check_provider()?;
    let mut config = ctx.config.clone();
    if !args.ports.is_empty() {
        let mut ports = config.ports.take().unwrap_or_default();
        ports.extend(&args.ports);
        ports.sort_unstable();
        ports.dedup();
        config.ports = Some(ports);
    }
    if let Some(p) = &args.purpose {
        config.purpose = Some(p.clone());
    }
    let spinner = ctx.out.spinner(format!("creating a {name} sandbox"));
    let record = service
        .create(&config)
        .await
        .context(|| format!("create a sandbox on provider {name}"))?;
    drop(spinner);
    if let Some(w) = record
        .params
        .as_ref()
        .and_then(|p| p.get("warnings"))
        .and_then(Value::as_array)
    {
        for w in w.iter().filter_map(Value::as_str) {
            ctx.out.note(format!("warning: sandbox {}: {w}", record.id));
        }
    }
    Ok(record)
}

async fn create(ctx: &Ctx, args: &CreateArgs) -> Result<(), Failure> {
    let service = ctx.service()?;
    let record = create_sandbox(ctx, &service, args).await?;
    ctx.out.result(&json!(record), || record.id.to_string());
    Ok(())
}

async fn stop_sandbox(
    ctx: &Ctx,
    service: &SandboxService,
    id: &SandboxId,
    delete: bool,
) -> Result<SandboxRecord, Failure> {
    let spinner = ctx.out.spinner(format!("stopping sandbox {id}"));
    let mode = if delete {
        StopMode::Delete
    } else {
        StopMode::Default
    };
    let r = service
        .stop(id, mode)
        .await
        .context(|| format!("stop sandbox {id}"));
    drop(spinner);
    r
}

async fn run(
    ctx: &Ctx,
    keep: bool,
    create: &CreateArgs,
    args: &CommandArgs,
) -> Result<u8, Failure> {
    let to_run = |mut f: Failure| {
        f.exit = EXIT_RUN_ERROR;
        f
    };
    let req = exec_request(args).map_err(to_run)?;
    let service = ctx.service().map_err(to_run)?;
    // From here on Ctrl-C is ours: a sandbox created by this command is stopped, not orphaned.
    let mut interrupt = Interrupt::install();
    let creating = create_sandbox(ctx, &service, create);
    tokio::pin!(creating);
    let mut interrupted = false;
    let record = tokio::select! {
        r = &mut creating => r,
        () = interrupt.recv() => {
            interrupted = true;
            ctx.out.note(if keep {
                "interrupted: the command will not run in the new sandbox"
            } else {
                "interrupted: the sandbox is stopped once it is created"
            });
            creating.await
        }
    }
    .map_err(to_run)?;
    let id = record.id;
    if keep {
        ctx.out.note(format!("sandbox {id}"));
    }
    if interrupted {
        if !keep {
            stop_sandbox(ctx, &service, &id, false)
                .await
                .map_err(to_run)?;
        }
        return Ok(EXIT_INTERRUPTED);
    }
    let result = run_live(
        &service,
        &id,
        CommandSpec::new(req),
        ctx.out,
        &mut interrupt,
    )
    .await;
    if !keep {
        if let Err(f) = stop_sandbox(ctx, &service, &id, false).await {
            // The command's result still matters more than a failed cleanup.
            ctx.out.failure(&f);
        }
    }
    let end = result?;
    if ctx.out.json {
        ctx.out
            .result(&outcome_json(&id, &end.outcome, keep), String::new);
    }
    Ok(end.exit_code())
}

fn outcome_json(id: &SandboxId, o: &sandbox::ProcessOutcome, kept: bool) -> Value {
    json!({
        "sandboxId": id,
        "processId": o.process_id,
        "status": o.status,
        "exitCode": o.exit_code,
        "signal": o.signal,
        "error": o.error,
        "sandboxKept": kept,
    })
}

async fn exec(ctx: &Ctx, id: &str, args: &CommandArgs) -> Result<u8, Failure> {
    let to_run = |mut f: Failure| {
        f.exit = EXIT_RUN_ERROR;
        f
    };
    let id = parse_sandbox_id(id).map_err(to_run)?;
    let req = exec_request(args).map_err(to_run)?;
    let service = ctx.service().map_err(to_run)?;
    let mut interrupt = Interrupt::install();
    let end = run_live(
        &service,
        &id,
        CommandSpec::new(req),
        ctx.out,
        &mut interrupt,
    )
    .await?;
    if ctx.out.json {
        ctx.out
            .result(&outcome_json(&id, &end.outcome, true), String::new);
    }
    Ok(end.exit_code())
}

async fn ls(ctx: &Ctx, status: Option<String>, active: bool) -> Result<u8, Failure> {
    let status = match (status, active) {
        (_, true) => Some(SandboxStatus::Active),
        (Some(s), _) => {
            Some(SandboxStatus::parse(s.trim()).context(|| format!("read --status {s}"))?)
        }
        (None, false) => None,
    };
    let filter = SandboxFilter {
        status,
        provider: ctx.global.provider.clone(),
        limit: None,
    };
    let service = ctx.service()?;
    let list = service
        .list(&filter)
        .await
        .context(|| "list sandboxes".into())?;
    ctx.out.result(&json!(list), || {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.status.to_string(),
                    r.provider.clone(),
                    time(r.created_at),
                    r.purpose.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(&["ID", "STATUS", "PROVIDER", "CREATED", "PURPOSE"], &rows)
    });
    Ok(0)
}

async fn show(ctx: &Ctx, id: &str) -> Result<u8, Failure> {
    let id = parse_sandbox_id(id)?;
    let service = ctx.service()?;
    let r = service
        .get(&id)
        .await
        .context(|| format!("show sandbox {id}"))?;
    ctx.out.result(&json!(r), || {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<10} {v}\n"));
        line("id", r.id.to_string());
        line("status", r.status.to_string());
        line("provider", r.provider.clone());
        line(
            "external",
            r.external_sandbox_id.clone().unwrap_or_default(),
        );
        if let Some(u) = &r.sandbox_url {
            line("url", u.clone());
        }
        line("created", time(r.created_at));
        if let Some(t) = r.shutdown_at {
            line("stopped", time(t));
        }
        if let Some(p) = &r.purpose {
            line("purpose", p.clone());
        }
        if let Some(p) = &r.ports {
            line("ports", format!("{p:?}"));
        }
        if let Some(p) = &r.params {
            line("params", p.to_string());
        }
        s
    });
    Ok(0)
}

async fn ps(ctx: &Ctx, id: &str) -> Result<u8, Failure> {
    let id = parse_sandbox_id(id)?;
    let service = ctx.service()?;
    service
        .get(&id)
        .await
        .context(|| format!("list processes of sandbox {id}"))?;
    let list = service
        .processes(&ProcessFilter {
            sandbox_id: Some(id),
            ..Default::default()
        })
        .await
        .context(|| format!("list processes of sandbox {id}"))?;
    ctx.out.result(&json!(list), || {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    p.status.to_string(),
                    p.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                    time(p.started_at),
                    p.argv().join(" "),
                ]
            })
            .collect();
        table(&["ID", "STATUS", "EXIT", "STARTED", "COMMAND"], &rows)
    });
    Ok(0)
}

async fn logs(ctx: &Ctx, pid: &str, follow: bool, from_seq: u64) -> Result<u8, Failure> {
    let pid = parse_process_id(pid)?;
    let service = ctx.service()?;
    let what = || format!("read the log of process {pid}");
    let mut printer = LogPrinter::new(ctx.out);
    if follow {
        use futures::StreamExt;
        let mut stream = service
            .follow_log(&pid, ReadFrom::Seq(from_seq))
            .await
            .context(what)?;
        while let Some(entry) = stream.next().await {
            if !printer.print(&entry.context(what)?).context(what)? {
                break;
            }
        }
    } else {
        let mut from = ReadFrom::Seq(from_seq);
        loop {
            let page = service.read_log(&pid, from, 1024).await.context(what)?;
            let Some(last) = page.entries.last() else {
                break;
            };
            from = ReadFrom::Seq(last.seq + 1);
            for e in &page.entries {
                if !printer.print(e).context(what)? {
                    return Ok(0);
                }
            }
        }
    }
    Ok(0)
}

async fn port(ctx: &Ctx, id: &str, port: u16) -> Result<u8, Failure> {
    let id = parse_sandbox_id(id)?;
    let service = ctx.service()?;
    let url = service
        .port_url(&id, port)
        .await
        .context(|| format!("expose port {port} of sandbox {id}"))?;
    ctx.out.result(
        &json!({ "sandboxId": id, "port": port, "url": url }),
        || url.clone(),
    );
    Ok(0)
}

async fn checkpoint(ctx: &Ctx, id: &str, comment: Option<String>) -> Result<u8, Failure> {
    let id = parse_sandbox_id(id)?;
    let service = ctx.service()?;
    let spinner = ctx.out.spinner(format!("checkpointing sandbox {id}"));
    let cp = service
        .checkpoint(&id, comment)
        .await
        .context(|| format!("checkpoint sandbox {id}"))?;
    drop(spinner);
    ctx.out.result(&json!(cp), || cp.id.clone());
    Ok(0)
}

async fn checkpoints(ctx: &Ctx, id: &str) -> Result<u8, Failure> {
    let id = parse_sandbox_id(id)?;
    let service = ctx.service()?;
    let list = service
        .list_checkpoints(&id)
        .await
        .context(|| format!("list checkpoints of sandbox {id}"))?;
    ctx.out.result(&json!(list), || {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|c| {
                vec![
                    c.id.clone(),
                    c.created_at.map(time).unwrap_or_default(),
                    c.comment.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(&["ID", "CREATED", "COMMENT"], &rows)
    });
    Ok(0)
}

async fn restore(ctx: &Ctx, id: &str, checkpoint: &str) -> Result<u8, Failure> {
    let id = parse_sandbox_id(id)?;
    let service = ctx.service()?;
    let spinner = ctx
        .out
        .spinner(format!("restoring sandbox {id} to {checkpoint}"));
    service
        .restore(&id, checkpoint)
        .await
        .context(|| format!("restore sandbox {id} to checkpoint {checkpoint}"))?;
    drop(spinner);
    ctx.out.result(
        &json!({ "sandboxId": id, "restored": checkpoint.trim() }),
        || format!("restored sandbox {id} to checkpoint {}", checkpoint.trim()),
    );
    Ok(0)
}

async fn stop(ctx: &Ctx, id: &str, delete: bool) -> Result<u8, Failure> {
    let id = parse_sandbox_id(id)?;
    let service = ctx.service()?;
    let r = stop_sandbox(ctx, &service, &id, delete).await?;
    ctx.out
        .result(&json!(r), || format!("sandbox {} is {}", r.id, r.status));
    Ok(0)
}

async fn reconcile(ctx: &Ctx) -> Result<u8, Failure> {
    let service = ctx.service()?;
    let report = service
        .reconcile()
        .await
        .context(|| "reconcile records with providers".into())?;
    ctx.out.result(&json!(report), || {
        let mut s = String::new();
        for (pid, reason) in &report.lost {
            s.push_str(&format!("lost       process {pid} ({reason})\n"));
        }
        for pid in &report.finalized {
            s.push_str(&format!("finalized  process {pid} (from its log)\n"));
        }
        for id in &report.gone {
            s.push_str(&format!("gone       sandbox {id} (now shutdown)\n"));
        }
        for id in &report.interrupted {
            s.push_str(&format!(
                "interrupted sandbox {id} (its create died; now error)\n"
            ));
        }
        for pid in &report.alive {
            s.push_str(&format!("alive      process {pid}\n"));
        }
        for why in &report.skipped {
            s.push_str(&format!("skipped    {why}\n"));
        }
        if s.is_empty() {
            s.push_str("nothing to reconcile\n");
        }
        s
    });
    Ok(0)
}

/// Names of the credential variables of a provider that are set (never their values).
fn credentials_set(env: &Env, vars: &[&'static str]) -> Vec<&'static str> {
    vars.iter()
        .copied()
        .filter(|v| env.get(v).is_some_and(|x| !x.trim().is_empty()))
        .collect()
}

fn providers(ctx: &Ctx) -> Result<u8, Failure> {
    let regs = registry::provider_registrations().context(|| "list providers".into())?;
    let default = ctx.provider_name();
    let list: Vec<Value> = regs
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "default": r.name == default,
                "credentialVars": r.credential_vars,
                "credentialsSet": credentials_set(&ctx.env, r.credential_vars),
            })
        })
        .collect();
    ctx.out.result(&json!(list), || {
        let rows: Vec<Vec<String>> = regs
            .iter()
            .map(|r| {
                let set = credentials_set(&ctx.env, r.credential_vars);
                let creds = if r.credential_vars.is_empty() {
                    "none needed".to_string()
                } else if set.is_empty() {
                    format!("not set ({})", r.credential_vars.join(", "))
                } else {
                    format!("set: {}", set.join(", "))
                };
                vec![
                    format!("{}{}", r.name, if r.name == default { " *" } else { "" }),
                    creds,
                ]
            })
            .collect();
        table(&["PROVIDER", "CREDENTIALS"], &rows) + "(* = used for new sandboxes)\n"
    });
    Ok(0)
}

async fn doctor(ctx: &Ctx) -> Result<u8, Failure> {
    let store = match registry::open_store(&ctx.store_url, &ctx.env) {
        Ok(b) => json!({
            "url": redact_url(&ctx.store_url),
            "records": b.records.name(),
            "location": b.location,
            "ok": true,
        }),
        Err(e) => json!({
            "url": redact_url(&ctx.store_url),
            "ok": false,
            "error": { "code": e.code(), "message": e.to_string() },
        }),
    };
    let regs = registry::provider_registrations().context(|| "list providers".into())?;
    let stores = registry::store_schemes().context(|| "list stores".into())?;
    let default = ctx.provider_name();
    let creds: Vec<Value> = regs
        .iter()
        .filter(|r| !r.credential_vars.is_empty())
        .map(|r| {
            json!({
                "provider": r.name,
                "set": credentials_set(&ctx.env, r.credential_vars),
                "unset": r.credential_vars.iter().filter(|v| !credentials_set(&ctx.env, &[v]).contains(v)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let isolation = local_isolation(ctx).await;
    let report = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "store": store,
        "stores": stores,
        "providers": regs.iter().map(|r| r.name).collect::<Vec<_>>(),
        "defaultProvider": default,
        "defaultProviderRegistered": regs.iter().any(|r| r.name == default),
        "localIsolation": isolation,
        "credentials": creds,
    });
    ctx.out.result(&report, || {
        let mut s = String::new();
        s.push_str(&format!("sandbox {}\n", env!("CARGO_PKG_VERSION")));
        if store["ok"] == json!(true) {
            s.push_str(&format!(
                "store:      {} ({}) at {}\n",
                store["url"].as_str().unwrap_or(""),
                store["records"].as_str().unwrap_or(""),
                store["location"].as_str().unwrap_or("")
            ));
        } else {
            s.push_str(&format!(
                "store:      {} FAILED: {}\n",
                store["url"].as_str().unwrap_or(""),
                store["error"]["message"].as_str().unwrap_or("")
            ));
        }
        s.push_str(&format!("stores:     {}\n", stores.join(", ")));
        let names: Vec<_> = regs.iter().map(|r| r.name).collect();
        s.push_str(&format!(
            "providers:  {}\n",
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        ));
        s.push_str(&format!(
            "default:    {default}{}\n",
            if names.contains(&default.as_str()) {
                ""
            } else {
                " (NOT REGISTERED)"
            }
        ));
        s.push_str(&format!("isolation:  {}\n", isolation_line(&isolation)));
        for c in &creds {
            let set: Vec<String> = serde_json::from_value(c["set"].clone()).unwrap_or_default();
            let unset: Vec<String> = serde_json::from_value(c["unset"].clone()).unwrap_or_default();
            s.push_str(&format!(
                "{:<11} {}\n",
                format!("{}:", c["provider"].as_str().unwrap_or("")),
                if set.is_empty() {
                    format!("no credentials ({} unset)", unset.join(", "))
                } else {
                    format!("set: {}", set.join(", "))
                }
            ));
        }
        s
    });
    Ok(if store["ok"] == json!(true) {
        0
    } else {
        crate::output::EXIT_ERROR
    })
}

/// The isolation modes of the `local` provider on this machine, when it is linked.
#[cfg(feature = "local")]
async fn local_isolation(ctx: &Ctx) -> Value {
    use sandbox::local::{availability, IsolationMode, LocalSettings};
    // Detection runs bubblewrap once: keep it off the async workers.
    let detected = tokio::task::spawn_blocking(availability).await;
    let Ok(avail) = detected else {
        return json!({ "available": null, "auto": null, "note": "isolation detection failed" });
    };
    let unavailable: serde_json::Map<String, Value> = [
        ("bwrap", avail.bwrap.as_ref().err()),
        ("landlock", avail.landlock_abi.as_ref().err()),
    ]
    .into_iter()
    .filter_map(|(k, why)| why.map(|w| (k.to_string(), json!(w))))
    .collect();
    let auto = avail
        .choose(IsolationMode::Auto)
        .map(|(i, _)| i.as_str())
        .unwrap_or("none");
    let mut v = json!({
        "available": avail.offered().iter().map(|i| i.as_str()).collect::<Vec<_>>(),
        "unavailable": unavailable,
        "auto": auto,
    });
    match LocalSettings::resolve(&ctx.config, &ctx.env) {
        Ok(settings) => {
            let requested = settings.defaults.isolation.unwrap_or(IsolationMode::Auto);
            v["requested"] = json!(requested);
            v["root"] = json!(settings.root);
            match avail.choose(requested) {
                Ok((i, _)) => v["effective"] = json!(i.as_str()),
                Err(e) => v["error"] = json!(e.to_string()),
            }
        }
        Err(e) => v["error"] = json!(e.to_string()),
    }
    v
}

/// Without the `local` provider there is nothing to detect.
#[cfg(not(feature = "local"))]
async fn local_isolation(_ctx: &Ctx) -> Value {
    json!({ "available": null, "auto": null, "note": "the local provider is not linked into this build" })
}

fn isolation_line(v: &Value) -> String {
    let names = |k: &str| -> Option<String> {
        let list = v.get(k)?.as_array()?;
        Some(
            list.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    let Some(available) = names("available") else {
        return v
            .get("note")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
    };
    let mut s = format!(
        "available: {available}; auto picks {}",
        v["auto"].as_str().unwrap_or("?")
    );
    if let (Some(req), Some(eff)) = (v["requested"].as_str(), v["effective"].as_str()) {
        s.push_str(&format!("; configured {req} -> {eff}"));
    }
    if let Some(un) = v["unavailable"].as_object() {
        for (k, why) in un {
            s.push_str(&format!(
                "\n            {k} unavailable: {}",
                why.as_str().unwrap_or("")
            ));
        }
    }
    if let Some(e) = v["error"].as_str() {
        s.push_str(&format!("\n            error: {e}"));
    }
    if let Some(root) = v["root"].as_str() {
        s.push_str(&format!("\n            local root: {root}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_lose_their_credentials_in_messages() {
        assert_eq!(
            redact_url("instant://app:secret@api.instantdb.com/x?token=abc"),
            "instant://api.instantdb.com/x"
        );
        assert_eq!(redact_url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
        assert_eq!(redact_url("memory:"), "memory:");
    }
}
