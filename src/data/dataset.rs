//! Dataset files (CSV, TSV, JSONL) read into texts and labels, and labels mapped to class ids the
//! way transformers' `run_glue.py` maps them.
//!
//! Every error about a file's content is one line naming the file, the line and, where it
//! applies, the column: a 67,000-row file is fixed in an editor, not by guessing.

use std::collections::HashSet;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// A dataset file's format, from its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated, RFC 4180 quoting.
    Csv,
    /// Tab-separated as GLUE writes it: no quoting at all.
    Tsv,
    /// JSON Lines: one object per line (`.jsonl`, and `.json` as transformers' examples write it).
    Jsonl,
}

impl Format {
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            Some("jsonl" | "json") => Ok(Format::Jsonl),
            _ => bail!(
                "{}: unknown dataset format; the name must end in .csv, .tsv, .jsonl or .json",
                path.display()
            ),
        }
    }
}

/// Which columns hold what (`--text-column`, `--text-pair-column`, `--label-column`); `None`
/// picks a default from the header (see [`read_dataset`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Columns {
    pub text: Option<String>,
    pub text_pair: Option<String>,
    pub label: Option<String>,
}

/// A dataset file's rows: texts as written, labels as strings (see [`LabelMap`] for ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDataset {
    pub path: PathBuf,
    pub texts: Vec<String>,
    /// The second segment of a sentence-pair task.
    pub pairs: Option<Vec<String>>,
    /// Trimmed of surrounding whitespace: a label is a name, and pandas (which run_glue reads
    /// CSV with) reads `" 1"` as `1`.
    pub labels: Option<Vec<String>>,
    /// The 1-based line each row starts on, for error messages.
    pub lines: Vec<usize>,
}

impl RawDataset {
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The pair text of row `i`, if the dataset has pairs.
    pub fn pair(&self, i: usize) -> Option<&str> {
        self.pairs.as_ref().map(|p| p[i].as_str())
    }

    /// `"path: line N"` of row `i`, the prefix of an error about that row.
    pub fn location(&self, i: usize) -> String {
        format!("{}: line {}", self.path.display(), self.lines[i])
    }
}

/// Text column names tried in order when `--text-column` is not given.
const TEXT_DEFAULTS: [&str; 2] = ["sentence", "text"];
const LABEL_DEFAULT: &str = "label";

/// Sentence-pair layouts recognized when neither text column is given: GLUE's pair tasks as
/// run_glue's `task_to_keys` names them, and MRPC's original TSV (`#1 String`, `#2 String`,
/// label `Quality`). The third field is a label column used when there is no `label` column.
const PAIR_LAYOUTS: [(&str, &str, Option<&str>); 5] = [
    ("sentence1", "sentence2", None),
    ("question1", "question2", None),
    ("question", "sentence", None),
    ("premise", "hypothesis", None),
    ("#1 String", "#2 String", Some("Quality")),
];

