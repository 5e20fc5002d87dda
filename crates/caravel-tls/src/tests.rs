use super::*;

fn names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

/// Serves "hello" over TLS on a loopback port.
async fn serve(cfg: Arc<rustls::ServerConfig>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l = TlsListener::new(tcp, cfg).unwrap();
    let addr = axum::serve::Listener::local_addr(&l).unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let h = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (addr, h)
}

fn client_trusting(ca: &Path) -> reqwest::Client {
    let roots = ca_roots(ca)
        .unwrap()
        .into_iter()
        .map(|c| reqwest::Certificate::from_der(&c).unwrap());
    reqwest::Client::builder()
        .tls_certs_only(roots)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn text(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> String {
    c.get(url).send().await.unwrap().text().await.unwrap()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[tokio::test]
async fn a_self_signed_pool_ca_is_trusted_by_its_clients_and_only_by_them() {
    let dir = tempfile::tempdir().unwrap();
    let issued = self_signed(&dir.path().join("tls"), &names()).unwrap();
    let (addr, h) = serve(server_config(&issued.cert, &issued.key).unwrap()).await;
    let c = client_trusting(&issued.ca);
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{}/", addr.port());
        let body = c.get(&url).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "hello", "{url}");
    }
    // A client with the system's roots only does not trust a private pool CA.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let e = plain
        .get(format!("https://127.0.0.1:{}/", addr.port()))
        .send()
        .await
        .unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");
    // Nor does one trusting another pool's CA.
    let other = self_signed(&dir.path().join("other"), &names()).unwrap();
    let e = client_trusting(&other.ca)
        .get(format!("https://127.0.0.1:{}/", addr.port()))
        .send()
        .await
        .unwrap_err();
    assert!(
        error_chain(&e).contains("UnknownIssuer"),
        "{}",
        error_chain(&e)
    );
    h.abort();
}

#[tokio::test]
async fn a_restart_keeps_the_ca_and_issues_a_leaf_for_the_new_names() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let first = self_signed(&tls, &["localhost".into()]).unwrap();
    let ca1 = std::fs::read(&first.ca).unwrap();
    let leaf1 = std::fs::read(&first.cert).unwrap();
    let second = self_signed(&tls, &names()).unwrap();
    assert_eq!(
        std::fs::read(&second.ca).unwrap(),
        ca1,
        "the CA must not change"
    );
    assert_ne!(std::fs::read(&second.cert).unwrap(), leaf1);
    use std::os::unix::fs::PermissionsExt;
    for k in [tls.join("ca-key.pem"), second.key.clone()] {
        let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", k.display());
    }
    // The reissued leaf chains to the CA clients already hold, and carries the new name.
    let (addr, h) = serve(server_config(&second.cert, &second.key).unwrap()).await;
    let c = client_trusting(&first.ca);
    let body = text(&c, format!("https://127.0.0.1:{}/", addr.port())).await;
    assert_eq!(body, "hello");
    h.abort();
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_told_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let issued = self_signed(dir.path(), &names()).unwrap();
    let (addr, h) = serve(server_config(&issued.cert, &issued.key).unwrap()).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = c
        .get(format!("http://127.0.0.1:{}/", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("https://"), "{body}");
    let v: serde_json_free::Value = body.parse().unwrap();
    assert_eq!(v.code, "invalid_argument");
    h.abort();
}

/// Just enough JSON for one assertion, without a serde_json dependency here.
mod serde_json_free {
    pub struct Value {
        pub code: String,
    }
    impl std::str::FromStr for Value {
        type Err = String;
        fn from_str(s: &str) -> Result<Value, String> {
            let at = s.find("\"code\":\"").ok_or("no code")? + 8;
            let end = s[at..].find('"').ok_or("unterminated")?;
            Ok(Value {
                code: s[at..at + end].to_string(),
            })
        }
    }
}

#[tokio::test]
async fn a_silent_connection_does_not_hold_up_other_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let issued = self_signed(dir.path(), &names()).unwrap();
    let (addr, h) = serve(server_config(&issued.cert, &issued.key).unwrap()).await;
    // Connected, sends nothing: a handshake done in the accept loop would block here.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let _half = {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        s
    };
    let c = client_trusting(&issued.ca);
    let body = text(&c, format!("https://127.0.0.1:{}/", addr.port())).await;
    assert_eq!(body, "hello");
    h.abort();
}

