//! Tool calling, all on the key holder's side: the blind server never sees
//! a tool's name, description or arguments in the clear.
//!
//! - `tools` are rendered into the model's own chat template where it takes
//!   them (its `tools` variable); a template that does not gets them in a
//!   system message in the Hermes format, which is also how its answer is
//!   read back ([`fallback_system_text`]).
//! - The answer is parsed into OpenAI `tool_calls` ([`parse`]).
//! - `tool_choice: "required"` or a named function constrain the answer to
//!   a call with the grammar machinery of structured output
//!   ([`forced_grammar`]).

pub mod parse;

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Map, Value};

use crate::decode::tail_start;
use crate::proxy::request::{invalid, RequestError};
use crate::structured::{closed_objects, json_layout};

/// How a model writes its calls, named after the family that defined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{json}</tool_call>` (Qwen2.5, Hermes, SmolLM3).
    Hermes,
    /// Bare `{"name", "parameters"}` JSON (Llama 3.1/3.2).
    Llama3,
    /// `[TOOL_CALLS][{...}]` (Mistral).
    Mistral,
}

impl ToolFormat {
    /// The format a chat template's own text asks its model for; `None`
    /// for a template that renders no tools.
    pub fn of_template(source: &str) -> Option<Self> {
        if !source.contains("tools") {
            return None;
        }
        Some(if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains(parse::PYTHON_TAG) || source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            // Hermes is the most common; an unknown format's answer that
            // does not parse as Hermes stays plain content.
            ToolFormat::Hermes
        })
    }
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Tools are shown; the answer is content only.
    None,
    /// The model decides; calls are parsed out of its answer.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

/// A request's tools, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    /// OpenAI's `tools` as sent: `{"type": "function", "function": {...}}`.
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
}

impl ToolRequest {
    /// Reads `tools` and `tool_choice`; `None` without tools.
    ///
    /// # Errors
    /// A 400 naming the field: a tool that is not a function with a name
    /// and an object schema, two tools of one name, a choice naming no
    /// tool, or a choice other than OpenAI's.
    pub fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
    ) -> Result<Option<Self>, RequestError> {
        let tools = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) if !a.is_empty() => a.clone(),
            Some(_) => return Err(invalid("tools", "tools must be a non-empty array")),
        };
        let mut names = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            names.push(tool_name(i, t)?);
        }
        if let Some(dup) = names
            .iter()
            .enumerate()
            .find_map(|(i, n)| names[..i].contains(n).then_some(n))
        {
            return Err(invalid("tools", format!("two tools are named {dup:?}")));
        }
        let explicit = choice.is_some_and(|c| !c.is_null());
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(invalid(
                        "tool_choice",
                        format!("tool_choice {other:?}: use \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        invalid(
                            "tool_choice",
                            "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !names.iter().any(|n| n == name) {
                    return Err(invalid(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not among the tools"),
                    ));
                }
                ToolChoice::Named(name.to_owned())
            }
        };
        if tools.is_empty() {
            return match (explicit, choice) {
                (false, _) | (true, ToolChoice::None) => Ok(None),
                _ => Err(invalid("tool_choice", "tool_choice needs tools")),
            };
        }
        Ok(Some(Self { tools, choice }))
    }

    /// Whether calls are read out of the answer.
    pub fn parses_calls(&self) -> bool {
        self.choice != ToolChoice::None
    }

    fn function(&self, name: &str) -> Option<&Map<String, Value>> {
        self.tools
            .iter()
            .filter_map(|t| t.get("function").and_then(Value::as_object))
            .find(|f| f.get("name").and_then(Value::as_str) == Some(name))
    }
}

/// How calls are read out of one request's answers.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolParsing {
    pub format: ToolFormat,
    /// `parallel_tool_calls`: `false` keeps the first call only.
    pub parallel: bool,
    /// The plaintext IDs of the format's special tokens that begin a call
    /// (Mistral's `[TOOL_CALLS]`): decoded text drops them, so streaming
    /// watches for them by ID.
    pub trigger_ids: Vec<u32>,
}

