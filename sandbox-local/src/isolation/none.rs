//! No isolation: an ordinary child process with a cleared environment.

use tokio::process::Command;

use super::Launch;

/// `argv` run directly in `cwd` with exactly `env`.
pub(crate) fn command(launch: &Launch<'_>) -> Command {
    let mut cmd = Command::new(&launch.argv[0]);
    cmd.args(&launch.argv[1..])
        .current_dir(launch.cwd)
        .env_clear()
        .envs(launch.env);
    cmd
}
