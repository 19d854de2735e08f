//! Wire encoding: compact JSON plus a trailing newline, with the key order the real server uses.
//!
//! Built-in kinds are encoded by Go structs, so their keys come out in struct-field order; custom
//! resources are unstructured maps and come out sorted. Clients do not care, but people comparing
//! a fake response with a transcript do, so built-in kinds get a per-context order table here.

use serde_json::{Map, Value};

/// Field order of `metadata` (ObjectMeta) in Go struct order.
const META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];
const MANAGED: &[&str] = &[
    "manager",
    "operation",
    "apiVersion",
    "time",
    "fieldsType",
    "fieldsV1",
    "subresource",
];
const OWNER_REF: &[&str] = &[
    "apiVersion",
    "kind",
    "name",
    "uid",
    "controller",
    "blockOwnerDeletion",
];
const OBJ_REF: &[&str] = &[
    "kind",
    "namespace",
    "name",
    "uid",
    "apiVersion",
    "resourceVersion",
    "fieldPath",
];
const STATUS_DETAILS: &[&str] = &[
    "name",
    "group",
    "kind",
    "uid",
    "causes",
    "retryAfterSeconds",
];
const CAUSE: &[&str] = &["reason", "message", "field"];
const TOP_GENERIC: &[&str] = &[
    "kind",
    "apiVersion",
    "metadata",
    // Status
    "status",
    "message",
    "reason",
    "details",
    "code",
    // Lists
    "items",
];
const TOP_SECRET: &[&str] = &[
    "kind",
    "apiVersion",
    "metadata",
    "immutable",
    "data",
    "stringData",
    "type",
];
const TOP_CORE_EVENT: &[&str] = &[
    "kind",
    "apiVersion",
    "metadata",
    "involvedObject",
    "reason",
    "message",
    "source",
    "firstTimestamp",
    "lastTimestamp",
    "count",
    "type",
    "eventTime",
    "series",
    "action",
    "related",
    "reportingComponent",
    "reportingInstance",
];
const TOP_EVENT_V1: &[&str] = &[
    "kind",
    "apiVersion",
    "metadata",
    "eventTime",
    "series",
    "reportingController",
    "reportingInstance",
    "action",
    "reason",
    "regarding",
    "related",
    "note",
    "type",
    "deprecatedSource",
    "deprecatedFirstTimestamp",
    "deprecatedLastTimestamp",
    "deprecatedCount",
];
const TOP_SPEC_STATUS: &[&str] = &["kind", "apiVersion", "metadata", "spec", "status"];
const CRD_NAMES: &[&str] = &[
    "plural",
    "singular",
    "shortNames",
    "kind",
    "listKind",
    "categories",
];
const CRD_VERSION: &[&str] = &[
    "name",
    "served",
    "storage",
    "deprecated",
    "deprecationWarning",
    "schema",
    "subresources",
    "additionalPrinterColumns",
    "selectableFields",
];
const CRD_STATUS: &[&str] = &["conditions", "acceptedNames", "storedVersions"];
const CONDITION: &[&str] = &[
    "type",
    "status",
    "observedGeneration",
    "lastTransitionTime",
    "reason",
    "message",
];
const SERIES: &[&str] = &["count", "lastObservedTime"];

/// How the top level of a document is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Unstructured (custom resources): every map sorted by key.
    Sorted,
    /// A Go-typed object of the given top-level shape.
    Typed(&'static [&'static str]),
}

impl Order {
    pub(crate) fn for_kind(kind: &str, custom: bool) -> Order {
        if custom {
            return Order::Sorted;
        }
        Order::Typed(match kind {
            "Secret" | "SecretList" => TOP_SECRET,
            "Event" | "EventList" => TOP_CORE_EVENT,
            "Lease"
            | "LeaseList"
            | "Namespace"
            | "NamespaceList"
            | "CustomResourceDefinition"
            | "CustomResourceDefinitionList" => TOP_SPEC_STATUS,
            _ => TOP_GENERIC,
        })
    }
    pub(crate) fn events_v1() -> Order {
        Order::Typed(TOP_EVENT_V1)
    }
    pub(crate) fn generic() -> Order {
        Order::Typed(TOP_GENERIC)
    }
}

/// Encode `value` as one compact JSON line (with the trailing newline the server always sends).
pub(crate) fn encode(value: &Value, order: Order) -> String {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, value, order, Ctx::Top);
    out.push(b'\n');
    // Only JSON was written: always UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Top,
    Nested(&'static [&'static str]),
    Opaque,
}

