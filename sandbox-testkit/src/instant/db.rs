//! The emulator's triple store: entities, links, InstaQL queries and transactions.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// A link between two namespaces, as declared in a schema: `forward` on `from`, `reverse` on `to`.
#[derive(Debug, Clone)]
pub(crate) struct LinkDef {
    pub from: &'static str,
    pub forward: &'static str,
    pub to: &'static str,
    pub reverse: &'static str,
}

/// The links of the `@ekairos/sandbox` schema the emulator knows.
pub(crate) const LINKS: &[LinkDef] = &[
    LinkDef {
        from: "sandbox_processes",
        forward: "sandbox",
        to: "sandbox_sandboxes",
        reverse: "processes",
    },
    LinkDef {
        from: "sandbox_processes",
        forward: "stream",
        to: "$streams",
        reverse: "sandboxProcesses",
    },
    LinkDef {
        from: "sandbox_sandboxes",
        forward: "user",
        to: "$users",
        reverse: "sandboxes",
    },
];

/// An error answered with HTTP 400 and `{"type", "message"}`.
#[derive(Debug, Clone)]
pub(crate) struct DbError {
    pub kind: &'static str,
    pub message: String,
}

fn err(kind: &'static str, message: impl Into<String>) -> DbError {
    DbError {
        kind,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct LinkRow {
    from_ns: String,
    from_id: String,
    label: String,
    to_id: String,
}

/// Entities of one namespace by id: (insertion number, attributes).
type Namespace = BTreeMap<String, (u64, Map<String, Value>)>;

/// Entities by namespace and id, with an insertion counter for stable ordering.
#[derive(Debug, Default, Clone)]
pub(crate) struct Db {
    entities: BTreeMap<String, Namespace>,
    links: Vec<LinkRow>,
    counter: u64,
    tx: u64,
}

/// Where a link label leads from a namespace: (target namespace, label as stored, forward?).
fn resolve_link(ns: &str, label: &str) -> Option<(&'static str, bool)> {
    LINKS.iter().find_map(|l| {
        if l.from == ns && l.forward == label {
            Some((l.to, true))
        } else if l.to == ns && l.reverse == label {
            Some((l.from, false))
        } else {
            None
        }
    })
}

fn forward_label(ns: &str, label: &str) -> Option<&'static str> {
    LINKS
        .iter()
        .find(|l| (l.from == ns && l.forward == label) || (l.to == ns && l.reverse == label))
        .map(|l| l.forward)
}

fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(contains_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

fn deep_merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                deep_merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

impl Db {
    pub fn get(&self, ns: &str, id: &str) -> Option<&Map<String, Value>> {
        self.entities.get(ns)?.get(id).map(|(_, m)| m)
    }

    /// Inserts or replaces attributes of an entity without a transaction (system namespaces).
    pub fn put(&mut self, ns: &str, id: &str, attrs: Map<String, Value>) {
        self.counter += 1;
        let n = self.counter;
        let slot = self
            .entities
            .entry(ns.to_string())
            .or_default()
            .entry(id.to_string())
            .or_insert((n, Map::new()));
        for (k, v) in attrs {
            slot.1.insert(k, v);
        }
    }

    /// Applies `steps` atomically: on error nothing changes. Returns the tx id and the entities
    /// touched (namespace, id).
    pub fn transact(&mut self, steps: &[Value]) -> Result<(u64, Vec<(String, String)>), DbError> {
        let mut next = self.clone();
        let mut touched = Vec::new();
        for step in steps {
            let arr = step
                .as_array()
                .ok_or_else(|| err("param-malformed", "each step must be an array"))?;
            let action = arr.first().and_then(Value::as_str).unwrap_or_default();
            let ns = arr
                .get(1)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let id = arr
                .get(2)
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    err(
                        "param-malformed",
                        format!("step {action}: id must be a string"),
                    )
                })?
                .to_string();
            let args = arr.get(3).cloned().unwrap_or(Value::Null);
            let opts = arr.get(4).cloned().unwrap_or(Value::Null);
            if ns.is_empty() {
                return Err(err("param-malformed", "step without a namespace"));
            }
            if uuid::Uuid::try_parse(&id).is_err() {
                return Err(err(
                    "param-malformed",
                    format!("Invalid id for {ns}: expected a uuid"),
                ));
            }
            if contains_nul(&args) {
                return Err(err(
                    "validation-failed",
                    format!("{ns} {id}: strings may not contain the NUL character"),
                ));
            }
            let exists = next.get(&ns, &id).is_some();
            match action {
                "create" | "update" | "merge" => {
                    let attrs = args.as_object().cloned().unwrap_or_default();
                    if attrs.contains_key("id") {
                        return Err(err("validation-failed", "`id` is not an attribute"));
                    }
                    if action == "create" && exists {
                        return Err(err(
                            "validation-failed",
                            format!("Creating entities that exist: {ns} {id}"),
                        ));
                    }
                    let upsert = opts.get("upsert").and_then(Value::as_bool).unwrap_or(true);
                    if action == "update" && !upsert && !exists {
                        return Err(err(
                            "validation-failed",
                            format!("Updating entities that don't exist: {ns} {id}"),
                        ));
                    }
                    if action == "merge" {
                        let current = next.get(&ns, &id).cloned().unwrap_or_default();
                        let mut merged = Value::Object(current);
                        deep_merge(&mut merged, &Value::Object(attrs));
                        let Value::Object(m) = merged else {
                            unreachable!()
                        };
                        next.put(&ns, &id, m);
                    } else {
                        next.put(&ns, &id, attrs);
                    }
                }
                "link" | "unlink" => {
                    let links = args.as_object().ok_or_else(|| {
                        err(
                            "param-malformed",
                            format!("{action}: args must be an object"),
                        )
                    })?;
                    if !exists && action == "link" {
                        next.put(&ns, &id, Map::new());
                    }
                    for (label, targets) in links {
                        let (_, is_forward) = resolve_link(&ns, label).ok_or_else(|| {
                            err(
                                "validation-failed",
                                format!("{ns} has no link labelled {label}"),
                            )
                        })?;
                        let fwd = forward_label(&ns, label).unwrap_or_default().to_string();
                        let ids: Vec<String> = match targets {
                            Value::String(s) => vec![s.clone()],
                            Value::Array(a) => a
                                .iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect(),
                            _ => return Err(err("param-malformed", "link targets must be ids")),
                        };
                        for target in ids {
                            let def_from = if is_forward {
                                ns.clone()
                            } else {
                                resolve_link(&ns, label)
                                    .map(|(t, _)| t.to_string())
                                    .unwrap_or_default()
                            };
                            let row = if is_forward {
                                LinkRow {
                                    from_ns: def_from,
                                    from_id: id.clone(),
                                    label: fwd.clone(),
                                    to_id: target,
                                }
                            } else {
                                LinkRow {
                                    from_ns: def_from,
                                    from_id: target,
                                    label: fwd.clone(),
                                    to_id: id.clone(),
                                }
                            };
                            if action == "link" {
                                if !next.links.contains(&row) {
                                    next.links.push(row);
                                }
                            } else {
                                next.links.retain(|r| r != &row);
                            }
                        }
                    }
                }
                "delete" => {
                    if let Some(m) = next.entities.get_mut(&ns) {
                        m.remove(&id);
                    }
                    next.links
                        .retain(|r| !((r.from_ns == ns && r.from_id == id) || r.to_id == id));
                }
                other => {
                    return Err(err(
                        "param-malformed",
                        format!("unknown transaction action {other:?}"),
                    ))
                }
            }
            touched.push((ns, id));
        }
        next.tx += 1;
        let tx = next.tx;
        *self = next;
        Ok((tx, touched))
    }

    /// Ids linked from `ns`/`id` through `label` (either direction), with their namespace.
    fn linked(&self, ns: &str, id: &str, label: &str) -> Option<(&'static str, Vec<String>)> {
        let (target, is_forward) = resolve_link(ns, label)?;
        let fwd = forward_label(ns, label)?;
        let ids = self
            .links
            .iter()
            .filter(|r| r.label == fwd)
            .filter_map(|r| {
                if is_forward && r.from_ns == ns && r.from_id == id {
                    Some(r.to_id.clone())
                } else if !is_forward && r.to_id == id && r.from_ns == target {
                    Some(r.from_id.clone())
                } else {
                    None
                }
            })
            .collect();
        Some((target, ids))
    }

    /// Values found at a dotted path (`status`, `sandbox.id`).
    fn path_values(&self, ns: &str, id: &str, path: &[&str]) -> Vec<Value> {
        match path {
            [] => vec![],
            ["id"] => vec![Value::String(id.to_string())],
            [attr] => vec![self
                .get(ns, id)
                .and_then(|m| m.get(*attr))
                .cloned()
                .unwrap_or(Value::Null)],
            [label, rest @ ..] => match self.linked(ns, id, label) {
                Some((target, ids)) => ids
                    .iter()
                    .flat_map(|t| self.path_values(target, t, rest))
                    .collect(),
                None => vec![],
            },
        }
    }

    fn matches(&self, ns: &str, id: &str, where_: &Map<String, Value>) -> Result<bool, DbError> {
        for (key, cond) in where_ {
            let ok = match key.as_str() {
                "and" | "or" => {
                    let parts = cond
                        .as_array()
                        .ok_or_else(|| err("validation-failed", format!("{key} takes a list")))?;
                    let mut results = Vec::new();
                    for p in parts {
                        let m = p
                            .as_object()
                            .ok_or_else(|| err("validation-failed", "where clauses are objects"))?;
                        results.push(self.matches(ns, id, m)?);
                    }
                    if key == "and" {
                        results.iter().all(|b| *b)
                    } else {
                        results.iter().any(|b| *b)
                    }
                }
                _ => {
                    let path: Vec<&str> = key.split('.').collect();
                    let values = self.path_values(ns, id, &path);
                    cond_holds(&values, cond)?
                }
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs an InstaQL query and returns the result tree.
    pub fn query(&self, q: &Value) -> Result<Value, DbError> {
        let q = q
            .as_object()
            .ok_or_else(|| err("param-malformed", "query must be an object"))?;
        let mut out = Map::new();
        for (ns, sub) in q {
            if ns == "$$ruleParams" {
                continue;
            }
            let ids: Vec<String> = self
                .entities
                .get(ns)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            out.insert(ns.clone(), self.select(ns, ids, sub, true)?);
        }
        Ok(Value::Object(out))
    }

    fn select(&self, ns: &str, ids: Vec<String>, sub: &Value, top: bool) -> Result<Value, DbError> {
        let sub = sub.as_object().cloned().unwrap_or_default();
        let opts = sub
            .get("$")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut rows: Vec<String> = Vec::new();
        let where_ = opts
            .get("where")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for id in ids {
            if self.get(ns, &id).is_none() {
                continue;
            }
            if self.matches(ns, &id, &where_)? {
                rows.push(id);
            }
        }
        let counter = |id: &String| {
            self.entities
                .get(ns)
                .and_then(|m| m.get(id))
                .map(|(n, _)| *n)
                .unwrap_or(0)
        };
        rows.sort_by_key(counter);
        if let Some(order) = opts.get("order").and_then(Value::as_object) {
            for (attr, dir) in order.iter().rev() {
                let desc = dir.as_str() == Some("desc");
                rows.sort_by(|a, b| {
                    let va = self.path_values(ns, a, &[attr.as_str()]);
                    let vb = self.path_values(ns, b, &[attr.as_str()]);
                    let o = cmp_values(va.first(), vb.first());
                    if desc {
                        o.reverse()
                    } else {
                        o
                    }
                });
            }
        }
        if !top && (opts.contains_key("offset") || opts.contains_key("limit")) {
            return Err(err(
                "validation-failed",
                "limit and offset are only allowed on top-level namespaces",
            ));
        }
        let offset = opts.get("offset").and_then(Value::as_u64).unwrap_or(0) as usize;
        let rows: Vec<String> = rows.into_iter().skip(offset).collect();
        let rows: Vec<String> = match opts.get("limit").and_then(Value::as_u64) {
            Some(n) => rows.into_iter().take(n as usize).collect(),
            None => rows,
        };
        let fields: Option<Vec<String>> = opts.get("fields").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        });
        let mut out = Vec::new();
        for id in rows {
            let mut obj = Map::new();
            obj.insert("id".into(), json!(id));
            for (k, v) in self.get(ns, &id).cloned().unwrap_or_default() {
                if fields.as_ref().is_none_or(|f| f.contains(&k)) {
                    obj.insert(k, v);
                }
            }
            for (label, nested) in &sub {
                if label == "$" {
                    continue;
                }
                let (target, linked) = self.linked(ns, &id, label).ok_or_else(|| {
                    err(
                        "validation-failed",
                        format!("{ns} has no link labelled {label}"),
                    )
                })?;
                obj.insert(label.clone(), self.select(target, linked, nested, false)?);
            }
            out.push(Value::Object(obj));
        }
        Ok(Value::Array(out))
    }
}

fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    let rank = |v: Option<&Value>| match v {
        None | Some(Value::Null) => 0,
        _ => 1,
    };
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

fn cond_holds(values: &[Value], cond: &Value) -> Result<bool, DbError> {
    let single = |v: &Value| -> Result<bool, DbError> {
        match cond {
            Value::Object(ops) => {
                for (op, arg) in ops {
                    let ok = match op.as_str() {
                        "$in" => arg.as_array().is_some_and(|a| a.contains(v)),
                        "$not" => v != arg,
                        "$ne" => v != arg,
                        "$isNull" => (v.is_null()) == arg.as_bool().unwrap_or(true),
                        "$gt" | "$gte" | "$lt" | "$lte" => {
                            let o = cmp_values(Some(v), Some(arg));
                            !v.is_null()
                                && match op.as_str() {
                                    "$gt" => o.is_gt(),
                                    "$gte" => o.is_ge(),
                                    "$lt" => o.is_lt(),
                                    _ => o.is_le(),
                                }
                        }
                        other => {
                            return Err(err(
                                "validation-failed",
                                format!("unsupported where operator {other}"),
                            ))
                        }
                    };
                    if !ok {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            _ => Ok(v == cond),
        }
    };
    if values.is_empty() {
        return single(&Value::Null);
    }
    for v in values {
        if single(v)? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "3f1c2b7e-8d4a-4c1e-9b2f-0a1b2c3d4e5f";
    const P1: &str = "9b1c2c3e-0000-4000-8000-000000000001";
    const P2: &str = "9b1c2c3e-0000-4000-8000-000000000002";

    fn db() -> Db {
        let mut db = Db::default();
        db.transact(&[
            json!(["update", "sandbox_sandboxes", S, {"status": "active", "params": {"a": {"b": 1}}}]),
            json!(["create", "sandbox_processes", P1, {"status": "running", "startedAt": 2}]),
            json!(["create", "sandbox_processes", P2, {"status": "exited", "startedAt": 1}]),
            json!(["link", "sandbox_processes", P1, {"sandbox": S}]),
            json!(["link", "sandbox_sandboxes", S, {"processes": [P2]}]),
        ])
        .unwrap();
        db
    }

    fn ids(v: &Value, ns: &str) -> Vec<String> {
        v[ns]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn where_on_link_paths_order_and_limit() {
        let db = db();
        let q = json!({"sandbox_processes": {"$": {"where": {"sandbox.id": S}, "order": {"startedAt": "asc"}}}});
        assert_eq!(ids(&db.query(&q).unwrap(), "sandbox_processes"), [P2, P1]);
        let q = json!({"sandbox_processes": {"$": {"where": {"status": {"$in": ["running"]}}, "limit": 5}}});
        assert_eq!(ids(&db.query(&q).unwrap(), "sandbox_processes"), [P1]);
        let q = json!({"sandbox_sandboxes": {"processes": {"$": {"where": {"status": "exited"}}}}});
        let r = db.query(&q).unwrap();
        assert_eq!(ids(&r["sandbox_sandboxes"][0], "processes"), [P2]);
        let q = json!({"sandbox_sandboxes": {"processes": {"$": {"limit": 1}}}});
        assert_eq!(db.query(&q).unwrap_err().kind, "validation-failed");
    }

    #[test]
    fn merge_unlink_delete_and_atomicity() {
        let mut db = db();
        db.transact(&[json!(["merge", "sandbox_sandboxes", S, {"params": {"a": {"c": 2}}}])])
            .unwrap();
        assert_eq!(
            db.get("sandbox_sandboxes", S).unwrap()["params"],
            json!({"a": {"b": 1, "c": 2}})
        );
        db.transact(&[json!(["unlink", "sandbox_processes", P1, {"sandbox": [S]}])])
            .unwrap();
        let q = json!({"sandbox_processes": {"$": {"where": {"sandbox.id": S}}}});
        assert_eq!(ids(&db.query(&q).unwrap(), "sandbox_processes"), [P2]);
        db.transact(&[json!(["delete", "sandbox_processes", P2, null])])
            .unwrap();
        assert!(db.get("sandbox_processes", P2).is_none());

        let before = db.get("sandbox_sandboxes", S).cloned();
        let e = db
            .transact(&[
                json!(["update", "sandbox_sandboxes", S, {"status": "shutdown"}]),
                json!(["create", "sandbox_processes", P1, {"status": "x"}]),
            ])
            .unwrap_err();
        assert!(e.message.contains("Creating entities that exist"));
        assert_eq!(
            db.get("sandbox_sandboxes", S).cloned(),
            before,
            "nothing applied"
        );
        let e = db
            .transact(&[
                json!(["update", "sandbox_processes", P2, {"status": "x"}, {"upsert": false}]),
            ])
            .unwrap_err();
        assert!(e.message.contains("Updating entities that don't exist"));
        let e = db
            .transact(&[json!(["update", "sandbox_processes", P1, {"command": "a\u{0}b"}])])
            .unwrap_err();
        assert_eq!(e.kind, "validation-failed");
    }
}
