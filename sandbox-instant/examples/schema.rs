//! Prints the InstantDB schema the `instant` store expects, as JSON (`cargo xtask instant-schema`).

fn main() {
    let json = serde_json::to_string_pretty(&sandbox_instant::schema::schema_json())
        .expect("the schema serialises");
    println!("{json}");
}
