//! `caravel bench backend`: the replica behind the gateway benchmarks and tests, on the
//! port in `PORT`. Hidden from `--help`; not for production.
//!
//! Plain (HTTP/1.1, and HTTP/2 with prior knowledge on the same port): `ok` to anything,
//! `POST /count` streams the request body and answers its length, `GET /version` answers
//! the HTTP version it was called with, `GET /echo-path/…` its path as received, and
//! `GET /upgrade` with `Upgrade: echo` switches
//! protocols and echoes bytes until the peer closes.
//!
//! `--grpc`: tonic's `grpc.health.v1.Health` (the reference implementation, SERVING) and
//! `caravel.bench.Echo` with raw-byte messages: `Unary` answers its request, `Chat`
//! (bidirectional) answers each message as it comes and ends with ABORTED on `fail`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio_stream::{Stream, StreamExt};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::Status;

use crate::raw_codec::Raw;

fn port() -> Result<u16> {
    std::env::var("PORT")
        .context("PORT is not set")?
        .parse()
        .context("PORT is not a port")
}

pub async fn run(grpc: bool) -> Result<i32> {
    let port = port()?;
    if grpc {
        let (_reporter, health) = tonic_health::server::health_reporter();
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(Echo)
            .serve(([0, 0, 0, 0], port).into())
            .await?;
        return Ok(0);
    }
    let app = axum::Router::new()
        .route("/count", axum::routing::post(count))
        .route("/version", axum::routing::get(version))
        .route("/upgrade", axum::routing::get(upgrade))
        .route("/echo-path/{*rest}", axum::routing::get(echo_path))
        .route("/headers", axum::routing::get(headers))
        .fallback(|| async { "ok" });
    let l = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    axum::serve(l, app).await?;
    Ok(0)
}

async fn count(req: Request) -> String {
    let mut body = req.into_body().into_data_stream();
    let mut n = 0usize;
    while let Some(Ok(chunk)) = body.next().await {
        n += chunk.len();
    }
    n.to_string()
}

async fn version(req: Request) -> String {
    format!("{:?}", req.version())
}

/// The request's headers, `name: value` a line, as the replica received them.
async fn headers(req: Request) -> String {
    req.headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
        .collect()
}

async fn echo_path(req: Request) -> String {
    req.uri().path().to_string()
}

async fn upgrade(mut req: Request) -> Response {
    if req.headers().get(header::UPGRADE).map(|v| v.as_bytes()) != Some(b"echo") {
        return (StatusCode::BAD_REQUEST, "Upgrade: echo expected").into_response();
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let (mut r, mut w) = tokio::io::split(hyper_util::rt::TokioIo::new(up));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "echo")
        .body(Body::empty())
        .expect("a valid response")
}

#[derive(Debug, Clone, Copy)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "caravel.bench.Echo";
}

type Replies = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

struct Chat;

impl StreamingService<Bytes> for Chat {
    type Response = Bytes;
    type ResponseStream = Replies;
    type Future = std::future::Ready<Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        let replies = req.into_inner().map(|m| match m {
            Ok(m) if &m[..] == b"fail" => Err(Status::aborted("asked to fail")),
            other => other,
        });
        // End the stream at the first error, as a server handler returning it would.
        let mut failed = false;
        let replies = replies.take_while(move |r| {
            let go = !failed;
            failed |= r.is_err();
            go
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(replies))))
    }
}

struct Unary;

impl UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(req.into_inner())))
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/caravel.bench.Echo/Chat" => Grpc::new(Raw).streaming(Chat, req).await,
                "/caravel.bench.Echo/Unary" => Grpc::new(Raw).unary(Unary, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}
