//! `iagent chat`: an interactive chat with an agent as one user, for trying an agent by hand.
//! Each line typed is a message; each reply is printed as `agent> text`, messages the agent
//! starts as `agent (pushed)> text`. An empty line is skipped; end of input (Ctrl-D) or `/quit`
//! ends the chat.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use iagent_protocol::{Message, RespCode};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::send::Speaker;

/// How long one reply may take before the chat says so and goes on.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    speaker: Speaker,
}

fn show(message: &Message, note: &str) -> String {
    match message.resp_code {
        RespCode::Ok => format!("{}{note}> {}", message.sender_id, message.content),
        code => format!(
            "{}{note}> [{}] {}",
            message.sender_id,
            code.code(),
            message.content
        ),
    }
}

pub(crate) async fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let (client, mut pushed) = args.speaker.connect(REPLY_TIMEOUT).await?;
    let printer = tokio::spawn(async move {
        while let Some(message) = pushed.recv().await {
            println!("{}", show(&message, " (pushed)"));
        }
    });
    eprintln!(
        "chatting as {}; end with Ctrl-D or /quit",
        args.speaker.user
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let text = line.trim();
        if text == "/quit" {
            break;
        }
        if text.is_empty() {
            continue;
        }
        match client.send(args.speaker.says(text.to_owned())).await {
            Ok(reply) => println!("{}", show(&reply, "")),
            Err(err) => eprintln!("iagent: no reply: {err}"),
        }
    }
    client.shutdown().await;
    printer.await.ok();
    Ok(ExitCode::SUCCESS)
}
