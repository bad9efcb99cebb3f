//! The provider conformance suite of sandbox-testkit, once per isolation mode this machine
//! offers.

mod common;

use sandbox_local::Isolation;

async fn suite(mode: Isolation) {
    for mode in common::modes(&[mode]).await {
        let dir = common::root();
        let provider = common::provider(dir.path());
        let report = sandbox_testkit::provider::run_provider_suite(
            provider,
            common::config(mode, r#""ports": [18080]"#),
        )
        .await;
        report.assert_passed();
        eprintln!("{mode}: {} checks passed", report.passed());
        assert!(report.passed() >= 15, "only {} checks ran", report.passed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_with_bubblewrap() {
    suite(Isolation::Bwrap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_with_landlock() {
    suite(Isolation::Landlock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_without_isolation() {
    suite(Isolation::None).await;
}
