//! Dataset files and label ids: SST-2 and MRPC as GLUE ships them, CSV/TSV/JSONL details, every
//! error with its exact one-line message, and run_glue's label order.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bertft_cuda::data::dataset::{read_dataset, Columns, Format, LabelMap, RawDataset};

/// A folder under the system temp dir, unique to this process and test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("bertft-data-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// Writes `name` and returns its path.
    fn file(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, content).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn no_flags() -> Columns {
    Columns::default()
}

fn read(path: &Path) -> RawDataset {
    read_dataset(path, &no_flags(), true).unwrap()
}

/// The error of reading `path`, checked to be one line.
fn read_err(path: &Path, cols: &Columns, require_labels: bool) -> String {
    one_line(read_dataset(path, cols, require_labels).unwrap_err())
}

fn one_line(e: anyhow::Error) -> String {
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    msg
}

fn counts(labels: &[String]) -> BTreeMap<&str, usize> {
    let mut c = BTreeMap::new();
    for l in labels {
        *c.entry(l.as_str()).or_default() += 1;
    }
    c
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn sst2_dev_as_glue_writes_it() {
    let ds = read(&common::sst2_dir().join("dev.tsv"));
    assert_eq!(ds.len(), 872);
    assert_eq!(ds.lines[0], 2);
    assert_eq!(ds.lines[871], 873);
    assert!(ds.pairs.is_none());
    // GLUE's trailing space before the tab is part of the text; tokenization drops it.
    assert_eq!(
        ds.texts[0],
        "it 's a charming and often affecting journey . "
    );
    let labels = ds.labels.as_ref().unwrap();
    assert_eq!(
        counts(labels).keys().copied().collect::<Vec<_>>(),
        ["0", "1"]
    );
    let map = LabelMap::from_dataset(&ds, &strings(&["LABEL_0", "LABEL_1"])).unwrap();
    assert_eq!(map.id2label, ["0", "1"]);
    let ids = map.encode(&ds).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids[1], 0);
    assert!(ids.iter().zip(labels).all(|(&id, l)| id.to_string() == *l));
}

#[test]
fn sst2_train_reads_every_row_quickly() {
    let start = Instant::now();
    let ds = read(&common::sst2_dir().join("train.tsv"));
    let elapsed = start.elapsed();
    assert_eq!(ds.len(), 67_349);
    assert_eq!(ds.texts[0], "hide new secretions from the parental units ");
    let c = counts(ds.labels.as_ref().unwrap());
    assert_eq!(c.len(), 2);
    assert_eq!(c["0"] + c["1"], 67_349);
    // 3.8 MB: even an unoptimized build reads it in well under a second.
    assert!(elapsed.as_secs_f64() < 2.0, "took {elapsed:?}");
}

#[test]
fn mrpc_pairs_from_its_own_header_with_bom_and_bare_quotes() {
    let dir = common::sst2_dir().join("../mrpc");
    let ds = read(&dir.join("dev.tsv"));
    assert_eq!(ds.len(), 408);
    assert_eq!(
        ds.texts[0],
        "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy ."
    );
    // A leading `"` is an ordinary character, not the start of a quoted field.
    assert_eq!(
        ds.pair(0),
        Some("\" The foodservice pie business does not fit our long-term growth strategy .")
    );
    let c = counts(ds.labels.as_ref().unwrap());
    assert_eq!((c["1"], c["0"]), (279, 129));
    assert_eq!(ds.pairs.as_ref().unwrap().len(), 408);

    let explicit = Columns {
        text: Some("#1 String".into()),
        text_pair: Some("#2 String".into()),
        label: Some("Quality".into()),
    };
    let train = read_dataset(&dir.join("train.tsv"), &explicit, true).unwrap();
    assert_eq!(train.len(), 3_668);
    let c = counts(train.labels.as_ref().unwrap());
    assert_eq!((c["1"], c["0"]), (2_474, 1_194));
    let quoted = train.texts.iter().chain(train.pairs.as_ref().unwrap());
    assert!(quoted.filter(|t| t.contains('"')).count() >= 769);
}

