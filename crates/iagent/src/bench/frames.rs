//! The messages the load consists of, and how a received frame is matched to the message it
//! answers.
//!
//! Every message has a pool-wide index (`seq * connections + connection`, the order in which an
//! open loop's schedule sends them). The index picks the
//! simulated user and whether the message is a group message, so that users and chat types are
//! spread evenly over the connections and over time, whatever the rate or window.

use serde::Deserialize;

/// What the messages of one run look like.
#[derive(Debug)]
pub(super) struct Frames {
    /// A per-run prefix of every `msg_id`, so that a second run against the same gateway is not
    /// answered from the first's dedup records.
    run: String,
    text: String,
    users: usize,
    /// The number of the first user: users are `u{first_user}` onwards.
    first_user: usize,
    group_share: f64,
    connections: usize,
}

impl Frames {
    /// Messages of `size` bytes of text from `users` users over `connections` connections, a
    /// `group_share` of them (0 to 1) group messages addressed to the echo agent.
    pub(super) fn new(size: usize, users: usize, group_share: f64, connections: usize) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            run: format!("b{:x}", now.as_nanos()),
            text: "x".repeat(size.max(1)),
            users: users.max(1),
            first_user: 0,
            group_share: group_share.clamp(0.0, 1.0),
            connections: connections.max(1),
        }
    }

    /// The same messages from other users: `u{first}` onwards, whose conversations are not
    /// those of the users from `u0`.
    pub(super) fn with_users_from(self, first: usize) -> Self {
        Self {
            first_user: first,
            ..self
        }
    }

    /// The pool-wide index of message `seq` of `connection`.
    pub(super) fn index(&self, connection: usize, seq: u64) -> u64 {
        seq * self.connections as u64 + connection as u64
    }

    /// The sender of message `index`.
    pub(super) fn user(&self, index: u64) -> usize {
        self.first_user + (index % self.users as u64) as usize
    }

    /// Whether message `index` is a group message: exactly `floor(n * share)` of the first `n`
    /// messages are, spread evenly (a share of 0.3 gives 3 of every 10, not 1 of every 3).
    pub(super) fn is_group(&self, index: u64) -> bool {
        let before = (index as f64 * self.group_share).floor();
        let after = ((index + 1) as f64 * self.group_share).floor();
        after > before
    }

    /// The `msg_id` of message `seq` of `connection`.
    pub(super) fn msg_id(&self, connection: usize, seq: u64) -> String {
        format!("{}-{connection}-{seq}", self.run)
    }

    /// The text content of message `index`: group messages name the agent, as a group message
    /// must to be answered.
    pub(super) fn content(&self, index: u64) -> String {
        if self.is_group(index) {
            format!("@echo {}", self.text)
        } else {
            self.text.clone()
        }
    }

    /// The group of a group message from `user`: a hundred groups, so that they see traffic
    /// from many users each.
    pub(super) fn group_id(user: usize) -> String {
        format!("g{}", user % 100)
    }

    /// Message `seq` of `connection` as the JSON text of one frame.
    pub(super) fn frame(&self, connection: usize, seq: u64) -> String {
        let index = self.index(connection, seq);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let user = self.user(index);
        let (chat_type, group) = if self.is_group(index) {
            (2, format!(",\"group_id\":\"{}\"", Self::group_id(user)))
        } else {
            (1, String::new())
        };
        format!(
            "{{\"chat_type\":{chat_type},\"msg_id\":\"{}\",\"timestamp\":{}{group},\"sender_type\":1,\"sender_id\":\"u{user}\",\"resp_code\":0,\"content_type\":1,\"content\":\"{}\"}}",
            self.msg_id(connection, seq),
            now.as_millis(),
            self.content(index),
        )
    }
}

/// What answers a message: the gateway's response names it in `ref_msg_id`; the reference echo
/// server returns the message itself, so its own `msg_id` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Replies {
    Gateway,
    Echo,
}

/// The fields of a received frame that matter here; everything else is skipped unparsed, which
/// keeps the generator's cost per frame low.
#[derive(Deserialize)]
struct Received<'a> {
    #[serde(borrow)]
    msg_id: Option<&'a str>,
    #[serde(borrow)]
    ref_msg_id: Option<&'a str>,
    resp_code: Option<i64>,
}

/// The message of this run a received frame answers (its `seq` on the connection that sent it)
/// and whether the answer is a 0; `None` for a frame that answers none of this run's messages.
pub(super) fn answered(frames: &Frames, replies: Replies, text: &str) -> Option<(u64, bool)> {
    let received: Received<'_> = serde_json::from_str(text).ok()?;
    let id = match replies {
        Replies::Gateway => received.ref_msg_id?,
        Replies::Echo => received.msg_id?,
    };
    let seq = id
        .strip_prefix(frames.run.as_str())?
        .rsplit('-')
        .next()?
        .parse()
        .ok()?;
    Some((seq, received.resp_code == Some(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_share_is_exact_and_spread() {
        let frames = Frames::new(8, 100, 0.3, 1);
        let groups: Vec<bool> = (0..10).map(|i| frames.is_group(i)).collect();
        assert_eq!(groups.iter().filter(|g| **g).count(), 3);
        assert!(!groups[0..3].iter().all(|g| *g), "not bunched");
        assert_eq!((0..1000).filter(|i| frames.is_group(*i)).count(), 300);
        assert_eq!(
            (0..1000)
                .filter(|i| Frames::new(8, 100, 0.0, 1).is_group(*i))
                .count(),
            0
        );
        assert_eq!(
            (0..1000)
                .filter(|i| Frames::new(8, 100, 1.0, 1).is_group(*i))
                .count(),
            1000
        );
    }

    #[test]
    fn a_frame_is_a_valid_message_of_its_user_and_chat_type() {
        let frames = Frames::new(5, 10, 0.5, 2);
        for index in 0..4 {
            let text = frames.frame((index % 2) as usize, index / 2);
            let message = iagent_protocol::parse_inbound(&text, &Default::default());
            let message = message.unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(message.sender_id, format!("u{}", index % 10));
            assert_eq!(message.group_id.is_some(), frames.is_group(index));
            assert!(message.content.ends_with("xxxxx"));
        }
    }

    #[test]
    fn replies_are_matched_by_ref_msg_id_from_the_gateway_and_by_msg_id_from_an_echo() {
        let frames = Frames::new(5, 10, 0.0, 4);
        let sent = frames.frame(3, 41);
        assert_eq!(answered(&frames, Replies::Echo, &sent), Some((41, true)));
        assert_eq!(answered(&frames, Replies::Gateway, &sent), None);
        let id = frames.msg_id(3, 41);
        let response = format!(
            "{{\"chat_type\":1,\"msg_id\":\"r1\",\"ref_msg_id\":\"{id}\",\"resp_code\":50,\"content\":\"x\"}}"
        );
        assert_eq!(
            answered(&frames, Replies::Gateway, &response),
            Some((41, false))
        );
        // Another run's message, a push nobody asked for, and garbage answer nothing.
        let other = Frames {
            run: "bother".into(),
            ..Frames::new(5, 10, 0.0, 4)
        };
        assert_eq!(answered(&other, Replies::Gateway, &response), None);
        assert_eq!(
            answered(
                &frames,
                Replies::Gateway,
                "{\"msg_id\":\"p1\",\"resp_code\":0}"
            ),
            None
        );
        assert_eq!(answered(&frames, Replies::Echo, "not json"), None);
    }
}
