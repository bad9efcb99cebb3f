//! Runs the Sprites API emulator until Ctrl-C, for demos of the CLI without an account:
//!
//! ```text
//! cargo run -p sandbox-testkit --features emulator-sprites --example sprites_emulator [TOKEN]
//! SPRITES_API_BASE_URL=<printed URL> SPRITES_API_TOKEN=<token> \
//!     sandbox run --provider sprites -- uname -a
//! ```

use sandbox_testkit::sprites::SpritesEmulator;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let token = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "emulator-token".to_string());
    let emulator = SpritesEmulator::start(token).await?;
    println!("SPRITES_API_BASE_URL={}", emulator.base_url());
    println!("SPRITES_API_TOKEN={}", emulator.token());
    eprintln!("Sprites API emulator running; Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    eprintln!("{} requests served", emulator.request_count());
    Ok(())
}
