//! The upstream InstantDB schema of `@ekairos/sandbox` as data (`reference/upstream-spec.md`
//! §4.1–4.2), and its JSON form for users to push to their app.

use serde_json::{json, Map, Value};

/// Value type of an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// `i.string()`.
    String,
    /// `i.number()`.
    Number,
    /// `i.boolean()`.
    Boolean,
    /// `i.json()`.
    Json,
}

impl ValueType {
    /// The schema's name for the type.
    pub fn as_str(&self) -> &'static str {
        match self {
            ValueType::String => "string",
            ValueType::Number => "number",
            ValueType::Boolean => "boolean",
            ValueType::Json => "json",
        }
    }

    /// Whether a JSON value written to the database is of this type (`null` never is).
    pub fn admits(&self, v: &Value) -> bool {
        match self {
            ValueType::String => v.is_string(),
            ValueType::Number => v.is_number(),
            ValueType::Boolean => v.is_boolean(),
            ValueType::Json => !v.is_null(),
        }
    }
}

/// One attribute of an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttrDef {
    /// Attribute name (camelCase).
    pub name: &'static str,
    /// Type.
    pub value_type: ValueType,
    /// Not `.optional()`.
    pub required: bool,
    /// `.indexed()`.
    pub indexed: bool,
}

/// One entity (namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityDef {
    /// Namespace.
    pub name: &'static str,
    /// Attributes, in upstream order.
    pub attrs: &'static [AttrDef],
}

impl EntityDef {
    /// The attribute called `name`.
    pub fn attr(&self, name: &str) -> Option<&AttrDef> {
        self.attrs.iter().find(|a| a.name == name)
    }
}

/// One side of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSide {
    /// Namespace.
    pub on: &'static str,
    /// `one` or `many`.
    pub has: &'static str,
    /// Label used in queries and link steps.
    pub label: &'static str,
}

/// A link between two entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkDef {
    /// Link name.
    pub name: &'static str,
    /// Forward side.
    pub forward: LinkSide,
    /// Reverse side.
    pub reverse: LinkSide,
}

const fn a(name: &'static str, value_type: ValueType, required: bool, indexed: bool) -> AttrDef {
    AttrDef {
        name,
        value_type,
        required,
        indexed,
    }
}

use ValueType::{Json, Number, String as Str};

/// `sandbox_sandboxes`: the public attributes followed by those of the full schema.
pub const SANDBOXES: EntityDef = EntityDef {
    name: "sandbox_sandboxes",
    attrs: &[
        a("sandboxUrl", Str, false, false),
        a("status", Str, true, true),
        a("timeout", Number, false, false),
        a("runtime", Str, false, false),
        a("vcpus", Number, false, false),
        a("ports", Json, false, false),
        a("purpose", Str, false, true),
        a("createdAt", Number, true, true),
        a("updatedAt", Number, false, true),
        a("shutdownAt", Number, false, true),
        a("externalSandboxId", Str, false, true),
        a("sandboxUserId", Str, false, true),
        a("provider", Str, true, true),
        a("providerConfig", Json, false, false),
        a("params", Json, false, false),
    ],
};

/// `sandbox_processes`.
pub const PROCESSES: EntityDef = EntityDef {
    name: "sandbox_processes",
    attrs: &[
        a("kind", Str, true, true),
        a("mode", Str, true, true),
        a("status", Str, true, true),
        a("provider", Str, true, true),
        a("command", Str, true, false),
        a("args", Json, false, false),
        a("cwd", Str, false, false),
        a("env", Json, false, false),
        a("exitCode", Number, false, true),
        a("signal", Str, false, false),
        a("externalProcessId", Str, false, true),
        a("streamId", Str, false, true),
        a("streamClientId", Str, false, true),
        a("streamStartedAt", Number, false, true),
        a("streamFinishedAt", Number, false, true),
        a("streamAbortReason", Str, false, false),
        a("startedAt", Number, true, true),
        a("updatedAt", Number, false, true),
        a("exitedAt", Number, false, true),
        a("metadata", Json, false, false),
    ],
};

/// Every entity of the schema.
pub const ENTITIES: &[EntityDef] = &[SANDBOXES, PROCESSES];

