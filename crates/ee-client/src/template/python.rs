//! Where Python's Jinja and minijinja write values differently, Python's
//! way, since chat templates are written against transformers:
//!
//! - `tojson` as transformers defines it for chat templates: Python's
//!   `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
//!   sort_keys=sort_keys)`. minijinja's own writes compact JSON and escapes
//!   HTML characters, which would change every tool prompt;
//! - printing a value (`{{ x }}`, `x|string`) as Python's `str(x)`: `True`,
//!   `None`, `{'a': 1}`;
//! - `length` of an undefined value is 0, as in jinja2.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind, Output, State};
use serde_json::Value as Json;

/// The environment's formatter: what `{{ x }}` writes.
pub fn format(out: &mut Output, _: &State, value: &Value) -> Result<(), Error> {
    out.write_str(&string(value.clone())).map_err(Error::from)
}

/// Python's `str(x)`; also the `string` filter.
pub fn string(value: Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        ValueKind::Bool | ValueKind::None | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            match serde_json::to_value(&value) {
                Ok(json) => python_repr(&json),
                Err(_) => value.to_string(),
            }
        }
        _ => value.to_string(),
    }
}

/// `length`, with jinja2's 0 for an undefined value.
pub fn length(value: Value) -> Result<usize, Error> {
    if value.is_undefined() {
        return Ok(0);
    }
    value.len().ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot calculate length of value of type {}", value.kind()),
        )
    })
}

/// Python's `repr()` of a JSON-shaped value (its `str()` but for strings).
fn python_repr(v: &Json) -> String {
    match v {
        Json::Null => "None".into(),
        Json::Bool(true) => "True".into(),
        Json::Bool(false) => "False".into(),
        Json::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
            Some(f) if f.is_finite() => python_float(f),
            Some(f) if f.is_nan() => "nan".into(),
            Some(f) => if f > 0.0 { "inf" } else { "-inf" }.into(),
            None => n.to_string(),
        },
        Json::String(s) => repr_str(s),
        Json::Array(items) => {
            let items: Vec<String> = items.iter().map(python_repr).collect();
            format!("[{}]", items.join(", "))
        }
        Json::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, x)| format!("{}: {}", repr_str(k), python_repr(x)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has one and no
/// double quote; backslash, the quote and control characters escaped.
fn repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The filter. Keyword arguments as Python's: `indent` (spaces), `separators`
/// (item and key separators), `sort_keys`, `ensure_ascii`.
pub fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    // Python's defaults: ", " between items unless indenting, then ",".
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = Style {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(out)
}

/// `json.dumps(value, ensure_ascii=False)`: Python's separators (`", "`,
/// `": "`) with non-ASCII text kept, as transformers' `tojson` writes, for
/// text the client writes into prompts itself.
pub fn dumps(value: &Json) -> String {
    let style = Style {
        indent: None,
        item: ", ".into(),
        key: ": ".into(),
        sort_keys: false,
        ensure_ascii: false,
    };
    let mut out = String::new();
    style.write(value, 0, &mut out);
    out
}

struct Style {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl Style {
    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                Some(f) => out.push_str(&python_float(f)),
                None => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.string(s, out),
            Json::Array(items) => {
                self.container(('[', ']'), items.iter().map(|x| (None, x)), depth, out)
            }
            Json::Object(map) => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                let entries = entries.into_iter().map(|(k, x)| (Some(k.as_str()), x));
                self.container(('{', '}'), entries, depth, out)
            }
        }
    }

    fn container<'a>(
        &self,
        (open, close): (char, char),
        entries: impl ExactSizeIterator<Item = (Option<&'a str>, &'a Json)>,
        depth: usize,
        out: &mut String,
    ) {
        out.push(open);
        if entries.len() == 0 {
            out.push(close);
            return;
        }
        let newline = |out: &mut String, depth: usize| {
            if let Some(n) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * depth));
            }
        };
        for (i, (key, value)) in entries.enumerate() {
            if i > 0 {
                out.push_str(&self.item);
            }
            newline(out, depth + 1);
            if let Some(k) = key {
                self.string(k, out);
                out.push_str(&self.key);
            }
            self.write(value, depth + 1, out);
        }
        newline(out, depth);
        out.push(close);
    }

    /// A JSON string as Python writes it: `"`, `\` and control characters
    /// escaped (as serde_json does too), non-ASCII as is unless
    /// `ensure_ascii`.
    fn string(&self, s: &str, out: &mut String) {
        let quoted = Json::String(s.to_owned()).to_string();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional
/// for exponents from -4 to 15, otherwise `1e-05` / `1.5e+20`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let plain = format!("{f}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;

    fn render(src: &str, ctx: Json) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        env.add_filter("length", length);
        env.add_filter("string", string);
        env.set_formatter(format);
        env.render_str(src, Value::from_serialize(&ctx)).unwrap()
    }

    #[test]
    fn writes_what_pythons_json_dumps_writes() {
        let ctx = serde_json::json!({"x": {"b": [1, 2.5, 1e-5, 1e20, 3.0], "a": "é<&>\"\n", "c": {}, "d": []}});
        // json.dumps(x, ensure_ascii=False)
        assert_eq!(
            render("{{ x|tojson }}", ctx.clone()),
            r#"{"b": [1, 2.5, 1e-05, 1e+20, 3.0], "a": "é<&>\"\n", "c": {}, "d": []}"#
        );
        // json.dumps(x, indent=2, sort_keys=True)
        assert_eq!(
            render("{{ x|tojson(indent=2, sort_keys=true) }}", ctx.clone()),
            "{\n  \"a\": \"é<&>\\\"\\n\",\n  \"b\": [\n    1,\n    2.5,\n    1e-05,\n    1e+20,\n    3.0\n  ],\n  \"c\": {},\n  \"d\": []\n}"
        );
        assert_eq!(
            render("{{ x.a|tojson(ensure_ascii=true) }}", ctx.clone()),
            r#""\u00e9<&>\"\n""#
        );
        assert_eq!(
            render(
                "{{ x.d|tojson(separators=(',', ':')) }}{{ [1,2]|tojson(separators=(',', ':')) }}",
                ctx
            ),
            "[][1,2]"
        );
    }

    #[test]
    fn prints_values_as_pythons_str_and_undefined_has_no_length() {
        let ctx = serde_json::json!({"d": {"type": "function", "ok": true, "n": null, "q": "it's"}, "l": [1.5, "a\n"]});
        assert_eq!(
            render(
                "{{ d }} {{ l|string }} {{ true }} {{ none }} {{ 2 }} {{ 'x' }}",
                ctx.clone()
            ),
            r#"{'type': 'function', 'ok': True, 'n': None, 'q': "it's"} [1.5, 'a\n'] True None 2 x"#
        );
        assert_eq!(
            render("{{ missing|length }}{{ l|length }}{{ missing }}", ctx),
            "02"
        );
    }
}
