//! Field ownership (`metadata.managedFields`) and the server-side-apply merge.
//!
//! Simplified model of structured-merge-diff: a field set is a set of *paths*; a path ends at a
//! leaf (scalar, atomic list, empty map) or names a list-map item (`k:{...}`). Lists are atomic
//! except list-maps: `x-kubernetes-list-type: map` in a CRD schema, plus `conditions` (keyed by
//! `type`) everywhere. Ownership rules:
//! - `Update` operations (POST/PUT/non-apply PATCH) take ownership of every leaf they change and
//!   remove it from all other managers.
//! - `Apply` replaces the manager's set with the leaves of the applied configuration; a leaf that a
//!   *different* manager owns with a different live value is a conflict (409) unless `force`, in
//!   which case the other manager loses it. Equal values are co-owned.
//! - A leaf the applier owned before and dropped now is removed from the object when no other
//!   manager owns it (or anything below it).
//! - After every write, paths that no longer exist in the object are pruned from every manager,
//!   and empty entries are dropped.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum El {
    /// A map field.
    F(String),
    /// A list-map item, identified by its key fields as compact JSON (`{"type":"Ready"}`).
    K(String),
}

pub(crate) type Path = Vec<El>;
pub(crate) type FieldSet = BTreeSet<Path>;

/// Field names whose arrays are list-maps, with their key fields.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListMaps(pub(crate) Vec<(String, Vec<String>)>);

impl ListMaps {
    pub(crate) fn with_defaults() -> Self {
        Self(vec![("conditions".to_owned(), vec!["type".to_owned()])])
    }
    fn keys(&self, field: &str) -> Option<&[String]> {
        self.0
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, k)| k.as_slice())
    }
    /// Collect list-map declarations from a CRD's openAPIV3Schema.
    pub(crate) fn collect_schema(&mut self, name: &str, schema: &Value) {
        if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map")
            && let Some(keys) = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
        {
            let keys: Vec<String> = keys
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            if !keys.is_empty() && self.keys(name).is_none() {
                self.0.push((name.to_owned(), keys));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                self.collect_schema(k, v);
            }
        }
        if let Some(items) = schema.get("items") {
            self.collect_schema(name, items);
        }
    }
}

fn item_key(item: &Value, keys: &[String]) -> Option<String> {
    let obj = item.as_object()?;
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), obj.get(k)?.clone());
    }
    Some(Value::Object(m).to_string())
}

fn last_field(path: &[El]) -> Option<&str> {
    path.iter().rev().find_map(|e| match e {
        El::F(f) => Some(f.as_str()),
        El::K(_) => None,
    })
}

/// Top-level paths that are never tracked (identity and server-owned metadata).
fn untracked(path: &[El]) -> bool {
    match path {
        [El::F(a)] => matches!(a.as_str(), "apiVersion" | "kind"),
        [El::F(m), El::F(f), ..] if m == "metadata" => matches!(
            f.as_str(),
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

/// The leaf paths of `value` (plus list-map item markers).
pub(crate) fn leaves(value: &Value, lm: &ListMaps) -> FieldSet {
    let mut out = FieldSet::new();
    walk(value, &mut Vec::new(), lm, &mut out);
    out
}

fn walk(value: &Value, path: &mut Path, lm: &ListMaps, out: &mut FieldSet) {
    if untracked(path) {
        return;
    }
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                path.push(El::F(k.clone()));
                walk(v, path, lm, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let keys = last_field(path).and_then(|f| lm.keys(f));
            let keyed: Option<Vec<String>> =
                keys.and_then(|keys| items.iter().map(|i| item_key(i, keys)).collect());
            match keyed {
                Some(item_keys) => {
                    for (item, key) in items.iter().zip(item_keys) {
                        path.push(El::K(key));
                        out.insert(path.clone());
                        walk(item, path, lm, out);
                        path.pop();
                    }
                }
                None => {
                    out.insert(path.clone());
                }
            }
        }
        _ => {
            // `metadata: {}` (or only untracked keys) owns nothing.
            let metadata_root = matches!(path.as_slice(), [El::F(m)] if m == "metadata");
            if !path.is_empty() && !metadata_root {
                out.insert(path.clone());
            }
        }
    }
}

/// The value at `path`, if present.
pub(crate) fn get<'a>(value: &'a Value, path: &[El]) -> Option<&'a Value> {
    let mut cur = value;
    for el in path {
        cur = match el {
            El::F(f) => cur.as_object()?.get(f)?,
            El::K(k) => {
                let want: Value = serde_json::from_str(k).ok()?;
                let want = want.as_object()?;
                cur.as_array()?
                    .iter()
                    .find(|item| want.iter().all(|(wk, wv)| item.get(wk) == Some(wv)))?
            }
        };
    }
    Some(cur)
}

