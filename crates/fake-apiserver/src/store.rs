//! The object store: resource definitions, the global resourceVersion, every write path
//! (create/update/patch/apply/delete), the bounded event history watches replay from, and the
//! garbage collector (ownerReferences, namespace and CRD cleanup).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc};

use super::errors::ApiError;
use super::fields::{self, Entry, FieldSet, ListMaps};
use super::render::Order;

/// How many watch events are kept for replay; older resourceVersions answer 410 Expired.
pub(crate) const HISTORY_CAP: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    Namespace,
    Secret,
    CoreEvent,
    EventV1,
    Lease,
    Crd,
    /// `apps/v1` Deployments, StatefulSets and DaemonSets: stored objects with a generation and
    /// a status subresource; no controller runs them (no ReplicaSets, no Pods).
    Workload,
    Custom,
}

/// One served resource (group/version/plural).
#[derive(Clone, Debug)]
pub(crate) struct ResourceDef {
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) plural: String,
    pub(crate) singular: String,
    pub(crate) kind: String,
    pub(crate) list_kind: String,
    pub(crate) namespaced: bool,
    pub(crate) status_subresource: bool,
    pub(crate) flavor: Flavor,
    /// Objects of all defs with the same storage id live together (core/v1 and events.k8s.io/v1 events).
    pub(crate) storage: String,
    pub(crate) short_names: Vec<String>,
    pub(crate) list_maps: ListMaps,
}

impl ResourceDef {
    fn builtin(
        group: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        flavor: Flavor,
        short: &[&str],
    ) -> Self {
        let storage = if plural == "events" {
            "events".to_owned()
        } else if group.is_empty() {
            plural.to_owned()
        } else {
            format!("{plural}.{group}")
        };
        Self {
            group: group.to_owned(),
            version: "v1".to_owned(),
            plural: plural.to_owned(),
            singular: kind.to_lowercase(),
            kind: kind.to_owned(),
            list_kind: format!("{kind}List"),
            namespaced,
            status_subresource: matches!(
                flavor,
                Flavor::Crd | Flavor::Namespace | Flavor::Workload
            ),
            flavor,
            storage,
            short_names: short.iter().map(|s| (*s).to_owned()).collect(),
            list_maps: ListMaps::with_defaults(),
        }
    }

    pub(crate) fn builtins() -> Vec<Arc<ResourceDef>> {
        vec![
            Arc::new(Self::builtin(
                "",
                "namespaces",
                "Namespace",
                false,
                Flavor::Namespace,
                &["ns"],
            )),
            Arc::new(Self::builtin(
                "",
                "secrets",
                "Secret",
                true,
                Flavor::Secret,
                &[],
            )),
            Arc::new(Self::builtin(
                "",
                "events",
                "Event",
                true,
                Flavor::CoreEvent,
                &["ev"],
            )),
            Arc::new(Self::builtin(
                "events.k8s.io",
                "events",
                "Event",
                true,
                Flavor::EventV1,
                &["ev"],
            )),
            Arc::new(Self::builtin(
                "coordination.k8s.io",
                "leases",
                "Lease",
                true,
                Flavor::Lease,
                &[],
            )),
            Arc::new(Self::builtin(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                Flavor::Crd,
                &["crd", "crds"],
            )),
            Arc::new(Self::builtin(
                "apps",
                "deployments",
                "Deployment",
                true,
                Flavor::Workload,
                &["deploy"],
            )),
            Arc::new(Self::builtin(
                "apps",
                "statefulsets",
                "StatefulSet",
                true,
                Flavor::Workload,
                &["sts"],
            )),
            Arc::new(Self::builtin(
                "apps",
                "daemonsets",
                "DaemonSet",
                true,
                Flavor::Workload,
                &["ds"],
            )),
        ]
    }

    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    pub(crate) fn custom(&self) -> bool {
        self.flavor == Flavor::Custom
    }
    pub(crate) fn has_generation(&self) -> bool {
        matches!(self.flavor, Flavor::Custom | Flavor::Crd | Flavor::Workload)
    }
    /// `secrets`, `gotooauthclients.goto-oauth.dev`.
    pub(crate) fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
    /// `Secret`, `GoToOAuthClient.goto-oauth.dev`.
    pub(crate) fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
    pub(crate) fn order(&self) -> Order {
        if self.flavor == Flavor::EventV1 {
            Order::events_v1()
        } else {
            Order::for_kind(&self.kind, self.custom())
        }
    }
    /// The JSON pointer (in stored form) a field-selector label reads, if the resource supports it.
    pub(crate) fn field_pointer(&self, label: &str) -> Option<String> {
        let p = match (self.flavor, label) {
            (_, "metadata.name") => "/metadata/name",
            (_, "metadata.namespace") => "/metadata/namespace",
            (Flavor::Secret, "type") => "/type",
            (Flavor::Namespace, "status.phase") => "/status/phase",
            (Flavor::CoreEvent, l) => return core_event_field(l),
            (Flavor::EventV1, l) => {
                let mapped = match l {
                    "reportingController" => "reportingComponent".to_owned(),
                    l if l.starts_with("regarding.") => {
                        l.replacen("regarding.", "involvedObject.", 1)
                    }
                    l if l.starts_with("deprecatedSource.") => {
                        l.replacen("deprecatedSource.", "source.", 1)
                    }
                    l => l.to_owned(),
                };
                return core_event_field(&mapped);
            }
            _ => return None,
        };
        Some(p.to_owned())
    }
}

fn core_event_field(label: &str) -> Option<String> {
    const OK: &[&str] = &[
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ];
    if !OK.contains(&label) {
        return None;
    }
    if label == "source" {
        return Some("/source/component".to_owned());
    }
    Some(format!("/{}", label.replace('.', "/")))
}

/// One entry of the watch history.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) rv: u64,
    pub(crate) storage: String,
    pub(crate) namespace: String,
    pub(crate) etype: &'static str,
    pub(crate) object: Arc<Value>,
    /// The state before a MODIFIED, so selector watches can turn it into ADDED/DELETED.
    pub(crate) previous: Option<Arc<Value>>,
}

/// Background work the garbage collector does after a write.
#[derive(Debug)]
pub(crate) enum GcJob {
    OwnerGone(String),
    Foreground(String, String, String),
    Orphan(String, String, String),
    Namespace(String),
    Crd(String),
}

type Key = (String, String);
/// A dependent object: (storage, namespace, name).
type Dependent = (String, String, String);

/// Per-request facts the write paths need.
pub(crate) struct Ctx {
    pub(crate) manager: String,
    pub(crate) dry_run: bool,
    pub(crate) now: String,
}

/// Content types PATCH accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

pub(crate) struct Store {
    pub(crate) rv: u64,
    /// Watches from a resourceVersion below this answer 410 Expired.
    pub(crate) floor: u64,
    objects: HashMap<String, BTreeMap<Key, Value>>,
    pub(crate) history: VecDeque<Arc<Record>>,
    pub(crate) tx: broadcast::Sender<Arc<Record>>,
    builtins: Vec<Arc<ResourceDef>>,
    /// CRD name → the defs it serves (one per served version; the first is the storage version).
    crds: BTreeMap<String, Vec<Arc<ResourceDef>>>,
    /// owner uid → dependents (storage, namespace, name).
    owners: HashMap<String, BTreeSet<(String, String, String)>>,
    /// uid → (storage, namespace, name) of every live object.
    uids: HashMap<String, (String, String, String)>,
    gc: mpsc::UnboundedSender<GcJob>,
}