impl ToolParsing {
    /// `text` (decoded with the format's own special tokens) as content
    /// and calls, each call with a fresh ID; `None` when no call parses.
    pub fn parse(&self, text: &str) -> Option<parse::ParsedAnswer> {
        let mut parsed = parse::parse(self.format, text);
        if !self.parallel {
            parsed.calls.truncate(1);
        }
        for call in &mut parsed.calls {
            call.id = call_id(self.format);
        }
        (!parsed.calls.is_empty()).then_some(parsed)
    }
}

/// A fresh call ID: OpenAI's `call_` and 24 hex digits, or for Mistral the
/// 9 letters and digits its templates insist on when the call comes back.
fn call_id(format: ToolFormat) -> String {
    let random = ee_core::rng::os_random_bytes().unwrap_or_default();
    match format {
        ToolFormat::Mistral => {
            const ALPHABET: &[u8] =
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
            random[..9]
                .iter()
                .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
                .collect()
        }
        _ => {
            let hex: String = random[..12].iter().map(|b| format!("{b:02x}")).collect();
            format!("call_{hex}")
        }
    }
}

/// A tool's function name, checked.
fn tool_name(i: usize, t: &Value) -> Result<String, RequestError> {
    let param = format!("tools[{i}]");
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(
            &format!("{param}.type"),
            "only function tools are supported",
        ));
    }
    let f = t
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            invalid(
                &format!("{param}.function"),
                "a tool needs a function object",
            )
        })?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .ok_or_else(|| {
            invalid(
                &format!("{param}.function.name"),
                "a function needs a name of 1 to 64 characters",
            )
        })?;
    match f.get("parameters") {
        None | Some(Value::Object(_)) => Ok(name.to_owned()),
        Some(_) => Err(invalid(
            &format!("{param}.function.parameters"),
            "parameters must be a JSON schema object",
        )),
    }
}

/// The system text that offers `tools` to a model whose template renders
/// none, in the Hermes format [`parse`] reads back.
pub fn fallback_system_text(tools: &[Value]) -> String {
    let mut text = String::from(
        "# Tools\n\nYou can call functions to help answer. Their signatures are listed \
         inside <tools></tools> tags:\n<tools>",
    );
    for t in tools {
        text.push('\n');
        text.push_str(&crate::template::python::dumps(t));
    }
    text.push_str(
        "\n</tools>\n\nTo call a function, answer with a JSON object holding its name and \
         arguments inside <tool_call></tool_call> tags, one block per call:\n<tool_call>\n\
         {\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>",
    );
    text
}

/// The grammar of the answer that `tool_choice` forces, in `format`, or
/// `None` when the model may answer freely.
pub fn forced_grammar(
    request: &ToolRequest,
    format: ToolFormat,
    special_id: &dyn Fn(&str) -> Option<u32>,
) -> Option<TopLevelGrammar> {
    let names: Vec<&str> = match &request.choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => request
            .tools
            .iter()
            .filter_map(|t| t["function"]["name"].as_str())
            .collect(),
        ToolChoice::Named(n) => vec![n.as_str()],
    };
    let args_key = match format {
        ToolFormat::Llama3 => "parameters",
        ToolFormat::Hermes | ToolFormat::Mistral => "arguments",
    };
    let calls: Vec<Value> = names
        .iter()
        .map(|name| {
            let params = request
                .function(name)
                .and_then(|f| f.get("parameters"))
                .cloned()
                .map_or_else(|| json!({"type": "object"}), closed_objects);
            json!({"type": "object", "properties": {"name": {"const": name}, args_key: params},
                   "required": ["name", args_key], "additionalProperties": false})
        })
        .collect();
    let call = json_layout(json!({"anyOf": calls}));
    let lark = match format {
        ToolFormat::Hermes => {
            format!("start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {call}")
        }
        ToolFormat::Llama3 => format!("start: call\ncall: %json {call}"),
        ToolFormat::Mistral => {
            let open = match special_id(parse::MISTRAL_CALLS) {
                Some(id) => format!("<[{id}]>"),
                None => format!("{:?}", parse::MISTRAL_CALLS),
            };
            format!("start: {open} \"[\" call \"]\"\ncall: %json {call}")
        }
    };
    Some(TopLevelGrammar::from_lark(lark))
}