/// Reads a dataset file. Columns are found by name in the header (for JSON Lines, the keys):
///
/// - text: `cols.text`, else a pair layout's first column (`sentence1`/`sentence2`, …, see
///   `PAIR_LAYOUTS`) when no text column is given, else `sentence`, else `text`;
/// - pair: `cols.text_pair`, else the pair layout's second column, else none;
/// - label: `cols.label`, else `label`, else the layout's own (MRPC's `Quality`), else none.
///
/// Labels are read whenever the label column exists. With `require_labels` every row needs one;
/// without it, a label column that is empty in every row gives `labels: None` (a test file),
/// and one that is empty in some rows only is an error (a broken file).
///
/// Blank lines are skipped, as pandas and the `datasets` library skip them. A name the header
/// repeats means its first column.
pub fn read_dataset(path: &Path, cols: &Columns, require_labels: bool) -> Result<RawDataset> {
    let format = Format::from_path(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = decode_utf8(path, &bytes)?;
    let table = match format {
        Format::Tsv => Table::delimited(path, tsv_records(text))?,
        Format::Csv => Table::delimited(path, csv_records(path, text)?)?,
        Format::Jsonl => Table::json(path, text)?,
    };
    let chosen = choose_columns(path, &table.names(), cols, require_labels)?;
    let texts = required_cells(path, &table, &chosen.text)?;
    let pairs = chosen
        .pair
        .as_deref()
        .map(|p| required_cells(path, &table, p))
        .transpose()?;
    let labels = match &chosen.label {
        Some(name) => read_labels(path, &table, name, require_labels)?,
        None => None,
    };
    Ok(RawDataset {
        path: path.to_path_buf(),
        texts,
        pairs,
        labels,
        lines: table.lines(),
    })
}

/// An error at `line` (and `column`, 1-based) of `path`.
fn at(path: &Path, line: usize, column: Option<usize>, msg: impl Display) -> anyhow::Error {
    match column {
        Some(c) => anyhow!("{}: line {line}, column {c}: {msg}", path.display()),
        None => anyhow!("{}: line {line}: {msg}", path.display()),
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The file as text, without a UTF-8 byte-order mark (GLUE's MRPC files start with one).
fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let body = bytes.strip_prefix(BOM).unwrap_or(bytes);
    std::str::from_utf8(body).map_err(|e| {
        let offset = bytes.len() - body.len() + e.valid_up_to();
        let before = &bytes[..offset];
        let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let hint = if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
            "the file looks like UTF-16; save it as UTF-8"
        } else {
            "the file must be UTF-8"
        };
        anyhow!(
            "{}: line {line}, byte {}: invalid UTF-8 (0x{:02X}); {hint}",
            path.display(),
            offset - line_start + 1,
            bytes[offset]
        )
    })
}

/// One record of a delimited file: the line it starts on and its fields.
type Record = (usize, Vec<String>);

/// GLUE's TSV: every line split on tabs, quotes ordinary characters, `\r\n` tolerated.
fn tsv_records(text: &str) -> Vec<Record> {
    text.split('\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix('\r').unwrap_or(line)))
        .filter(|(_, line)| !line.is_empty())
        .map(|(n, line)| (n, line.split('\t').map(str::to_owned).collect()))
        .collect()
}

/// RFC 4180 CSV. Stricter than RFC-lenient readers where leniency hides a broken file: a quoted
/// field that never closes, or text after a closing quote, is an error rather than a row that
/// silently swallows the lines after it. A `"` inside an unquoted field is kept, as Python's csv
/// module keeps it.
fn csv_records(path: &Path, text: &str) -> Result<Vec<Record>> {
    let mut reader = CsvReader {
        chars: text.chars().peekable(),
        line: 1,
        column: 0,
    };
    let mut records = Vec::new();
    while reader.chars.peek().is_some() {
        let line = reader.line;
        let mut fields = Vec::new();
        let blank = loop {
            let (field, quoted, end) = reader.field(path)?;
            let blank = fields.is_empty() && !quoted && field.is_empty() && end != FieldEnd::Comma;
            fields.push(field);
            if end != FieldEnd::Comma {
                break blank;
            }
        };
        if !blank {
            records.push((line, fields));
        }
    }
    Ok(records)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FieldEnd {
    Comma,
    Newline,
    Eof,
}

struct CsvReader<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    /// Line and column (1-based, in characters) of the character last read.
    line: usize,
    column: usize,
}

impl CsvReader<'_> {
    fn next(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.column = 0;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    /// Consumes `\n`, or `\r\n`, after a `\r` was read: true when it was a line end.
    fn crlf(&mut self) -> bool {
        if self.chars.peek() == Some(&'\n') {
            self.next();
            true
        } else {
            false
        }
    }

    /// One field, whether it was quoted, and what ended it.
    fn field(&mut self, path: &Path) -> Result<(String, bool, FieldEnd)> {
        if self.chars.peek() == Some(&'"') {
            self.next();
            let field = self.quoted(path)?;
            Ok((field, true, self.after_quote(path)?))
        } else {
            let (field, end) = self.unquoted();
            Ok((field, false, end))
        }
    }

    fn unquoted(&mut self) -> (String, FieldEnd) {
        let mut field = String::new();
        loop {
            match self.next() {
                None => return (field, FieldEnd::Eof),
                Some(',') => return (field, FieldEnd::Comma),
                Some('\n') => return (field, FieldEnd::Newline),
                Some('\r') if self.crlf() => return (field, FieldEnd::Newline),
                Some(c) => field.push(c),
            }
        }
    }

    /// The inside of a quoted field, its opening quote already read; `""` is one quote.
    fn quoted(&mut self, path: &Path) -> Result<String> {
        let (line, column) = (self.line, self.column);
        let mut field = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(at(
                        path,
                        line,
                        Some(column),
                        "this quoted field is never closed (a \" inside a quoted field is written \"\")",
                    ))
                }
                Some('"') if self.chars.peek() == Some(&'"') => {
                    self.next();
                    field.push('"');
                }
                Some('"') => return Ok(field),
                Some(c) => field.push(c),
            }
        }
    }

    fn after_quote(&mut self, path: &Path) -> Result<FieldEnd> {
        match self.next() {
            None => Ok(FieldEnd::Eof),
            Some(',') => Ok(FieldEnd::Comma),
            Some('\n') => Ok(FieldEnd::Newline),
            Some('\r') if self.crlf() => Ok(FieldEnd::Newline),
            Some(c) => Err(at(
                path,
                self.line,
                Some(self.column),
                format!("{c:?} after a closing quote; a \" inside a quoted field is written \"\""),
            )),
        }
    }
}

