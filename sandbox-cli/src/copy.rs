//! `sandbox cp`: files between the host and a sandbox, byte for byte, in both directions.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sandbox::{Error, FileWrite, Missing, SandboxId};
use serde_json::json;

use crate::commands::{service, Ctx};
use crate::output::{Context, Failure};

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A file on the host.
    Host(PathBuf),
    /// stdin (as source) or stdout (as destination).
    Stdio,
    /// A path inside a sandbox, relative to its workspace or absolute within it.
    Sandbox(SandboxId, String),
}

/// Parses `ID:path` (sandbox side), `-` (stdio) or a host path. Like `docker cp`, a prefix
/// before the first `:` that contains no `/` names a sandbox; write `./a:b` for a host file
/// with a colon in its name.
///
/// # Errors
/// A malformed sandbox id, or an empty sandbox path.
pub fn parse_endpoint(s: &str) -> Result<Endpoint, Failure> {
    if s == "-" {
        return Ok(Endpoint::Stdio);
    }
    match s.split_once(':') {
        Some((prefix, path)) if !prefix.is_empty() && !prefix.contains('/') => {
            let id =
                SandboxId::parse(prefix).context(|| format!("read the sandbox side of {s:?}"))?;
            if path.is_empty() {
                return Err(Failure::new(
                    format!("read {s:?}"),
                    Error::invalid(
                        "sandbox_path_invalid",
                        "the sandbox path after `ID:` is empty",
                    ),
                ));
            }
            Ok(Endpoint::Sandbox(id, path.to_string()))
        }
        _ => Ok(Endpoint::Host(PathBuf::from(s))),
    }
}

fn file_name(sandbox_path: &str) -> &str {
    sandbox_path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(sandbox_path)
}

/// Copies one file; returns the exit code.
pub async fn cp(ctx: &Ctx, src: &str, dst: &str) -> Result<u8, Failure> {
    let (from, to) = (parse_endpoint(src)?, parse_endpoint(dst)?);
    let bytes = match (&from, &to) {
        (Endpoint::Sandbox(..), Endpoint::Sandbox(..))
        | (Endpoint::Host(_) | Endpoint::Stdio, Endpoint::Host(_) | Endpoint::Stdio) => {
            return Err(Failure::new(
                format!("copy {src} to {dst}"),
                Error::invalid(
                    "sandbox_cp_invalid",
                    "exactly one side must be in a sandbox (SANDBOX_ID:PATH)",
                ),
            ))
        }
        (Endpoint::Host(path), Endpoint::Sandbox(id, dest)) => {
            let content = std::fs::read(path).map_err(|e| {
                Failure::new(
                    format!("read {}", path.display()),
                    Error::invalid("sandbox_cp_source_unreadable", e.to_string()),
                )
            })?;
            let len = content.len();
            let dest = if dest.ends_with('/') {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
                format!("{dest}{name}")
            } else {
                dest.clone()
            };
            upload(ctx, id, &dest, content).await?;
            ctx.out.result(
                &json!({ "sandboxId": id, "path": dest, "bytes": len, "direction": "to_sandbox" }),
                String::new,
            );
            return Ok(0);
        }
        (Endpoint::Stdio, Endpoint::Sandbox(id, dest)) => {
            let mut content = Vec::new();
            std::io::stdin().read_to_end(&mut content).map_err(|e| {
                Failure::new(
                    "read stdin",
                    Error::invalid("sandbox_cp_source_unreadable", e.to_string()),
                )
            })?;
            let len = content.len();
            upload(ctx, id, dest, content).await?;
            ctx.out.result(
                &json!({ "sandboxId": id, "path": dest, "bytes": len, "direction": "to_sandbox" }),
                String::new,
            );
            return Ok(0);
        }
        (Endpoint::Sandbox(id, path), _) => download(ctx, id, path).await?,
    };
    let (Endpoint::Sandbox(id, path), to) = (&from, &to) else {
        unreachable!("the only remaining direction is sandbox to host")
    };
    match to {
        Endpoint::Stdio => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|_| out.flush())
                .map_err(|e| Failure::new("write stdout", Error::from(e)))?;
        }
        Endpoint::Host(dest) => {
            let dest = if dest.is_dir() {
                dest.join(file_name(path))
            } else {
                dest.clone()
            };
            write_host(&dest, &bytes)?;
            ctx.out.result(
                &json!({ "sandboxId": id, "path": path, "bytes": bytes.len(), "direction": "from_sandbox", "hostPath": dest }),
                String::new,
            );
        }
        Endpoint::Sandbox(..) => unreachable!("checked above"),
    }
    Ok(0)
}

async fn upload(ctx: &Ctx, id: &SandboxId, dest: &str, content: Vec<u8>) -> Result<(), Failure> {
    let service = service(ctx)?;
    service
        .write_files(id, vec![FileWrite::new(dest, content)])
        .await
        .context(|| format!("copy to {dest} in sandbox {id}"))
}

async fn download(ctx: &Ctx, id: &SandboxId, path: &str) -> Result<bytes::Bytes, Failure> {
    let service = service(ctx)?;
    let what = || format!("copy {path} from sandbox {id}");
    service
        .read_file(id, path)
        .await
        .context(what)?
        .ok_or_else(|| Failure::new(what(), Error::not_found(Missing::File, path)))
}

fn write_host(dest: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(dest, bytes).map_err(|e| {
        Failure::new(
            format!("write {}", dest.display()),
            Error::invalid("sandbox_cp_destination_unwritable", e.to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_docker_cp() {
        let id = SandboxId::new();
        assert_eq!(
            parse_endpoint(&format!("{id}:a/b.bin")).unwrap(),
            Endpoint::Sandbox(id, "a/b.bin".into())
        );
        assert_eq!(parse_endpoint("-").unwrap(), Endpoint::Stdio);
        assert_eq!(
            parse_endpoint("./x:y").unwrap(),
            Endpoint::Host("./x:y".into())
        );
        assert_eq!(
            parse_endpoint("/tmp/a").unwrap(),
            Endpoint::Host("/tmp/a".into())
        );
        let bad = parse_endpoint("not-an-id:file").unwrap_err();
        assert_eq!(bad.error.code(), "invalid_sandbox_id");
        assert_eq!(
            parse_endpoint(&format!("{id}:")).unwrap_err().error.code(),
            "sandbox_path_invalid"
        );
    }
}
