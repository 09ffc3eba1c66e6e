//! The `rules` kind: an ordered list of patterns (keywords or regular expressions), each with a
//! reply template; the first rule that matches a text message replies. When none does, the
//! agent sends its fallback reply, or declines with `no_rule_matched`.
//!
//! Everything that can be wrong with a configuration (a rule with both or neither pattern, a
//! regular expression that does not compile or is too big, a placeholder the template cannot
//! fill) is found when the agent is built, so a running agent never fails a message.
//!
//! ```json
//! {
//!   "rules": [
//!     { "keywords": ["price", "cost"], "reply": "Our prices are on example.com/prices" },
//!     { "regex": "(?i)^(hi|hello)\\b", "reply": "Hello {sender_id}!" },
//!     { "regex": "order (?P<number>[0-9]+)", "reply": "Looking up order {number} for you." }
//!   ],
//!   "fallback": "Sorry, I did not understand.",
//!   "strategy": { "group": "always" }
//! }
//! ```

use std::collections::HashMap;

use iagent_protocol::{ContentType, Message};
use regex::{Captures, Regex, RegexBuilder};
use serde::Deserialize;

use crate::{Agent, Reply, ReplyStrategy, Replying, Turn};

/// The kind's name in configuration.
pub const KIND: &str = "rules";

/// The reason code of the 10 sent when no rule matched and there is no fallback.
pub const NO_RULE_MATCHED: &str = "no_rule_matched";

/// The most rules one agent may have. Every rule may be tried for every message, so the list is
/// kept to a size that stays cheap to scan and to hold in memory.
pub const MAX_RULES: usize = 1000;

/// The most memory one rule's compiled matcher (its regular expression, or its keywords) may
/// take, in bytes. Configurations come from outside the gateway's code, and a short pattern can
/// compile to a huge program (`\w{1000}{1000}`), so without a bound one hostile or careless
/// configuration could take the gateway's memory, and every app's service with it. 1 MiB is far
/// more than any realistic pattern needs. The bound is per rule, so an agent's worst case is
/// [`MAX_RULES`] times this; the two limits together keep it finite, not small.
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// Placeholders every template may use.
const SENDER_ID: &str = "sender_id";
const AGENT_ID: &str = "agent_id";
const GROUP_ID: &str = "group_id";
const TEXT: &str = "text";
const BUILTIN_PLACEHOLDERS: [&str; 4] = [SENDER_ID, AGENT_ID, GROUP_ID, TEXT];

/// The rules agent.
#[derive(Debug, Clone)]
pub struct Rules {
    id: String,
    strategy: ReplyStrategy,
    rules: Vec<Rule>,
    fallback: Option<Template>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Read one by one (see [`RuleConfig`]) so that every error can name its rule.
    rules: Vec<serde_json::Value>,
    #[serde(default)]
    fallback: Option<String>,
    #[serde(default)]
    strategy: ReplyStrategy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    #[serde(default)]
    keywords: Option<Vec<String>>,
    #[serde(default)]
    regex: Option<String>,
    reply: String,
}

/// One rule: a matcher and its reply.
#[derive(Debug, Clone)]
struct Rule {
    /// For keywords, a regular expression built from them; its reply offers no captures.
    matcher: Regex,
    reply: Template,
}

impl Rule {
    fn build(index: usize, value: serde_json::Value) -> Result<Self, String> {
        let at = |reason: String| format!("rules[{index}]: {reason}");
        if !value.is_object() {
            return Err(at("must be a JSON object".into()));
        }
        let config = RuleConfig::deserialize(value).map_err(|err| at(err.to_string()))?;
        let is_regex = config.regex.is_some();
        let matcher = match (config.keywords, config.regex) {
            (Some(keywords), None) => keywords_matcher(&keywords).map_err(at)?,
            (None, Some(pattern)) => {
                compile(&pattern).map_err(|err| at(format!("invalid regex {pattern:?}: {err}")))?
            }
            (Some(_), Some(_)) => {
                return Err(at(
                    "has both \"keywords\" and \"regex\"; give exactly one".into()
                ));
            }
            (None, None) => {
                return Err(at(
                    "has neither \"keywords\" nor \"regex\"; give exactly one".into(),
                ));
            }
        };
        let captures = is_regex.then_some(&matcher);
        let reply =
            Template::parse(&config.reply, captures).map_err(|err| at(format!("reply: {err}")))?;
        Ok(Self { matcher, reply })
    }
}

