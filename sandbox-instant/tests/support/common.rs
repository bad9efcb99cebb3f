//! Shared setup: an emulator and a backend pointed at it.
#![allow(dead_code)]

use std::time::Duration;

use sandbox_core::{Env, StoreBackend};
use sandbox_instant::InstantConfig;
use sandbox_testkit::instant::InstantEmulator;

pub const APP_ID: &str = "5b0bb4a8-6a8a-4bd4-9e55-6c3a0c1f0a11";
pub const TOKEN: &str = "c1d2e3f4-0000-4000-8000-00000000beef";

pub async fn emulator() -> InstantEmulator {
    InstantEmulator::start(APP_ID, TOKEN).await
}

pub fn config(emu: &InstantEmulator) -> InstantConfig {
    let mut c = InstantConfig::new(APP_ID, TOKEN, &emu.base_url()).unwrap();
    c.retry.initial_backoff = Duration::from_millis(5);
    c.retry.max_backoff = Duration::from_millis(50);
    c.sse_timeout = Duration::from_secs(5);
    c
}

pub fn backend(emu: &InstantEmulator) -> StoreBackend {
    sandbox_instant::backend(config(emu)).unwrap()
}

pub fn env(emu: &InstantEmulator) -> Env {
    Env::from_pairs([
        ("INSTANT_APP_ID", APP_ID),
        ("INSTANT_APP_ADMIN_TOKEN", TOKEN),
        ("INSTANT_API_URI", emu.base_url().as_str()),
    ])
}

/// A backend whose writers send only when a batch is full or on flush/close, so request
/// counts do not depend on how fast the machine is.
pub fn backend_without_timer(emu: &InstantEmulator) -> StoreBackend {
    let mut c = config(emu);
    c.batch_delay = Duration::from_secs(3600);
    sandbox_instant::backend(c).unwrap()
}
