//! `InstantStore`: sandbox and process records as `sandbox_sandboxes` / `sandbox_processes`
//! entities, over `/admin/query` and `/admin/transact`.

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use sandbox_core::protocol::strip_nul_value;
use sandbox_core::{
    Error, Missing, ProcessFilter, ProcessId, ProcessPatch, ProcessRecord, ProcessStatus,
    RecordStore, Result, SandboxFilter, SandboxId, SandboxPatch, SandboxRecord,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::client::InstantClient;
use crate::error::Op;
use crate::schema::{PROCESSES, SANDBOXES};
use crate::INSTANT;

/// The `instant` record store.
#[derive(Debug)]
pub struct InstantStore {
    client: InstantClient,
    /// Sandboxes this store saw exist, so inserting a process into one needs no lookup first.
    known_sandboxes: Mutex<HashSet<SandboxId>>,
}

/// Attributes of a record as written: camelCase names, NUL stripped, `id` and the link apart.
pub(crate) fn attributes<T: Serialize>(record: &T) -> Map<String, Value> {
    let v = serde_json::to_value(record).unwrap_or(Value::Null);
    let Value::Object(mut m) = strip_nul_value(v) else {
        return Map::new();
    };
    m.remove("id");
    m.remove("sandboxId");
    m
}

fn decode<T: DeserializeOwned>(ns: &str, row: Value) -> Result<T> {
    let id = row
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    serde_json::from_value(row).map_err(|e| {
        Error::protocol(
            "instant_record_invalid",
            format!("{INSTANT}: {ns} {id} does not match the schema: {e}"),
        )
    })
}

fn rows(result: &Value, ns: &str) -> Result<Vec<Value>> {
    match result.get(ns) {
        Some(Value::Array(a)) => Ok(a.clone()),
        None => Ok(vec![]),
        Some(other) => Err(Error::protocol(
            "instant_response_invalid",
            format!("{INSTANT}: query result for {ns} is not a list: {other}"),
        )),
    }
}

/// A process row with its `sandbox` link folded into `sandboxId`.
fn process_from_row(mut row: Value) -> Result<ProcessRecord> {
    let sandbox = row
        .get("sandbox")
        .and_then(|s| match s {
            Value::Array(a) => a.first(),
            obj @ Value::Object(_) => Some(obj),
            _ => None,
        })
        .and_then(|s| s.get("id"))
        .cloned();
    let Some(sandbox) = sandbox else {
        let id = row.get("id").cloned().unwrap_or(Value::Null);
        return Err(Error::protocol(
            "instant_record_invalid",
            format!("{INSTANT}: sandbox_processes {id} has no sandbox link"),
        ));
    };
    if let Some(m) = row.as_object_mut() {
        m.remove("sandbox");
        m.insert("sandboxId".into(), sandbox);
    }
    decode(PROCESSES.name, row)
}

const OPEN_STATUSES: [ProcessStatus; 3] = [
    ProcessStatus::Starting,
    ProcessStatus::Running,
    ProcessStatus::Detached,
];

impl InstantStore {
    pub(crate) fn new(client: InstantClient) -> Self {
        InstantStore {
            client,
            known_sandboxes: Mutex::new(HashSet::new()),
        }
    }

    fn note_sandbox(&self, id: SandboxId) {
        self.known_sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
    }

    fn is_known(&self, id: &SandboxId) -> bool {
        self.known_sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Rows of `ns` matching `where_`, ordered by `order_attr` then id, at most `limit`.
    ///
    /// InstaQL orders by one attribute and cannot break ties by id, so with a limit the rows
    /// tied at the boundary are fetched too and the cut is made here.
    async fn list_ordered(
        &self,
        ns: &str,
        where_: Map<String, Value>,
        order_attr: &str,
        limit: Option<usize>,
        expand: Value,
    ) -> Result<Vec<Value>> {
        let mut opts = json!({"where": where_, "order": {order_attr: "asc"}});
        if let Some(n) = limit {
            opts["limit"] = json!(n);
        }
        let mut q = expand.as_object().cloned().unwrap_or_default();
        q.insert("$".into(), opts);
        let result = self.client.query(json!({ ns: q.clone() })).await?;
        let mut found = rows(&result, ns)?;
        if let (Some(n), Some(last)) = (limit, found.last()) {
            if found.len() == n {
                let tie = last.get(order_attr).cloned().unwrap_or(Value::Null);
                let mut w = where_.clone();
                w.insert(
                    order_attr.into(),
                    if tie.is_null() {
                        json!({"$isNull": true})
                    } else {
                        tie
                    },
                );
                q.insert("$".into(), json!({"where": w}));
                let more = self.client.query(json!({ ns: q })).await?;
                for r in rows(&more, ns)? {
                    if !found.iter().any(|f| f.get("id") == r.get("id")) {
                        found.push(r);
                    }
                }
            }
        }
        // Missing values first, as the server sorts; numbers compared as numbers, whatever
        // their JSON spelling.
        let time = |v: &Value| {
            v.get(order_attr)
                .and_then(Value::as_f64)
                .unwrap_or(f64::NEG_INFINITY)
        };
        let id = |v: &Value| {
            v.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        found.sort_by(|a, b| time(a).total_cmp(&time(b)).then_with(|| id(a).cmp(&id(b))));
        if let Some(n) = limit {
            found.truncate(n);
        }
        Ok(found)
    }
}

fn by_id(id: impl ToString) -> Value {
    json!({"$": {"where": {"id": id.to_string()}}})
}

#[async_trait]
impl RecordStore for InstantStore {
    fn name(&self) -> &str {
        INSTANT
    }

    async fn insert_sandbox(&self, record: &SandboxRecord) -> Result<()> {
        let step = json!([
            "create",
            SANDBOXES.name,
            record.id.to_string(),
            attributes(record)
        ]);
        self.client
            .transact(
                vec![step],
                Op::Insert(Missing::Sandbox, record.id.to_string()),
            )
            .await?;
        self.note_sandbox(record.id);
        Ok(())
    }

    async fn patch_sandbox(&self, id: &SandboxId, patch: &SandboxPatch) -> Result<()> {
        let step =
            json!(["update", SANDBOXES.name, id.to_string(), attributes(patch), {"upsert": false}]);
        self.client
            .transact(vec![step], Op::Patch(Missing::Sandbox, id.to_string()))
            .await?;
        self.note_sandbox(*id);
        Ok(())
    }

    async fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>> {
        let r = self
            .client
            .query(json!({ SANDBOXES.name: by_id(id) }))
            .await?;
        let Some(row) = rows(&r, SANDBOXES.name)?.into_iter().next() else {
            return Ok(None);
        };
        let rec: SandboxRecord = decode(SANDBOXES.name, row)?;
        self.note_sandbox(rec.id);
        Ok(Some(rec))
    }

    async fn list_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<SandboxRecord>> {
        let mut w = Map::new();
        if let Some(s) = filter.status {
            w.insert("status".into(), json!(s.as_str()));
        }
        if let Some(p) = &filter.provider {
            w.insert("provider".into(), json!(p));
        }
        let found = self
            .list_ordered(SANDBOXES.name, w, "createdAt", filter.limit, json!({}))
            .await?;
        let recs = found
            .into_iter()
            .map(|r| decode::<SandboxRecord>(SANDBOXES.name, r))
            .collect::<Result<Vec<_>>>()?;
        for r in &recs {
            self.note_sandbox(r.id);
        }
        Ok(recs)
    }

    async fn insert_process(&self, record: &ProcessRecord) -> Result<()> {
        if !self.is_known(&record.sandbox_id) {
            // One lookup, only for a sandbox this store has not seen: links to a missing
            // entity are not refused by the server.
            let r = self
                .client
                .query(json!({ SANDBOXES.name: {"$": {"where": {"id": record.sandbox_id.to_string()}, "fields": ["status"]}} }))
                .await?;
            if rows(&r, SANDBOXES.name)?.is_empty() {
                return Err(Error::not_found(
                    Missing::Sandbox,
                    record.sandbox_id.to_string(),
                ));
            }
            self.note_sandbox(record.sandbox_id);
        }
        let pid = record.id.to_string();
        let mut links = Map::new();
        links.insert("sandbox".into(), json!(record.sandbox_id.to_string()));
        // The `$streams` entity id is the server's stream id, a UUID; anything else is not one.
        if let Some(sid) = record
            .stream_id
            .as_deref()
            .filter(|s| uuid::Uuid::try_parse(s).is_ok())
        {
            links.insert("stream".into(), json!(sid));
        }
        let steps = vec![
            json!(["create", PROCESSES.name, pid, attributes(record)]),
            json!(["link", PROCESSES.name, pid, links]),
        ];
        self.client
            .transact(steps, Op::Insert(Missing::Process, pid.clone()))
            .await?;
        Ok(())
    }

    async fn patch_process(&self, id: &ProcessId, patch: &ProcessPatch) -> Result<()> {
        let pid = id.to_string();
        let mut steps =
            vec![json!(["update", PROCESSES.name, pid, attributes(patch), {"upsert": false}])];
        if let Some(sid) = patch
            .stream_id
            .as_deref()
            .filter(|s| uuid::Uuid::try_parse(s).is_ok())
        {
            steps.push(json!(["link", PROCESSES.name, pid, {"stream": sid}]));
        }
        self.client
            .transact(steps, Op::Patch(Missing::Process, pid))
            .await?;
        Ok(())
    }

    async fn get_process(&self, id: &ProcessId) -> Result<Option<ProcessRecord>> {
        let mut q = by_id(id);
        q["sandbox"] = json!({"$": {"fields": ["id"]}});
        let r = self.client.query(json!({ PROCESSES.name: q })).await?;
        match rows(&r, PROCESSES.name)?.into_iter().next() {
            Some(row) => process_from_row(row).map(Some),
            None => Ok(None),
        }
    }

    async fn list_processes(&self, filter: &ProcessFilter) -> Result<Vec<ProcessRecord>> {
        let mut w = Map::new();
        if let Some(s) = filter.sandbox_id {
            w.insert("sandbox.id".into(), json!(s.to_string()));
        }
        match (filter.status, filter.open_only) {
            (Some(s), true) if s.is_terminal() => return Ok(vec![]),
            (Some(s), _) => {
                w.insert("status".into(), json!(s.as_str()));
            }
            (None, true) => {
                let open: Vec<&str> = OPEN_STATUSES.iter().map(|s| s.as_str()).collect();
                w.insert("status".into(), json!({ "$in": open }));
            }
            (None, false) => {}
        }
        let found = self
            .list_ordered(
                PROCESSES.name,
                w,
                "startedAt",
                filter.limit,
                json!({"sandbox": {"$": {"fields": ["id"]}}}),
            )
            .await?;
        found.into_iter().map(process_from_row).collect()
    }
}
