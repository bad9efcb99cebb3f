//! The store and stream conformance suites hold for SQLite: on a file, on a file reopened by a
//! second handle, and in memory.

use std::sync::Arc;

use sandbox_sqlite::{SqliteConfig, SqliteDatabase};
use sandbox_testkit::{store::run_store_suite, stream::run_stream_suite};

fn file_db() -> (tempfile::TempDir, SqliteDatabase) {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDatabase::open(&SqliteConfig::file(dir.path().join("suite.db"))).unwrap();
    (dir, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_store_passes_the_store_suite() {
    let (_dir, db) = file_db();
    run_store_suite(Arc::new(db.records()))
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_sink_passes_the_stream_suite() {
    let (_dir, db) = file_db();
    run_stream_suite(Arc::new(db.logs())).await.assert_passed();
}

#[tokio::test]
async fn sqlite_memory_store_and_sink_pass_the_suites() {
    let db = SqliteDatabase::open(&SqliteConfig::memory()).unwrap();
    run_store_suite(Arc::new(db.records()))
        .await
        .assert_passed();
    run_stream_suite(Arc::new(db.logs())).await.assert_passed();
}

#[tokio::test]
async fn the_registered_sqlite_scheme_opens_a_backend_that_passes_the_suites() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    let backend = sandbox_core::registry::open_store(&url, &sandbox_core::Env::process()).unwrap();
    assert_eq!(
        backend.location,
        dir.path().join("registry.db").display().to_string()
    );
    assert_eq!(backend.records.name(), "sqlite");
    run_store_suite(backend.records.clone())
        .await
        .assert_passed();
    run_stream_suite(backend.logs.clone()).await.assert_passed();
}
