//! `trainer_state.json` as transformers writes it, and the JSON dialect of the files around it.
//!
//! transformers saves `TrainerState` with `json.dumps(dataclasses.asdict(state), indent=2,
//! sort_keys=True) + "\n"`. The writer here produces the same bytes: keys sorted at every level,
//! two-space indent, non-ASCII escaped (`ensure_ascii`), and floats as Python's `repr` prints
//! them (`5e-05`, `1e+16`, `2.0`). The reader accepts what Python writes, including `NaN` and
//! `Infinity` (a diverged run logs `"grad_norm": NaN`), and parses floats correctly rounded, so a
//! saved state reloads bit for bit (serde_json's default float parser can be one ulp off).

use std::fs;
use std::path::Path;

use anyhow::{anyhow, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::model::weights::write_atomic;

/// transformers' `TrainerState` (5.x): the same fields under the same names.
///
/// Fields missing from a file take transformers' defaults (files from older versions lack some);
/// fields this struct does not know are ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct TrainerState {
    /// Epochs done, fractional within an epoch.
    pub epoch: f64,
    /// Optimizer steps done.
    pub global_step: u64,
    pub max_steps: u64,
    pub logging_steps: u64,
    pub eval_steps: u64,
    pub save_steps: u64,
    /// `None` only before training starts; the Trainer sets it when the loop begins.
    pub train_batch_size: Option<usize>,
    pub num_train_epochs: u64,
    pub num_input_tokens_seen: u64,
    pub total_flos: f64,
    /// One object per log call (`loss`, `learning_rate`, `eval_*`, `epoch`, `step`, ...).
    pub log_history: Vec<Map<String, Value>>,
    pub best_metric: Option<f64>,
    pub best_global_step: Option<u64>,
    /// The path of the best checkpoint folder, as the Trainer writes it (`<output_dir>/checkpoint-N`).
    pub best_model_checkpoint: Option<String>,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub is_hyper_param_search: bool,
    pub trial_name: Option<String>,
    pub trial_params: Option<Value>,
    /// Callback states by class name (`TrainerControl`, `EarlyStoppingCallback`, ...).
    pub stateful_callbacks: Value,
}

impl Default for TrainerState {
    /// The dataclass defaults (after its `__post_init__`: empty history, no callbacks).
    fn default() -> Self {
        TrainerState {
            epoch: 0.0,
            global_step: 0,
            max_steps: 0,
            logging_steps: 500,
            eval_steps: 500,
            save_steps: 500,
            train_batch_size: None,
            num_train_epochs: 0,
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: Value::Object(Map::new()),
        }
    }
}

impl TrainerState {
    /// The file's text as `TrainerState.save_to_json` writes it.
    ///
    /// Non-finite floats cannot live in a JSON value here, so a NaN or infinite `epoch`,
    /// `total_flos` or `best_metric` is written as `null` (Python would write `NaN`).
    pub fn to_json(&self) -> String {
        let value = serde_json::to_value(self).expect("TrainerState has string keys only");
        to_python_json(&value)
    }

    /// Writes `path` atomically (temporary name in the same folder, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.to_json();
        write_atomic(path, |tmp| fs::write(tmp, &text).map_err(Into::into))
    }

    pub fn load(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

/// Reads a JSON file (Python's dialect) into `T`; every error is one line naming the file.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let value =
        parse_python_json(&text).map_err(|e| anyhow!("{}: invalid JSON ({e})", path.display()))?;
    serde_json::from_value(value).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Writes `value` as Python's `json.dumps(value, indent=2, sort_keys=True) + "\n"`, atomically.
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = to_python_json(value);
    write_atomic(path, |tmp| fs::write(tmp, &text).map_err(Into::into))
}

/// `json.dumps(value, indent=2, sort_keys=True) + "\n"`, byte for byte.
pub fn to_python_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out.push('\n');
    out
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', 2 * level));
}

