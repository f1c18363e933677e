//! JSON as Python's `json` module writes and reads it, for the files the Trainer writes with
//! `json.dumps` (`trainer_state.json`, the `*_results.json` files, our `log.jsonl`).
//!
//! Python's floats include inf and NaN, which `json.dumps` writes as `Infinity`, `-Infinity`
//! and `NaN` (not JSON, but what `json.loads` reads back), and a fp16 run logs them: the
//! gradient norm of an overflowed step is inf. serde_json's `Value` cannot hold them (it turns
//! them into `null`), so these files go through [`PyValue`], a JSON value with Python's number
//! types: ints, and floats of any value. The writer produces `json.dumps`' bytes (sorted keys
//! and two-space indents for the files, its one-line form for log lines; non-ASCII escaped,
//! floats as `repr` prints them: `5e-05`, `1e+16`, `2.0`). The reader accepts what Python
//! writes and parses floats correctly rounded, so a saved value reloads bit for bit
//! (serde_json's default float parser can be one ulp off).

use serde_json::{Number, Value};

use crate::train::metrics::python_float_repr;

/// A JSON value as Python's `json.loads` returns it.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    Null,
    Bool(bool),
    /// An integer (one of 64 bits, signed or not, as [`Number`] holds them).
    Int(i128),
    /// A float, inf and NaN included.
    Float(f64),
    String(String),
    List(Vec<PyValue>),
    Dict(PyDict),
}

/// A JSON object as a Python dict holds it: keys in insertion order, equal to another with the
/// same items in any order.
#[derive(Clone, Debug, Default)]
pub struct PyDict(Vec<(String, PyValue)>);

impl PartialEq for PyDict {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl PyDict {
    pub fn new() -> Self {
        PyDict(Vec::new())
    }

    /// Sets `key` to `value`: a new key goes last, a present one keeps its place.
    pub fn insert(&mut self, key: impl Into<String>, value: PyValue) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn remove(&mut self, key: &str) -> Option<PyValue> {
        let at = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(at).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &PyValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Named floats (metrics), in order.
    pub fn of_floats(entries: &[(String, f64)]) -> Self {
        entries
            .iter()
            .map(|(k, v)| (k.clone(), PyValue::Float(*v)))
            .collect()
    }
}

impl FromIterator<(String, PyValue)> for PyDict {
    fn from_iter<I: IntoIterator<Item = (String, PyValue)>>(items: I) -> Self {
        let mut dict = PyDict::new();
        for (k, v) in items {
            dict.insert(k, v);
        }
        dict
    }
}

impl PyValue {
    /// An int's or a float's value.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            PyValue::Int(i) => Some(i as f64),
            PyValue::Float(x) => Some(x),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            PyValue::Int(i) => i64::try_from(i).ok(),
            _ => None,
        }
    }