/// Every link of the schema.
pub const LINKS: &[LinkDef] = &[
    LinkDef {
        name: "sandbox_user",
        forward: LinkSide {
            on: "sandbox_sandboxes",
            has: "one",
            label: "user",
        },
        reverse: LinkSide {
            on: "$users",
            has: "many",
            label: "sandboxes",
        },
    },
    LinkDef {
        name: "sandboxProcessSandbox",
        forward: LinkSide {
            on: "sandbox_processes",
            has: "one",
            label: "sandbox",
        },
        reverse: LinkSide {
            on: "sandbox_sandboxes",
            has: "many",
            label: "processes",
        },
    },
    LinkDef {
        name: "sandboxProcessStream",
        forward: LinkSide {
            on: "sandbox_processes",
            has: "one",
            label: "stream",
        },
        reverse: LinkSide {
            on: "$streams",
            has: "many",
            label: "sandboxProcesses",
        },
    },
];

/// The entity called `name`.
pub fn entity(name: &str) -> Option<&'static EntityDef> {
    ENTITIES.iter().find(|e| e.name == name)
}

/// The schema in the JSON form of InstantDB's `i.schema(...)` (what `instant-cli push` sends):
/// `{"entities": {ns: {"attrs": {name: {"valueType", "required", "isIndexed", "config":
/// {"indexed", "unique"}, "metadata"}}, "links": {label: {"entityName", "cardinality"}}}},
/// "links": {name: {"forward", "reverse"}}, "rooms": {}}`. Each entity's `links` indexes the
/// links that start or end on it, as `i.schema` does.
pub fn schema_json() -> Value {
    let mut entities = Map::new();
    for e in ENTITIES {
        let mut attrs = Map::new();
        for at in e.attrs {
            attrs.insert(
                at.name.into(),
                json!({
                    "valueType": at.value_type.as_str(),
                    "required": at.required,
                    "isIndexed": at.indexed,
                    "config": {"indexed": at.indexed, "unique": false},
                    "metadata": {},
                }),
            );
        }
        let mut links = Map::new();
        for l in LINKS {
            for (here, there) in [(&l.forward, &l.reverse), (&l.reverse, &l.forward)] {
                if here.on == e.name {
                    links.insert(
                        here.label.into(),
                        json!({"entityName": there.on, "cardinality": here.has}),
                    );
                }
            }
        }
        entities.insert(e.name.into(), json!({"attrs": attrs, "links": links}));
    }
    let mut links = Map::new();
    for l in LINKS {
        let side = |s: &LinkSide| json!({"on": s.on, "has": s.has, "label": s.label});
        links.insert(
            l.name.into(),
            json!({"forward": side(&l.forward), "reverse": side(&l.reverse)}),
        );
    }
    json!({"entities": entities, "links": links, "rooms": {}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_json_lists_entities_attributes_and_links() {
        let s = schema_json();
        let p = &s["entities"]["sandbox_processes"]["attrs"];
        assert_eq!(p["exitCode"]["valueType"], "number");
        assert_eq!(p["exitCode"]["config"]["indexed"], true);
        assert_eq!(p["command"]["required"], true);
        assert_eq!(
            s["entities"]["sandbox_sandboxes"]["attrs"]
                .as_object()
                .unwrap()
                .len(),
            15
        );
        assert_eq!(p.as_object().unwrap().len(), 20);
        assert_eq!(
            s["links"]["sandboxProcessStream"]["reverse"]["on"],
            "$streams"
        );
        assert_eq!(
            s["links"]["sandboxProcessSandbox"]["forward"]["label"],
            "sandbox"
        );
    }

    #[test]
    fn schema_json_has_the_shape_of_upstreams_i_schema() {
        let s = schema_json();
        assert_eq!(s["rooms"], json!({}));
        assert_eq!(
            s["entities"]["sandbox_sandboxes"]["attrs"]["purpose"],
            json!({"valueType": "string", "required": false, "isIndexed": true,
                "config": {"indexed": true, "unique": false}, "metadata": {}})
        );
        assert_eq!(
            s["entities"]["sandbox_processes"]["attrs"]["command"],
            json!({"valueType": "string", "required": true, "isIndexed": false,
                "config": {"indexed": false, "unique": false}, "metadata": {}})
        );
        assert_eq!(
            s["entities"]["sandbox_processes"]["links"],
            json!({
                "sandbox": {"entityName": "sandbox_sandboxes", "cardinality": "one"},
                "stream": {"entityName": "$streams", "cardinality": "one"},
            })
        );
        assert_eq!(
            s["entities"]["sandbox_sandboxes"]["links"],
            json!({
                "user": {"entityName": "$users", "cardinality": "one"},
                "processes": {"entityName": "sandbox_processes", "cardinality": "many"},
            })
        );
    }
}