/// Compiles a regular expression within [`MAX_REGEX_BYTES`].
fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_BYTES)
        .build()
}

/// A regular expression that finds any of `keywords` as a whole word, case-insensitively: not
/// preceded or followed by a letter, digit or `_`. Whitespace inside a keyword matches any run
/// of whitespace, and whitespace around it is ignored.
fn keywords_matcher(keywords: &[String]) -> Result<Regex, String> {
    if keywords.is_empty() {
        return Err("\"keywords\" must not be empty".into());
    }
    let mut alternatives = Vec::with_capacity(keywords.len());
    for (n, keyword) in keywords.iter().enumerate() {
        let words: Vec<String> = keyword.split_whitespace().map(regex::escape).collect();
        if words.is_empty() {
            return Err(format!("keywords[{n}] is empty"));
        }
        alternatives.push(words.join(r"\s+"));
    }
    let pattern = format!(
        r"(?i)\b{{start-half}}(?:{})\b{{end-half}}",
        alternatives.join("|")
    );
    compile(&pattern).map_err(|err| format!("the keywords do not compile: {err}"))
}

/// What a template holds: text, and placeholders filled per message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    SenderId,
    AgentId,
    GroupId,
    Text,
    /// A capture group of the rule's regular expression, by number.
    Capture(usize),
}

/// A reply template: `{name}` placeholders, `{{` and `}}` for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `source`; `captures`, if given, is the regular expression whose capture groups
    /// the template may name, by number or by name.
    fn parse(source: &str, captures: Option<&Regex>) -> Result<Self, String> {
        let groups: HashMap<&str, usize> = captures
            .into_iter()
            .flat_map(Regex::capture_names)
            .enumerate()
            .filter_map(|(index, name)| name.map(|name| (name, index)))
            .collect();
        let groups_len = captures.map_or(0, Regex::captures_len);
        if let Some(name) = BUILTIN_PLACEHOLDERS
            .iter()
            .find(|name| groups.contains_key(*name))
        {
            return Err(format!(
                "the capture group name \"{name}\" is taken by the placeholder {{{name}}}; \
                 rename the group"
            ));
        }
        let resolve = |name: &str| -> Result<Part, String> {
            Ok(match name {
                SENDER_ID => Part::SenderId,
                AGENT_ID => Part::AgentId,
                GROUP_ID => Part::GroupId,
                TEXT => Part::Text,
                _ => match (groups.get(name), name.parse::<usize>()) {
                    (Some(&index), _) => Part::Capture(index),
                    (None, Ok(index)) if index < groups_len => Part::Capture(index),
                    _ => return Err(unknown_placeholder(name, captures)),
                },
            })
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.next_if(|&(_, c)| c == '{').is_some() => literal.push('{'),
                '}' if chars.next_if(|&(_, c)| c == '}').is_some() => literal.push('}'),
                '{' => {
                    let rest = &source[at + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(format!(
                            "unclosed \"{{\" at byte {at}; write \"{{{{\" for a literal brace"
                        ));
                    };
                    let name = &rest[..end];
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(resolve(name)?);
                    while chars.next_if(|&(i, _)| i <= at + 1 + end).is_some() {}
                }
                '}' => {
                    return Err(format!(
                        "unmatched \"}}\" at byte {at}; write \"}}}}\" for a literal brace"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { parts })
    }

    /// Whether filling the template needs the match's capture groups.
    fn uses_captures(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Capture(_)))
    }

    fn render(&self, agent_id: &str, message: &Message, captures: Option<&Captures<'_>>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::SenderId => out.push_str(&message.sender_id),
                Part::AgentId => out.push_str(agent_id),
                Part::GroupId => out.push_str(message.group_id.as_deref().unwrap_or_default()),
                Part::Text => out.push_str(text_of(message).unwrap_or_default()),
                Part::Capture(index) => out.push_str(
                    captures
                        .and_then(|captures| captures.get(*index))
                        .map_or("", |group| group.as_str()),
                ),
            }
        }
        out
    }
}

