//! Label and field selectors, parsed the way the API server parses them (the subset clients use).

use serde_json::Value;

/// One label requirement.
#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

/// Split on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if let Some(c) = v.chars().next()
        && (c == '=' || c == '!')
    {
        return Err(format!(
            "unable to parse requirement: found '{c}', expected: identifier"
        ));
    }
    if !v.chars().all(is_label_char) {
        return Err(format!(
            "unable to parse requirement: values[0]: Invalid value: \"{v}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ));
    }
    Ok(v.to_owned())
}

fn parse_key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if k.is_empty() || !k.chars().all(is_label_char) {
        return Err(format!(
            "unable to parse requirement: invalid label key \"{k}\""
        ));
    }
    Ok(k.to_owned())
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| "unable to parse requirement: found '', expected: '('".to_owned())?;
    inner.split(',').map(parse_value).collect()
}

impl LabelSelector {
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if raw.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in split_top_level(raw) {
            let part = part.trim();
            if part.is_empty() {
                return Err(
                    "unable to parse requirement: found '', expected: identifier".to_owned(),
                );
            }
            if let Some(k) = part.strip_prefix('!') {
                reqs.push(LabelReq::NotExists(parse_key(k)?));
            } else if let Some((k, v)) = part.split_once("!=") {
                reqs.push(LabelReq::NotEq(parse_key(k)?, parse_value(v)?));
            } else if let Some((k, v)) = part.split_once("==") {
                reqs.push(LabelReq::Eq(parse_key(k)?, parse_value(v)?));
            } else if let Some((k, v)) = part.split_once('=') {
                reqs.push(LabelReq::Eq(parse_key(k)?, parse_value(v)?));
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                reqs.push(LabelReq::NotIn(parse_key(k)?, parse_set(rest)?));
            } else if let Some((k, rest)) = part.split_once(" in ") {
                reqs.push(LabelReq::In(parse_key(k)?, parse_set(rest)?));
            } else {
                reqs.push(LabelReq::Exists(parse_key(part)?));
            }
        }
        Ok(Self(reqs))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let labels = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector` over the JSON pointers a resource supports.
#[derive(Clone, Debug, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// `supported` maps each selectable field label to the JSON pointer (in stored form) it reads.
    pub(crate) fn parse(
        raw: &str,
        supported: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if raw.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in raw.split(',') {
            let part = part.trim();
            let (key, neg, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, false, v)
            } else {
                return Err(format!(
                    "invalid selector: '{raw}'; can't understand '{part}'"
                ));
            };
            let pointer = supported(key.trim())
                .ok_or_else(|| format!("field label not supported: {}", key.trim()))?;
            reqs.push((pointer, neg, value.trim().to_owned()));
        }
        Ok(Self(reqs))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(pointer, neg, want)| {
            let got = match obj.pointer(pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (got == *want) != *neg
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_operators() {
        let obj = json!({"metadata": {"labels": {"a": "1", "b": "x"}}});
        for (sel, want) in [
            ("a=1", true),
            ("a==1", true),
            ("a!=1", false),
            ("a in (1,2)", true),
            ("a notin (1,2)", false),
            ("c notin (1)", true),
            ("b", true),
            ("!b", false),
            ("!c", true),
            ("a=1,b=x", true),
            ("a=1,b=y", false),
            ("", true),
        ] {
            let parsed = LabelSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(parsed.matches(&obj), want, "{sel}");
        }
        let err = LabelSelector::parse("a===b!").unwrap_err();
        assert_eq!(
            err,
            "unable to parse requirement: found '=', expected: identifier"
        );
    }
}