/// A file's rows, before columns are picked.
enum Table {
    /// CSV or TSV: a header and rows of as many fields.
    Delimited {
        header: Vec<String>,
        rows: Vec<Record>,
    },
    /// JSON Lines: one object per row, its keys the columns.
    Json {
        rows: Vec<(usize, Map<String, Value>)>,
    },
}

impl Table {
    fn delimited(path: &Path, records: Vec<Record>) -> Result<Table> {
        let mut records = records.into_iter();
        let Some((_, header)) = records.next() else {
            bail!("{}: empty file (no header, no rows)", path.display());
        };
        let rows: Vec<Record> = records.collect();
        if rows.is_empty() {
            bail!("{}: no rows, only a header", path.display());
        }
        for (line, fields) in &rows {
            if fields.len() != header.len() {
                return Err(at(
                    path,
                    *line,
                    None,
                    format!(
                        "{} fields, expected {} as in the header",
                        fields.len(),
                        header.len()
                    ),
                ));
            }
        }
        Ok(Table::Delimited { header, rows })
    }

    fn json(path: &Path, text: &str) -> Result<Table> {
        let mut rows = Vec::new();
        for (i, line) in text.split('\n').enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if rows.is_empty() && line.trim_start().starts_with('[') {
                bail!(
                    "{}: line {}: this looks like a JSON array; expected JSON Lines, one object per line",
                    path.display(),
                    i + 1
                );
            }
            rows.push((i + 1, json_object(path, i + 1, line)?));
        }
        if rows.is_empty() {
            bail!("{}: no rows (no JSON objects)", path.display());
        }
        Ok(Table::Json { rows })
    }

    /// The column names: the header, or every key in order of first appearance.
    fn names(&self) -> Vec<String> {
        match self {
            Table::Delimited { header, .. } => header.clone(),
            Table::Json { rows } => {
                let mut seen = HashSet::new();
                rows.iter()
                    .flat_map(|(_, obj)| obj.keys())
                    .filter(|k| seen.insert(k.as_str()))
                    .cloned()
                    .collect()
            }
        }
    }

    fn lines(&self) -> Vec<usize> {
        match self {
            Table::Delimited { rows, .. } => rows.iter().map(|r| r.0).collect(),
            Table::Json { rows } => rows.iter().map(|r| r.0).collect(),
        }
    }

    /// Column `name` of every row, with its line; `None` where a JSON row lacks the key or has
    /// `null`.
    fn column(&self, path: &Path, name: &str) -> Result<Vec<(usize, Option<String>)>> {
        match self {
            Table::Delimited { header, rows } => {
                let Some(col) = header.iter().position(|h| h == name) else {
                    bail!("{}: no column {name:?}", path.display());
                };
                Ok(rows
                    .iter()
                    .map(|(line, fields)| (*line, Some(fields[col].clone())))
                    .collect())
            }
            Table::Json { rows } => rows
                .iter()
                .map(|(line, obj)| Ok((*line, json_cell(path, *line, name, obj.get(name))?)))
                .collect(),
        }
    }
}

fn json_object(path: &Path, line: usize, text: &str) -> Result<Map<String, Value>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        // serde_json ends its message with its own position, relative to this one line.
        let msg = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let msg = msg.strip_suffix(&suffix).unwrap_or(&msg);
        at(path, line, Some(e.column()), format!("invalid JSON: {msg}"))
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        other => Err(at(
            path,
            line,
            None,
            format!("expected a JSON object, found {}", json_kind(&other)),
        )),
    }
}

