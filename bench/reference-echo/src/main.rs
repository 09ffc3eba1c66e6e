//! The reference of `docs/performance.md`: a minimal WebSocket echo server (fastwebsockets on a
//! single-threaded tokio runtime) that returns every text and binary frame unchanged. Nothing
//! that parses, validates, stores and routes a message can beat it, so the gateway's figures are
//! stated as ratios to this server's, measured in the same run by the same load generator.
//!
//! Usage: `reference-echo [ADDRESS]` (default `127.0.0.1:0`). It accepts an upgrade on any path
//! without a token, and prints `listening on ws://ADDRESS` once it accepts connections.

use std::io::Write;
use std::net::SocketAddr;

use fastwebsockets::{FragmentCollector, OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::net::TcpListener;

fn main() -> std::process::ExitCode {
    let address = match std::env::args().nth(1).map(|a| a.parse::<SocketAddr>()) {
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
        Some(Ok(address)) => address,
        Some(Err(err)) => {
            eprintln!("reference-echo: the address is invalid: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Single-threaded on purpose: the reference is what one core can do.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("reference-echo: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(address)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("reference-echo: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(address: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on ws://{}", listener.local_addr()?)?;
    // Scripts read the address from a pipe: it must not wait in a buffer.
    stdout.flush()?;
    loop {
        let (stream, _) = listener.accept().await?;
        // As the gateway does: a small frame must not wait for the previous one's ACK.
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service_fn(accept))
                .with_upgrades();
            // A peer that goes away mid-handshake is the peer's business.
            connection.await.ok();
        });
    }
}

/// Answers the upgrade request and echoes on the upgraded connection in a task of its own.
async fn accept(mut request: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        // A connection that ends, cleanly or not, ends only its own task.
        echo(upgraded).await.ok();
    });
    Ok(response)
}

async fn echo(upgraded: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut socket = FragmentCollector::new(upgraded.await?);
    loop {
        let frame = socket.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => socket.write_frame(frame).await?,
            _ => {}
        }
    }
}