/// The error for a placeholder the template cannot fill, listing the ones it can.
fn unknown_placeholder(name: &str, captures: Option<&Regex>) -> String {
    let mut known: Vec<String> = BUILTIN_PLACEHOLDERS
        .iter()
        .map(|name| format!("{{{name}}}"))
        .collect();
    if let Some(captures) = captures {
        known.extend((0..captures.captures_len()).map(|index| format!("{{{index}}}")));
        known.extend(
            captures
                .capture_names()
                .flatten()
                .map(|name| format!("{{{name}}}")),
        );
    }
    format!(
        "unknown placeholder {{{name}}}; known here: {}",
        known.join(", ")
    )
}

/// The text a message offers to rules: its content if it is a text message.
fn text_of(message: &Message) -> Option<&str> {
    (message.content_type == ContentType::Text).then_some(message.content.as_str())
}

impl Rules {
    /// A rules agent from its JSON configuration (`docs/agents.md`, "rules").
    pub fn from_config(id: &str, config: &str) -> Result<Self, String> {
        let config: Config = crate::parse_config(config)?;
        if config.rules.len() > MAX_RULES {
            return Err(format!(
                "{} rules; at most {MAX_RULES} are allowed",
                config.rules.len()
            ));
        }
        let rules = config
            .rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| Rule::build(index, rule))
            .collect::<Result<Vec<_>, _>>()?;
        // The fallback has no match, so it may use only the placeholders every template has.
        let fallback = config
            .fallback
            .map(|source| Template::parse(&source, None).map_err(|err| format!("fallback: {err}")))
            .transpose()?;
        Ok(Self {
            id: id.to_owned(),
            strategy: config.strategy,
            rules,
            fallback,
        })
    }

    /// The reply to `message`: the first matching rule's, else the fallback, else a decline.
    fn answer(&self, message: &Message) -> Reply {
        let text = |content: String| Reply::Content {
            content_type: ContentType::Text,
            content,
        };
        if let Some(haystack) = text_of(message) {
            for rule in &self.rules {
                if rule.reply.uses_captures() {
                    if let Some(captures) = rule.matcher.captures(haystack) {
                        return text(rule.reply.render(&self.id, message, Some(&captures)));
                    }
                } else if rule.matcher.is_match(haystack) {
                    return text(rule.reply.render(&self.id, message, None));
                }
            }
        }
        match &self.fallback {
            Some(fallback) => text(fallback.render(&self.id, message, None)),
            None => Reply::Declined(NO_RULE_MATCHED.into()),
        }
    }
}

impl Agent for Rules {
    fn id(&self) -> &str {
        &self.id
    }

    fn strategy(&self) -> &ReplyStrategy {
        &self.strategy
    }

    fn reply<'a>(&'a self, turn: Turn<'a>) -> Replying<'a> {
        Replying::Now(Ok(self.answer(turn.message)))
    }
    /// The reply is computed from the message alone.
    fn repeatable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use iagent_protocol::{ChatType, RespCode, SenderType};
    use serde_json::json;

    use super::*;