fn write_value(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = n.as_f64().expect("a number is u64, i64 or f64");
                out.push_str(&python_float_repr(f));
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            // Rust orders strings by UTF-8 bytes, which is code-point order, as Python sorts str.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, level + 1);
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// A string as `json.dumps` writes it with `ensure_ascii=True`: printable ASCII as is, the
/// usual short escapes, everything else as `\uXXXX` UTF-16 units.
fn write_string(out: &mut String, s: &str) {
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
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip (Rust's `{:e}` finds the same),
/// positional for decimal exponents in [-4, 16), scientific with a signed two-digit exponent
/// otherwise, and always a `.0` on integral positional values.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always writes an exponent");
    let exp: i32 = exp.parse().expect("{:e} writes a decimal exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                let zeros = "0".repeat(int_len - digits.len());
                format!("{sign}{digits}{zeros}.0")
            } else {
                format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let mantissa = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs())
    }
}

/// Parses JSON as Python's `json.loads` accepts it: also `NaN`, `Infinity` and `-Infinity`
/// (read as `null`, the only thing a JSON value can hold in their place). Floats are parsed by
/// `str::parse`, which rounds correctly; integers stay integers; a repeated key keeps the last
/// value, as in Python.
pub fn parse_python_json(text: &str) -> Result<Value, String> {
    let mut reader = Reader { text, pos: 0 };
    reader.skip_ws();
    let value = reader.value(0)?;
    reader.skip_ws();
    if reader.pos != text.len() {
        return Err(reader.error("unexpected data after the value"));
    }
    Ok(value)
}

/// Deeper nesting than any trainer file has; the bound keeps hostile input off the stack limit.
const MAX_DEPTH: usize = 128;

struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn error(&self, msg: &str) -> String {
        let before = &self.text[..self.pos.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{msg} at line {line} column {column}")
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected '{}'", byte as char)))
        }
    }

    fn literal(&mut self, word: &str, value: Value) -> Result<Value, String> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.error("expected a value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'N') => self.literal("NaN", Value::Null),
            Some(b'I') => self.literal("Infinity", Value::Null),
            Some(b'-') if self.text[self.pos..].starts_with("-Infinity") => {
                self.literal("-Infinity", Value::Null)
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("expected a value")),
            None => Err(self.error("unexpected end of input")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, String> {
        self.pos += 1;
        let mut map = Map::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a string key"));
            }
            let key = self.string()?;
            self.skip_ws();
            self.expect(b':')?;
            self.skip_ws();
            let value = self.value(depth + 1)?;
            // A repeated key keeps its first position and its last value, as a Python dict does
            // (the map preserves insertion order: serde_json's preserve_order feature).
            map.insert(key, value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, String> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.pos += 1; // the opening quote
        let mut out = String::new();
        loop {
            // Copy the run up to the next quote, escape or control character in one go; those
            // are ASCII, so the run ends on a character boundary.
            let start = self.pos;
            while matches!(self.peek(), Some(b) if b != b'"' && b != b'\\' && b >= 0x20) {
                self.pos += 1;
            }
            out.push_str(&self.text[start..self.pos]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    self.escape(&mut out)?;
                }
                Some(_) => return Err(self.error("control character in a string")),
                None => return Err(self.error("unterminated string")),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), String> {
        let Some(c) = self.peek() else {
            return Err(self.error("unterminated string"));
        };
        self.pos += 1;
        match c {
            b'"' => out.push('"'),
            b'\\' => out.push('\\'),
            b'/' => out.push('/'),
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let unit = self.hex4()?;
                let c = if (0xD800..0xDC00).contains(&unit)
                    && self.text[self.pos..].starts_with("\\u")
                {
                    let save = self.pos;
                    self.pos += 2;
                    let low = self.hex4()?;
                    if (0xDC00..0xE000).contains(&low) {
                        char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                    } else {
                        self.pos = save;
                        None
                    }
                } else {
                    char::from_u32(unit)
                };
                // Python keeps a lone surrogate; a Rust string cannot hold one.
                out.push(c.unwrap_or('\u{FFFD}'));
            }
            _ => {
                self.pos -= 1;
                return Err(self.error("invalid escape"));
            }
        }
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let hex = self.text.get(self.pos..self.pos + 4).unwrap_or("");
        match u32::from_str_radix(hex, 16) {
            Ok(v) if hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                self.pos += 4;
                Ok(v)
            }
            _ => Err(self.error("invalid \\u escape")),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        let int_digits = self.digits();
        if int_digits == 0 {
            return Err(self.error("expected a digit"));
        }
        if int_digits > 1 && self.text.as_bytes()[int_start] == b'0' {
            self.pos = int_start;
            return Err(self.error("leading zero in a number"));
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            float = true;
            if self.digits() == 0 {
                return Err(self.error("expected a digit after '.'"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            float = true;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("expected a digit in the exponent"));
            }
        }
        let token = &self.text[start..self.pos];
        if !float {
            if let Ok(u) = token.parse::<u64>() {
                return Ok(Value::Number(u.into()));
            }
            if let Ok(i) = token.parse::<i64>() {
                return Ok(Value::Number(i.into()));
            }
            // Beyond 64 bits Python keeps an exact int; the nearest float is the best left here.
        }
        let f: f64 = token.parse().map_err(|_| self.error("invalid number"))?;
        // An overflowing literal (1e999) is infinite in Python too; it becomes null like Infinity.
        Ok(Number::from_f64(f).map_or(Value::Null, Value::Number))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        // Expected strings: Python 3.11 repr().
        let cases = [
            (5e-05, "5e-05"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (1.2345e16, "1.2345e+16"),
            (1e22, "1e+22"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (2.0, "2.0"),
            (-12.5, "-12.5"),
            (0.3333333333333333, "0.3333333333333333"),
            (3.0517578125e-05, "3.0517578125e-05"),
            (0.1 + 0.2, "0.30000000000000004"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn strings_escape_as_ensure_ascii() {
        let mut out = String::new();
        write_string(&mut out, "caf\u{e9} \u{1F600} \"q\" \\ \n\t\u{7f}/");
        // json.dumps("café 😀 \"q\" \\ \n\t\x7f/")
        assert_eq!(out, r#""caf\u00e9 \ud83d\ude00 \"q\" \\ \n\t\u007f/""#);
        assert_eq!(
            parse_python_json(&out).unwrap(),
            Value::String("caf\u{e9} \u{1F600} \"q\" \\ \n\t\u{7f}/".into())
        );
    }

    #[test]
    fn floats_reload_bit_for_bit() {
        // xorshift over [0, 10): about 8% of these come back one ulp off through serde_json's
        // default parser; correctly rounded parsing must return every one exactly.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = (x >> 11) as f64 / (1u64 << 53) as f64 * 10.0;
            for v in [f, f * 1e-7, f * 1e18] {
                let text = python_float_repr(v);
                let back = parse_python_json(&text).unwrap().as_f64().unwrap();
                assert_eq!(back.to_bits(), v.to_bits(), "{text}");
            }
        }
    }

    #[test]
    fn reads_python_dialect() {
        let v = parse_python_json(
            "{\"a\": NaN, \"b\": [Infinity, -Infinity, -0.5, 7, -3, 1e2], \"a\": 1, \"s\": \"\\ud83d\\ude00\"}",
        )
        .unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "b", "s"]);
        assert_eq!(v["a"], Value::from(1u64));
        assert_eq!(v["b"][0], Value::Null);
        assert_eq!(v["b"][2].as_f64(), Some(-0.5));
        assert!(v["b"][3].is_u64() && v["b"][4].is_i64() && v["b"][5].is_f64());
        assert_eq!(v["s"], Value::String("\u{1F600}".into()));
        for bad in [
            "{\"a\":1,}",
            "[01]",
            "[1.]",
            "\"abc",
            "{\"a\" 1}",
            "[1] x",
            "tru",
            "",
        ] {
            let err = parse_python_json(bad).unwrap_err();
            assert!(err.contains("line 1 column"), "{bad}: {err}");
        }
        let deep = "[".repeat(MAX_DEPTH + 2);
        assert!(parse_python_json(&deep)
            .unwrap_err()
            .contains("nested too deeply"));
    }

    #[test]
    fn defaults_are_the_dataclass_defaults() {
        // TrainerState().__dict__ in transformers 5.
        let d: TrainerState = serde_json::from_str("{}").unwrap();
        assert_eq!(d, TrainerState::default());
        assert_eq!(
            (d.logging_steps, d.eval_steps, d.save_steps),
            (500, 500, 500)
        );
        assert!(d.is_local_process_zero && d.is_world_process_zero);
        assert_eq!(d.stateful_callbacks, serde_json::json!({}));
    }
}