    /// As serde_json holds it, to deserialize into a Rust type: a non-finite float becomes
    /// `null`, the only thing a `Value` can hold in its place.
    pub fn to_value(&self) -> Value {
        match self {
            PyValue::Null => Value::Null,
            PyValue::Bool(b) => Value::Bool(*b),
            PyValue::Int(i) => match (u64::try_from(*i), i64::try_from(*i)) {
                (Ok(u), _) => Value::from(u),
                (_, Ok(i)) => Value::from(i),
                _ => Number::from_f64(*i as f64).map_or(Value::Null, Value::Number),
            },
            PyValue::Float(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
            PyValue::String(s) => Value::String(s.clone()),
            PyValue::List(items) => Value::Array(items.iter().map(PyValue::to_value).collect()),
            PyValue::Dict(d) => Value::Object(
                d.iter()
                    .map(|(k, v)| (k.to_string(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

impl From<&Value> for PyValue {
    fn from(value: &Value) -> Self {
        match value {
            Value::Null => PyValue::Null,
            Value::Bool(b) => PyValue::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => PyValue::Int(u.into()),
                (_, Some(i)) => PyValue::Int(i.into()),
                _ => PyValue::Float(n.as_f64().expect("a number is u64, i64 or f64")),
            },
            Value::String(s) => PyValue::String(s.clone()),
            Value::Array(items) => PyValue::List(items.iter().map(PyValue::from).collect()),
            Value::Object(map) => PyValue::Dict(
                map.iter()
                    .map(|(k, v)| (k.clone(), PyValue::from(v)))
                    .collect(),
            ),
        }
    }
}

/// `json.dumps(value, indent=2, sort_keys=True) + "\n"`, byte for byte: how the Trainer writes
/// `trainer_state.json`.
pub fn dumps_file(value: &PyValue) -> String {
    let mut out = dumps_indented(value, 2);
    out.push('\n');
    out
}

/// `json.dumps(value, indent=indent, sort_keys=True)`, byte for byte (no final newline:
/// `Trainer.save_metrics` writes the `*_results.json` files with `json.dump(indent=4)`).
pub fn dumps_indented(value: &PyValue, indent: usize) -> String {
    let mut out = String::new();
    write_value(
        &mut out,
        value,
        Some(Indent {
            level: 0,
            width: indent,
        }),
    );
    out
}

/// Where the indented form is: nesting level and spaces per level.
#[derive(Clone, Copy)]
struct Indent {
    level: usize,
    width: usize,
}

impl Indent {
    fn inner(self) -> Indent {
        Indent {
            level: self.level + 1,
            ..self
        }
    }
}

/// `json.dumps(value)`, byte for byte: one line, keys in their order, `", "` and `": "` between
/// items.
pub fn dumps_line(value: &PyValue) -> String {
    let mut out = String::new();
    write_value(&mut out, value, None);
    out
}

/// A float as `json.dumps` writes it: `repr`, but for the three values JSON has no literal for.
pub fn json_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        python_float_repr(x)
    }
}

/// Before an item of a container: a new line indented to `level` (indented form), or the
/// separator after the first item (one-line form).
fn item_start(out: &mut String, level: Option<Indent>, first: bool) {
    match level {
        Some(Indent { level, width }) => {
            if !first {
                out.push(',');
            }
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * level));
        }
        None if !first => out.push_str(", "),
        None => {}
    }
}

/// Writes `value`; `level` is the indentation level in the indented, key-sorted form, `None`
/// for the one-line form.
fn write_value(out: &mut String, value: &PyValue, level: Option<Indent>) {
    let inner = level.map(Indent::inner);
    match value {
        PyValue::Null => out.push_str("null"),
        PyValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        PyValue::Int(i) => out.push_str(&i.to_string()),
        PyValue::Float(x) => out.push_str(&json_float(*x)),
        PyValue::String(s) => write_string(out, s),
        PyValue::List(items) if items.is_empty() => out.push_str("[]"),
        PyValue::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                item_start(out, inner, i == 0);
                write_value(out, item, inner);
            }
            if let Some(level) = level {
                item_start(out, Some(level), true);
            }
            out.push(']');
        }
        PyValue::Dict(map) if map.0.is_empty() => out.push_str("{}"),
        PyValue::Dict(map) => {
            let mut entries: Vec<(&str, &PyValue)> = map.iter().collect();
            if level.is_some() {
                // Rust orders strings by UTF-8 bytes, which is code-point order, as Python
                // sorts str.
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                item_start(out, inner, i == 0);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, inner);
            }
            if let Some(level) = level {
                item_start(out, Some(level), true);
            }
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

/// Parses JSON as Python's `json.loads` accepts it: also `NaN`, `Infinity` and `-Infinity`.
/// Floats are parsed by `str::parse`, which rounds correctly; integers stay integers; a repeated
/// key keeps the last value, as in Python. Errors name the line and column.
pub fn loads(text: &str) -> Result<PyValue, String> {
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

    fn literal(&mut self, word: &str, value: PyValue) -> Result<PyValue, String> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.error("expected a value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<PyValue, String> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(PyValue::String),
            Some(b't') => self.literal("true", PyValue::Bool(true)),
            Some(b'f') => self.literal("false", PyValue::Bool(false)),
            Some(b'n') => self.literal("null", PyValue::Null),
            Some(b'N') => self.literal("NaN", PyValue::Float(f64::NAN)),
            Some(b'I') => self.literal("Infinity", PyValue::Float(f64::INFINITY)),
            Some(b'-') if self.text[self.pos..].starts_with("-Infinity") => {
                self.literal("-Infinity", PyValue::Float(f64::NEG_INFINITY))
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("expected a value")),
            None => Err(self.error("unexpected end of input")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<PyValue, String> {
        self.pos += 1;
        let mut map = PyDict::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(PyValue::Dict(map));
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
            // A repeated key keeps its first position and its last value, as a Python dict does.
            map.insert(key, value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(PyValue::Dict(map));
                }
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<PyValue, String> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(PyValue::List(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(PyValue::List(items));
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

    fn number(&mut self) -> Result<PyValue, String> {
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
            match token.parse::<i128>() {
                Ok(i) if i64::try_from(i).is_ok() || u64::try_from(i).is_ok() => {
                    return Ok(PyValue::Int(i));
                }
                // Beyond 64 bits Python keeps an exact int; the nearest float is the best left.
                _ => {}
            }
        }
        let f: f64 = token.parse().map_err(|_| self.error("invalid number"))?;
        // An overflowing literal (1e999) is infinite, as in Python.
        Ok(PyValue::Float(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_files_are_json_dump_with_indent_4() {
        // Python 3.11: json.dumps({...}, indent=4, sort_keys=True).
        let nested: PyDict = [(
            "b".to_string(),
            PyValue::List(vec![PyValue::Int(1), PyValue::Int(2)]),
        )]
        .into_iter()
        .collect();
        let metrics: PyDict = [
            ("nested".to_string(), PyValue::Dict(nested)),
            (
                "eval_samples_per_second".to_string(),
                PyValue::Float(f64::INFINITY),
            ),
            ("eval_loss".to_string(), PyValue::Float(0.5)),
            ("epoch".to_string(), PyValue::Float(1.0)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            dumps_indented(&PyValue::Dict(metrics), 4),
            "{\n    \"epoch\": 1.0,\n    \"eval_loss\": 0.5,\n    \"eval_samples_per_second\": \
             Infinity,\n    \"nested\": {\n        \"b\": [\n            1,\n            2\n        ]\n    \
             }\n}"
        );
    }

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
            assert_eq!(json_float(x), want, "{x:e}");
        }
        // json.dumps([float('nan'), float('inf'), -float('inf')])
        let specials = PyValue::List(vec![
            PyValue::Float(f64::NAN),
            PyValue::Float(f64::INFINITY),
            PyValue::Float(f64::NEG_INFINITY),
        ]);
        assert_eq!(dumps_line(&specials), "[NaN, Infinity, -Infinity]");
    }

    #[test]
    fn dicts_compare_as_python_dicts() {
        let ab: PyDict = [("a", 1), ("b", 2)]
            .map(|(k, v)| (k.to_string(), PyValue::Int(v)))
            .into_iter()
            .collect();
        let mut ba = PyDict::new();
        ba.insert("b", PyValue::Int(2));
        ba.insert("a", PyValue::Int(0));
        assert_ne!(ab, ba);
        ba.insert("a", PyValue::Int(1));
        assert_eq!(ab, ba);
        assert_eq!(ba.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["b", "a"]);
        ba.insert("c", PyValue::Null);
        assert_ne!(ab, ba);
        assert_eq!(ba.remove("c"), Some(PyValue::Null));
        assert_eq!(ab, ba);
    }

    #[test]
    fn dumps_as_python() {
        let mut inner = PyDict::new();
        inner.insert("z", PyValue::Int(-3));
        inner.insert("a", PyValue::List(vec![]));
        let mut d = PyDict::new();
        d.insert("loss", PyValue::Float(0.5));
        d.insert("grad_norm", PyValue::Float(f64::INFINITY));
        d.insert("nested", PyValue::Dict(inner));
        d.insert(
            "list",
            PyValue::List(vec![PyValue::Null, PyValue::Bool(true)]),
        );
        d.insert("empty", PyValue::Dict(PyDict::new()));
        let d = PyValue::Dict(d);
        // d = {'loss': 0.5, 'grad_norm': float('inf'), 'nested': {'z': -3, 'a': []},
        //      'list': [None, True], 'empty': {}}; json.dumps(d) and
        // json.dumps(d, indent=2, sort_keys=True) + "\n" in Python 3.12.
        assert_eq!(
            dumps_line(&d),
            r#"{"loss": 0.5, "grad_norm": Infinity, "nested": {"z": -3, "a": []}, "list": [null, true], "empty": {}}"#
        );
        assert_eq!(
            dumps_file(&d),
            "{\n  \"empty\": {},\n  \"grad_norm\": Infinity,\n  \"list\": [\n    null,\n    true\n  \
             ],\n  \"loss\": 0.5,\n  \"nested\": {\n    \"a\": [],\n    \"z\": -3\n  }\n}\n"
        );
    }

    #[test]
    fn strings_escape_as_ensure_ascii() {
        let mut out = String::new();
        write_string(&mut out, "caf\u{e9} \u{1F600} \"q\" \\ \n\t\u{7f}/");
        // json.dumps("café 😀 \"q\" \\ \n\t\x7f/")
        assert_eq!(out, r#""caf\u00e9 \ud83d\ude00 \"q\" \\ \n\t\u007f/""#);
        assert_eq!(
            loads(&out).unwrap(),
            PyValue::String("caf\u{e9} \u{1F600} \"q\" \\ \n\t\u{7f}/".into())
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
                let text = json_float(v);
                let back = loads(&text).unwrap().as_f64().unwrap();
                assert_eq!(back.to_bits(), v.to_bits(), "{text}");
            }
        }
    }

    #[test]
    fn reads_python_dialect() {
        let v = loads(
            "{\"a\": NaN, \"b\": [Infinity, -Infinity, -0.5, 7, -3, 1e2, 1e999, 18446744073709551615], \"a\": 1, \"s\": \"\\ud83d\\ude00\"}",
        )
        .unwrap();
        let PyValue::Dict(d) = &v else {
            panic!("{v:?}")
        };
        let keys: Vec<&str> = d.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "s"]);
        assert_eq!(d.get("a"), Some(&PyValue::Int(1)));
        let PyValue::List(b) = d.get("b").unwrap() else {
            panic!("{v:?}")
        };
        assert_eq!(b[0], PyValue::Float(f64::INFINITY));
        assert_eq!(b[1], PyValue::Float(f64::NEG_INFINITY));
        assert_eq!(b[2], PyValue::Float(-0.5));
        assert_eq!(b[3..5], [PyValue::Int(7), PyValue::Int(-3)]);
        assert_eq!(b[5], PyValue::Float(100.0));
        assert_eq!(b[6], PyValue::Float(f64::INFINITY));
        assert_eq!(b[7], PyValue::Int(u64::MAX.into()));
        assert_eq!(d.get("s"), Some(&PyValue::String("\u{1F600}".into())));
        assert!(matches!(loads("NaN"), Ok(PyValue::Float(x)) if x.is_nan()));
        // serde_json's view: non-finite floats are null, ints stay ints.
        let json = v.to_value();
        assert_eq!(json["b"][0], Value::Null);
        assert!(json["b"][3].is_u64() && json["b"][4].is_i64() && json["b"][5].is_f64());
        assert_eq!(PyValue::from(&json).to_value(), json);
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
            let err = loads(bad).unwrap_err();
            assert!(err.contains("line 1 column"), "{bad}: {err}");
        }
        let deep = "[".repeat(MAX_DEPTH + 2);
        assert!(loads(&deep).unwrap_err().contains("nested too deeply"));
    }
}