#[test]
fn formats_come_from_the_extension() {
    for (name, format) in [
        ("a.csv", Format::Csv),
        ("a.TSV", Format::Tsv),
        ("a.jsonl", Format::Jsonl),
        ("a.json", Format::Jsonl),
    ] {
        assert_eq!(Format::from_path(Path::new(name)).unwrap(), format);
    }
    let dir = TempDir::new("ext");
    let path = dir.file("train.txt", "text\tlabel\na\t1\n");
    assert_eq!(
        read_err(&path, &no_flags(), true),
        format!(
            "{}: unknown dataset format; the name must end in .csv, .tsv, .jsonl or .json",
            path.display()
        )
    );
    let missing = dir.0.join("absent.tsv");
    let msg = read_err(&missing, &no_flags(), true);
    assert!(
        msg.starts_with(&format!("cannot read {}: ", missing.display())),
        "{msg}"
    );
}

#[test]
fn tsv_bom_crlf_quotes_and_spaces_are_kept_as_glue_means_them() {
    let dir = TempDir::new("tsv");
    let path = dir.file(
        "t.tsv",
        "\u{FEFF}sentence\tlabel\r\n\"quoted\" start \t1\r\n\r\nsay \"hi\tneg\r\n",
    );
    let ds = read(&path);
    assert_eq!(ds.texts, ["\"quoted\" start ", "say \"hi"]);
    assert_eq!(ds.labels.unwrap(), ["1", "neg"]);
    assert_eq!(ds.lines, [2, 4]); // the blank line 3 is skipped, not renumbered
}

#[test]
fn sentence_wins_over_text_and_flags_win_over_both() {
    let dir = TempDir::new("cols");
    let path = dir.file("t.tsv", "text\tsentence\tlabel\tgold\nA\tB\tx\ty\n");
    let ds = read(&path);
    assert_eq!(
        (ds.texts[0].as_str(), ds.labels.unwrap()[0].as_str()),
        ("B", "x")
    );
    let cols = Columns {
        text: Some("text".into()),
        text_pair: Some("sentence".into()),
        label: Some("gold".into()),
    };
    let ds = read_dataset(&path, &cols, true).unwrap();
    assert_eq!(ds.texts, ["A"]);
    assert_eq!(ds.pairs.unwrap(), ["B"]);
    assert_eq!(ds.labels.unwrap(), ["y"]);
}

#[test]
fn glue_pair_columns_are_found_without_flags() {
    let dir = TempDir::new("pairs");
    let path = dir.file("p.csv", "idx,sentence1,sentence2,label\n0,first,second,1\n");
    let ds = read(&path);
    assert_eq!(ds.texts, ["first"]);
    assert_eq!(ds.pair(0), Some("second"));
    // An explicit text column means no pair unless one is named too.
    let cols = Columns {
        text: Some("sentence2".into()),
        ..Columns::default()
    };
    let ds = read_dataset(&path, &cols, true).unwrap();
    assert_eq!((ds.texts[0].as_str(), ds.pairs), ("second", None));
}

#[test]
fn csv_follows_rfc_4180() {
    let dir = TempDir::new("csv");
    let path = dir.file(
        "c.csv",
        "\u{FEFF}text,label\r\n\"a, b\",1\r\n\"say \"\"hi\"\"\",0\n\"two\nlines\",1\nsize 5\" disk,\"0\"\n\n",
    );
    let ds = read(&path);
    assert_eq!(
        ds.texts,
        ["a, b", "say \"hi\"", "two\nlines", "size 5\" disk"]
    );
    assert_eq!(ds.labels.unwrap(), ["1", "0", "1", "0"]);
    assert_eq!(ds.lines, [2, 3, 4, 6]);
}

#[test]
fn jsonl_strings_and_numbers() {
    let dir = TempDir::new("jsonl");
    let path = dir.file(
        "j.jsonl",
        "{\"text\": \"good \\\"film\\\"\", \"label\": 1, \"meta\": {\"x\": [1]}}\n\n{\"label\": \"0\", \"text\": 42}\r\n",
    );
    let ds = read(&path);
    assert_eq!(ds.texts, ["good \"film\"", "42"]);
    assert_eq!(ds.labels.unwrap(), ["1", "0"]);
    assert_eq!(ds.lines, [1, 3]);
}

#[test]
fn labels_are_optional_unless_required() {
    let dir = TempDir::new("optional");
    let unlabeled = dir.file("u.tsv", "sentence\nfine\n");
    let ds = read_dataset(&unlabeled, &no_flags(), false).unwrap();
    assert_eq!((ds.texts.len(), ds.labels), (1, None));
    // A test file whose label column is empty throughout has no labels either.
    let empty = dir.file(
        "e.jsonl",
        "{\"text\": \"a\", \"label\": null}\n{\"text\": \"b\"}\n",
    );
    assert_eq!(
        read_dataset(&empty, &no_flags(), false).unwrap().labels,
        None
    );
}

