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

// Ids (client ids, e-mail addresses, Kubernetes names) are never broken: `.id` keeps one on a
// single line and scrolls it sideways inside its own box when it is wider than the screen (a
// 360 px phone leaves about 290 px). Prose (the display name) wraps at spaces, and breaks a word
// only when it alone is wider than the line.
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
p{overflow-wrap:break-word}\
.lead{font-size:1.1rem}\
.id{display:inline-block;max-width:100%;overflow-x:auto;white-space:nowrap;vertical-align:bottom;\
font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;\
background:#eef0f3;border-radius:4px;padding:.05em .3em}\
.close{margin-top:1.5rem;font-weight:600}\
.tech{margin-top:1.75rem;padding-top:.75rem;border-top:1px solid #e2e5ea;color:#4a5568;font-size:.875rem}\
.tech h2{font-size:.875rem;margin:0 0 .5rem}\
dl{margin:0;display:grid;grid-template-columns:max-content minmax(0,1fr);gap:.3rem 1rem}\
dt{font-weight:600}dd{margin:0;min-width:0}\
@media (max-width:30rem){main{margin:0;padding:1rem}dl{grid-template-columns:minmax(0,1fr)}\
dd{margin-bottom:.4rem}}";

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

/// An identifier, escaped, kept whole (see [`STYLE`]).
fn id(value: &str) -> String {
    format!("<span class=\"id\">{}</span>", escape_html(value))
}

/// The small block for the platform team: the Kubernetes side of what the page is about. The
/// rest of a page speaks GoTo; Kubernetes words appear only here.
fn platform_details(rows: &[(&str, String)], note: &str) -> String {
    let rows: String = rows
        .iter()
        .map(|(term, value)| format!("<dt>{}</dt><dd>{value}</dd>\n", escape_html(term)))
        .collect();
    format!(
        "<section class=\"tech\">\n<h2>For the platform team</h2>\n<dl>\n{rows}</dl>\n{note}</section>\n"
    )
}

/// What the success page reports. Values are shown as given (escaped).
pub struct SuccessPage<'a> {
    /// The application as the GoTo admin knows it: `spec.displayName`, else the resource name.
    pub application: &'a str,
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

/// Leads with what the admin did (which GoTo account now reaches which application), says
/// each fact once, and keeps the Kubernetes details in one small block for the platform team.
fn success_page_at(p: &SuccessPage, now: jiff::Timestamp) -> String {
    let app = format!("<strong>{}</strong>", escape_html(p.application));
    let connected = match p.account.map(str::trim).filter(|a| !a.is_empty()) {
        Some(account) => format!(
            "The GoTo account {} is now connected to {app}.",
            id(account)
        ),
        None => format!("Your GoTo account is now connected to {app}."),
    };
    let expiry = match p.access_token_expires_at {
        Some(raw) => expiry_text(raw, now),
        None => "not reported by GoTo".to_string(),
    };
    let details = platform_details(
        &[
            ("GoTo OAuth client", id(p.client_id)),
            (
                "Kubernetes resource",
                id(&format!("{}/{}", p.namespace, p.name)),
            ),
            ("Token Secret", id(p.secret_name)),
            ("Access token expires", expiry),
        ],
        "",
    );
    let body = format!(
        "<p class=\"lead\">{connected}</p>\n\
         <p>{app} can use GoTo with the access you allowed, and renews that access by itself. \
         Nothing else is needed from you.</p>\n\
         <p class=\"close\">You can close this tab now.</p>\n{details}",
    );
    document("Authorization complete", "ok", "&#10003;", &body)
}

/// "in about 60 minutes (Monday, 23 November 2026, 11:00 UTC)"; an unparseable value is shown
/// verbatim.
fn expiry_text(raw: &str, now: jiff::Timestamp) -> String {
    let Ok(at) = raw.parse::<jiff::Timestamp>() else {
        return id(raw);
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
    format!("{} ({})", escape_html(&relative), escape_html(&human))
}

/// What an error page says. `what_happened` and `what_to_do` are plain sentences for a GoTo
/// admin, without Kubernetes words.
pub struct ErrorPage<'a> {
    pub title: &'a str,
    pub what_happened: &'a str,
    pub what_to_do: &'a str,
    /// The application as the GoTo admin knows it (`spec.displayName`), when it was read.
    pub application: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// A short code a cluster admin can look up, e.g. a condition reason.
    pub reference: Option<&'a str>,
}

/// A page explaining a failed authorization and what to do next.
pub fn error_page(p: &ErrorPage) -> String {
    let mut rows = Vec::new();
    let resource = match (p.namespace, p.name) {
        (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
        (Some(ns), None) => Some(format!("namespace {ns}")),
        (None, Some(name)) => Some(name.to_string()),
        (None, None) => None,
    };
    if let Some(resource) = resource {
        rows.push(("Kubernetes resource", id(&resource)));
    }
    if let Some(reference) = p.reference {
        rows.push(("Reference", id(reference)));
    }
    let details = if rows.is_empty() {
        String::new()
    } else {
        platform_details(
            &rows,
            "<p>If you ask for help, give these details to the person who sent you the link.</p>\n",
        )
    };
    let application = p
        .application
        .map(|a| {
            format!(
                "<p class=\"lead\">Application: <strong>{}</strong></p>\n",
                escape_html(a)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "{application}<h2>What happened</h2>\n<p>{}</p>\n<h2>What to do</h2>\n<p>{}</p>\n{details}",
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
            application: "Payroll sync",
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

    /// The text before the platform team's block: what the GoTo admin reads.
    fn admin_part(html: &str) -> &str {
        html.split("<section class=\"tech\">").next().unwrap()
    }

    #[test]
    fn escapes_markup_quotes_and_ampersands() {
        assert_eq!(escape_html(EVIL), EVIL_ESCAPED);
        assert_eq!(escape_html("a & b"), "a &amp; b");
        assert_eq!(escape_html("plain"), "plain");
    }

    #[test]
    fn success_page_leads_with_who_connected_what_and_says_it_once() {
        let html = success_page_at(&success(), now());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(
            html.contains(
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            )
        );
        assert!(html.contains("<title>Authorization complete</title>"));
        assert!(html.contains(
            "<p class=\"lead\">The GoTo account <span class=\"id\">admin@example.com</span> \
             is now connected to <strong>Payroll sync</strong>.</p>"
        ));
        assert!(html.contains("You can close this tab now."));
        // Each fact once.
        for fact in [
            "admin@example.com",
            "a20abc4f-868a-4339-934f-4da2d788d0aa",
            "team-a/goto-prod",
            "goto-prod-tokens",
            "in about 60 minutes (Monday, 23 November 2026, 11:00 UTC)",
        ] {
            assert_eq!(html.matches(fact).count(), 1, "{fact}");
        }
        // The admin's part speaks GoTo; Kubernetes words only in the platform team's block.
        let admin = admin_part(&html);
        for word in [
            "Namespace",
            "namespace",
            "Secret",
            "Kubernetes",
            "Resource",
            "resource",
        ] {
            assert!(
                !admin.contains(word),
                "{word} in the admin's part:\n{admin}"
            );
        }
        let tech = html.split("<section class=\"tech\">").nth(1).unwrap();
        assert!(tech.contains("For the platform team"));
        assert!(tech.contains(
            "<dt>Kubernetes resource</dt><dd><span class=\"id\">team-a/goto-prod</span></dd>"
        ));
        assert!(
            tech.contains(
                "<dt>Token Secret</dt><dd><span class=\"id\">goto-prod-tokens</span></dd>"
            )
        );
    }

    #[test]
    fn success_page_without_optional_values() {
        let mut p = success();
        p.account = None;
        p.access_token_expires_at = None;
        let html = success_page_at(&p, now());
        assert!(
            html.contains("Your GoTo account is now connected to <strong>Payroll sync</strong>.")
        );
        assert!(html.contains("not reported by GoTo"));

        p.access_token_expires_at = Some("not-a-time<b>");
        let html = success_page_at(&p, now());
        assert!(html.contains("not-a-time&lt;b&gt;"));
        assert!(!html.contains("<b>"));
    }

    /// A display name is whatever the spec says: `<script>` is shown, never run.
    #[test]
    fn every_value_is_escaped_including_the_display_name() {
        let p = SuccessPage {
            application: EVIL,
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
        // Display name twice (lead, sentence), account, client id, namespace and name, Secret,
        // expiry.
        assert_eq!(html.matches(EVIL_ESCAPED).count(), 8, "{html}");

        let html = error_page(&ErrorPage {
            title: "t",
            what_happened: "w",
            what_to_do: "d",
            application: Some(EVIL),
            namespace: Some("n"),
            name: Some("m"),
            reference: None,
        });
        assert!(!html.contains("<script>"));
        assert!(html.contains(&format!("Application: <strong>{EVIL_ESCAPED}</strong>")));
    }

    /// Ids stay whole on a narrow phone: no CSS that breaks inside a word, ids on one line in a
    /// box that scrolls sideways, and the one-column layout below 30rem.
    #[test]
    fn ids_are_never_broken_mid_token() {
        assert!(!STYLE.contains("anywhere"));
        assert!(!STYLE.contains("break-all"));
        assert!(STYLE.contains(
            ".id{display:inline-block;max-width:100%;overflow-x:auto;white-space:nowrap"
        ));
        assert!(STYLE.contains("@media (max-width:30rem)"));
        let html = success_page_at(&success(), now());
        assert!(html.contains("<span class=\"id\">a20abc4f-868a-4339-934f-4da2d788d0aa</span>"));
        assert!(!html.contains("<code>"));
    }

    #[test]
    fn error_page_content_and_escaping() {
        let html = error_page(&ErrorPage {
            title: "Authorization <failed>",
            what_happened: EVIL,
            what_to_do: "Ask & retry",
            application: Some("Payroll sync"),
            namespace: Some("team-a"),
            name: Some("goto-prod"),
            reference: Some("AuthorizationFailed"),
        });
        assert!(html.contains("<title>Authorization &lt;failed&gt;</title>"));
        assert!(html.contains("Authorization &lt;failed&gt;</h1>"));
        assert!(html.contains(EVIL_ESCAPED));
        assert!(!html.contains("<script>"));
        assert!(html.contains("Ask &amp; retry"));
        assert!(html.contains("Application: <strong>Payroll sync</strong>"));
        assert!(html.contains("<span class=\"id\">team-a/goto-prod</span>"));
        assert!(html.contains("<span class=\"id\">AuthorizationFailed</span>"));
        assert!(html.contains("width=device-width, initial-scale=1"));
        let admin = admin_part(&html);
        assert!(
            !admin.contains("Kubernetes") && !admin.contains("namespace"),
            "{admin}"
        );

        let bare = error_page(&ErrorPage {
            title: "Not found",
            what_happened: "x",
            what_to_do: "y",
            application: None,
            namespace: None,
            name: None,
            reference: None,
        });
        assert!(!bare.contains("<dl>"));
        assert!(!bare.contains("Application:"));
    }

    #[test]
    fn pages_load_nothing_external() {
        let pages = [
            success_page(&success()),
            error_page(&ErrorPage {
                title: "t",
                what_happened: "w",
                what_to_do: "d",
                application: Some("a"),
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