fn child_ctx(order: Order, parent: Ctx, key: &str) -> Ctx {
    let Order::Typed(top) = order else {
        return Ctx::Opaque;
    };
    match parent {
        Ctx::Opaque => Ctx::Opaque,
        Ctx::Top => match key {
            "metadata" => {
                if std::ptr::eq(top, TOP_GENERIC) {
                    // Lists and Status objects use ListMeta; fields that are absent do not matter.
                    Ctx::Nested(LIST_META_OR_META)
                } else {
                    Ctx::Nested(META)
                }
            }
            "items" => Ctx::Top,
            "details" => Ctx::Nested(STATUS_DETAILS),
            "involvedObject" | "regarding" | "related" => Ctx::Nested(OBJ_REF),
            "series" => Ctx::Nested(SERIES),
            "spec" if std::ptr::eq(top, TOP_SPEC_STATUS) => Ctx::Nested(SPEC_ANY),
            "status" if std::ptr::eq(top, TOP_SPEC_STATUS) => Ctx::Nested(CRD_STATUS),
            "object" => Ctx::Top,
            _ => Ctx::Opaque,
        },
        Ctx::Nested(table) => {
            if std::ptr::eq(table, META) {
                match key {
                    "managedFields" => Ctx::Nested(MANAGED),
                    "ownerReferences" => Ctx::Nested(OWNER_REF),
                    _ => Ctx::Opaque,
                }
            } else if std::ptr::eq(table, LIST_META_OR_META) {
                match key {
                    "managedFields" => Ctx::Nested(MANAGED),
                    _ => Ctx::Opaque,
                }
            } else if std::ptr::eq(table, STATUS_DETAILS) {
                if key == "causes" {
                    Ctx::Nested(CAUSE)
                } else {
                    Ctx::Opaque
                }
            } else if std::ptr::eq(table, SPEC_ANY) {
                match key {
                    "names" => Ctx::Nested(CRD_NAMES),
                    "versions" => Ctx::Nested(CRD_VERSION),
                    _ => Ctx::Opaque,
                }
            } else if std::ptr::eq(table, CRD_STATUS) {
                match key {
                    "conditions" => Ctx::Nested(CONDITION),
                    "acceptedNames" => Ctx::Nested(CRD_NAMES),
                    _ => Ctx::Opaque,
                }
            } else {
                Ctx::Opaque
            }
        }
    }
}

/// ObjectMeta and ListMeta merged: the objects that use [`TOP_GENERIC`] (lists, Status) may carry either.
const LIST_META_OR_META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "continue",
    "remainingItemCount",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];
/// Specs of Lease, Namespace and CRD: union of the field orders (they do not share field names).
const SPEC_ANY: &[&str] = &[
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
    "strategy",
    "preferredHolder",
    "finalizers",
    "group",
    "names",
    "scope",
    "versions",
    "conversion",
    "preserveUnknownFields",
];

fn write_value(out: &mut Vec<u8>, value: &Value, order: Order, ctx: Ctx) {
    match value {
        Value::Object(map) => write_object(out, map, order, ctx),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, order, ctx);
            }
            out.push(b']');
        }
        other => push_json(out, other),
    }
}

/// Appends a scalar as JSON, without a copy of it first.
fn push_json(out: &mut Vec<u8>, value: &Value) {
    // Writing a scalar into a Vec does not fail.
    let _ = serde_json::to_writer(out, value);
}

/// Appends a key as a JSON string.
fn push_key(out: &mut Vec<u8>, key: &str) {
    // Writing a string into a Vec does not fail.
    let _ = serde_json::to_writer(out, key);
}

fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>, order: Order, ctx: Ctx) {
    let table: &[&str] = match (order, ctx) {
        (Order::Sorted, _) | (_, Ctx::Opaque) => &[],
        (Order::Typed(top), Ctx::Top) => top,
        (_, Ctx::Nested(t)) => t,
    };
    out.push(b'{');
    let mut first = true;
    let mut emit = |out: &mut Vec<u8>, k: &str, v: &Value| {
        if !first {
            out.push(b',');
        }
        first = false;
        push_key(out, k);
        out.push(b':');
        write_value(out, v, order, child_ctx(order, ctx, k));
    };
    for k in table {
        if let Some(v) = map.get(*k) {
            emit(out, k, v);
        }
    }
    // serde_json's map is sorted, which is what Go's unstructured encoder does too.
    for (k, v) in map {
        if !table.contains(&k.as_str()) {
            emit(out, k, v);
        }
    }
    out.push(b'}');
}