/// Whether `path` names a key field of a list-map item (`conditions[type=Ready].type`).
pub(crate) fn is_item_key(path: &[El]) -> bool {
    match path {
        [.., El::K(key), El::F(field)] => serde_json::from_str::<Value>(key)
            .ok()
            .and_then(|k| k.as_object().map(|k| k.contains_key(field)))
            .unwrap_or(false),
        _ => false,
    }
}

/// Remove the value at `path`; returns whether something was removed.
pub(crate) fn remove(value: &mut Value, path: &[El]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for el in parent {
        let next = match el {
            El::F(f) => cur.as_object_mut().and_then(|m| m.get_mut(f)),
            El::K(k) => {
                let Ok(Value::Object(want)) = serde_json::from_str::<Value>(k) else {
                    return false;
                };
                cur.as_array_mut().and_then(|a| {
                    a.iter_mut()
                        .find(|item| want.iter().all(|(wk, wv)| item.get(wk) == Some(wv)))
                })
            }
        };
        let Some(next) = next else {
            return false;
        };
        cur = next;
    }
    match last {
        El::F(f) => cur.as_object_mut().is_some_and(|m| m.remove(f).is_some()),
        El::K(k) => {
            let Ok(Value::Object(want)) = serde_json::from_str::<Value>(k) else {
                return false;
            };
            let Some(arr) = cur.as_array_mut() else {
                return false;
            };
            let before = arr.len();
            arr.retain(|item| !want.iter().all(|(wk, wv)| item.get(wk) == Some(wv)));
            before != arr.len()
        }
    }
}

/// Render a path the way conflict messages do: `.status.conditions[type="Ready"].status`.
pub(crate) fn display(path: &[El]) -> String {
    let mut s = String::new();
    for el in path {
        match el {
            El::F(f) => {
                s.push('.');
                s.push_str(f);
            }
            El::K(k) => {
                let parts: Vec<String> = match serde_json::from_str::<Value>(k) {
                    Ok(Value::Object(m)) => m.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    _ => vec![k.clone()],
                };
                s.push('[');
                s.push_str(&parts.join(","));
                s.push(']');
            }
        }
    }
    s
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) manager: String,
    pub(crate) operation: String,
    pub(crate) api_version: String,
    pub(crate) time: Option<String>,
    pub(crate) subresource: Option<String>,
    pub(crate) set: FieldSet,
}

impl Entry {
    pub(crate) fn same_slot(
        &self,
        manager: &str,
        operation: &str,
        subresource: Option<&str>,
    ) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }
}

/// Parse `metadata.managedFields` of an object.
pub(crate) fn read_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|e| {
            let mut set = FieldSet::new();
            if let Some(f) = e.get("fieldsV1") {
                parse_fields(f, &mut Vec::new(), &mut set);
            }
            let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
            Entry {
                manager: s("manager").unwrap_or_default(),
                operation: s("operation").unwrap_or_default(),
                api_version: s("apiVersion").unwrap_or_default(),
                time: s("time"),
                subresource: s("subresource"),
                set,
            }
        })
        .collect()
}

fn parse_fields(node: &Value, path: &mut Path, out: &mut FieldSet) {
    let Some(map) = node.as_object() else {
        return;
    };
    if map.is_empty() {
        if !path.is_empty() {
            out.insert(path.clone());
        }
        return;
    }
    for (k, v) in map {
        if k == "." {
            if matches!(path.last(), Some(El::K(_))) {
                out.insert(path.clone());
            }
            continue;
        }
        let el = if let Some(f) = k.strip_prefix("f:") {
            El::F(f.to_owned())
        } else if let Some(key) = k.strip_prefix("k:") {
            El::K(key.to_owned())
        } else {
            continue;
        };
        path.push(el);
        parse_fields(v, path, out);
        path.pop();
    }
}

fn el_key(el: &El) -> String {
    match el {
        El::F(f) => format!("f:{f}"),
        El::K(k) => format!("k:{k}"),
    }
}