pub(crate) enum Lookup {
    Found(Arc<ResourceDef>),
    /// Known group/version, unknown resource: JSON 404.
    UnknownResource,
    /// Unknown group/version: text/plain 404.
    UnknownGroupVersion,
}

pub(crate) fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    // The alphabet of k8s.io/apimachinery/pkg/util/rand: no vowels, no confusable characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn is_dns_subdomain(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(ok_char)
        && name.chars().next().is_some_and(alnum)
        && name.chars().last().is_some_and(alnum)
        && name.split('.').all(|l| !l.is_empty())
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}
fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    if let Value::Object(o) = obj {
        let m = o
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if !m.is_object() {
            *m = Value::Object(Map::new());
        }
        if let Value::Object(mm) = m {
            return mm;
        }
    }
    unreachable!("metadata was made an object above")
}
pub(crate) fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(key)).and_then(Value::as_str)
}
fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}
fn set_finalizers(obj: &mut Value, fins: &[String]) {
    let m = meta_mut(obj);
    if fins.is_empty() {
        m.remove("finalizers");
    } else {
        m.insert("finalizers".into(), json!(fins));
    }
}
fn owner_uids(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Everything except metadata and status: what bumps `metadata.generation` when it changes.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

fn without_rv(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    o
}

/// `MicroTime` fields must carry exactly six fractional digits; anything else is a decode error (400).
fn check_micro_time(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    let pointers: &[&str] = match def.flavor {
        Flavor::Lease => &["/spec/renewTime", "/spec/acquireTime"],
        Flavor::CoreEvent | Flavor::EventV1 => &["/eventTime", "/series/lastObservedTime"],
        _ => &[],
    };
    for p in pointers {
        let Some(Value::String(s)) = obj.pointer(p) else {
            continue;
        };
        let bytes = s.as_bytes();
        let head_ok = bytes.len() >= 19
            && jiff::civil::DateTime::strptime("%Y-%m-%dT%H:%M:%S", &s[..19]).is_ok();
        let rest = if head_ok { &s[19..] } else { s.as_str() };
        let frac_ok = rest.len() >= 7
            && rest.starts_with('.')
            && rest[1..7].chars().all(|c| c.is_ascii_digit())
            && matches!(&rest[7..], "Z")
                | (rest[7..].len() == 6
                    && (rest[7..].starts_with('+') || rest[7..].starts_with('-')));
        if !(head_ok && frac_ok) {
            let kind = &def.kind;
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{}\" cannot be handled as a {kind}: parsing time \"{s}\" as \"2006-01-02T15:04:05.000000Z07:00\": cannot parse \"{rest}\" as \".000000\"",
                def.version
            )));
        }
    }
    Ok(())
}

/// core/v1 Event (storage form) → events.k8s.io/v1 Event.
pub(crate) fn event_to_v1(core: &Value) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), json!("Event"));
    out.insert("apiVersion".into(), json!("events.k8s.io/v1"));
    let Some(src) = core.as_object() else {
        return Value::Object(out);
    };
    let get = |k: &str| src.get(k).cloned();
    if let Some(m) = get("metadata") {
        out.insert("metadata".into(), m);
    }
    out.insert("eventTime".into(), get("eventTime").unwrap_or(Value::Null));
    for (from, to) in [
        ("series", "series"),
        ("reportingComponent", "reportingController"),
        ("reportingInstance", "reportingInstance"),
        ("action", "action"),
        ("reason", "reason"),
        ("involvedObject", "regarding"),
        ("related", "related"),
        ("message", "note"),
        ("type", "type"),
    ] {
        if let Some(v) = get(from)
            && !(v.is_null() || v.as_str() == Some(""))
        {
            out.insert(to.into(), v);
        }
    }
    out.insert(
        "deprecatedSource".into(),
        get("source").unwrap_or(json!({})),
    );
    out.insert(
        "deprecatedFirstTimestamp".into(),
        get("firstTimestamp").unwrap_or(Value::Null),
    );
    out.insert(
        "deprecatedLastTimestamp".into(),
        get("lastTimestamp").unwrap_or(Value::Null),
    );
    if let Some(c) = get("count")
        && c.as_i64().unwrap_or(0) != 0
    {
        out.insert("deprecatedCount".into(), c);
    }
    Value::Object(out)
}

/// events.k8s.io/v1 Event → core/v1 Event (storage form).
pub(crate) fn event_from_v1(v1: &Value) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), json!("Event"));
    out.insert("apiVersion".into(), json!("v1"));
    let Some(src) = v1.as_object() else {
        return Value::Object(out);
    };
    for (from, to) in [
        ("metadata", "metadata"),
        ("regarding", "involvedObject"),
        ("reason", "reason"),
        ("note", "message"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("type", "type"),
        ("eventTime", "eventTime"),
        ("series", "series"),
        ("action", "action"),
        ("related", "related"),
        ("reportingController", "reportingComponent"),
        ("reportingInstance", "reportingInstance"),
    ] {
        if let Some(v) = src.get(from) {
            out.insert(to.into(), v.clone());
        }
    }
    Value::Object(out)
}

/// Fill the defaults a core/v1 Event always shows.
fn default_event(obj: &mut Value) {
    let Some(m) = obj.as_object_mut() else { return };
    m.entry("involvedObject").or_insert_with(|| json!({}));
    m.entry("source").or_insert_with(|| json!({}));
    m.entry("firstTimestamp").or_insert(Value::Null);
    m.entry("lastTimestamp").or_insert(Value::Null);
    m.entry("eventTime").or_insert(Value::Null);
    m.entry("reportingComponent").or_insert_with(|| json!(""));
    m.entry("reportingInstance").or_insert_with(|| json!(""));
}

impl Store {
    pub(crate) fn new(
        tx: broadcast::Sender<Arc<Record>>,
        gc: mpsc::UnboundedSender<GcJob>,
        now: &str,
    ) -> Self {
        let mut s = Self {
            rv: 0,
            floor: 1,
            objects: HashMap::new(),
            history: VecDeque::new(),
            tx,
            builtins: ResourceDef::builtins(),
            crds: BTreeMap::new(),
            owners: HashMap::new(),
            uids: HashMap::new(),
            gc,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": ns,
                    "uid": new_uid(),
                    "creationTimestamp": now,
                    "labels": {"kubernetes.io/metadata.name": ns},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            s.put(
                "namespaces",
                (String::new(), ns.to_owned()),
                obj,
                "ADDED",
                None,
            );
        }
        s
    }

    // ----- definitions -----

    pub(crate) fn lookup(&self, group: &str, version: &str, plural: &str) -> Lookup {
        let mut known_gv = false;
        for d in self.all_defs() {
            if d.group == group && d.version == version {
                known_gv = true;
                if d.plural == plural {
                    return Lookup::Found(d);
                }
            }
        }
        if known_gv {
            Lookup::UnknownResource
        } else {
            Lookup::UnknownGroupVersion
        }
    }

    pub(crate) fn all_defs(&self) -> Vec<Arc<ResourceDef>> {
        let mut v = self.builtins.clone();
        for defs in self.crds.values() {
            v.extend(defs.iter().cloned());
        }
        v
    }

    fn def_for_storage(&self, storage: &str) -> Option<Arc<ResourceDef>> {
        self.builtins
            .iter()
            .find(|d| d.storage == storage && d.flavor != Flavor::EventV1)
            .cloned()
            .or_else(|| {
                self.crds
                    .values()
                    .flat_map(|v| v.first())
                    .find(|d| d.storage == storage)
                    .cloned()
            })
    }

