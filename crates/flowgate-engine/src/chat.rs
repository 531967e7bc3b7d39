//! Chat templates: the model's own Jinja template (from `tokenizer.chat_template` in GGUF, or
//! `tokenizer_config.json` / `chat_template.jinja` / `chat_template.json` in an HF directory)
//! rendered with minijinja configured the way transformers' `apply_chat_template` configures
//! jinja2.
//!
//! Design choices:
//! - `trim_blocks` and `lstrip_blocks` on, trailing newline of the template dropped (jinja2's
//!   default), lenient undefined values (jinja2's default `Undefined`).
//! - Python string/dict/list methods (`.strip()`, `.split()`, `.startswith()`, `.items()`, ...)
//!   come from `minijinja-contrib`'s `pycompat` callback.
//! - `tojson` is replaced by a filter that writes exactly what Python's
//!   `json.dumps(x, ensure_ascii=False)` writes (transformers overrides jinja2's own `tojson`
//!   the same way): `", "` / `": "` separators, optional `indent`, `separators`, `sort_keys`.
//! - `raise_exception(msg)` fails the render with `msg`; `strftime_now(fmt)` formats the render
//!   time (UTC: no time-zone database is used).
//! - The variables are the ones transformers passes: `messages`, `add_generation_prompt`,
//!   `bos_token`, `eos_token`, `tools = none`, `documents = none`.
//! - No default template is invented: a model without one gets `None`, and callers feed raw
//!   text.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flowgate_formats::gguf::GgufFile;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use serde::Serialize;
use serde_json::Value as Json;

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0:#}")]
    Template(#[from] minijinja::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

const NAME: &str = "chat_template";
/// Context variable holding the render time for `strftime_now`.
const NOW_VAR: &str = "__flowgate_now_unix";

/// A compiled chat template with the BOS/EOS strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are the strings the template sees.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_formatter(py_formatter);
        env.add_template_owned(NAME, neutralise_generation_tags(source))?;
        Ok(ChatTemplate {
            env,
            bos: bos_token.to_string(),
            eos: eos_token.to_string(),
        })
    }

    /// `tokenizer.chat_template` of a GGUF file; BOS/EOS strings from its vocabulary.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Self>, ChatError> {
        let src = match g.get("tokenizer.chat_template") {
            None => return Ok(None),
            Some(v) => v.as_str().ok_or_else(|| {
                ChatError::Invalid("tokenizer.chat_template is not a string".into())
            })?,
        };
        let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
        let tok_str = |key: &str| -> String {
            let id = g.get(key).and_then(|v| v.as_u64());
            match (id, tokens) {
                (Some(id), Some(t)) => usize::try_from(id)
                    .ok()
                    .and_then(|i| t.get(i))
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            }
        };
        let bos = tok_str("tokenizer.ggml.bos_token_id");
        let eos = tok_str("tokenizer.ggml.eos_token_id");
        Self::new(src, &bos, &eos).map(Some)
    }

    /// From an HF directory: `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// `{name, template}` of which "default" is taken), else `chat_template.jinja`, else
    /// `chat_template.json`. BOS/EOS strings from `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>, ChatError> {
        let tcfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let mut src = template_from_json(tcfg.get("chat_template"))?;
        if src.is_none() {
            let p = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&p) {
                Ok(s) => src = Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ChatError::Io { path: p, source: e }),
            }
        }
        if src.is_none() {
            if let Some(j) = read_json(&dir.join("chat_template.json"))? {
                src = template_from_json(j.get("chat_template"))?;
            }
        }
        let Some(src) = src else { return Ok(None) };
        let bos = crate::tokenizer::special_token_str(tcfg.get("bos_token")).unwrap_or("");
        let eos = crate::tokenizer::special_token_str(tcfg.get("eos_token")).unwrap_or("");
        Self::new(&src, bos, eos).map(Some)
    }

    pub fn bos_token(&self) -> &str {
        &self.bos
    }

    pub fn eos_token(&self) -> &str {
        &self.eos
    }

    /// Renders a conversation; with `add_generation_prompt` the template opens the assistant
    /// turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.render_at(messages, add_generation_prompt, now)
    }

    /// [`render`](Self::render) with `strftime_now` fixed to `now_unix` (seconds, UTC).
    pub fn render_at(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        now_unix: i64,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template(NAME)?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
            tools => Value::from(()),
            documents => Value::from(()),
            __flowgate_now_unix => now_unix,
        };
        Ok(tmpl.render(ctx)?)
    }
}

