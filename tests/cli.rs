//! The binary's command line as a user meets it: bad input exits non-zero with a message.

use std::process::Command;

fn operator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"))
        .args(args)
        .env_remove("GOTO_OAUTH_PUBLIC_URL")
        .output()
        .expect("run the operator binary")
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