fn render_set(set: &FieldSet, update: bool) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for (depth, el) in path.iter().enumerate() {
            let node = cur
                .entry(el_key(el))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(node) = node else {
                break;
            };
            let is_last = depth + 1 == path.len();
            let marker = match el {
                El::K(_) => is_last,
                // Update entries mark every map they reach, except the top-level metadata.
                El::F(f) => update && !is_last && !(depth == 0 && f == "metadata"),
            };
            if marker {
                node.insert(".".to_owned(), Value::Object(Map::new()));
            }
            cur = node;
        }
    }
    Value::Object(root)
}

/// Write `entries` back into `metadata.managedFields` (removing the key when there are none).
pub(crate) fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), Value::String(e.manager.clone()));
            m.insert("operation".into(), Value::String(e.operation.clone()));
            m.insert("apiVersion".into(), Value::String(e.api_version.clone()));
            if let Some(t) = &e.time {
                m.insert("time".into(), Value::String(t.clone()));
            }
            m.insert("fieldsType".into(), Value::String("FieldsV1".into()));
            m.insert(
                "fieldsV1".into(),
                render_set(&e.set, e.operation == "Update"),
            );
            if let Some(s) = &e.subresource {
                m.insert("subresource".into(), Value::String(s.clone()));
            }
            Value::Object(m)
        })
        .collect();
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

/// Keep only the part of a field set that a write through `subresource` may touch.
pub(crate) fn scope(
    set: FieldSet,
    status_subresource: bool,
    subresource: Option<&str>,
) -> FieldSet {
    let is_status = |p: &Path| matches!(p.first(), Some(El::F(f)) if f == "status");
    match (status_subresource, subresource) {
        (true, Some("status")) => set.into_iter().filter(is_status).collect(),
        (true, _) => set.into_iter().filter(|p| !is_status(p)).collect(),
        _ => set,
    }
}

/// Drop paths that no longer exist in `obj` from every entry (`stringData` is write-only and kept).
pub(crate) fn prune(entries: &mut Vec<Entry>, obj: &Value) {
    for e in entries.iter_mut() {
        e.set.retain(|p| {
            matches!(p.first(), Some(El::F(f)) if f == "stringData") || get(obj, p).is_some()
        });
    }
    entries.retain(|e| !e.set.is_empty());
}

/// Record an `Update` by `manager`: it takes every leaf that differs between `old` and `new`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_update(
    entries: &mut Vec<Entry>,
    old: Option<&Value>,
    new: &Value,
    lm: &ListMaps,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
    now: &str,
) {
    let changed: FieldSet = leaves(new, lm)
        .into_iter()
        .filter(|p| old.and_then(|o| get(o, p)) != get(new, p) || old.is_none())
        .collect();
    if changed.is_empty() {
        return;
    }
    for e in entries.iter_mut() {
        if !e.same_slot(manager, "Update", subresource) {
            e.set.retain(|p| !changed.contains(p));
        }
    }
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.same_slot(manager, "Update", subresource))
    {
        e.set.extend(changed);
        e.time = Some(now.to_owned());
        e.api_version = api_version.to_owned();
    } else {
        entries.push(Entry {
            manager: manager.to_owned(),
            operation: "Update".to_owned(),
            api_version: api_version.to_owned(),
            time: Some(now.to_owned()),
            subresource: subresource.map(str::to_owned),
            set: changed,
        });
    }
}

/// A field another manager owns with a different value.
pub(crate) struct Conflict {
    pub(crate) manager: String,
    pub(crate) using: Option<String>,
    pub(crate) path: Path,
}

/// Merge an applied configuration into the live object (list-maps merged by key).
pub(crate) fn apply_merge(live: &mut Value, config: &Value, lm: &ListMaps, field: Option<&str>) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    l.remove(k);
                    continue;
                }
                match l.get_mut(k) {
                    Some(existing) => apply_merge(existing, v, lm, Some(k)),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(c)) => {
            let keys = field.and_then(|f| lm.keys(f));
            match keys {
                Some(keys) if c.iter().all(|i| item_key(i, keys).is_some()) => {
                    for item in c {
                        let key = item_key(item, keys);
                        match l.iter_mut().find(|x| item_key(x, keys) == key) {
                            Some(existing) => apply_merge(existing, item, lm, None),
                            None => l.push(item.clone()),
                        }
                    }
                }
                _ => *l = c.clone(),
            }
        }
        (l, c) => *l = c.clone(),
    }
}
