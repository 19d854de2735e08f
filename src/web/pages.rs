//! The HTML pages the browser-facing endpoint shows a GoTo admin at the end of an authorization.
//!
//! The reader is often not a Kubernetes user and may be on a phone, so the pages say in plain
//! words what happened and what to do, and carry a reference a cluster admin can look up. They
//! are self-contained (inline CSS, no scripts, no external assets) so they render under the strict
//! [`security_headers`] and leak nothing to third parties. Every interpolated value is escaped.

use http::{HeaderName, HeaderValue, header};

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
}

/// Response headers for these pages: nothing may load, frame, submit or be cached.
pub fn security_headers() -> [(HeaderName, HeaderValue); 5] {
    [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; \
                 frame-ancestors 'none'; base-uri 'none'",
            ),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ]
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;padding:1rem;background:#f4f5f7;color:#1d2430;\
font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif}\
main{max-width:36rem;margin:2rem auto;background:#fff;border-radius:12px;padding:1.5rem;\
box-shadow:0 1px 4px rgba(0,0,0,.12)}\
h1{font-size:1.5rem;margin:0 0 1rem;display:flex;align-items:center;gap:.6rem}\
.mark{flex:none;display:inline-flex;align-items:center;justify-content:center;width:2rem;height:2rem;\
border-radius:50%;color:#fff;font-size:1.1rem}\
.ok .mark{background:#1a7f37}.err .mark{background:#c62828}\
h2{font-size:1rem;margin:1.25rem 0 .25rem}\
dl{margin:1rem 0;display:grid;grid-template-columns:max-content 1fr;gap:.4rem 1rem}\
dt{font-weight:600;color:#4a5568}dd{margin:0;overflow-wrap:anywhere}\
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em;\
background:#eef0f3;border-radius:4px;padding:.05em .3em;overflow-wrap:break-word}\
.small{color:#5b6575;font-size:.9rem}\
.close{margin-top:1.5rem;font-weight:600}\
@media (max-width:30rem){main{margin:0;padding:1rem}dl{grid-template-columns:1fr}dd{margin-bottom:.5rem}}";

fn document(title: &str, class: &str, mark: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n<title>{title}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<main class=\"{class}\">\n\
         <h1><span class=\"mark\" aria-hidden=\"true\">{mark}</span>{title}</h1>\n{body}</main>\n\
         </body>\n</html>\n",
        title = escape_html(title),
    )
}

/// What the success page reports. Values are shown as given (escaped).
pub struct SuccessPage<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub client_id: &'a str,
    /// The GoTo account: `principal`, else `email`.
    pub account: Option<&'a str>,
    /// RFC 3339.
    pub access_token_expires_at: Option<&'a str>,
    pub secret_name: &'a str,
}

/// The page shown after tokens were obtained and stored.
pub fn success_page(p: &SuccessPage) -> String {
    success_page_at(p, jiff::Timestamp::now())
}

fn success_page_at(p: &SuccessPage, now: jiff::Timestamp) -> String {
    let ns = escape_html(p.namespace);
    let name = escape_html(p.name);
    let secret = escape_html(p.secret_name);
    let account = match p.account.map(str::trim).filter(|a| !a.is_empty()) {
        Some(a) => format!("<code>{}</code>", escape_html(a)),
        None => "not reported by GoTo".to_string(),
    };
    let expiry = match p.access_token_expires_at {
        Some(raw) => expiry_text(raw, now),
        None => "not reported by GoTo".to_string(),
    };
    let body = format!(
        "<p>GoTo granted access to the OAuth client <code>{client}</code>, and the operator \
         stored the tokens for <code>{name}</code> in namespace <code>{ns}</code>.</p>\n\
         <dl>\n\
         <dt>OAuth client</dt><dd><code>{client}</code></dd>\n\
         <dt>Namespace</dt><dd><code>{ns}</code></dd>\n\
         <dt>Resource</dt><dd><code>{name}</code></dd>\n\
         <dt>GoTo account</dt><dd>{account}</dd>\n\
         <dt>Access token expires</dt><dd>{expiry}</dd>\n\
         <dt>Stored in</dt><dd>Secret <code>{secret}</code> in namespace <code>{ns}</code></dd>\n\
         </dl>\n\
         <p>The tokens are stored in Secret <code>{secret}</code>. The operator renews the access \
         token automatically before it expires; nothing else is needed from you.</p>\n\
         <p class=\"close\">You can close this tab now.</p>\n",
        client = escape_html(p.client_id),
    );
    document("Authorization complete", "ok", "&#10003;", &body)
}

/// "in about 60 minutes (Monday, 23 November 2026, 11:00 UTC)" plus the exact instant; an
/// unparseable value is shown verbatim.
fn expiry_text(raw: &str, now: jiff::Timestamp) -> String {
    let Ok(at) = raw.parse::<jiff::Timestamp>() else {
        return format!("<code>{}</code>", escape_html(raw));
    };
    let seconds = at.as_second() - now.as_second();
    let relative = if seconds <= 0 {
        "already expired".to_string()
    } else if seconds < 90 {
        "in about a minute".to_string()
    } else if seconds < 90 * 60 {
        format!("in about {} minutes", (seconds + 30) / 60)
    } else if seconds < 36 * 3600 {
        format!("in about {} hours", (seconds + 1800) / 3600)
    } else {
        format!("in about {} days", (seconds + 43_200) / 86_400)
    };
    let human = at.strftime("%A, %-d %B %Y, %H:%M UTC").to_string();
    let exact = at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    format!(
        "{} ({})<br><span class=\"small\">exactly <code>{}</code></span>",
        escape_html(&relative),
        escape_html(&human),
        escape_html(&exact)
    )
}

/// What an error page says. `what_happened` and `what_to_do` are plain sentences.
pub struct ErrorPage<'a> {
    pub title: &'a str,
    pub what_happened: &'a str,
    pub what_to_do: &'a str,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// A short code a cluster admin can look up, e.g. a condition reason.
    pub reference: Option<&'a str>,
}

/// A page explaining a failed authorization and what to do next.
pub fn error_page(p: &ErrorPage) -> String {
    let mut details = String::new();
    let resource = match (p.namespace, p.name) {
        (Some(ns), Some(name)) => Some(format!(
            "<code>{}</code> in namespace <code>{}</code>",
            escape_html(name),
            escape_html(ns)
        )),
        (Some(ns), None) => Some(format!("namespace <code>{}</code>", escape_html(ns))),
        (None, Some(name)) => Some(format!("<code>{}</code>", escape_html(name))),
        (None, None) => None,
    };
    if let Some(resource) = resource {
        details.push_str(&format!("<dt>Resource</dt><dd>{resource}</dd>\n"));
    }
    if let Some(reference) = p.reference {
        details.push_str(&format!(
            "<dt>Reference</dt><dd><code>{}</code></dd>\n",
            escape_html(reference)
        ));
    }
    let details = if details.is_empty() {
        String::new()
    } else {
        format!(
            "<dl>\n{details}</dl>\n<p class=\"small\">If you ask your Kubernetes administrator \
             for help, give them the details above.</p>\n"
        )
    };
    let body = format!(
        "<h2>What happened</h2>\n<p>{}</p>\n<h2>What to do</h2>\n<p>{}</p>\n{details}",
        escape_html(p.what_happened),
        escape_html(p.what_to_do),
    );
    document(p.title, "err", "!", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "<script>alert(\"x\")</script>&'";
    const EVIL_ESCAPED: &str = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;";

    fn success() -> SuccessPage<'static> {
        SuccessPage {
            namespace: "team-a",
            name: "goto-prod",
            client_id: "a20abc4f-868a-4339-934f-4da2d788d0aa",
            account: Some("admin@example.com"),
            access_token_expires_at: Some("2026-11-23T11:00:00Z"),
            secret_name: "goto-prod-tokens",
        }
    }

    fn now() -> jiff::Timestamp {
        "2026-11-23T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn escapes_markup_quotes_and_ampersands() {
        assert_eq!(escape_html(EVIL), EVIL_ESCAPED);
        assert_eq!(escape_html("a & b"), "a &amp; b");
        assert_eq!(escape_html("plain"), "plain");
    }

    #[test]
    fn success_page_says_what_who_when_where() {
        let html = success_page_at(&success(), now());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(
            html.contains(
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            )
        );
        assert!(html.contains("<title>Authorization complete</title>"));
        assert!(html.contains("Authorization complete</h1>"));
        assert!(html.contains("a20abc4f-868a-4339-934f-4da2d788d0aa"));
        assert!(html.contains("<code>team-a</code>"));
        assert!(html.contains("<code>goto-prod</code>"));
        assert!(html.contains("admin@example.com"));
        assert!(html.contains("in about 60 minutes"));
        assert!(html.contains("Monday, 23 November 2026, 11:00 UTC"));
        assert!(html.contains("2026-11-23T11:00:00Z"));
        assert!(html.contains("stored in Secret <code>goto-prod-tokens</code>"));
        assert!(html.contains("You can close this tab now."));
    }

    #[test]
    fn success_page_without_optional_values() {
        let mut p = success();
        p.account = None;
        p.access_token_expires_at = None;
        let html = success_page_at(&p, now());
        assert_eq!(html.matches("not reported by GoTo").count(), 2);

        p.access_token_expires_at = Some("not-a-time<b>");
        let html = success_page_at(&p, now());
        assert!(html.contains("not-a-time&lt;b&gt;"));
        assert!(!html.contains("<b>"));
    }

    #[test]
    fn every_success_value_is_escaped() {
        let p = SuccessPage {
            namespace: EVIL,
            name: EVIL,
            client_id: EVIL,
            account: Some(EVIL),
            access_token_expires_at: Some(EVIL),
            secret_name: EVIL,
        };
        let html = success_page_at(&p, now());
        assert!(!html.contains("<script>"));
        assert!(!html.contains("alert(\""));
        assert_eq!(html.matches(EVIL_ESCAPED).count(), 11);
    }

    #[test]
    fn error_page_content_and_escaping() {
        let html = error_page(&ErrorPage {
            title: "Authorization <failed>",
            what_happened: EVIL,
            what_to_do: "Ask & retry",
            namespace: Some("team-a"),
            name: Some("goto-prod"),
            reference: Some("AuthorizationFailed"),
        });
        assert!(html.contains("<title>Authorization &lt;failed&gt;</title>"));
        assert!(html.contains("Authorization &lt;failed&gt;</h1>"));
        assert!(html.contains(EVIL_ESCAPED));
        assert!(!html.contains("<script>"));
        assert!(html.contains("Ask &amp; retry"));
        assert!(html.contains("<code>goto-prod</code> in namespace <code>team-a</code>"));
        assert!(html.contains("<code>AuthorizationFailed</code>"));
        assert!(html.contains("width=device-width, initial-scale=1"));

        let bare = error_page(&ErrorPage {
            title: "Not found",
            what_happened: "x",
            what_to_do: "y",
            namespace: None,
            name: None,
            reference: None,
        });
        assert!(!bare.contains("<dl>"));
    }

    #[test]
    fn pages_load_nothing_external() {
        let pages = [
            success_page(&success()),
            error_page(&ErrorPage {
                title: "t",
                what_happened: "w",
                what_to_do: "d",
                namespace: Some("n"),
                name: Some("m"),
                reference: Some("r"),
            }),
        ];
        for html in pages {
            let lower = html.to_ascii_lowercase();
            assert!(!lower.contains("http"), "{html}");
            for forbidden in ["src=", "href=", "<script", "<link", "@import", "url("] {
                assert!(!lower.contains(forbidden), "{forbidden}");
            }
        }
    }

    #[test]
    fn security_headers_are_strict() {
        let headers = security_headers();
        let get = |name: HeaderName| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_str().unwrap().to_string())
                .unwrap()
        };
        assert_eq!(
            get(header::CONTENT_SECURITY_POLICY),
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; \
             frame-ancestors 'none'; base-uri 'none'"
        );
        assert_eq!(get(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        assert_eq!(get(header::REFERRER_POLICY), "no-referrer");
        assert_eq!(get(header::X_FRAME_OPTIONS), "DENY");
        assert_eq!(get(header::CACHE_CONTROL), "no-store");
    }
}