/// Every way a file can be wrong, with its exact message.
#[test]
fn bad_files_get_one_line_errors_naming_file_line_and_column() {
    let dir = TempDir::new("errors");
    let cases: Vec<(&str, &[u8], bool, String)> = vec![
        ("empty.tsv", b"", true, "empty file (no header, no rows)".into()),
        ("blank.csv", b"\n\r\n\n", true, "empty file (no header, no rows)".into()),
        ("header.tsv", b"text\tlabel\n", true, "no rows, only a header".into()),
        ("empty.jsonl", b"\n  \n", true, "no rows (no JSON objects)".into()),
        (
            "fields.tsv",
            b"text\tlabel\nok\t1\na\tb\t1\n",
            true,
            "line 3: 3 fields, expected 2 as in the header".into(),
        ),
        (
            "fields.csv",
            b"text,label\n\"x\ny\",1\nonly one field\n",
            true,
            "line 4: 1 fields, expected 2 as in the header".into(),
        ),
        (
            "utf8.tsv",
            b"text\tlabel\nab\xFFc\t1\n",
            true,
            "line 2, byte 3: invalid UTF-8 (0xFF); the file must be UTF-8".into(),
        ),
        (
            "utf16.tsv",
            b"\xFF\xFEt\x00",
            true,
            "line 1, byte 1: invalid UTF-8 (0xFF); the file looks like UTF-16; save it as UTF-8"
                .into(),
        ),
        (
            "bom_utf8.tsv",
            b"\xEF\xBB\xBFtext\xC3\tlabel\n",
            true,
            "line 1, byte 8: invalid UTF-8 (0xC3); the file must be UTF-8".into(),
        ),
        (
            "json.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": }\n",
            true,
            "line 2, column 24: invalid JSON: expected value".into(),
        ),
        (
            "notobj.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n[1, 2]\n",
            true,
            "line 2: expected a JSON object, found an array".into(),
        ),
        (
            "array.json",
            b"[\n{\"text\": \"a\"}\n]\n",
            true,
            "line 1: this looks like a JSON array; expected JSON Lines, one object per line".into(),
        ),
        (
            "bool.jsonl",
            b"{\"text\": \"a\", \"label\": true}\n",
            true,
            "line 1: \"label\" is a boolean; expected a string or a number".into(),
        ),
        (
            "nulltext.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n{\"text\": null, \"label\": 1}\n",
            true,
            "line 2: no \"text\" (missing or null)".into(),
        ),
        (
            "open.csv",
            b"text,label\nfine,1\n\"never closed,1\nmore,0\n",
            true,
            "line 3, column 1: this quoted field is never closed (a \" inside a quoted field is written \"\")".into(),
        ),
        (
            "after.csv",
            b"text,label\n\"quoted\"x,1\n",
            true,
            "line 2, column 9: 'x' after a closing quote; a \" inside a quoted field is written \"\"".into(),
        ),
        (
            "nolabel.tsv",
            b"text\tgold\na\t1\n",
            true,
            "no label column: \"label\" is not among the columns \"text\", \"gold\"; pass --label-column"
                .into(),
        ),
        (
            "emptylabel.tsv",
            b"text\tlabel\na\t1\nb\t \n",
            true,
            "line 3: no label (column \"label\" is empty or missing)".into(),
        ),
        (
            "somelabels.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n",
            false,
            "line 2: no label (column \"label\" is empty or missing)".into(),
        ),
        (
            "notext.csv",
            b"review,label\ngood,1\n",
            true,
            "no text column: neither \"sentence\" nor \"text\" is among the columns \"review\", \"label\"; pass --text-column".into(),
        ),
    ];
    for (name, content, require_labels, want) in cases {
        let path = dir.file(name, content);
        let msg = read_err(&path, &no_flags(), require_labels);
        assert_eq!(msg, format!("{}: {want}", path.display()), "{name}");
    }
}

#[test]
fn a_named_column_that_is_not_there_lists_the_columns() {
    let dir = TempDir::new("missing");
    let path = dir.file("m.tsv", "text\tlabel\na\t1\n");
    for (cols, flag) in [
        (
            Columns {
                text: Some("review".into()),
                ..Columns::default()
            },
            "--text-column",
        ),
        (
            Columns {
                text_pair: Some("review".into()),
                ..Columns::default()
            },
            "--text-pair-column",
        ),
        (
            Columns {
                label: Some("review".into()),
                ..Columns::default()
            },
            "--label-column",
        ),
    ] {
        // Even when labels are optional, a label column asked for by name must exist.
        assert_eq!(
            read_err(&path, &cols, false),
            format!(
                "{}: no column \"review\" ({flag}); the columns are \"text\", \"label\"",
                path.display()
            )
        );
    }
}