/// A JSON value as a cell: strings as they are, numbers in decimal (`1` → `"1"`).
fn json_cell(path: &Path, line: usize, key: &str, value: Option<&Value>) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(at(
            path,
            line,
            None,
            format!(
                "{key:?} is {}; expected a string or a number",
                json_kind(other)
            ),
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The column names picked for a file.
struct Chosen {
    text: String,
    pair: Option<String>,
    label: Option<String>,
}

fn choose_columns(
    path: &Path,
    names: &[String],
    cols: &Columns,
    require_labels: bool,
) -> Result<Chosen> {
    let has = |n: &str| names.iter().any(|h| h == n);
    let listed = || list_names(names);
    let missing = |name: &str, flag: &str| {
        anyhow!(
            "{}: no column {name:?} ({flag}); the columns are {}",
            path.display(),
            listed()
        )
    };
    for (name, flag) in [
        (&cols.text, "--text-column"),
        (&cols.text_pair, "--text-pair-column"),
        (&cols.label, "--label-column"),
    ] {
        if let Some(name) = name.as_deref().filter(|n| !has(n)) {
            return Err(missing(name, flag));
        }
    }
    let layout = if cols.text.is_none() && cols.text_pair.is_none() {
        PAIR_LAYOUTS
            .iter()
            .find(|(text, pair, _)| has(text) && has(pair))
    } else {
        None
    };
    let text = match (&cols.text, layout) {
        (Some(t), _) => t.clone(),
        (None, Some((t, _, _))) => t.to_string(),
        (None, None) => TEXT_DEFAULTS
            .iter()
            .find(|n| has(n))
            .map(|n| n.to_string())
            .ok_or_else(|| {
                anyhow!(
                    "{}: no text column: neither \"sentence\" nor \"text\" is among the columns {}; pass --text-column",
                    path.display(),
                    listed()
                )
            })?,
    };
    let pair = cols
        .text_pair
        .clone()
        .or_else(|| layout.map(|(_, p, _)| p.to_string()));
    let label = cols
        .label
        .clone()
        .or_else(|| has(LABEL_DEFAULT).then(|| LABEL_DEFAULT.to_string()))
        .or_else(|| layout.and_then(|(_, _, l)| l.filter(|l| has(l)).map(str::to_string)));
    if require_labels && label.is_none() {
        bail!(
            "{}: no label column: \"label\" is not among the columns {}; pass --label-column",
            path.display(),
            listed()
        );
    }
    Ok(Chosen { text, pair, label })
}

/// `"a", "b", "c"`, at most [`LIST_MAX`] of them.
fn list_names(names: &[String]) -> String {
    let mut out = names
        .iter()
        .take(LIST_MAX)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST_MAX {
        out.push_str(&format!(", … ({} in all)", names.len()));
    }
    out
}

const LIST_MAX: usize = 20;

/// A text column: every row must have it.
fn required_cells(path: &Path, table: &Table, name: &str) -> Result<Vec<String>> {
    table
        .column(path, name)?
        .into_iter()
        .map(|(line, cell)| {
            cell.ok_or_else(|| at(path, line, None, format!("no {name:?} (missing or null)")))
        })
        .collect()
}

fn read_labels(
    path: &Path,
    table: &Table,
    name: &str,
    require_labels: bool,
) -> Result<Option<Vec<String>>> {
    let cells: Vec<(usize, Option<String>)> = table
        .column(path, name)?
        .into_iter()
        .map(|(line, cell)| {
            let label = cell.map(|c| c.trim().to_string()).filter(|c| !c.is_empty());
            (line, label)
        })
        .collect();
    let first_missing = cells
        .iter()
        .find(|(_, l)| l.is_none())
        .map(|(line, _)| *line);
    match first_missing {
        None => Ok(Some(
            cells
                .into_iter()
                .map(|(_, l)| l.unwrap_or_default())
                .collect(),
        )),
        Some(_) if !require_labels && cells.iter().all(|(_, l)| l.is_none()) => Ok(None),
        Some(line) => Err(at(
            path,
            line,
            None,
            format!("no label (column {name:?} is empty or missing)"),
        )),
    }
}

/// Class names by id, and the label strings of a file mapped to those ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    pub id2label: Vec<String>,
}

impl LabelMap {
    /// The label set to train with, by run_glue's rule:
    ///
    /// - when the model has real label names (not `LABEL_0`, `LABEL_1`, …) and every training
    ///   label is one of them (ignoring ASCII case when no exact match, as run_glue lowercases),
    ///   the model's names in the model's order, so its classifier keeps its meaning;
    /// - when the model has real names and the training labels are all integers (and the names
    ///   are not), the integers are read as ids into the model's names, as the `datasets`
    ///   library's class labels are; an integer outside `0..num_labels` is an error;
    /// - otherwise the sorted unique training labels, integers numerically ("2" before "10"),
    ///   anything else by code point. When the model had other real names this discards them,
    ///   as run_glue does (it warns "Ignoring the model labels"); the caller can tell by
    ///   comparing `id2label` with the model's.
    pub fn from_training(labels: &[String], model_id2label: &[String]) -> Result<LabelMap> {
        if labels.is_empty() {
            bail!("no labels to train on");
        }
        build(labels, model_id2label).map_err(|bad| anyhow!(out_of_range(&bad, model_id2label)))
    }

    /// [`LabelMap::from_training`] for a dataset file, with errors naming its file and line.
    pub fn from_dataset(ds: &RawDataset, model_id2label: &[String]) -> Result<LabelMap> {
        let Some(labels) = &ds.labels else {
            bail!("{}: no labels to train on", ds.path.display());
        };
        build(labels, model_id2label).map_err(|bad| {
            let row = labels.iter().position(|l| *l == bad).unwrap_or(0);
            anyhow!(
                "{}: {}",
                ds.location(row),
                out_of_range(&bad, model_id2label)
            )
        })
    }

    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    /// The id of `label`: its exact name; else its name ignoring ASCII case, when only one name
    /// matches that way; else, when no name is itself an integer, the integer `label` read as an
    /// id (a file with `0`/`1` labels against a model named `negative`/`positive`).
    pub fn id(&self, label: &str) -> Option<u32> {
        let label = label.trim();
        let exact = self.id2label.iter().position(|n| n == label);
        exact
            .or_else(|| self.caseless_id(label))
            .or_else(|| self.index_id(label))
            .map(|i| i as u32)
    }

    /// Ids for every row of `ds`; an unknown label is an error naming its line.
    pub fn encode(&self, ds: &RawDataset) -> Result<Vec<u32>> {
        let Some(labels) = &ds.labels else {
            bail!("{}: the file has no labels", ds.path.display());
        };
        labels
            .iter()
            .enumerate()
            .map(|(row, label)| {
                self.id(label).ok_or_else(|| {
                    anyhow!(
                        "{}: unknown label {label:?}; the known labels are {}",
                        ds.location(row),
                        self.describe()
                    )
                })
            })
            .collect()
    }

    fn exact_or_caseless(&self, label: &str) -> bool {
        self.id2label.iter().any(|n| n == label) || self.caseless_id(label).is_some()
    }

    fn caseless_id(&self, label: &str) -> Option<usize> {
        let mut matches = self
            .id2label
            .iter()
            .enumerate()
            .filter(|(_, n)| n.eq_ignore_ascii_case(label));
        match (matches.next(), matches.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    }

    fn index_id(&self, label: &str) -> Option<usize> {
        if self.id2label.iter().any(|n| is_integer(n)) {
            return None;
        }
        let i: usize = label.parse().ok()?;
        (i < self.id2label.len()).then_some(i)
    }

    /// The names, and the ids that [`LabelMap::id`] also accepts.
    fn describe(&self) -> String {
        let names = list_names(&self.id2label);
        if self.id2label.iter().any(|n| is_integer(n)) || self.id2label.is_empty() {
            names
        } else {
            format!("{names} (or their ids 0 to {})", self.id2label.len() - 1)
        }
    }
}

/// The map of [`LabelMap::from_training`], or the first integer label out of the model's range.
fn build(labels: &[String], model: &[String]) -> std::result::Result<LabelMap, String> {
    let unique = sorted_unique(labels);
    if has_real_names(model) {
        let named = LabelMap {
            id2label: model.to_vec(),
        };
        if unique.iter().all(|l| named.exact_or_caseless(l)) {
            return Ok(named);
        }
        if !model.iter().any(|n| is_integer(n)) && unique.iter().all(|l| is_integer(l)) {
            return match unique.iter().find(|l| named.index_id(l).is_none()) {
                Some(bad) => Err(bad.clone()),
                None => Ok(named),
            };
        }
    }
    Ok(LabelMap { id2label: unique })
}

fn out_of_range(label: &str, model: &[String]) -> String {
    let named: Vec<String> = model
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i}={n}"))
        .collect();
    format!(
        "label {label} is out of range: integer labels are ids into the model's {} labels ({})",
        model.len(),
        named.join(", ")
    )
}

/// Whether a model's names are its own rather than the `LABEL_<i>` placeholders transformers
/// writes when a config names no labels.
fn has_real_names(model: &[String]) -> bool {
    model
        .iter()
        .enumerate()
        .any(|(i, n)| *n != format!("LABEL_{i}"))
}

fn is_integer(s: &str) -> bool {
    s.parse::<i64>().is_ok()
}

/// Unique labels in run_glue's order (`sorted(set(labels))` on ints or on strings).
fn sorted_unique(labels: &[String]) -> Vec<String> {
    let mut unique: Vec<String> = labels
        .iter()
        .map(|l| l.trim().to_string())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if unique.iter().all(|l| is_integer(l)) {
        // Tie-break "1" and "01" by text so the order never depends on hashing.
        unique.sort_by_cached_key(|l| (l.parse::<i64>().unwrap_or_default(), l.clone()));
    } else {
        unique.sort();
    }
    unique
}
