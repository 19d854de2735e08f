//! The binary's command line as a user meets it: bad input exits non-zero with a message, and
//! the client subcommands (`status`, `link`, `refresh`, `rotate-link`) work against a real flow:
//! the operator binary, the fake GoTo and the API server behind the fault proxy.

mod common;

use std::{path::Path, process::Command};

use common::Stack;
use goto_oauth_operator::resource::GoToOAuthClient;
use kube_fault_proxy::Fault;

fn operator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"))
        .args(args)
        .env_remove("GOTO_OAUTH_PUBLIC_URL")
        .output()
        .expect("run the operator binary")
}

/// The binary runs on jemalloc with the settings measured in BENCHMARKS.md ("the allocator"),
/// compiled in (jemalloc prints the options in force at exit when asked to).
#[test]
#[cfg(not(target_env = "msvc"))]
fn the_allocator_runs_with_the_measured_settings() {
    let out = Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    for setting in [
        "opt.narenas: 1\n",
        "opt.tcache: false\n",
        "opt.dirty_decay_ms: 1000 ",
        "opt.muzzy_decay_ms: 0 ",
    ] {
        assert!(
            stats.contains(setting),
            "{setting:?} not in force:\n{stats}"
        );
    }
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    for (args, needle) in [
        (vec!["run"], "--public-url"),
        (
            vec!["run", "--public-url", "http://example.com"],
            "only https",
        ),
        (
            vec![
                "run",
                "--public-url",
                "https://x.example",
                "--log-format",
                "xml",
            ],
            "xml",
        ),
        (
            vec![
                "run",
                "--public-url",
                "https://x.example",
                "--token-rate-limit",
                "0",
            ],
            "token-rate-limit",
        ),
        (
            vec![
                "run",
                "--public-url",
                "https://x.example",
                "--listen",
                "nowhere",
            ],
            "--listen",
        ),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        let out = operator(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// An allow-list entry the operator could not match exactly stops it at start-up, naming the
/// flag and what is wrong, by flag and by environment variable alike.
#[test]
fn bad_allowed_endpoint_hosts_exit_2_with_a_message() {
    for (entry, needle) in [
        ("*.logmeininc.com", "wildcards are not supported"),
        ("https://auth.eu.example.com", "no scheme"),
        ("auth.eu.example.com/oauth", "no scheme"),
        ("user@auth.eu.example.com", "user@"),
        ("auth.eu.example.com.", "trailing dot"),
        ("b\u{fc}cher.example", "xn--bcher-kva.example"),
        ("authentication.logmeininc.com,", "empty"),
        ("", "unset it"),
        ("auth.eu.example.com:99999", "not a host"),
    ] {
        let flag = format!("--allowed-endpoint-hosts={entry}");
        let by_flag = operator(&["run", "--public-url", "https://x.example", &flag]);
        let by_env = Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"))
            .args(["run", "--public-url", "https://x.example"])
            .env("GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS", entry)
            .output()
            .expect("run the operator binary");
        for out in [by_flag, by_env] {
            assert_eq!(out.status.code(), Some(2), "{entry:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("--allowed-endpoint-hosts") && stderr.contains(needle),
                "{entry:?}: {stderr}"
            );
        }
    }
}

#[test]
fn help_says_the_allow_list_replaces_the_default() {
    let out = operator(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--allowed-endpoint-hosts",
        "GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS",
        "authentication.logmeininc.com,api.getgo.com",
        "replaces the default list",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}

#[test]
fn unreachable_cluster_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(&kubeconfig, "not: [valid").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"))
        .args([
            "run",
            "--public-url",
            "https://x.example",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Kubernetes client"), "{stderr}");
}

#[test]
fn crd_command_prints_the_crd() {
    let out = operator(&["crd"]);
    assert!(out.status.success());
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("name: gotooauthclients.goto-oauth.dev"));
}

/// What a client subcommand run printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the exit code, and that the output (stdout and stderr) says each of `needles`.
    fn expect(&self, code: i32, needles: &[&str]) -> &Run {
        let output = format!("{}{}", self.stdout, self.stderr);
        assert_eq!(self.code, Some(code), "{output}");
        for needle in needles {
            assert!(output.contains(needle), "{needle} missing from\n{output}");
        }
        self
    }
}

/// Runs `program` (the binary, or a link to it under another name) asynchronously, so that the
/// fake GoTo and the proxy, which run in this test's runtime, keep serving meanwhile.
async fn run_as(program: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(program)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .await
        .expect("run the binary");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A client subcommand against the test's cluster and namespace.
async fn cli(stack: &Stack, args: &[&str]) -> Run {
    cli_as(
        Path::new(env!("CARGO_BIN_EXE_goto-oauth-operator")),
        stack,
        args,
    )
    .await
}

async fn cli_as(program: &Path, stack: &Stack, args: &[&str]) -> Run {
    let kubeconfig = stack.cluster.kubeconfig.to_string_lossy().into_owned();
    let mut all = args.to_vec();
    all.extend(["-n", &stack.cluster.namespace, "--kubeconfig", &kubeconfig]);
    run_as(program, &all).await
}

fn status_of(obj: &GoToOAuthClient) -> goto_oauth_operator::resource::GoToOAuthClientStatus {
    obj.status.clone().unwrap_or_default()
}

/// The whole life of a client through the CLI: awaiting consent, a rotated link, consent,
/// a refresh on request; and the not-found and forbidden exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_subcommands_follow_a_real_flow() {
    let stack = Stack::start(&[]).await;
    let first_link = stack.client("demo", serde_json::json!({})).await;

    let status = cli(&stack, &["status", "demo"]).await;
    status.expect(
        1,
        &[
            &first_link,
            "AwaitingAuthorization",
            "Send the link above to a GoTo admin",
        ],
    );
    let link = cli(&stack, &["link", "demo"]).await;
    assert_eq!(link.expect(0, &[]).stdout, format!("{first_link}\n"));
    cli(&stack, &["refresh", "demo", "--wait"])
        .await
        .expect(1, &["not authorized"]);

    let rotated = cli(
        &stack,
        &["rotate-link", "demo", "--wait", "--timeout", "30s"],
    )
    .await;
    let new_link = rotated.expect(0, &["http"]).stdout.trim().to_string();
    assert_ne!(new_link, first_link);
    assert_eq!(stack.cluster.authorization_link("demo").await, new_link);

    stack.provider.allow(&new_link).await;
    let authorized = stack
        .cluster
        .wait_condition("demo", "Ready", "True", "Authorized")
        .await;
    let principal = status_of(&authorized).principal.expect("a principal");
    let status = cli(&stack, &["status", "demo"]).await;
    status.expect(
        0,
        &[
            &principal,
            "Token expires:",
            "Next refresh:",
            "What to do:    Nothing.",
        ],
    );
    assert!(
        !status.stdout.contains("/authorize/"),
        "no link when none is needed"
    );

    let before = status_of(&authorized)
        .last_refresh_time
        .expect("lastRefreshTime");
    // lastRefreshTime has whole seconds: let the refresh land in a later one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let refresh = cli(&stack, &["refresh", "demo", "--wait", "--timeout", "30s"]).await;
    refresh.expect(0, &["refreshed"]);
    let after = stack.cluster.clients().get("demo").await.unwrap();
    let after = status_of(&after)
        .last_refresh_time
        .expect("lastRefreshTime");
    assert!(after.0 > before.0, "{after:?} after {before:?}");

    cli(&stack, &["status", "nope"])
        .await
        .expect(4, &["no GoToOAuthClient"]);
    stack.cluster.proxy().inject_fault(Fault {
        method: Some(http::Method::GET),
        path_contains: "/gotooauthclients/demo".into(),
        status: 403,
        times: 1,
    });
    cli(&stack, &["status", "demo"])
        .await
        .expect(5, &["refused access"]);

    for output in [&status.stdout, &refresh.stdout, &link.stdout] {
        stack.provider.assert_no_secret_material(output);
    }
}

/// Installed as `kubectl-goto_oauth`, the binary is the kubectl plugin: the same subcommands,
/// without `run`/`crd`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_is_a_kubectl_plugin_under_its_plugin_name() {
    let stack = Stack::start(&[]).await;
    let link = stack.client("demo", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-goto_oauth");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_goto-oauth-operator"), &plugin).unwrap();

    let out = cli_as(&plugin, &stack, &["link", "demo"]).await;
    assert_eq!(out.expect(0, &[]).stdout.trim(), link);
    cli_as(&plugin, &stack, &["status", "demo"])
        .await
        .expect(1, &[&link]);
    let help = run_as(&plugin, &["--help"]).await;
    assert!(
        !help
            .expect(0, &["kubectl goto-oauth", "rotate-link"])
            .stdout
            .contains("crd")
    );
    run_as(&plugin, &["run"]).await.expect(2, &["run"]);
}

/// No cluster: a kubeconfig naming a closed port, or none that can be read.
#[tokio::test]
async fn unreachable_cluster_has_its_own_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    let port = common::free_port();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let program = Path::new(env!("CARGO_BIN_EXE_goto-oauth-operator"));
    let config = kubeconfig.to_string_lossy().into_owned();
    run_as(program, &["status", "demo", "--kubeconfig", &config])
        .await
        .expect(3, &["cannot reach"]);
    run_as(
        program,
        &["link", "demo", "--kubeconfig", "/nonexistent/config"],
    )
    .await
    .expect(3, &["kubeconfig"]);
}
