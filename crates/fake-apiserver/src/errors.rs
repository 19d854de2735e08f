//! `Status` error bodies, with the exact messages, reasons and `details` shapes kube-apiserver uses.

use serde_json::{Map, Value, json};

use super::store::ResourceDef;

/// An error answer; rendered as a `Status` object (or as the plain-text 404 of an unknown path).
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: Option<String>,
    pub(crate) message: String,
    pub(crate) details: Option<Value>,
    pub(crate) metadata: Value,
    /// `404 page not found` as text/plain: what the server's mux answers for unregistered paths.
    pub(crate) plain_404: bool,
}

impl ApiError {
    pub(crate) fn new(
        code: u16,
        reason: Option<&str>,
        message: impl Into<String>,
        details: Option<Value>,
    ) -> Self {
        Self {
            code,
            reason: reason.map(str::to_owned),
            message: message.into(),
            details,
            metadata: json!({}),
            plain_404: false,
        }
    }

    pub(crate) fn page_not_found() -> Self {
        let mut e = Self::new(404, Some("NotFound"), "404 page not found", None);
        e.plain_404 = true;
        e
    }

    pub(crate) fn status_body(&self) -> Value {
        let mut m = Map::new();
        m.insert("kind".into(), json!("Status"));
        m.insert("apiVersion".into(), json!("v1"));
        m.insert("metadata".into(), self.metadata.clone());
        m.insert("status".into(), json!("Failure"));
        m.insert("message".into(), json!(self.message));
        if let Some(r) = &self.reason {
            m.insert("reason".into(), json!(r));
        }
        if let Some(d) = &self.details {
            m.insert("details".into(), d.clone());
        }
        m.insert("code".into(), json!(self.code));
        Value::Object(m)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, Some("BadRequest"), message, None)
    }

    pub(crate) fn resource_not_found() -> Self {
        Self::new(
            404,
            Some("NotFound"),
            "the server could not find the requested resource",
            Some(json!({})),
        )
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            405,
            Some("MethodNotAllowed"),
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        )
    }

    pub(crate) fn unsupported_media_type(accepted: &str) -> Self {
        Self::new(
            415,
            Some("UnsupportedMediaType"),
            format!(
                "the body of the request was in an unknown format - accepted media types include: {accepted}"
            ),
            None,
        )
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(500, None, message, None)
    }

    /// Name/group/kind details naming the resource (plural) the way NotFound/Conflict/AlreadyExists do.
    fn resource_details(def: &ResourceDef, name: &str) -> Value {
        let mut d = Map::new();
        d.insert("name".into(), json!(name));
        if !def.group.is_empty() {
            d.insert("group".into(), json!(def.group));
        }
        d.insert("kind".into(), json!(def.plural));
        Value::Object(d)
    }

    pub(crate) fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            404,
            Some("NotFound"),
            format!("{} \"{name}\" not found", def.qualified_resource()),
            Some(Self::resource_details(def, name)),
        )
    }

    pub(crate) fn namespace_not_found(ns: &str) -> Self {
        Self::new(
            404,
            Some("NotFound"),
            format!("namespaces \"{ns}\" not found"),
            Some(json!({"name": ns, "kind": "namespaces"})),
        )
    }

    pub(crate) fn namespace_terminating(def: &ResourceDef, name: &str, ns: &str) -> Self {
        let mut details = Self::resource_details(def, name);
        if let Some(d) = details.as_object_mut() {
            d.insert(
                "causes".into(),
                json!([{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]),
            );
        }
        Self::new(
            403,
            Some("Forbidden"),
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                def.qualified_resource()
            ),
            Some(details),
        )
    }

    pub(crate) fn already_exists(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            Some("AlreadyExists"),
            format!("{} \"{name}\" already exists", def.qualified_resource()),
            Some(Self::resource_details(def, name)),
        )
    }

    pub(crate) fn conflict_modified(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            Some("Conflict"),
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                def.qualified_resource()
            ),
            Some(Self::resource_details(def, name)),
        )
    }

    pub(crate) fn precondition(def: &ResourceDef, name: &str, what: &str) -> Self {
        let mut d = Map::new();
        d.insert("name".into(), json!(name));
        if !def.group.is_empty() {
            d.insert("group".into(), json!(def.group));
        }
        d.insert("kind".into(), json!(def.kind));
        Self::new(
            409,
            Some("Conflict"),
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {what}",
                def.qualified_kind()
            ),
            Some(Value::Object(d)),
        )
    }

    /// 422 Invalid with field causes: `(reason, field, message)`.
    pub(crate) fn invalid(
        def: &ResourceDef,
        name: &str,
        causes: &[(&str, String, String)],
    ) -> Self {
        let parts: Vec<String> = causes.iter().map(|(_, f, m)| format!("{f}: {m}")).collect();
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let mut d = Map::new();
        if !name.is_empty() {
            d.insert("name".into(), json!(name));
        }
        if !def.group.is_empty() {
            d.insert("group".into(), json!(def.group));
        }
        d.insert("kind".into(), json!(def.kind));
        d.insert(
            "causes".into(),
            Value::Array(
                causes
                    .iter()
                    .map(|(r, f, m)| json!({"reason": r, "message": m, "field": f}))
                    .collect(),
            ),
        );
        Self::new(
            422,
            Some("Invalid"),
            format!("{} \"{name}\" is invalid: {joined}", def.qualified_kind()),
            Some(Value::Object(d)),
        )
    }

    /// 422 about a query parameter (`PatchOptions`/`ListOptions` validation).
    pub(crate) fn invalid_options(kind: &str, causes: &[(&str, &str, &str)]) -> Self {
        let parts: Vec<String> = causes.iter().map(|(_, f, m)| format!("{f}: {m}")).collect();
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        Self::new(
            422,
            Some("Invalid"),
            format!("{kind}.meta.k8s.io \"\" is invalid: {joined}"),
            Some(json!({
                "group": "meta.k8s.io",
                "kind": kind,
                "causes": causes.iter().map(|(r, f, m)| json!({"reason": r, "message": m, "field": f})).collect::<Vec<_>>(),
            })),
        )
    }
}
