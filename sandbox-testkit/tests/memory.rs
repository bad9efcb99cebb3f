//! The store and stream conformance suites hold for the in-memory backend.

use std::sync::Arc;

use sandbox_core::{MemorySink, MemoryStore};
use sandbox_testkit::{store::run_store_suite, stream::run_stream_suite};

#[tokio::test]
async fn memory_store_passes_the_store_suite() {
    run_store_suite(Arc::new(MemoryStore::new()))
        .await
        .assert_passed();
}

#[tokio::test]
async fn memory_sink_passes_the_stream_suite() {
    run_stream_suite(Arc::new(MemorySink::new()))
        .await
        .assert_passed();
}
