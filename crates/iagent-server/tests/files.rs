//! Media files: an app uploads a file and gets an id, downloads it back, and refers to it in
//! image, voice and video messages. Files belong to their app: another app's id, an id that
//! never existed, or one made of path tricks is illegal in a message (40) and not found (404)
//! on download. Uploads are authenticated first and limited in size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestGateway, assert_response, private};
use iagent_server::Config;
use serde_json::{Value, json};

async fn upload(
    gateway: &TestGateway,
    token: &str,
    content_type: &str,
    bytes: &[u8],
) -> (u16, Value) {
    let path = format!("/api/v1/files?app_token={token}");
    let (status, _, body) = gateway
        .http("POST", &path, &[("Content-Type", content_type)], bytes)
        .await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `id` as one path segment: every byte but letters, digits, `-`, `.` and `_` percent-encoded.
fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn image(msg_id: &str, ids: &[&str]) -> Value {
    let mut message = private(msg_id, "alice", "x");
    message["content_type"] = json!(2);
    message["content"] = json!(json!({ "file_ids": ids }).to_string());
    message
}

#[tokio::test]
async fn an_uploaded_file_is_downloaded_back_and_usable_in_messages() {
    let gateway = TestGateway::start().await;
    let bytes: Vec<u8> = (0..=255).cycle().take(100_000).collect();
    let (status, answer) = upload(&gateway, &gateway.token, "image/png", &bytes).await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["file_id"].as_str().unwrap().to_owned();
    assert_eq!(answer["size"], 100_000);
    assert_eq!(answer["content_type"], "image/png");

    let auth = format!("Bearer {}", gateway.token);
    let (status, head, body) = gateway
        .http(
            "GET",
            &format!("/api/v1/files/{id}"),
            &[("Authorization", &auth)],
            b"",
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, bytes, "the same bytes back");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: image/png"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");

    let mut client = gateway.connect().await;
    let response = client.ask(&image("img", &[&id])).await;
    assert_response(&response, "img", 0);
    assert_eq!(response["content_type"], 2);
    assert_eq!(
        serde_json::from_str::<Value>(response["content"].as_str().unwrap()).unwrap()["file_ids"]
            [0],
        id
    );
    gateway.stop().await;
}

#[tokio::test]
async fn files_of_other_apps_made_up_ids_and_path_tricks_are_unknown() {
    let gateway = TestGateway::start().await;
    let other = gateway.create_app("app2").await;
    let (_, answer) = upload(&gateway, &other, "audio/ogg", b"not yours").await;
    let foreign = answer["file_id"].as_str().unwrap().to_owned();
    let (_, answer) = upload(&gateway, &gateway.token, "audio/ogg", b"yours").await;
    let own = answer["file_id"].as_str().unwrap().to_owned();

    let mut client = gateway.connect().await;
    let tricks = [
        foreign.as_str(),
        "f00000000000000000000000000000000",
        "../../etc/passwd",
        "../iagent.sqlite3",
        "files/../../iagent.sqlite3",
        "%2e%2e%2fetc",
        "/etc/passwd",
        "f\u{0}",
    ];
    for (i, id) in tricks.iter().enumerate() {
        let msg_id = format!("t{i}");
        // The first unknown id is named even after a valid one.
        let response = client.ask(&image(&msg_id, &[&own, id])).await;
        assert_response(&response, &msg_id, 40);
        assert_eq!(
            response["content"],
            format!("file_id \"{id}\" is not a file of this app"),
            "{response}"
        );
        let path = format!(
            "/api/v1/files/{}?app_token={}",
            percent_encode(id),
            gateway.token
        );
        let (status, _, _) = gateway.http("GET", &path, &[], b"").await;
        assert_eq!(status, 404, "{id}");
    }
    for path in [
        "/api/v1/files/../../etc/passwd",
        "/api/v1/files/..%2F..%2Fiagent.sqlite3",
    ] {
        let path = format!("{path}?app_token={}", gateway.token);
        let (status, _, body) = gateway.http("GET", &path, &[], b"").await;
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
    }
    assert_response(&client.ask(&image("ok", &[&own])).await, "ok", 0);
    gateway.stop().await;
}

#[tokio::test]
async fn uploads_are_authenticated_first_and_limited_in_size() {
    let mut config = Config::default();
    config.limits.max_file_bytes = 1024;
    let gateway = TestGateway::with_config(config).await;
    let (status, answer) = upload(&gateway, &gateway.token, "image/png", &[7; 1025]).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"], "files are limited to 1024 bytes");
    assert_eq!(
        upload(&gateway, &gateway.token, "image/png", &[7; 1024])
            .await
            .0,
        200
    );
    assert_eq!(
        upload(&gateway, &gateway.token, "image/png", b"").await.0,
        400
    );
    assert_eq!(
        upload(&gateway, "iat_wrong", "image/png", b"x").await.0,
        401
    );
    let (status, _, _) = gateway.http("POST", "/api/v1/files", &[], b"x").await;
    assert_eq!(status, 401);
    let (status, _, _) = gateway
        .http(
            "GET",
            "/api/v1/files/f00000000000000000000000000000000",
            &[],
            b"",
        )
        .await;
    assert_eq!(status, 401);
    gateway.stop().await;
}