fn write_pair(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let sub = dir.join(tag);
    let issued = self_signed(&sub, &names()).unwrap();
    (issued.cert, issued.key)
}

#[test]
fn changed_certificate_files_are_served_and_a_bad_change_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (a_cert, a_key) = write_pair(dir.path(), "a");
    let (b_cert, b_key) = write_pair(dir.path(), "b");
    let live_cert = dir.path().join("live.pem");
    let live_key = dir.path().join("live-key.pem");
    std::fs::copy(&a_cert, &live_cert).unwrap();
    std::fs::copy(&a_key, &live_key).unwrap();
    let files = CertFiles::load(&live_cert, &live_key).unwrap();
    let a = files.current().cert[0].clone();
    assert_eq!(a.as_ref(), load_certs("c", &a_cert).unwrap()[0].as_ref());

    // Renewed: both files replaced.
    std::fs::copy(&b_cert, &live_cert).unwrap();
    std::fs::copy(&b_key, &live_key).unwrap();
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(100));
    let b = files.current().cert[0].clone();
    assert_eq!(b.as_ref(), load_certs("c", &b_cert).unwrap()[0].as_ref());

    // Only the certificate replaced: key and certificate do not match, B stays.
    std::fs::copy(&a_cert, &live_cert).unwrap();
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(100));
    assert_eq!(files.current().cert[0].as_ref(), b.as_ref());
    // Then the key follows: A is served.
    std::fs::copy(&a_key, &live_key).unwrap();
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(100));
    assert_eq!(files.current().cert[0].as_ref(), a.as_ref());
}

#[test]
fn bad_certificate_files_are_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_pair(dir.path(), "a");
    let (_, other_key) = write_pair(dir.path(), "b");
    let missing = dir.path().join("nope.pem");
    let e = server_config(&missing, &key).unwrap_err().to_string();
    assert!(
        e.contains("reading certificate") && e.contains("nope.pem"),
        "{e}"
    );

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = server_config(&empty, &key).unwrap_err().to_string();
    assert!(
        e.contains("empty.pem") && e.contains("holds no certificate"),
        "{e}"
    );
    let e = server_config(&cert, &empty).unwrap_err().to_string();
    assert!(
        e.contains("empty.pem") && e.contains("holds no private key"),
        "{e}"
    );

    let garbled = dir.path().join("garbled.pem");
    std::fs::write(
        &garbled,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = server_config(&garbled, &key).unwrap_err().to_string();
    assert!(
        e.contains("garbled.pem") && e.contains("does not parse"),
        "{e}"
    );

    let e = server_config(&cert, &other_key).unwrap_err().to_string();
    assert!(e.contains("does not go with the certificate"), "{e}");

    let e = self_signed(dir.path(), &[]).unwrap_err().to_string();
    assert!(e.contains("at least one name"), "{e}");
    let e = self_signed(&dir.path().join("c"), &["not a name!".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"not a name!\"") && e.contains("labels may hold"),
        "{e}"
    );
    for ok in [
        "a.example.com",
        "*.pool.example",
        "10.0.0.1",
        "::1",
        "node-7",
    ] {
        check_name(ok).unwrap();
    }
    for bad in ["", "a..b", "-a.b", "a_b", "*.", "x.*.y"] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn a_pinned_client_accepts_only_the_registered_certificate() {
    let (cfg, fp) = ephemeral(&["127.0.0.1".into()]).unwrap();
    let (_, other_fp) = ephemeral(&["127.0.0.1".into()]).unwrap();
    assert_ne!(fp, other_fp);
    let (addr, h) = serve(cfg).await;
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let pinned = |pin: &str| {
        reqwest::Client::builder()
            .tls_backend_preconfigured(pinned_client_config(pin).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let body = text(&pinned(&fp), &url).await;
    assert_eq!(body, "hello");
    // Upper-case hex pins the same certificate.
    assert!(pinned(&fp.to_uppercase()).get(&url).send().await.is_ok());
    let e = pinned(&other_fp).get(&url).send().await.unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.contains("not the one it registered"), "{chain}");
    h.abort();
}