    fn namespace_state(&self, ns: &str) -> Option<bool> {
        self.objects
            .get("namespaces")
            .and_then(|m| m.get(&(String::new(), ns.to_owned())))
            .map(|o| meta(o).is_some_and(|m| m.contains_key("deletionTimestamp")))
    }

    // ----- low-level writes -----

    fn push_record(&mut self, rec: Record) {
        let rec = Arc::new(rec);
        if self.history.len() >= HISTORY_CAP
            && let Some(old) = self.history.pop_front()
        {
            self.floor = self.floor.max(old.rv);
        }
        self.history.push_back(rec.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(rec);
    }

    fn index(&mut self, storage: &str, key: &Key, obj: Option<&Value>, old: Option<&Value>) {
        let id = (storage.to_owned(), key.0.clone(), key.1.clone());
        if let Some(old) = old {
            for o in owner_uids(old) {
                if let Some(set) = self.owners.get_mut(&o) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.owners.remove(&o);
                    }
                }
            }
            if let Some(uid) = meta_str(old, "uid") {
                self.uids.remove(uid);
            }
        }
        if let Some(obj) = obj {
            for o in owner_uids(obj) {
                self.owners.entry(o).or_default().insert(id.clone());
            }
            if let Some(uid) = meta_str(obj, "uid") {
                self.uids.insert(uid.to_owned(), id.clone());
            }
        }
    }

    /// Store `obj` under a fresh resourceVersion and emit a watch event.
    fn put(
        &mut self,
        storage: &str,
        key: Key,
        mut obj: Value,
        etype: &'static str,
        prev: Option<Value>,
    ) -> Value {
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.index(storage, &key, Some(&obj), prev.as_ref());
        self.objects
            .entry(storage.to_owned())
            .or_default()
            .insert(key.clone(), obj.clone());
        self.push_record(Record {
            rv: self.rv,
            storage: storage.to_owned(),
            namespace: key.0,
            etype,
            object: Arc::new(obj.clone()),
            previous: prev.map(Arc::new),
        });
        obj
    }

    /// Remove an object for good; the DELETED event carries a new resourceVersion and `last` state.
    fn delete_now(&mut self, storage: &str, key: &Key, mut last: Value) {
        let Some(old) = self.objects.get_mut(storage).and_then(|m| m.remove(key)) else {
            return;
        };
        self.rv += 1;
        meta_mut(&mut last).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.index(storage, key, None, Some(&old));
        self.push_record(Record {
            rv: self.rv,
            storage: storage.to_owned(),
            namespace: key.0.clone(),
            etype: "DELETED",
            object: Arc::new(last),
            previous: None,
        });
        if let Some(uid) = meta_str(&old, "uid")
            && self.owners.contains_key(uid)
        {
            let _ = self.gc.send(GcJob::OwnerGone(uid.to_owned()));
        }
        if !key.0.is_empty() && self.namespace_state(&key.0) == Some(true) {
            let _ = self.gc.send(GcJob::Namespace(key.0.clone()));
        }
    }

    pub(crate) fn get_obj(&self, def: &ResourceDef, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&def.storage)?
            .get(&(ns.to_owned(), name.to_owned()))
    }

    /// Objects of a resource in key order (namespace, name), optionally one namespace only.
    pub(crate) fn iter_objects<'a>(
        &'a self,
        def: &ResourceDef,
        ns: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = (&'a Key, &'a Value)> + 'a> {
        let Some(map) = self.objects.get(&def.storage) else {
            return Box::new(std::iter::empty());
        };
        match ns {
            Some(ns) => Box::new(
                map.range((ns.to_owned(), String::new())..)
                    .take_while(move |(k, _)| k.0 == ns),
            ),
            None => Box::new(map.iter()),
        }
    }

    // ----- views -----

    /// The object as the given resource presents it (events.k8s.io conversion, CR apiVersion).
    pub(crate) fn view(def: &ResourceDef, stored: &Value) -> Value {
        match def.flavor {
            Flavor::EventV1 => event_to_v1(stored),
            Flavor::Custom => {
                let mut o = stored.clone();
                if let Some(m) = o.as_object_mut() {
                    m.insert("apiVersion".into(), json!(def.api_version()));
                }
                o
            }
            _ => stored.clone(),
        }
    }

    fn from_view(def: &ResourceDef, body: Value) -> Value {
        if def.flavor == Flavor::EventV1 {
            event_from_v1(&body)
        } else {
            body
        }
    }

    fn storage_api_version(&self, def: &ResourceDef) -> String {
        match def.flavor {
            Flavor::EventV1 | Flavor::CoreEvent => "v1".to_owned(),
            Flavor::Custom => self
                .crds
                .values()
                .flat_map(|v| v.first())
                .find(|d| d.storage == def.storage)
                .map(|d| d.api_version())
                .unwrap_or_else(|| def.api_version()),
            _ => def.api_version(),
        }
    }

    // ----- shared validation -----

    fn check_type_meta(&self, def: &ResourceDef, body: &Value) -> Result<(), ApiError> {
        let kind = body.get("kind").and_then(Value::as_str).unwrap_or("");
        let api_version = body.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if !kind.is_empty() && kind != def.kind {
            let v = if api_version.is_empty() {
                def.version.as_str()
            } else {
                api_version
            };
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{v}\" cannot be handled as a {}: converting (v1.{kind}) to (core.{}): unknown conversion",
                def.kind, def.kind
            )));
        }
        if !api_version.is_empty() && api_version != def.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({})",
                def.api_version()
            )));
        }
        Ok(())
    }

    fn validate(
        &self,
        def: &ResourceDef,
        ns: &str,
        obj: &Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        check_micro_time(def, obj)?;
        let name = meta_str(obj, "name").unwrap_or("");
        let mut causes: Vec<(&str, String, String)> = Vec::new();
        if let Some(refs) = meta(obj)
            .and_then(|m| m.get("ownerReferences"))
            .and_then(Value::as_array)
        {
            for r in refs {
                if r.get("uid")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    causes.push((
                        "FieldValueInvalid",
                        "metadata.ownerReferences.uid".into(),
                        "Invalid value: \"\": must not be empty".into(),
                    ));
                }
            }
        }
        match def.flavor {
            Flavor::Lease => {
                if let Some(d) = obj
                    .pointer("/spec/leaseDurationSeconds")
                    .and_then(Value::as_i64)
                    && d <= 0
                {
                    causes.push((
                        "FieldValueInvalid",
                        "spec.leaseDurationSeconds".into(),
                        format!("Invalid value: {d}: must be greater than 0"),
                    ));
                }
            }
            Flavor::CoreEvent | Flavor::EventV1 => {
                let io_ns = obj
                    .pointer("/involvedObject/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if io_ns != ns {
                    causes.push((
                        "FieldValueInvalid",
                        "involvedObject.namespace".into(),
                        format!("Invalid value: \"{io_ns}\": does not match event.namespace"),
                    ));
                }
                if def.flavor == Flavor::EventV1 {
                    if obj.get("eventTime").is_none_or(Value::is_null) {
                        causes.push((
                            "FieldValueRequired",
                            "eventTime".into(),
                            "Required value".into(),
                        ));
                    }
                    let t = obj.get("type").and_then(Value::as_str).unwrap_or("");
                    if t != "Normal" && t != "Warning" {
                        causes.push((
                            "FieldValueInvalid",
                            "type".into(),
                            format!("Invalid value: \"{t}\": has invalid value: {t}"),
                        ));
                    }
                }
            }
            _ => {}
        }
        if let Some(old) = old
            && meta(old).is_some_and(|m| m.contains_key("deletionTimestamp"))
        {
            let before = finalizers(old);
            let added: Vec<String> = finalizers(obj)
                .into_iter()
                .filter(|f| !before.contains(f))
                .collect();
            if !added.is_empty() {
                let list = added
                    .iter()
                    .map(|f| format!("\"{f}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                let msg = format!(
                    "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{list}}}"
                );
                // The real server reports this cause twice (metadata and update validation both fire).
                causes.push((
                    "FieldValueForbidden",
                    "metadata.finalizers".into(),
                    msg.clone(),
                ));
                causes.push(("FieldValueForbidden", "metadata.finalizers".into(), msg));
            }
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(def, name, &causes));
        }
        Ok(())
    }

    /// Secret normalisation: `stringData` merged into base64 `data`, `type` defaults to Opaque.
    fn normalize_secret(obj: &mut Value) -> Result<(), ApiError> {
        let Some(m) = obj.as_object_mut() else {
            return Ok(());
        };
        if let Some(Value::Object(data)) = m.get("data") {
            for (k, v) in data {
                let s = v.as_str().unwrap_or("");
                if base64::engine::general_purpose::STANDARD.decode(s).is_err() {
                    return Err(ApiError::bad_request(format!(
                        "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data at input byte 0 (data[{k}])"
                    )));
                }
            }
        }
        if let Some(Value::Object(sd)) = m.remove("stringData") {
            let data = m.entry("data").or_insert_with(|| json!({}));
            if !data.is_object() {
                *data = json!({});
            }
            if let Some(d) = data.as_object_mut() {
                for (k, v) in sd {
                    let s = v.as_str().unwrap_or("");
                    d.insert(
                        k,
                        json!(base64::engine::general_purpose::STANDARD.encode(s)),
                    );
                }
            }
        }
        if m.get("data")
            .is_some_and(|d| d.as_object().is_some_and(Map::is_empty) || d.is_null())
        {
            m.remove("data");
        }
        if m.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            m.insert("type".into(), json!("Opaque"));
        }
        Ok(())
    }

    // ----- create -----

    pub(crate) fn create(
        &mut self,
        ctx: &Ctx,
        def: &Arc<ResourceDef>,
        ns: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(format!(
                "the object provided is unrecognized (must be of type {}): couldn't get version/kind; json parse error: cannot unmarshal into object",
                def.kind
            )));
        }
        self.check_type_meta(def, &body)?;
        let mut obj = Self::from_view(def, body);
        let body_ns = meta_str(&obj, "namespace").unwrap_or("").to_owned();
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut name = meta_str(&obj, "name").unwrap_or("").to_owned();
        let generate = meta_str(&obj, "generateName").unwrap_or("").to_owned();
        if name.is_empty() && !generate.is_empty() {
            name = format!("{generate}{}", random_suffix());
        }
        if def.namespaced {
            match self.namespace_state(ns) {
                None => return Err(ApiError::namespace_not_found(ns)),
                Some(true) => return Err(ApiError::namespace_terminating(def, &name, ns)),
                Some(false) => {}
            }
        }
        if name.is_empty() {
            return Err(ApiError::invalid(
                def,
                "",
                &[(
                    "FieldValueRequired",
                    "metadata.name".into(),
                    "Required value: name or generateName is required".into(),
                )],
            ));
        }
        if !is_dns_subdomain(&name) {
            let mut causes = Vec::new();
            if !generate.is_empty() && !is_dns_subdomain(&format!("{generate}a")) {
                causes.push((
                    "FieldValueInvalid",
                    "metadata.generateName".into(),
                    format!("Invalid value: \"{generate}\": {SUBDOMAIN_MSG}"),
                ));
            }
            causes.push((
                "FieldValueInvalid",
                "metadata.name".into(),
                format!("Invalid value: \"{name}\": {SUBDOMAIN_MSG}"),
            ));
            return Err(ApiError::invalid(def, &name, &causes));
        }
        let ns_key = if def.namespaced {
            ns.to_owned()
        } else {
            String::new()
        };
        if self.get_obj(def, &ns_key, &name).is_some() {
            return Err(ApiError::already_exists(def, &name));
        }
        self.build_new(ctx, def, &ns_key, &name, &mut obj)?;
        let mut entries = Vec::new();
        fields::record_update(
            &mut entries,
            None,
            &obj,
            &def.list_maps,
            &ctx.manager,
            &def.api_version(),
            None,
            &ctx.now,
        );
        fields::write_entries(&mut obj, &entries);
        self.validate(def, &ns_key, &obj, None)?;
        if def.flavor == Flavor::Crd {
            self.check_crd(def, &obj)?;
        }
        if ctx.dry_run {
            return Ok(Self::view(def, &obj));
        }
        let stored = self.put(&def.storage, (ns_key, name), obj, "ADDED", None);
        if def.flavor == Flavor::Crd {
            self.register_crd(&stored);
        }
        Ok(Self::view(def, &stored))
    }

    /// Server-set fields of a new object (identity, timestamps, defaults, dropped status).
    fn build_new(
        &self,
        ctx: &Ctx,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        let api_version = self.storage_api_version(def);
        if let Some(m) = obj.as_object_mut() {
            m.insert("apiVersion".into(), json!(api_version));
            m.insert("kind".into(), json!(def.kind));
            if def.status_subresource {
                m.remove("status");
            }
        }
        let m = meta_mut(obj);
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "selfLink",
        ] {
            m.remove(k);
        }
        m.insert("name".into(), json!(name));
        if def.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), json!(new_uid()));
        m.insert("creationTimestamp".into(), json!(ctx.now));
        if def.has_generation() {
            m.insert("generation".into(), json!(1));
        }
        match def.flavor {
            Flavor::Secret => Self::normalize_secret(obj)?,
            Flavor::CoreEvent | Flavor::EventV1 => default_event(obj),
            Flavor::Lease => {
                if let Some(o) = obj.as_object_mut() {
                    o.entry("spec").or_insert_with(|| json!({}));
                }
            }
            Flavor::Namespace => {
                let m = meta_mut(obj);
                let labels = m.entry("labels").or_insert_with(|| json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
                if let Some(o) = obj.as_object_mut() {
                    o.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
                    o.insert("status".into(), json!({"phase": "Active"}));
                }
            }
            Flavor::Crd => {
                let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
                let storage_version = obj
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .and_then(|vs| {
                        vs.iter()
                            .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                            .or(vs.first())
                    })
                    .and_then(|v| v.get("name"))
                    .cloned()
                    .unwrap_or(json!("v1"));
                if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.entry("conversion")
                        .or_insert_with(|| json!({"strategy": "None"}));
                    if let Some(n) = spec.get_mut("names").and_then(Value::as_object_mut)
                        && !n.contains_key("listKind")
                        && let Some(k) = n.get("kind").and_then(Value::as_str)
                    {
                        let lk = format!("{k}List");
                        n.insert("listKind".into(), json!(lk));
                    }
                }
                let names = obj.pointer("/spec/names").cloned().unwrap_or(names);
                // The real server establishes a CRD ~0.1 s after creation; here it is at once.
                let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "lastTransitionTime": ctx.now, "reason": reason, "message": msg});
                if let Some(o) = obj.as_object_mut() {
                    o.insert(
                        "status".into(),
                        json!({
                            "conditions": [
                                cond("NamesAccepted", "NoConflicts", "no conflicts found"),
                                cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                            ],
                            "acceptedNames": names,
                            "storedVersions": [storage_version],
                        }),
                    );
                }
            }
            Flavor::Workload | Flavor::Custom => {}
        }
        Ok(())
    }

    fn check_crd(&self, def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").unwrap_or("");
        let group = obj
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("");
        let plural = obj
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = obj
            .pointer("/spec/names/kind")
            .and_then(Value::as_str)
            .unwrap_or("");
        let versions = obj
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(0);
        let mut causes = Vec::new();
        if name != format!("{plural}.{group}") {
            causes.push((
                "FieldValueInvalid",
                "metadata.name".into(),
                format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
            ));
        }
        if kind.is_empty() {
            causes.push((
                "FieldValueRequired",
                "spec.names.kind".into(),
                "Required value".into(),
            ));
        }
        if versions == 0 {
            causes.push((
                "FieldValueRequired",
                "spec.versions".into(),
                "Required value: must have exactly one version marked as storage version".into(),
            ));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(def, name, &causes));
        }
        Ok(())
    }

    fn register_crd(&mut self, crd: &Value) {
        let name = meta_str(crd, "name").unwrap_or("").to_owned();
        let s = |p: &str| {
            crd.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let group = s("/spec/group");
        let plural = s("/spec/names/plural");
        let kind = s("/spec/names/kind");
        let singular = {
            let x = s("/spec/names/singular");
            if x.is_empty() { kind.to_lowercase() } else { x }
        };
        let list_kind = {
            let x = s("/spec/names/listKind");
            if x.is_empty() {
                format!("{kind}List")
            } else {
                x
            }
        };
        let namespaced = s("/spec/scope") != "Cluster";
        let short_names: Vec<String> = crd
            .pointer("/spec/names/shortNames")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let mut versions: Vec<&Value> = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|v| v.get("served").and_then(Value::as_bool) != Some(false))
                    .collect()
            })
            .unwrap_or_default();
        // Storage version first: it names the stored apiVersion.
        versions.sort_by_key(|v| v.get("storage").and_then(Value::as_bool) != Some(true));
        let defs = versions
            .into_iter()
            .map(|v| {
                let mut lm = ListMaps::with_defaults();
                if let Some(schema) = v.pointer("/schema/openAPIV3Schema") {
                    lm.collect_schema("", schema);
                }
                Arc::new(ResourceDef {
                    group: group.clone(),
                    version: v
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("v1")
                        .to_owned(),
                    plural: plural.clone(),
                    singular: singular.clone(),
                    kind: kind.clone(),
                    list_kind: list_kind.clone(),
                    namespaced,
                    status_subresource: v.pointer("/subresources/status").is_some(),
                    flavor: Flavor::Custom,
                    storage: format!("{plural}.{group}"),
                    short_names: short_names.clone(),
                    list_maps: lm,
                })
            })
            .collect();
        self.crds.insert(name, defs);
    }

    // ----- update / patch / apply -----

    /// PUT.
    pub(crate) fn replace(
        &mut self,
        ctx: &Ctx,
        def: &Arc<ResourceDef>,
        ns: &str,
        name: &str,
        sub: Option<&str>,
        body: Value,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the object provided is unrecognized"));
        }
        self.check_type_meta(def, &body)?;
        let body = Self::from_view(def, body);
        let body_name = meta_str(&body, "name").unwrap_or("");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(&body, "namespace").unwrap_or("");
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let precondition = match meta_str(&body, "resourceVersion") {
            None | Some("") => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::internal(format!(
                    "strconv.ParseUint: parsing \"{rv}\": invalid syntax"
                ))
            })?),
        };
        let Some(old) = self.get_obj(def, ns, name).cloned() else {
            return Err(ApiError::not_found(def, name));
        };
        if let Some(rv) = precondition
            && meta_str(&old, "resourceVersion") != Some(rv.to_string().as_str())
        {
            return Err(ApiError::conflict_modified(def, name));
        }
        // The quirk from the transcripts: an object without managedFields never gains them via PUT.
        let track = meta(&old).is_some_and(|m| m.contains_key("managedFields"));
        self.finish_write(
            ctx,
            def,
            ns,
            name,
            old,
            body,
            sub,
            Tracking::Update { track },
        )
    }

    /// PATCH (merge, JSON, strategic, apply).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        ctx: &Ctx,
        def: &Arc<ResourceDef>,
        ns: &str,
        name: &str,
        sub: Option<&str>,
        kind: PatchKind,
        body: &[u8],
        force: bool,
    ) -> Result<(u16, Value), ApiError> {
        if kind == PatchKind::Apply {
            return self.apply(ctx, def, ns, name, sub, body, force);
        }
        let Some(old) = self.get_obj(def, ns, name).cloned() else {
            // Decode errors win over NotFound only for malformed bodies; keep NotFound first like the server.
            return Err(ApiError::not_found(def, name));
        };
        let mut view = Self::view(def, &old);
        match kind {
            PatchKind::Merge | PatchKind::Strategic => {
                let patch: Value = serde_json::from_slice(body).map_err(|e| {
                    ApiError::bad_request(format!("error decoding patch: {}", go_json_error(&e)))
                })?;
                if kind == PatchKind::Strategic {
                    strategic_merge(&mut view, &patch);
                } else {
                    json_patch::merge(&mut view, &patch);
                }
            }
            PatchKind::Json => {
                let ops: Vec<Value> = serde_json::from_slice(body).map_err(|e| {
                    let what = match serde_json::from_slice::<Value>(body) {
                        Ok(Value::Object(_)) => "json: cannot unmarshal object into Go value of type []handlers.jsonPatchOp".to_owned(),
                        Ok(_) => format!("json: {e}"),
                        Err(e) => go_json_error(&e),
                    };
                    ApiError::bad_request(format!("error decoding patch: {what}"))
                })?;
                // Go's JSON patch treats `test` of a missing path against null as success (kube-rs
                // relies on it to add the first finalizer).
                let ops: Vec<Value> = ops
                    .into_iter()
                    .filter(|op| {
                        let missing_null_test = op.get("op").and_then(Value::as_str)
                            == Some("test")
                            && op.get("value").is_some_and(Value::is_null)
                            && op
                                .get("path")
                                .and_then(Value::as_str)
                                .is_some_and(|p| view.pointer(p).is_none());
                        !missing_null_test
                    })
                    .collect();
                let ops: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                json_patch::patch(&mut view, &ops).map_err(|_| {
                    ApiError::new(
                        422,
                        Some("Invalid"),
                        "the server rejected our request due to an error in our request",
                        Some(json!({})),
                    )
                })?;
            }
            PatchKind::Apply => {}
        }
        if let Some(rv) = meta_str(&view, "resourceVersion")
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict_modified(def, name));
        }
        let new = Self::from_view(def, view);
        let v = self.finish_write(
            ctx,
            def,
            ns,
            name,
            old,
            new,
            sub,
            Tracking::Update { track: true },
        )?;
        Ok((200, v))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        ctx: &Ctx,
        def: &Arc<ResourceDef>,
        ns: &str,
        name: &str,
        sub: Option<&str>,
        body: &[u8],
        force: bool,
    ) -> Result<(u16, Value), ApiError> {
        let config: Value = serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        if !config.is_object() {
            return Err(ApiError::bad_request(
                "error decoding YAML: the body is not an object",
            ));
        }
        let kind = config.get("kind").and_then(Value::as_str).unwrap_or("");
        let api_version = config
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if kind != def.kind || api_version != def.api_version() {
            let (g, v) = match api_version.split_once('/') {
                Some((g, v)) => (g, v),
                None => ("", api_version),
            };
            return Err(ApiError::bad_request(format!(
                "invalid object type: {g}/{v}, Kind={kind}"
            )));
        }
        let body_name = meta_str(&config, "name").unwrap_or("");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(&config, "namespace").unwrap_or("");
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut config = Self::from_view(def, config);
        let precondition = meta_str(&config, "resourceVersion").map(str::to_owned);
        if let Some(m) = config.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        // What this apply may touch: status only through /status, never through the main resource.
        if def.status_subresource
            && let Some(m) = config.as_object_mut()
        {
            if sub == Some("status") {
                m.retain(|k, _| {
                    matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")
                });
                if let Some(md) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                    md.retain(|k, _| k == "name" || k == "namespace");
                }
            } else {
                m.remove("status");
            }
        }
        let applied: FieldSet = fields::scope(
            fields::leaves(&config, &def.list_maps),
            def.status_subresource,
            sub,
        );
        let api_version = def.api_version();

        let Some(old) = self.get_obj(def, ns, name).cloned() else {
            if sub.is_some() {
                return Err(ApiError::not_found(def, name));
            }
            if precondition.is_some() {
                return Err(ApiError::conflict_modified(def, name));
            }
            if def.namespaced {
                match self.namespace_state(ns) {
                    None => return Err(ApiError::namespace_not_found(ns)),
                    Some(true) => return Err(ApiError::namespace_terminating(def, name, ns)),
                    Some(false) => {}
                }
            }
            let ns_key = if def.namespaced {
                ns.to_owned()
            } else {
                String::new()
            };
            let mut obj = config;
            self.build_new(ctx, def, &ns_key, name, &mut obj)?;
            let entries = vec![Entry {
                manager: ctx.manager.clone(),
                operation: "Apply".into(),
                api_version,
                time: Some(ctx.now.clone()),
                subresource: None,
                set: applied,
            }];
            fields::write_entries(&mut obj, &entries);
            self.validate(def, &ns_key, &obj, None)?;
            if def.flavor == Flavor::Crd {
                self.check_crd(def, &obj)?;
            }
            if ctx.dry_run {
                return Ok((201, Self::view(def, &obj)));
            }
            let stored = self.put(&def.storage, (ns_key, name.to_owned()), obj, "ADDED", None);
            if def.flavor == Flavor::Crd {
                self.register_crd(&stored);
            }
            return Ok((201, Self::view(def, &stored)));
        };
        if let Some(rv) = precondition
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict_modified(def, name));
        }

        let mut entries = fields::read_entries(&old);
        // Conflicts: another manager owns a field this apply sets to a different value.
        let mut conflicts: Vec<fields::Conflict> = Vec::new();
        for p in &applied {
            let live = fields::get(&old, p);
            if live.is_none() || live == fields::get(&config, p) {
                continue;
            }
            for e in &entries {
                if e.manager != ctx.manager && e.set.contains(p) {
                    conflicts.push(fields::Conflict {
                        manager: e.manager.clone(),
                        using: (e.operation == "Update").then(|| e.api_version.clone()),
                        path: p.clone(),
                    });
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(conflict_error(&conflicts));
        }
        let sub_slot = sub.filter(|_| def.status_subresource);
        let previous: FieldSet = entries
            .iter()
            .find(|e| e.same_slot(&ctx.manager, "Apply", sub_slot))
            .map(|e| e.set.clone())
            .unwrap_or_default();
        let mut new = old.clone();
        // Fields this manager applied before and dropped now go away unless someone else owns them.
        let mut dropped: Vec<&fields::Path> = previous.difference(&applied).collect();
        dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in dropped {
            let owned_elsewhere = entries.iter().any(|e| {
                !e.same_slot(&ctx.manager, "Apply", sub_slot)
                    && e.set.iter().any(|q| q.starts_with(p))
            });
            let under_applied = applied.iter().any(|q| q.starts_with(p));
            // A list-map item's key fields go with the item (its marker, removed after its
            // leaves), never on their own: the item would stay behind without its key.
            if !owned_elsewhere && !under_applied && !fields::is_item_key(p) {
                fields::remove(&mut new, p);
            }
        }
        let mut merge_src = config.clone();
        if let Some(m) = merge_src.as_object_mut() {
            m.remove("apiVersion");
            m.remove("kind");
        }
        fields::apply_merge(&mut new, &merge_src, &def.list_maps, None);
        if force {
            let conflicted: BTreeSet<&fields::Path> = conflicts.iter().map(|c| &c.path).collect();
            for e in entries.iter_mut() {
                if e.manager != ctx.manager {
                    e.set.retain(|p| !conflicted.contains(p));
                }
            }
        }
        match entries
            .iter_mut()
            .find(|e| e.same_slot(&ctx.manager, "Apply", sub_slot))
        {
            Some(e) => {
                if e.set != applied {
                    e.set = applied;
                    e.time = Some(ctx.now.clone());
                }
            }
            None => entries.insert(
                0,
                Entry {
                    manager: ctx.manager.clone(),
                    operation: "Apply".into(),
                    api_version,
                    time: Some(ctx.now.clone()),
                    subresource: sub_slot.map(str::to_owned),
                    set: applied,
                },
            ),
        }
        let v = self.finish_write(ctx, def, ns, name, old, new, sub, Tracking::Apply(entries))?;
        Ok((200, v))
    }

    /// The common tail of every update: status rules, generation, ownership, no-op detection,
    /// and final deletion when the last finalizer of a terminating object goes away.
    #[allow(clippy::too_many_arguments)]
    fn finish_write(
        &mut self,
        ctx: &Ctx,
        def: &Arc<ResourceDef>,
        ns: &str,
        name: &str,
        old: Value,
        body: Value,
        sub: Option<&str>,
        tracking: Tracking,
    ) -> Result<Value, ApiError> {
        let mut new = if def.status_subresource && sub == Some("status") {
            let mut n = old.clone();
            if let Some(m) = n.as_object_mut() {
                match body.get("status") {
                    Some(s) if !s.is_null() => {
                        m.insert("status".into(), s.clone());
                    }
                    _ => {
                        m.remove("status");
                    }
                }
            }
            n
        } else {
            let mut n = body;
            if def.status_subresource
                && let Some(m) = n.as_object_mut()
            {
                match old.get("status") {
                    Some(s) => {
                        m.insert("status".into(), s.clone());
                    }
                    None => {
                        m.remove("status");
                    }
                }
            }
            n
        };
        // Identity and server-owned metadata always come from the stored object.
        if let Some(m) = new.as_object_mut() {
            m.insert(
                "apiVersion".into(),
                old.get("apiVersion").cloned().unwrap_or(Value::Null),
            );
            m.insert("kind".into(), json!(def.kind));
        }
        {
            let old_meta = meta(&old).cloned().unwrap_or_default();
            let m = meta_mut(&mut new);
            for k in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "managedFields",
                "resourceVersion",
            ] {
                match old_meta.get(k) {
                    Some(v) => {
                        m.insert(k.into(), v.clone());
                    }
                    None => {
                        m.remove(k);
                    }
                }
            }
            m.remove("selfLink");
            for k in ["labels", "annotations", "finalizers", "ownerReferences"] {
                if m.get(k).is_some_and(|v| {
                    v.is_null()
                        || v.as_object().is_some_and(Map::is_empty)
                        || v.as_array().is_some_and(Vec::is_empty)
                }) {
                    m.remove(k);
                }
            }
        }
        match def.flavor {
            Flavor::Secret => Self::normalize_secret(&mut new)?,
            Flavor::CoreEvent | Flavor::EventV1 => default_event(&mut new),
            Flavor::Namespace => {
                if let Some(m) = new.as_object_mut() {
                    m.insert("spec".into(), old.get("spec").cloned().unwrap_or(json!({})));
                }
            }
            _ => {}
        }
        self.validate(def, ns, &new, Some(&old))?;
        if def.has_generation() && spec_part(&old) != spec_part(&new) {
            let g = meta(&old)
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        let sub_slot = sub.filter(|_| def.status_subresource);
        let mut entries = match tracking {
            Tracking::Apply(entries) => entries,
            Tracking::Update { track } => {
                let mut entries = fields::read_entries(&old);
                if track {
                    let scoped_new = scoped(&new, def.status_subresource, sub_slot);
                    let scoped_old = scoped(&old, def.status_subresource, sub_slot);
                    fields::record_update(
                        &mut entries,
                        Some(&scoped_old),
                        &scoped_new,
                        &def.list_maps,
                        &ctx.manager,
                        &def.api_version(),
                        sub_slot,
                        &ctx.now,
                    );
                }
                entries
            }
        };
        fields::prune(&mut entries, &new);
        fields::write_entries(&mut new, &entries);

        if without_rv(&new) == without_rv(&old) {
            return Ok(Self::view(def, &old));
        }
        if ctx.dry_run {
            return Ok(Self::view(def, &new));
        }
        let key = (ns.to_owned(), name.to_owned());
        let terminating = meta(&new).is_some_and(|m| m.contains_key("deletionTimestamp"));
        if terminating && finalizers(&new).is_empty() {
            self.delete_now(&def.storage, &key, old);
            return Ok(Self::view(def, &new));
        }
        let stored = self.put(&def.storage, key, new, "MODIFIED", Some(old));
        if def.flavor == Flavor::Crd {
            self.register_crd(&stored);
        }
        Ok(Self::view(def, &stored))
    }

    // ----- delete -----

    /// DELETE of one object: the Success Status when it is gone, the object when something keeps it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn delete(
        &mut self,
        ctx: &Ctx,
        def: &Arc<ResourceDef>,
        ns: &str,
        name: &str,
        opts: &Value,
        policy_param: Option<&str>,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.get_obj(def, ns, name).cloned() else {
            return Err(ApiError::not_found(def, name));
        };
        let uid = meta_str(&old, "uid").unwrap_or("").to_owned();
        if let Some(want) = opts.pointer("/preconditions/uid").and_then(Value::as_str)
            && want != uid
        {
            return Err(ApiError::precondition(
                def,
                name,
                &format!(
                    "the UID in the precondition ({want}) does not match the UID in record ({uid}). The object might have been deleted and then recreated"
                ),
            ));
        }
        let rv = meta_str(&old, "resourceVersion").unwrap_or("").to_owned();
        if let Some(want) = opts
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            && want != rv
        {
            return Err(ApiError::precondition(
                def,
                name,
                &format!(
                    "the ResourceVersion in the precondition ({want}) does not match the ResourceVersion in record ({rv}). The object might have been modified"
                ),
            ));
        }
        if meta(&old).is_some_and(|m| m.contains_key("deletionTimestamp")) {
            return Ok(Self::view(def, &old));
        }
        let policy = opts
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .or(policy_param)
            .unwrap_or("Background")
            .to_owned();
        let mut fins = finalizers(&old);
        match (def.flavor, policy.as_str()) {
            (Flavor::Namespace, _) | (Flavor::Crd, _) => {}
            (_, "Foreground") if !fins.iter().any(|f| f == "foregroundDeletion") => {
                fins.push("foregroundDeletion".into())
            }
            (_, "Orphan") if !fins.iter().any(|f| f == "orphan") => fins.push("orphan".into()),
            _ => {}
        }
        let key = (ns.to_owned(), name.to_owned());
        let keep = !fins.is_empty() || matches!(def.flavor, Flavor::Namespace | Flavor::Crd);
        if !keep {
            if !ctx.dry_run {
                self.delete_now(&def.storage, &key, old);
            }
            let mut d = Map::new();
            d.insert("name".into(), json!(name));
            if !def.group.is_empty() {
                d.insert("group".into(), json!(def.group));
            }
            d.insert("kind".into(), json!(def.plural));
            d.insert("uid".into(), json!(uid));
            return Ok(json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": Value::Object(d),
            }));
        }
        let mut new = old.clone();
        {
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(ctx.now));
            if def.flavor != Flavor::Namespace {
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
            }
            if def.has_generation() {
                let g = m.get("generation").and_then(Value::as_i64).unwrap_or(1);
                m.insert("generation".into(), json!(g + 1));
            }
        }
        match def.flavor {
            Flavor::Namespace => {
                if let Some(m) = new.as_object_mut() {
                    m.insert("status".into(), json!({"phase": "Terminating"}));
                }
            }
            Flavor::Crd => fins.push("customresourcecleanup.apiextensions.k8s.io".into()),
            _ => {}
        }
        set_finalizers(&mut new, &fins);
        if ctx.dry_run {
            return Ok(Self::view(def, &new));
        }
        let stored = self.put(&def.storage, key, new, "MODIFIED", Some(old));
        let job = match (def.flavor, policy.as_str()) {
            (Flavor::Namespace, _) => Some(GcJob::Namespace(name.to_owned())),
            (Flavor::Crd, _) => Some(GcJob::Crd(name.to_owned())),
            (_, "Foreground") => Some(GcJob::Foreground(
                def.storage.clone(),
                ns.to_owned(),
                name.to_owned(),
            )),
            (_, "Orphan") => Some(GcJob::Orphan(
                def.storage.clone(),
                ns.to_owned(),
                name.to_owned(),
            )),
            _ => None,
        };
        if let Some(job) = job {
            let _ = self.gc.send(job);
        }
        Ok(Self::view(def, &stored))
    }

    /// Remove one finalizer from a terminating object (the GC's part of Foreground/Orphan).
    fn drop_finalizer(&mut self, storage: &str, key: &Key, finalizer: &str) {
        let Some(old) = self.objects.get(storage).and_then(|m| m.get(key)).cloned() else {
            return;
        };
        let mut fins = finalizers(&old);
        fins.retain(|f| f != finalizer);
        let mut new = old.clone();
        set_finalizers(&mut new, &fins);
        if fins.is_empty() {
            self.delete_now(storage, key, old);
        } else {
            self.put(storage, key.clone(), new, "MODIFIED", Some(old));
        }
    }

    /// An object's uid and the objects whose ownerReferences name it, or `None` when it is gone.
    fn dependents_of(&self, storage: &str, key: &Key) -> Option<(String, Vec<Dependent>)> {
        let object = self.objects.get(storage)?.get(key)?;
        let uid = meta_str(object, "uid")?.to_owned();
        let dependents = self
            .owners
            .get(&uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        Some((uid, dependents))
    }

    /// Delete an object on behalf of the GC (background propagation; finalizers respected).
    fn gc_delete(&mut self, storage: &str, key: &Key, now: &str) {
        let Some(def) = self.def_for_storage(storage) else {
            return;
        };
        let Some(old) = self.objects.get(storage).and_then(|m| m.get(key)).cloned() else {
            return;
        };
        if meta(&old).is_some_and(|m| m.contains_key("deletionTimestamp")) {
            return;
        }
        if finalizers(&old).is_empty() {
            self.delete_now(storage, key, old);
        } else {
            let mut new = old.clone();
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if def.has_generation() {
                let g = m.get("generation").and_then(Value::as_i64).unwrap_or(1);
                m.insert("generation".into(), json!(g + 1));
            }
            self.put(storage, key.clone(), new, "MODIFIED", Some(old));
        }
    }

    pub(crate) fn run_gc(&mut self, job: GcJob, now: &str) {
        match job {
            GcJob::OwnerGone(uid) => {
                let dependents: Vec<(String, String, String)> = self
                    .owners
                    .get(&uid)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                for (storage, ns, name) in dependents {
                    let key = (ns, name);
                    let Some(obj) = self.objects.get(&storage).and_then(|m| m.get(&key)) else {
                        continue;
                    };
                    // The GC deletes a dependent once none of its owners exists any more.
                    if owner_uids(obj).iter().all(|u| !self.uids.contains_key(u)) {
                        self.gc_delete(&storage, &key, now);
                    }
                }
            }
            GcJob::Foreground(storage, ns, name) => {
                let key = (ns, name);
                if let Some((_, dependents)) = self.dependents_of(&storage, &key) {
                    for (s, n, nm) in dependents {
                        self.gc_delete(&s, &(n, nm), now);
                    }
                }
                self.drop_finalizer(&storage, &key, "foregroundDeletion");
            }
            GcJob::Orphan(storage, ns, name) => {
                let key = (ns, name);
                if let Some((uid, dependents)) = self.dependents_of(&storage, &key) {
                    for (s, n, nm) in dependents {
                        let k = (n, nm);
                        let Some(old) = self.objects.get(&s).and_then(|m| m.get(&k)).cloned()
                        else {
                            continue;
                        };
                        let mut new = old.clone();
                        let m = meta_mut(&mut new);
                        if let Some(Value::Array(refs)) = m.get_mut("ownerReferences") {
                            refs.retain(|r| {
                                r.get("uid").and_then(Value::as_str) != Some(uid.as_str())
                            });
                            if refs.is_empty() {
                                m.remove("ownerReferences");
                            }
                        }
                        self.put(&s, k, new, "MODIFIED", Some(old));
                    }
                }
                self.drop_finalizer(&storage, &key, "orphan");
            }
            GcJob::Namespace(ns) => {
                let storages: Vec<String> = self
                    .objects
                    .keys()
                    .filter(|s| *s != "namespaces")
                    .cloned()
                    .collect();
                let mut remaining = 0usize;
                for storage in storages {
                    let keys: Vec<Key> = self
                        .objects
                        .get(&storage)
                        .map(|m| {
                            m.range((ns.clone(), String::new())..)
                                .take_while(|(k, _)| k.0 == ns)
                                .map(|(k, _)| k.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    for key in keys {
                        self.gc_delete(&storage, &key, now);
                        if self
                            .objects
                            .get(&storage)
                            .is_some_and(|m| m.contains_key(&key))
                        {
                            remaining += 1;
                        }
                    }
                }
                if remaining == 0 {
                    let key = (String::new(), ns);
                    if let Some(old) = self
                        .objects
                        .get("namespaces")
                        .and_then(|m| m.get(&key))
                        .cloned()
                        && meta(&old).is_some_and(|m| m.contains_key("deletionTimestamp"))
                    {
                        self.delete_now("namespaces", &key, old);
                    }
                }
            }
            GcJob::Crd(name) => {
                if let Some(defs) = self.crds.remove(&name)
                    && let Some(def) = defs.first()
                {
                    let keys: Vec<(Key, Value)> = self
                        .objects
                        .get(&def.storage)
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default();
                    for (k, v) in keys {
                        self.delete_now(&def.storage, &k, v);
                    }
                    self.objects.remove(&def.storage);
                }
                let key = (String::new(), name);
                if let Some(old) = self
                    .objects
                    .get("customresourcedefinitions.apiextensions.k8s.io")
                    .and_then(|m| m.get(&key))
                    .cloned()
                {
                    self.delete_now("customresourcedefinitions.apiextensions.k8s.io", &key, old);
                }
            }
        }
    }

    /// Make every resourceVersion up to now too old for watches.
    pub(crate) fn compact(&mut self) {
        self.floor = self.rv;
        self.history.clear();
    }
}

/// How an update records field ownership.
pub(crate) enum Tracking {
    Update { track: bool },
    Apply(Vec<Entry>),
}

fn scoped(obj: &Value, status_subresource: bool, sub: Option<&str>) -> Value {
    if !status_subresource {
        return obj.clone();
    }
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        if sub == Some("status") {
            m.retain(|k, _| k == "status");
        } else {
            m.remove("status");
        }
    }
    o
}

fn conflict_error(conflicts: &[fields::Conflict]) -> ApiError {
    let who = |c: &fields::Conflict| match &c.using {
        Some(v) => format!("\"{}\" using {v}", c.manager),
        None => format!("\"{}\"", c.manager),
    };
    let message = if conflicts.len() == 1 {
        let c = &conflicts[0];
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            who(c),
            fields::display(&c.path)
        )
    } else {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for c in conflicts {
            let w = who(c);
            match groups.iter_mut().find(|(g, _)| *g == w) {
                Some((_, paths)) => paths.push(fields::display(&c.path)),
                None => groups.push((w, vec![fields::display(&c.path)])),
            }
        }
        let body: Vec<String> = groups
            .iter()
            .map(|(w, paths)| {
                let lines: Vec<String> = paths.iter().map(|p| format!("- {p}")).collect();
                format!("conflicts with {w}:\n{}", lines.join("\n"))
            })
            .collect();
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            body.join("\n")
        )
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", who(c)),
                "field": fields::display(&c.path),
            })
        })
        .collect();
    ApiError::new(
        409,
        Some("Conflict"),
        message,
        Some(json!({"causes": causes})),
    )
}

