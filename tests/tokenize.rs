//! Tokenization: parity with transformers' fast tokenizer of all-MiniLM-L6-v2 from both
//! `tokenizer.json` and `vocab.txt`, truncation, the vocab.txt settings, and errors.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use bertft_cuda::data::tokenize::{Encoded, TextTokenizer};
use serde::Deserialize;

/// A folder under the system temp dir, unique to this process and test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("bertft-tokenize-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn write(&self, name: &str, text: &str) -> &Self {
        fs::write(self.0.join(name), text).unwrap();
        self
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Deserialize)]
struct Case {
    text: String,
    text_pair: Option<String>,
    max_length: usize,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let path = common::fixtures_dir().join("minilm_tokens.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The MiniLM tokenizer rebuilt from vocab.txt and tokenizer_config.json alone.
fn minilm_vocab_only(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for f in ["vocab.txt", "tokenizer_config.json"] {
        fs::copy(common::minilm_dir().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn assert_matches_fixture(tok: &TextTokenizer, what: &str) {
    let cases = cases();
    assert!(cases.len() >= 20, "the fixture has {} cases", cases.len());
    for c in &cases {
        let got = tok
            .encode(&c.text, c.text_pair.as_deref(), c.max_length)
            .unwrap();
        assert_eq!(
            got,
            Encoded {
                ids: c.input_ids.clone(),
                type_ids: c.token_type_ids.clone()
            },
            "{what}: {:?} / {:?} at max_length {}",
            c.text,
            c.text_pair,
            c.max_length
        );
    }
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tok = TextTokenizer::from_dir(&common::minilm_dir()).unwrap();
    assert_matches_fixture(&tok, "tokenizer.json");
}

#[test]
fn vocab_txt_matches_transformers() {
    let dir = minilm_vocab_only("vocab-parity");
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_matches_fixture(&tok, "vocab.txt");
}

#[test]
fn both_paths_agree_beyond_the_fixture() {
    let json = TextTokenizer::from_dir(&common::minilm_dir()).unwrap();
    let dir = minilm_vocab_only("vocab-agree");
    let vocab = TextTokenizer::from_dir(dir.path()).unwrap();
    let long_word = "x".repeat(150);
    let texts = [
        "literal [CLS] and [SEP] and [MASK] and [PAD] markers",
        "unknown ☃ symbols ⟁ and control\u{1}chars",
        long_word.as_str(),
        "Ünïcödé façade — “quotes” … ellipsis",
        "中文字符和English混合",
    ];
    for a in texts {
        for b in [None, Some("a second segment, [SEP] included")] {
            for max_length in [5, 12, 512] {
                assert_eq!(
                    json.encode(a, b, max_length).unwrap(),
                    vocab.encode(a, b, max_length).unwrap(),
                    "{a:?} {b:?}"
                );
            }
        }
    }
    // A literal special token stays one token, as the fast tokenizer's added tokens make it.
    assert_eq!(
        json.encode("[SEP]", None, 512).unwrap().ids,
        [101, 102, 102]
    );
}

#[test]
fn the_files_padding_is_not_applied() {
    // MiniLM's tokenizer.json pads to a fixed 128 and truncates at 128.
    let tok = TextTokenizer::from_dir(&common::minilm_dir()).unwrap();
    let e = tok.encode("Hello, world!", None, 512).unwrap();
    assert_eq!(e.ids, [101, 7592, 1010, 2088, 999, 102]);
    assert_eq!(e.type_ids, [0; 6]);
    let long = "word ".repeat(300);
    assert_eq!(
        tok.encode(&long, None, 512).unwrap().ids.len(),
        302,
        "the file's 128 limit is not applied"
    );
    assert_eq!(tok.pad_id(), 0);
}

#[test]
fn files_lists_what_to_copy() {
    let dir = common::minilm_dir();
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let expected: Vec<PathBuf> = [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    assert_eq!(tok.files(), expected.as_slice());
    let only = minilm_vocab_only("files");
    let tok = TextTokenizer::from_dir(only.path()).unwrap();
    assert_eq!(
        tok.files(),
        [
            only.path().join("tokenizer_config.json"),
            only.path().join("vocab.txt")
        ]
    );
}

#[test]
fn truncation_never_exceeds_max_length_and_keeps_the_head() {
    let tok = TextTokenizer::from_dir(&common::minilm_dir()).unwrap();
    let a = "one two three four five six seven eight nine ten eleven twelve";
    let b = "alpha beta gamma delta epsilon zeta eta theta";
    let full_single = tok.encode(a, None, 512).unwrap();
    let full_pair = tok.encode(a, Some(b), 512).unwrap();
    for max_length in 3..=30 {
        let single = tok.encode(a, None, max_length).unwrap();
        assert_eq!(
            single.ids.len(),
            full_single.ids.len().min(max_length),
            "max_length {max_length}"
        );
        let n = single.ids.len();
        assert_eq!(
            single.ids[..n - 1],
            full_single.ids[..n - 1],
            "the head is kept"
        );
        assert_eq!(single.ids[n - 1], 102, "[SEP] always closes it");

        let pair = tok.encode(a, Some(b), max_length).unwrap();
        assert_eq!(
            pair.ids.len(),
            full_pair.ids.len().min(max_length),
            "max_length {max_length}"
        );
        assert_eq!(pair.ids.len(), pair.type_ids.len());
        let seps: Vec<usize> = (0..pair.ids.len())
            .filter(|&i| pair.ids[i] == 102)
            .collect();
        assert_eq!(seps.len(), 2);
        assert!(pair.type_ids[..=seps[0]].iter().all(|&t| t == 0));
        assert!(pair.type_ids[seps[0] + 1..].iter().all(|&t| t == 1));
    }
    // Exactly the special tokens fit: nothing of the text is left.
    assert_eq!(tok.encode(a, None, 2).unwrap().ids, [101, 102]);
    assert_eq!(tok.encode(a, Some(b), 3).unwrap().ids, [101, 102, 102]);
}

/// The token counts of both segments of an encoded pair (specials excluded).
fn segment_lengths(e: &Encoded) -> (usize, usize) {
    let first_sep = e.ids.iter().position(|&i| i == 102).unwrap();
    (first_sep - 1, e.ids.len() - first_sep - 2)
}

#[test]
fn pairs_are_cut_longest_first() {
    let tok = TextTokenizer::from_dir(&common::minilm_dir()).unwrap();
    let long = "one two three four five six seven eight nine ten eleven twelve"; // 12 tokens
    let short = "alpha beta"; // 2 tokens
    assert_eq!(
        segment_lengths(&tok.encode(long, Some(short), 512).unwrap()),
        (12, 2)
    );
    // Only the longer segment loses tokens while it is still the longer one.
    assert_eq!(
        segment_lengths(&tok.encode(long, Some(short), 3 + 8).unwrap()),
        (6, 2)
    );
    assert_eq!(
        segment_lengths(&tok.encode(short, Some(long), 3 + 8).unwrap()),
        (2, 6)
    );
    // Two long segments share the budget evenly.
    let other = "a b c d e f g h i j k l m n"; // 14 tokens
    assert_eq!(
        segment_lengths(&tok.encode(long, Some(other), 3 + 10).unwrap()),
        (5, 5)
    );
    let (x, y) = segment_lengths(&tok.encode(long, Some(other), 3 + 11).unwrap());
    assert!(x + y == 11 && x.abs_diff(y) == 1, "({x}, {y})");
}

#[test]
fn encode_batch_is_encode_in_order() {
    let tok = TextTokenizer::from_dir(&common::minilm_dir()).unwrap();
    let items: Vec<(&str, Option<&str>)> = (0..64)
        .map(|i| match i % 3 {
            0 => (
                "a fairly long sentence that will be cut somewhere in the middle",
                None,
            ),
            1 => ("short", Some("and its pair")),
            _ => ("Hello, world!", None),
        })
        .collect();
    let batch = tok.encode_batch(&items, 10).unwrap();
    assert_eq!(batch.len(), items.len());
    for ((text, pair), got) in items.iter().zip(&batch) {
        assert_eq!(*got, tok.encode(text, *pair, 10).unwrap());
    }
    let err = format!(
        "{:#}",
        tok.encode_batch(&[("fine", None), ("too", Some("small"))], 2)
            .unwrap_err()
    );
    assert_eq!(
        err,
        "example 1: max_length 2 cannot hold the 3 special tokens of a pair"
    );
}

/// A vocabulary in which casing, accents and Chinese-character splitting are visible.
const TINY_VOCAB: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n##s\ncafe\ncafé\nHello\n,\n!\n你\n好\n你好\n";

fn tiny(tag: &str, config: Option<&str>) -> TempDir {
    let dir = TempDir::new(tag);
    dir.write("vocab.txt", TINY_VOCAB);
    if let Some(c) = config {
        dir.write("tokenizer_config.json", c);
    }
    dir
}

fn ids(dir: &TempDir, text: &str) -> Vec<u32> {
    TextTokenizer::from_dir(dir.path())
        .unwrap()
        .encode(text, None, 64)
        .unwrap()
        .ids
}

#[test]
fn vocab_txt_follows_its_config() {
    let text = "Hello worlds, CAFÉ! 你好";
    // Defaults: lowercase, accents stripped (they follow lowercase), Chinese characters split.
    assert_eq!(
        ids(&tiny("default", None), text),
        [2, 5, 6, 7, 11, 8, 12, 13, 14, 3]
    );
    // Cased: no lowercasing, and so no accent stripping either.
    let cased = tiny("cased", Some(r#"{"do_lower_case": false}"#));
    assert_eq!(ids(&cased, text), [2, 10, 6, 7, 11, 1, 12, 13, 14, 3]);
    let accents = tiny(
        "accents",
        Some(r#"{"do_lower_case": true, "strip_accents": false}"#),
    );
    assert_eq!(ids(&accents, text), [2, 5, 6, 7, 11, 9, 12, 13, 14, 3]);
    let chinese = tiny("chinese", Some(r#"{"tokenize_chinese_chars": false}"#));
    assert_eq!(ids(&chinese, text), [2, 5, 6, 7, 11, 8, 12, 15, 3]);
    // Special tokens in the text are matched whole, before normalization.
    assert_eq!(
        ids(&tiny("literal", None), "hello [SEP] [MASK] world"),
        [2, 5, 3, 4, 6, 3]
    );
    let tok = TextTokenizer::from_dir(tiny("pair", None).path()).unwrap();
    assert_eq!(
        tok.encode("hello", Some("world"), 64).unwrap(),
        Encoded {
            ids: vec![2, 5, 3, 6, 3],
            type_ids: vec![0, 0, 0, 1, 1]
        }
    );
    assert_eq!(tok.pad_id(), 0);
}

#[test]
fn special_tokens_come_from_the_config_files() {
    let dir = TempDir::new("specials");
    dir.write("vocab.txt", "<unk>\n<s>\n</s>\n<pad>\nhello\n");
    // Either spelling transformers saves: plain text or an AddedToken object.
    dir.write(
        "tokenizer_config.json",
        r#"{"cls_token": {"content": "<s>", "lstrip": false}, "sep_token": "</s>", "unk_token": "[UNK]"}"#,
    );
    // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
    dir.write(
        "special_tokens_map.json",
        r#"{"unk_token": "<unk>", "pad_token": "<pad>"}"#,
    );
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.encode("hello there", None, 16).unwrap().ids,
        [1, 4, 0, 2]
    );
    assert_eq!(tok.pad_id(), 3);
}

fn error_of(dir: &Path) -> String {
    let msg = match TextTokenizer::from_dir(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(!msg.contains('\n'), "errors are one line: {msg}");
    msg
}

#[test]
fn errors_name_the_file() {
    let empty = TempDir::new("empty");
    assert_eq!(
        error_of(empty.path()),
        format!(
            "{}: no tokenizer.json or vocab.txt in this folder",
            empty.path().display()
        )
    );

    for missing in ["[CLS]", "[SEP]", "[PAD]", "[UNK]"] {
        let dir = TempDir::new("no-special");
        dir.write(
            "vocab.txt",
            &TINY_VOCAB.replace(&format!("{missing}\n"), ""),
        );
        assert_eq!(
            error_of(dir.path()),
            format!(
                "{}: the special token {missing:?} is not in the vocabulary",
                dir.path().join("vocab.txt").display()
            )
        );
    }

    let bad_config = tiny("bad-config", Some("{\"do_lower_case\": tru}"));
    let err = error_of(bad_config.path());
    assert!(
        err.starts_with(
            &bad_config
                .path()
                .join("tokenizer_config.json")
                .display()
                .to_string()
        ) && err.contains("line 1 column"),
        "{err}"
    );
    let wrong_type = tiny("wrong-type", Some(r#"{"do_lower_case": "yes"}"#));
    assert!(error_of(wrong_type.path()).contains("tokenizer_config.json: invalid type"));

    let bad_json = TempDir::new("bad-json");
    bad_json.write("tokenizer.json", "{\"model\": 3}");
    let err = error_of(bad_json.path());
    assert!(
        err.starts_with(&bad_json.path().join("tokenizer.json").display().to_string()),
        "{err}"
    );
}

#[test]
fn max_length_must_hold_the_special_tokens() {
    let tok = TextTokenizer::from_dir(tiny("too-small", None).path()).unwrap();
    let err = tok.encode("hello", None, 1).unwrap_err().to_string();
    assert_eq!(
        err,
        "max_length 1 cannot hold the 2 special tokens of one text"
    );
}
