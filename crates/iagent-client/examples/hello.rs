//! Connects to the gateway at `IAGENT_URL` (`ws://host:port`) with the app token in
//! `IAGENT_TOKEN`, sends one message and prints its response.
//!
//! ```text
//! IAGENT_URL=ws://127.0.0.1:8080 IAGENT_TOKEN=... cargo run -p iagent-client --example hello
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use iagent_client::{Client, Config, Message};
use iagent_protocol::{ChatType, ContentType, RespCode, SenderType};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("IAGENT_URL").map_err(|_| "set IAGENT_URL, e.g. ws://127.0.0.1:8080")?;
    let token = std::env::var("IAGENT_TOKEN").map_err(|_| "set IAGENT_TOKEN to an app token")?;
    let mut config = Config::new(url, token);
    config.connections = 1;
    let (client, _pushed) = Client::connect(config).await?;

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let message = Message {
        chat_type: ChatType::Private,
        msg_id: format!("hello-{}", now.as_nanos()),
        ref_msg_id: None,
        timestamp: i64::try_from(now.as_millis())?,
        group_id: None,
        sender_type: SenderType::User,
        sender_id: "hello-example".into(),
        receiver_id: None,
        resp_code: RespCode::Ok,
        content_type: ContentType::Text,
        content: "hello".into(),
    };
    let response = client.send(message).await?;
    println!(
        "{} answered with resp_code {}: {}",
        response.sender_id,
        response.resp_code.code(),
        response.content
    );
    client.shutdown().await;
    Ok(())
}
