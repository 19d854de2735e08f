//! The operator's Kubernetes API client: kube's default stack (TLS, authentication, base URI,
//! extra headers, connect/read/write timeouts, kube's retry of 429 and 5xx answers), rebuilt
//! here only to bound hyper's per-connection read buffer.
//!
//! hyper grows a connection's read buffer while reads fill it, up to about 400 KB, and keeps it
//! for the life of the connection. A LIST page of 500 clients fills it, and the connection then
//! carries a watch for hours: a heap profile of 1,000 clients found 1.8 MB in four such buffers,
//! more than any per-client store but the cached objects. kube's builder does not expose the
//! limit. Capped at [`READ_BUFFER_MAX`], a large answer is read in more, smaller reads.
//!
//! A kubeconfig with a proxy (`proxy-url`) gets kube's own client unchanged: its proxy
//! connectors are kube's to get right.

use hyper_timeout::TimeoutConnector;
use hyper_util::{
    client::legacy::{Builder, connect::HttpConnector},
    rt::TokioExecutor,
};
use kube::{
    Client, Config,
    client::{ConfigExt, retry::RetryPolicy},
};
use tower::{BoxError, ServiceBuilder, retry::RetryLayer};

/// The largest read buffer of one API server connection (hyper's floor is 8 KiB). A LIST page
/// of 500 clients then takes about 50 reads instead of two, which costs nothing measurable
/// next to parsing it.
pub const READ_BUFFER_MAX: usize = 16 * 1024;

/// A client for `config`, as `kube::Client::try_from` builds it but with the read buffer
/// capped.
pub fn build(config: Config) -> Result<Client, kube::Error> {
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    // The cluster URL may be https: the TLS connector wraps this one.
    http.enforce_http(false);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client = Builder::new(TokioExecutor::new())
        .http1_max_buf_size(READ_BUFFER_MAX)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(http_client);
    Ok(Client::new(service, config.default_namespace))
}

/// The same as [`build`] for the configuration kube infers (KUBECONFIG, or in-cluster).
pub async fn infer() -> Result<Client, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    build(config)
}
