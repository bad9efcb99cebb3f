//! The store and stream conformance suites hold for `instant` through the emulator.

#[path = "support/common.rs"]
mod common;

use sandbox_instant as _;
use sandbox_testkit::{store::run_store_suite, stream::run_stream_suite};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_store_passes_the_store_suite() {
    let emu = common::emulator().await;
    run_store_suite(common::backend(&emu).records)
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_sink_passes_the_stream_suite() {
    let emu = common::emulator().await;
    run_stream_suite(common::backend(&emu).logs)
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_sink_passes_the_stream_suite_when_every_append_is_flushed_to_file_parts() {
    let emu = common::emulator().await;
    emu.set_flush_byte_limit(1);
    run_stream_suite(common::backend(&emu).logs)
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registered_instant_scheme_opens_a_backend_that_passes_the_suites() {
    let emu = common::emulator().await;
    let b = sandbox_core::registry::open_store("instant:", &common::env(&emu)).unwrap();
    assert!(b.location.contains(common::APP_ID));
    assert!(!b.location.contains(common::TOKEN));
    run_store_suite(b.records).await.assert_passed();
    run_stream_suite(b.logs).await.assert_passed();
}