/// serde_json's messages mapped onto the Go encoding/json ones the transcripts show.
fn go_json_error(e: &serde_json::Error) -> String {
    if e.is_eof() {
        "unexpected end of JSON input".to_owned()
    } else {
        format!("invalid character: {e}")
    }
}

/// Strategic merge patch for built-in kinds, reduced to what matters here: a JSON merge patch,
/// except that `metadata.finalizers` (patchStrategy=merge) is merged and
/// `$deleteFromPrimitiveList/finalizers` removes entries.
fn strategic_merge(target: &mut Value, patch: &Value) {
    let mut patch = patch.clone();
    let mut add: Vec<String> = Vec::new();
    let mut del: Vec<String> = Vec::new();
    if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(Value::Array(f)) = m.remove("finalizers") {
            add = f
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
        }
        if let Some(Value::Array(f)) = m.remove("$deleteFromPrimitiveList/finalizers") {
            del = f
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
        }
    }
    strip_directives(&mut patch);
    json_patch::merge(target, &patch);
    if add.is_empty() && del.is_empty() {
        return;
    }
    let existing = finalizers(target);
    let mut merged = add.clone();
    merged.extend(existing.into_iter().filter(|f| !add.contains(f)));
    merged.retain(|f| !del.contains(f));
    set_finalizers(target, &merged);
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            for x in m.values_mut() {
                strip_directives(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}