/// Holds streamed content back where a call may be starting, as stop
/// strings are held: text before a call streams as content, the call
/// itself is decided at the end.
#[derive(Debug)]
pub struct ToolStream {
    format: ToolFormat,
    /// Text not yet released (a possible trigger's beginning, or all of
    /// it once a call has started).
    held: String,
    /// Content released so far.
    released: String,
    started: bool,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            held: String::new(),
            released: String::new(),
            started: false,
        }
    }

    /// Takes the next piece of answer text; returns the content that can
    /// be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        if self.started {
            return String::new();
        }
        // A trigger never straddles released text: a tail that might begin
        // one is always held. So only the held text is searched.
        let at_start = self.released.is_empty();
        if let Some(at) = parse::call_start(self.format, &self.held, at_start) {
            self.started = true;
            let out: String = self.held[..at].to_owned();
            self.held.drain(..at);
            self.released.push_str(&out);
            return out;
        }
        // Llama 3's bare JSON may start after leading whitespace: hold it.
        if self.format == ToolFormat::Llama3 && at_start && self.held.trim().is_empty() {
            return String::new();
        }
        let triggers = parse::triggers(self.format);
        let keep_from = tail_start(&self.held, |tail| {
            triggers.iter().any(|t| t.starts_with(tail))
        });
        let out: String = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        self.released.push_str(&out);
        out
    }

    /// A token that begins a call arrived (one decoding drops, such as
    /// Mistral's `[TOOL_CALLS]`): hold everything from here.
    pub fn start(&mut self) {
        self.started = true;
    }

    /// The held text at the end, parsed by `parsing`: content still to
    /// show and the calls. `full` is the whole answer with its call
    /// markers' text.
    pub fn finish(&mut self, parsing: &ToolParsing, full: &str) -> parse::ParsedAnswer {
        let Some(parsed) = parsing.parse(full) else {
            return parse::ParsedAnswer {
                content: std::mem::take(&mut self.held),
                calls: Vec::new(),
            };
        };
        self.held.clear();
        // What was released already is not sent again.
        let content = parsed
            .content
            .strip_prefix(self.released.as_str())
            .unwrap_or("")
            .to_owned();
        parse::ParsedAnswer {
            content,
            calls: parsed.calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}}})
    }

    #[test]
    fn tools_and_tool_choice_are_validated_by_name() {
        let tools = json!([weather()]);
        let r = ToolRequest::parse(Some(&tools), None).unwrap().unwrap();
        assert_eq!(r.choice, ToolChoice::Auto);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let r = ToolRequest::parse(Some(&tools), Some(&named))
            .unwrap()
            .unwrap();
        assert_eq!(r.choice, ToolChoice::Named("get_weather".into()));
        assert_eq!(
            ToolRequest::parse(None, Some(&json!("none"))).unwrap(),
            None
        );
        for (tools, choice, param) in [
            (json!({}), json!(null), "tools"),
            (json!([]), json!(null), "tools"),
            (json!([{"type": "code"}]), json!(null), "tools[0].type"),
            (
                json!([{"type": "function", "function": {}}]),
                json!(null),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                json!(null),
                "tools[0].function.parameters",
            ),
            (json!([weather(), weather()]), json!(null), "tools"),
            (tools.clone(), json!("sometimes"), "tool_choice"),
            (
                tools.clone(),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (json!(null), json!("required"), "tool_choice"),
        ] {
            let e = ToolRequest::parse(Some(&tools), Some(&choice)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{tools} {choice}: {e:?}");
        }
    }

    #[test]
    fn template_formats_are_told_apart() {
        assert_eq!(ToolFormat::of_template("{{ messages }}"), None);
        assert_eq!(
            ToolFormat::of_template("{% if tools %}<tool_call>{% endif %}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolFormat::of_template("{% if tools %}[TOOL_CALLS]{% endif %}"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(
            ToolFormat::of_template("{% if tools %}<|python_tag|>{% endif %}"),
            Some(ToolFormat::Llama3)
        );
    }

    #[test]
    fn streamed_text_is_held_from_where_a_call_may_start() {
        let mut s = ToolStream::new(ToolFormat::Hermes);
        let mut shown = String::new();
        for piece in [
            "Let me",
            " look. <to",
            "ol_call>\n{\"name\": \"f\", ",
            "\"arguments\": {}}\n</tool_call>",
        ] {
            shown.push_str(&s.push(piece));
        }
        assert_eq!(shown, "Let me look. ");
        let full = "Let me look. <tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let end = s.finish(&parsing(ToolFormat::Hermes), full);
        assert_eq!(end.calls.len(), 1);
        assert_eq!(end.content, "");
        // A near miss is released, and text without a call all arrives.
        let mut s = ToolStream::new(ToolFormat::Hermes);
        let mut shown = s.push("a <to");
        shown.push_str(&s.push("p> b"));
        let end = s.finish(&parsing(ToolFormat::Hermes), "a <top> b");
        assert_eq!(format!("{shown}{}", end.content), "a <top> b");
        assert!(end.calls.is_empty());
        // Llama 3: an answer that opens with JSON is held whole.
        let mut s = ToolStream::new(ToolFormat::Llama3);
        assert_eq!(s.push(" "), "");
        assert_eq!(s.push("{\"name\": \"f\", \"parameters\": {}}"), "");
        let end = s.finish(
            &parsing(ToolFormat::Llama3),
            " {\"name\": \"f\", \"parameters\": {}}",
        );
        assert_eq!(end.calls.len(), 1);
        assert!(end.calls[0].id.starts_with("call_"));
        // Mistral's marker is a special token decoding drops: started by ID.
        let mut s = ToolStream::new(ToolFormat::Mistral);
        assert_eq!(s.push("Sure."), "Sure.");
        s.start();
        assert_eq!(s.push("[{\"name\": \"f\", \"arguments\": {}}]"), "");
        let full = "Sure.[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]";
        let end = s.finish(&parsing(ToolFormat::Mistral), full);
        assert_eq!((end.content.as_str(), end.calls.len()), ("", 1));
        assert_eq!(
            end.calls[0].id.len(),
            9,
            "Mistral's templates want 9 characters"
        );
        // parallel_tool_calls: false keeps the first call.
        let two = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let one = ToolParsing {
            parallel: false,
            ..parsing(ToolFormat::Hermes)
        };
        assert_eq!(one.parse(two).unwrap().calls.len(), 1);
        assert_eq!(
            parsing(ToolFormat::Hermes).parse(two).unwrap().calls.len(),
            2
        );
    }

    fn parsing(format: ToolFormat) -> ToolParsing {
        ToolParsing {
            format,
            parallel: true,
            trigger_ids: Vec::new(),
        }
    }

    #[test]
    fn a_forced_call_grammar_compiles_for_every_format() {
        let tools = json!([weather()]);
        let r = ToolRequest::parse(Some(&tools), Some(&json!("required")))
            .unwrap()
            .unwrap();
        for format in [ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral] {
            let g = forced_grammar(&r, format, &|_| None).expect("a grammar");
            let text = serde_json::to_string(&g).unwrap();
            assert!(text.contains("get_weather"), "{text}");
        }
        let auto = ToolRequest::parse(Some(&tools), None).unwrap().unwrap();
        assert!(forced_grammar(&auto, ToolFormat::Hermes, &|_| None).is_none());
    }
}