    const EXAMPLE: &str = r#"{
        "rules": [
            { "keywords": ["price", "cost"], "reply": "Our prices are on example.com/prices" },
            { "regex": "(?i)^(hi|hello)\\b", "reply": "Hello {sender_id}!" },
            { "regex": "order (?P<number>[0-9]+)", "reply": "Looking up order {number} for you." }
        ],
        "fallback": "Sorry, I did not understand.",
        "strategy": { "group": "always" }
    }"#;

    fn message(text: &str) -> Message {
        Message {
            chat_type: ChatType::Private,
            msg_id: "m".into(),
            ref_msg_id: None,
            timestamp: 0,
            group_id: None,
            sender_type: SenderType::User,
            sender_id: "alice".into(),
            receiver_id: Some("helper".into()),
            resp_code: RespCode::Ok,
            content_type: ContentType::Text,
            content: text.into(),
        }
    }

    fn agent(config: serde_json::Value) -> Rules {
        Rules::from_config("helper", &config.to_string()).unwrap()
    }

    fn error(config: serde_json::Value) -> String {
        Rules::from_config("helper", &config.to_string()).unwrap_err()
    }

    fn said(content: &str) -> Reply {
        Reply::Content {
            content_type: ContentType::Text,
            content: content.into(),
        }
    }

    fn ask(agent: &Rules, text: &str) -> Reply {
        agent.answer(&message(text))
    }

    #[test]
    fn the_documented_example_builds_and_answers() {
        let agent = Rules::from_config("helper", EXAMPLE).unwrap();
        assert_eq!(
            ask(&agent, "What does it cost?"),
            said("Our prices are on example.com/prices")
        );
        assert_eq!(ask(&agent, "Hello there"), said("Hello alice!"));
        assert_eq!(
            ask(&agent, "where is order 42?"),
            said("Looking up order 42 for you.")
        );
        assert_eq!(ask(&agent, "hm"), said("Sorry, I did not understand."));
        assert_eq!(agent.strategy().group, crate::strategy::GroupPolicy::Always);
    }

    #[test]
    fn keywords_match_whole_words_case_insensitively() {
        let agent = agent(json!({
            "rules": [{ "keywords": ["price", "opening hours", "c++"], "reply": "yes" }]
        }));
        for text in [
            "Price?",
            "the PRICE",
            "price",
            "(price)",
            "what are your Opening  Hours",
            "I like c++.",
        ] {
            assert_eq!(ask(&agent, text), said("yes"), "{text:?}");
        }
        for text in [
            "priceless",
            "prices",
            "overprice",
            "price_",
            "c++x",
            "opening",
        ] {
            assert_eq!(
                ask(&agent, text),
                Reply::Declined(NO_RULE_MATCHED.into()),
                "{text:?}"
            );
        }
        // Non-ASCII letters are word characters too, and case folds beyond ASCII.
        let agent = self::agent(json!({ "rules": [{ "keywords": ["über"], "reply": "yes" }] }));
        assert_eq!(ask(&agent, "ÜBER alles"), said("yes"));
        assert_eq!(
            ask(&agent, "überall"),
            Reply::Declined(NO_RULE_MATCHED.into())
        );
    }

    #[test]
    fn regex_replies_fill_numbered_and_named_captures() {
        let agent = agent(json!({ "rules": [{
            "regex": r"(?P<verb>buy|sell) (\d+) (?P<item>\w+)",
            "reply": "{0} | {1} {2} {3} | {verb} {item} | {{literal}} {text}",
        }]}));
        assert_eq!(
            ask(&agent, "please buy 3 apples"),
            said("buy 3 apples | buy 3 apples | buy apples | {literal} please buy 3 apples")
        );
        // A group that took no part in the match is empty.
        let agent = self::agent(json!({ "rules": [{
            "regex": r"ticket( #\d+)?",
            "reply": "[{1}]",
        }]}));
        assert_eq!(ask(&agent, "my ticket"), said("[]"));
        assert_eq!(ask(&agent, "my ticket #7"), said("[ #7]"));
        // The examples of `docs/agents.md`.
        let agent = self::agent(json!({ "rules": [{
            "regex": r"(?<n>\d+)",
            "reply": "{{ref: {1}}} {{{n}}}",
        }]}));
        assert_eq!(ask(&agent, "see 42"), said("{ref: 42} {42}"));
        let documented = error(json!({ "rules": [{
            "regex": "order (?P<number>[0-9]+)",
            "reply": "Looking up order {num} for you.",
        }]}));
        assert_eq!(
            documented,
            "rules[0]: reply: unknown placeholder {num}; known here: {sender_id}, {agent_id}, \
             {group_id}, {text}, {0}, {1}, {number}"
        );
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let agent = agent(json!({ "rules": [
            { "keywords": ["refund"], "reply": "first" },
            { "regex": "refund|money", "reply": "second" },
            { "keywords": ["money"], "reply": "third" },
        ]}));
        assert_eq!(ask(&agent, "refund my money"), said("first"));
        assert_eq!(ask(&agent, "money"), said("second"));
    }

    #[test]
    fn the_fallback_fills_its_placeholders() {
        let agent = agent(json!({
            "rules": [{ "keywords": ["x"], "reply": "x" }],
            "fallback": "{agent_id} did not get \"{text}\" from {sender_id} in [{group_id}]",
        }));
        assert_eq!(
            ask(&agent, "what?"),
            said("helper did not get \"what?\" from alice in []")
        );
        let mut in_group = message("huh");
        in_group.chat_type = ChatType::Group;
        in_group.group_id = Some("room".into());
        assert_eq!(
            agent.answer(&in_group),
            said("helper did not get \"huh\" from alice in [room]")
        );
    }

    #[test]
    fn without_a_fallback_no_match_declines() {
        let agent = agent(json!({ "rules": [{ "keywords": ["x"], "reply": "x" }] }));
        assert_eq!(
            ask(&agent, "nothing here"),
            Reply::Declined("no_rule_matched".into())
        );
        let empty = self::agent(json!({ "rules": [] }));
        assert_eq!(ask(&empty, "x"), Reply::Declined("no_rule_matched".into()));
    }

    #[test]
    fn media_never_matches_a_rule() {
        let mut image = message(r#"{"file_ids":["price"]}"#);
        image.content_type = ContentType::Image;
        let agent = agent(json!({ "rules": [
            { "keywords": ["price", "file_ids"], "reply": "keyword" },
            { "regex": ".*", "reply": "regex" },
        ]}));
        assert_eq!(
            agent.answer(&image),
            Reply::Declined(NO_RULE_MATCHED.into())
        );
        let with_fallback = self::agent(json!({
            "rules": [{ "regex": ".*", "reply": "regex" }],
            "fallback": "no text: [{text}]",
        }));
        assert_eq!(with_fallback.answer(&image), said("no text: []"));
    }

    #[tokio::test]
    async fn replies_through_the_agent_trait() {
        let agent = Rules::from_config("helper", EXAMPLE).unwrap();
        let message = message("order 7");
        let reply = agent
            .reply(Turn {
                message: &message,
                history: &[],
                files: &crate::NoFiles,
            })
            .await;
        assert_eq!(reply, Ok(said("Looking up order 7 for you.")));
    }

    #[test]
    fn configuration_errors_name_the_rule() {
        let ok = json!({ "keywords": ["a"], "reply": "a" });
        let at_1 = |rule: serde_json::Value| error(json!({ "rules": [ok, rule] }));
        let both = at_1(json!({ "keywords": ["a"], "regex": "a", "reply": "a" }));
        assert!(both.starts_with("rules[1]: has both"), "{both}");
        let neither = at_1(json!({ "reply": "a" }));
        assert!(neither.starts_with("rules[1]: has neither"), "{neither}");
        let empty = at_1(json!({ "keywords": [], "reply": "a" }));
        assert!(
            empty.starts_with("rules[1]: \"keywords\" must not be empty"),
            "{empty}"
        );
        let blank = at_1(json!({ "keywords": ["a", " "], "reply": "a" }));
        assert!(
            blank.starts_with("rules[1]: keywords[1] is empty"),
            "{blank}"
        );
        let bad = at_1(json!({ "regex": "(unclosed", "reply": "a" }));
        assert!(
            bad.starts_with("rules[1]: invalid regex \"(unclosed\""),
            "{bad}"
        );
        let huge = at_1(json!({ "regex": r"\w{1000}{1000}", "reply": "a" }));
        assert!(huge.starts_with("rules[1]: invalid regex"), "{huge}");
        assert!(huge.contains("size limit"), "{huge}");
        let unknown = at_1(json!({ "regex": "(?P<n>a)(b)", "reply": "{n} {2} {3}" }));
        assert!(
            unknown.starts_with("rules[1]: reply: unknown placeholder {3}"),
            "{unknown}"
        );
        assert!(unknown.contains("{n}"), "{unknown}");
        let keyword_capture = at_1(json!({ "keywords": ["a"], "reply": "{1}" }));
        assert!(
            keyword_capture.starts_with("rules[1]: reply: unknown placeholder {1}"),
            "{keyword_capture}"
        );
        let unclosed = at_1(json!({ "keywords": ["a"], "reply": "{text" }));
        assert!(
            unclosed.starts_with("rules[1]: reply: unclosed \"{\""),
            "{unclosed}"
        );
        let unmatched = at_1(json!({ "keywords": ["a"], "reply": "a } b" }));
        assert!(
            unmatched.starts_with("rules[1]: reply: unmatched \"}\""),
            "{unmatched}"
        );
        let clash = at_1(json!({ "regex": "(?P<text>a)", "reply": "a" }));
        assert!(
            clash.starts_with("rules[1]: reply: the capture group name \"text\""),
            "{clash}"
        );
        let unknown_key = at_1(json!({ "keywords": ["a"], "reply": "a", "weight": 2 }));
        assert_eq!(
            unknown_key,
            "rules[1]: unknown field `weight`, expected one of `keywords`, `regex`, `reply`"
        );
        let no_reply = at_1(json!({ "keywords": ["a"] }));
        assert!(
            no_reply.starts_with("rules[1]: missing field `reply`"),
            "{no_reply}"
        );
        let not_object = at_1(json!(["a", "a"]));
        assert_eq!(not_object, "rules[1]: must be a JSON object");
    }

    #[test]
    fn configuration_errors_outside_the_rules() {
        assert!(error(json!({})).contains("missing field `rules`"));
        let unknown_key = error(json!({ "rules": [], "colour": "blue" }));
        assert!(
            unknown_key.starts_with("unknown field `colour`"),
            "{unknown_key}"
        );
        let not_object = Rules::from_config("helper", r#"[[], "fallback"]"#).unwrap_err();
        assert!(
            not_object.starts_with("configuration must be a JSON object"),
            "{not_object}"
        );
        let fallback = error(json!({ "rules": [], "fallback": "{0}" }));
        assert!(
            fallback.starts_with("fallback: unknown placeholder {0}"),
            "{fallback}"
        );
        let rule = json!({ "keywords": ["a"], "reply": "a" });
        let too_many = error(json!({ "rules": vec![rule.clone(); MAX_RULES + 1] }));
        assert_eq!(too_many, "1001 rules; at most 1000 are allowed");
        assert!(
            Rules::from_config("h", &json!({ "rules": vec![rule; MAX_RULES] }).to_string()).is_ok()
        );
    }

    #[test]
    fn the_kind_is_built_in() {
        let built = crate::Kinds::builtin().build("helper", KIND, EXAMPLE);
        assert_eq!(
            built.map(|agent| agent.id().to_owned()),
            Ok("helper".into())
        );
        let err = crate::Kinds::builtin()
            .build("helper", KIND, r#"{"rules":[{"reply":"a"}]}"#)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "agent helper: invalid configuration: rules[0]: has neither \"keywords\" nor \
             \"regex\"; give exactly one"
        );
    }
}