fn read_json(path: &Path) -> Result<Option<Json>, ChatError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ChatError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ChatError::Json {
            path: path.to_path_buf(),
            source: e,
        })
}

fn template_from_json(v: Option<&Json>) -> Result<Option<String>, ChatError> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let named = |name: &str| {
                list.iter().find_map(|e| {
                    (e.get("name")?.as_str()? == name)
                        .then(|| e.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            match named("default") {
                Some(t) => Ok(Some(t)),
                None => Err(ChatError::Invalid(
                    "chat_template is a list without a \"default\" entry".into(),
                )),
            }
        }
        Some(_) => Err(ChatError::Invalid(
            "chat_template is neither a string nor a list".into(),
        )),
    }
}

/// Prints values the way Python's `str()` does where it differs from minijinja: `True`,
/// `False`, `None`.
fn py_formatter(out: &mut minijinja::Output, state: &State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(Error::from),
        ValueKind::None => out.write_str("None").map_err(Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// transformers' `{% generation %}...{% endgeneration %}` (assistant-token tracking) renders its
/// body unchanged; minijinja has no such tag, so it becomes `{% if true %}...{% endif %}`,
/// keeping the whitespace-control markers.
fn neutralise_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(state: &State, fmt: String) -> Result<String, Error> {
    let now = state.lookup(NOW_VAR).and_then(|v| v.as_i64()).unwrap_or(0);
    Ok(strftime(now, &fmt))
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31) (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C/Python `strftime` for a UTC timestamp (common directives; unknown ones are copied).
pub fn strftime(unix: i64, fmt: &str) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let month = MONTHS[(m as usize - 1) % 12];
    let day_name = DAYS[weekday % 7];
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m as usize - 1) % 12] + d + u32::from(is_leap && m > 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&day_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python `json.dumps(value, ensure_ascii=..., indent=..., separators=..., sort_keys=...)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an int or a string",
                    )
                })?;
                Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() && !s.is_undefined() => {
            let a = s.get_item_by_index(0)?;
            let b = s.get_item_by_index(1)?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` for the common cases (shortest round-trip digits).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python: 1e+16, 1.5e-05
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn newline_indent(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                if v.to_string().contains(['.', 'e', 'E', 'n', 'i']) {
                    out.push_str(&py_float(f64::try_from(v.clone()).unwrap_or(i as f64)));
                } else {
                    out.push_str(&i.to_string());
                }
            } else if let Ok(f) = f64::try_from(v.clone()) {
                out.push_str(&py_float(f));
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String => write_json_str(v.as_str().unwrap_or(""), opts.ensure_ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                match k.as_str() {
                    Some(s) => write_json_str(s, opts.ensure_ascii, out),
                    None => write_json_str(&k.to_string(), opts.ensure_ascii, out),
                }
                out.push_str(&opts.key_sep);
                write_json(&v.get_item(k)?, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        _ => write_json_str(&v.to_string(), opts.ensure_ascii, out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_if_blocks() {
        assert_eq!(
            neutralise_generation_tags("a{%- generation %}b{% endgeneration -%}c{{ x }}{% if y %}"),
            "a{%- if true %}b{% endif -%}c{{ x }}{% if y %}"
        );
    }

    #[test]
    fn civil_dates() {
        // 2024-07-26 00:00:00 UTC = 1721952000
        assert_eq!(civil_from_days(1_721_952_000 / 86_400), (2024, 7, 26));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }
}