#[test]
fn label_order_follows_run_glue() {
    let placeholders = strings(&["LABEL_0", "LABEL_1", "LABEL_2"]);
    let ints = strings(&["10", "2", "2", "-1", "0"]);
    assert_eq!(
        LabelMap::from_training(&ints, &placeholders)
            .unwrap()
            .id2label,
        ["-1", "0", "2", "10"]
    );
    let names = strings(&["pos", "neg", "Neutral", "neg", "10"]);
    let map = LabelMap::from_training(&names, &[]).unwrap();
    assert_eq!(map.id2label, ["10", "Neutral", "neg", "pos"]);
    assert_eq!(
        (map.id("neg"), map.id("pos"), map.id("x")),
        (Some(2), Some(3), None)
    );
    assert!(LabelMap::from_training(&[], &placeholders).is_err());
}

#[test]
fn a_model_with_real_label_names_keeps_them() {
    let model = strings(&["POSITIVE", "negative"]);
    // Names match (ignoring case, as run_glue lowercases): the model's names and order.
    let map = LabelMap::from_training(&strings(&["negative", "positive"]), &model).unwrap();
    assert_eq!(map.id2label, ["POSITIVE", "negative"]);
    assert_eq!((map.id("positive"), map.id("NEGATIVE")), (Some(0), Some(1)));
    // Integer labels are ids into the model's names.
    let map = LabelMap::from_training(&strings(&["1", "0", "1"]), &model).unwrap();
    assert_eq!(map.id2label, model);
    assert_eq!(
        (map.id("0"), map.id("1"), map.id("2")),
        (Some(0), Some(1), None)
    );
    // Other names: run_glue ignores the model's and sorts the dataset's.
    let map = LabelMap::from_training(&strings(&["good", "bad"]), &model).unwrap();
    assert_eq!(map.id2label, ["bad", "good"]);
}

#[test]
fn an_integer_label_beyond_the_models_labels_is_an_error() {
    let model = strings(&["negative", "positive"]);
    let msg = one_line(LabelMap::from_training(&strings(&["0", "1", "2"]), &model).unwrap_err());
    assert_eq!(
        msg,
        "label 2 is out of range: integer labels are ids into the model's 2 labels (0=negative, 1=positive)"
    );
    let dir = TempDir::new("range");
    let path = dir.file("r.tsv", "text\tlabel\na\t0\nb\t1\nc\t2\nd\t2\n");
    let ds = read(&path);
    let msg = one_line(LabelMap::from_dataset(&ds, &model).unwrap_err());
    assert_eq!(msg, format!("{}: line 4: {msg_tail}", path.display(), msg_tail = "label 2 is out of range: integer labels are ids into the model's 2 labels (0=negative, 1=positive)"));
}

#[test]
fn an_unknown_label_at_evaluation_names_its_line_and_the_known_labels() {
    let dir = TempDir::new("unknown");
    let train = read(&dir.file("train.tsv", "text\tlabel\na\tpos\nb\tneg\n"));
    let map = LabelMap::from_dataset(&train, &[]).unwrap();
    assert_eq!(map.id2label, ["neg", "pos"]);
    let path = dir.file("dev.jsonl", "{\"text\": \"c\", \"label\": \"pos\"}\n{\"text\": \"d\", \"label\": 1}\n\n{\"text\": \"e\", \"label\": \"maybe\"}\n");
    let dev = read(&path);
    let msg = one_line(map.encode(&dev).unwrap_err());
    assert_eq!(
        msg,
        format!(
            "{}: line 4: unknown label \"maybe\"; the known labels are \"neg\", \"pos\" (or their ids 0 to 1)",
            path.display()
        )
    );
    let numeric = LabelMap::from_training(&strings(&["0", "1"]), &[]).unwrap();
    let msg = one_line(numeric.encode(&dev).unwrap_err());
    assert_eq!(
        msg,
        format!(
            "{}: line 1: unknown label \"pos\"; the known labels are \"0\", \"1\"",
            path.display()
        )
    );
    let unlabeled = read_dataset(&dir.file("u.tsv", "text\nf\n"), &no_flags(), false).unwrap();
    assert!(one_line(map.encode(&unlabeled).unwrap_err()).ends_with(": the file has no labels"));
}
