//! `iagent send`: one text message to a running gateway, and its one response printed.
//!
//! It uses a direct connection (`pool=false`), so that it never receives, and so never takes
//! away from the app's backend, responses that belong to the pool.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use iagent_client::{Client, Config, ConnectError};
use iagent_protocol::{ChatType, ContentType, Message, RespCode, SenderType};

/// Where to connect and who speaks: shared by `send` and `chat`.
#[derive(Args)]
pub(crate) struct Speaker {
    /// The gateway's address.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub(crate) url: String,
    /// The app token (or set IAGENT_TOKEN).
    #[arg(long, env = "IAGENT_TOKEN", hide_env_values = true)]
    pub(crate) token: String,
    /// The end user the messages are from.
    #[arg(long, default_value = "cli-user")]
    pub(crate) user: String,
    /// The agent to address; without it the app's default agent answers.
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// Send group messages in this group.
    #[arg(long)]
    pub(crate) group: Option<String>,
}

impl Speaker {
    /// A direct client of one connection.
    pub(crate) async fn connect(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<(Client, iagent_client::Pushed)> {
        let mut config = Config::new(&self.url, &self.token);
        config.connections = 1;
        config.direct = true;
        config.request_timeout = timeout;
        Client::connect(config).await.map_err(|err| match err {
            ConnectError::Unauthorized => anyhow::anyhow!("the gateway refused the token (401)"),
            other => anyhow::anyhow!("cannot connect to {}: {other}", self.url),
        })
    }

    /// A text message from the user, with a fresh id.
    pub(crate) fn says(&self, text: String) -> Message {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Message {
            chat_type: if self.group.is_some() {
                ChatType::Group
            } else {
                ChatType::Private
            },
            msg_id: format!("cli-{}", now.as_nanos()),
            ref_msg_id: None,
            timestamp: i64::try_from(now.as_millis()).unwrap_or(i64::MAX),
            group_id: self.group.clone(),
            sender_type: SenderType::User,
            sender_id: self.user.clone(),
            receiver_id: self.agent.clone(),
            resp_code: RespCode::Ok,
            content_type: ContentType::Text,
            content: text,
        }
    }
}

#[derive(Args)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    speaker: Speaker,
    /// How long to wait for the response, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Print the whole response as JSON instead of its content.
    #[arg(long)]
    json: bool,
    /// The text to send.
    text: String,
}

pub(crate) async fn run(args: SendArgs) -> anyhow::Result<ExitCode> {
    let (client, _pushed) = args
        .speaker
        .connect(Duration::from_secs(args.timeout))
        .await?;
    let outcome = client.send(args.speaker.says(args.text)).await;
    client.shutdown().await;
    let response = outcome.context("no response")?;
    if args.json {
        println!("{}", response.to_json());
    } else if response.resp_code == RespCode::Ok {
        println!("{}", response.content);
    } else {
        println!("[{}] {}", response.resp_code.code(), response.content);
    }
    Ok(match response.resp_code {
        RespCode::Ok | RespCode::NoReply => ExitCode::SUCCESS,
        RespCode::Illegal | RespCode::Failed => ExitCode::FAILURE,
    })
}
