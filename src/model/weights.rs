//! Loading and saving weights in transformers naming (safetensors).
//!
//! Loading accepts what the Hub holds for BERT: a `BertForSequenceClassification` checkpoint, a
//! bare `BertModel` (names without `bert.`), TF-era LayerNorm names (`gamma`/`beta`), fp16 and
//! bf16 storage, and sharded files. What a classifier needs but a checkpoint lacks (pooler,
//! classifier head) is initialized as transformers initializes it. Saving writes a folder that
//! `BertForSequenceClassification.from_pretrained` loads.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo, TensorView};
use safetensors::SafeTensors;

use crate::config::BertConfig;
use crate::data::tokenize::TOKENIZER_FILES;
use crate::model::init::init_param;
use crate::model::params::ParamLayout;

/// The parameters of a model, in [`ParamLayout`] order, and what loading had to say about them.
#[derive(Clone, Debug)]
pub struct LoadedWeights {
    pub flat: Vec<f32>,
    /// One line each: ignored and unused tensors, newly initialized parameters.
    pub notices: Vec<String>,
}

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
const PYTORCH_FILES: [&str; 2] = ["pytorch_model.bin", "pytorch_model.bin.index.json"];
const CONFIG_FILE: &str = "config.json";

/// Reads the checkpoint in `model_dir` into one flat buffer laid out as `layout`.
///
/// Pooler and classifier tensors the checkpoint lacks are drawn from N(0, initializer_range)
/// (biases 0) with Philox under `seed`, so a run is reproducible from its seed (`init`).
pub fn load_weights(
    model_dir: &Path,
    cfg: &BertConfig,
    layout: &ParamLayout,
    seed: u64,
) -> Result<LoadedWeights> {
    ensure!(
        *layout == ParamLayout::new(cfg),
        "the parameter layout given to load_weights was not built from this config"
    );
    let checkpoint = Checkpoint::find(model_dir)?;
    let maps = checkpoint
        .files
        .iter()
        .map(|f| map_file(f))
        .collect::<Result<Vec<_>>>()?;
    let files = checkpoint
        .files
        .iter()
        .zip(&maps)
        .map(|(path, map)| {
            SafeTensors::deserialize(map)
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;

    let sorted = sort_tensors(&checkpoint, &files, layout)?;
    let mut flat = vec![0f32; layout.total];
    let mut missing_init = Vec::new();
    for (index, spec) in layout.specs.iter().enumerate() {
        let dst = &mut flat[spec.offset..spec.offset + spec.len()];
        match sorted.params.get(&spec.name) {
            Some(found) => {
                let view = files[found.file]
                    .tensor(&found.file_name)
                    .expect("the name was listed by this file");
                let file = checkpoint.files[found.file].display();
                copy_tensor(&view, dst, &spec.shape)
                    .map_err(|e| anyhow!("{file}: tensor {} {e}", found.file_name))?;
            }
            None if is_head(&spec.name) => {
                init_param(dst, spec, index, cfg, seed);
                missing_init.push(spec.name.clone());
            }
            None => bail!(
                "{}: tensor {} is missing",
                checkpoint.label.display(),
                spec.name
            ),
        }
    }
    let mut notices = sorted.notices;
    if !missing_init.is_empty() {
        notices.push(format!(
            "newly initialized: {} (train this model before using it)",
            missing_init.join(", ")
        ));
    }
    Ok(LoadedWeights { flat, notices })
}

/// The safetensors files of a checkpoint folder, and the file that errors about it should name.
struct Checkpoint {
    files: Vec<PathBuf>,
    /// `model.safetensors`, or the index of a sharded checkpoint.
    label: PathBuf,
}

impl Checkpoint {
    fn find(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Ok(Checkpoint {
                files: vec![single.clone()],
                label: single,
            });
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Ok(Checkpoint {
                files: shard_files(&index)?,
                label: index,
            });
        }
        if let Some(pt) = PYTORCH_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
        {
            bail!(
                "{}: only safetensors checkpoints are supported (convert it to {SINGLE_FILE}, e.g. by \
                 saving with transformers' save_pretrained(safe_serialization=True))",
                pt.display()
            );
        }
        bail!(
            "{}: no {SINGLE_FILE} or {INDEX_FILE} in this folder",
            dir.display()
        )
    }
}

/// The distinct shard files named by a sharded checkpoint's `weight_map`.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text =
        fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: invalid JSON ({e})", index.display()))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no \"weight_map\" object", index.display());
    };
    let mut names: Vec<&str> = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            bail!(
                "{}: weight_map entry {tensor} is not a file name",
                index.display()
            );
        };
        if !names.contains(&file) {
            names.push(file);
        }
    }
    ensure!(
        !names.is_empty(),
        "{}: weight_map is empty",
        index.display()
    );
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Maps a file instead of reading it: a checkpoint can be larger than the memory it deserves.
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the map is read-only and lives only while loading; a checkpoint rewritten under a
    // running load is outside what any loader (transformers' included) protects against.
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))
}

/// Where a layout parameter was found: which file, under which name.
struct Found {
    file: usize,
    file_name: String,
}

/// The checkpoint's tensors sorted into parameters and the rest, with notices for the rest.
struct Sorted {
    params: HashMap<String, Found>,
    notices: Vec<String>,
}

/// What a tensor name in a checkpoint is to a `BertForSequenceClassification`.
#[derive(Debug, PartialEq, Eq)]
enum FileTensor {
    /// A parameter, under its layout name.
    Param(String),
    /// The `position_ids` buffer older transformers saved (a constant, not a parameter).
    PositionIds,
    /// The masked-LM / next-sentence heads of a pre-training checkpoint.
    PretrainingHead,
    Unused,
}

/// Maps checkpoint naming variants onto layout names: `BertModel` checkpoints lack the `bert.`
/// prefix, and TF-converted ones call LayerNorm's weight and bias `gamma` and `beta`.
fn classify(name: &str, layout_names: &HashMap<&str, usize>) -> FileTensor {
    if name.ends_with("position_ids") {
        return FileTensor::PositionIds;
    }
    if name.starts_with("cls.") {
        return FileTensor::PretrainingHead;
    }
    let renamed = if let Some(stem) = name.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = name.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        name.to_string()
    };
    let full = if renamed.starts_with("bert.") || renamed.starts_with("classifier.") {
        renamed
    } else {
        format!("bert.{renamed}")
    };
    if layout_names.contains_key(full.as_str()) {
        FileTensor::Param(full)
    } else {
        FileTensor::Unused
    }
}

fn sort_tensors(
    checkpoint: &Checkpoint,
    files: &[SafeTensors],
    layout: &ParamLayout,
) -> Result<Sorted> {
    let layout_names: HashMap<&str, usize> = layout
        .specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut params: HashMap<String, Found> = HashMap::new();
    let (mut position_ids, mut heads, mut unused) = (0usize, 0usize, Vec::new());
    for (file, tensors) in files.iter().enumerate() {
        let mut names = tensors.names();
        names.sort_unstable();
        for name in names {
            match classify(name, &layout_names) {
                FileTensor::Param(param) => {
                    if let Some(first) = params.get(&param) {
                        bail!(
                            "{}: tensor {param} appears twice, as {} and as {name}",
                            checkpoint.label.display(),
                            first.file_name
                        );
                    }
                    params.insert(
                        param,
                        Found {
                            file,
                            file_name: name.to_string(),
                        },
                    );
                }
                FileTensor::PositionIds => position_ids += 1,
                FileTensor::PretrainingHead => heads += 1,
                FileTensor::Unused => unused.push(name.to_string()),
            }
        }
    }
    let mut notices = Vec::new();
    if position_ids > 0 {
        notices.push(format!(
            "ignored {} (*.position_ids)",
            plural(position_ids, "position-id buffer")
        ));
    }
    if heads > 0 {
        notices.push(format!(
            "ignored {} (cls.*)",
            plural(heads, "pre-training head tensor")
        ));
    }
    if !unused.is_empty() {
        notices.push(format!(
            "weights not used by BertForSequenceClassification: {}",
            unused.join(", ")
        ));
    }
    Ok(Sorted { params, notices })
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Checks the shape and converts the storage type of one tensor into its slot of the flat buffer.
pub(crate) fn copy_tensor(view: &TensorView, dst: &mut [f32], expected: &[usize]) -> Result<()> {
    ensure!(
        view.shape() == expected,
        "has shape {:?}, the config expects {:?}",
        view.shape(),
        expected
    );
    let bytes = view.data();
    // The conversions are per element and independent; large embeddings make them worth spreading.
    match view.dtype() {
        Dtype::F32 => dst
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(4))
            .for_each(|(d, b)| *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => dst
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(d, b)| *d = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => dst
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(d, b)| *d = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        other => bail!("has dtype {other}, only F32, F16 and BF16 are supported"),
    }
    Ok(())
}

/// The tensors a checkpoint may lack and still be fine-tuned from: the task head.
fn is_head(name: &str) -> bool {
    name.starts_with("bert.pooler.") || name.starts_with("classifier.")
}

/// Writes a folder `BertForSequenceClassification.from_pretrained` loads: `model.safetensors`
/// (every parameter, F32, full names), `config.json`, and the tokenizer files of `tokenizer_dir`.
///
/// Each file is written under a temporary name in `out_dir` and renamed into place, so a reader
/// never sees a half-written file and an interrupted save leaves the previous one intact.
pub fn save_pretrained(
    out_dir: &Path,
    cfg: &BertConfig,
    layout: &ParamLayout,
    flat: &[f32],
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    ensure!(
        *layout == ParamLayout::new(cfg),
        "the parameter layout given to save_pretrained was not built from this config"
    );
    ensure!(
        flat.len() == layout.total,
        "cannot save {} values: the model has {} parameters",
        flat.len(),
        layout.total
    );
    // Found before anything is written, so that a bad tokenizer folder leaves out_dir untouched.
    let tokenizer_files = tokenizer_dir
        .map(present_tokenizer_files)
        .transpose()?
        .unwrap_or_default();
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;

    write_atomic(&out_dir.join(SINGLE_FILE), |tmp| {
        write_safetensors(tmp, layout, flat)
    })?;
    write_atomic(&out_dir.join(CONFIG_FILE), |tmp| {
        fs::write(tmp, cfg.to_classifier_json()).map_err(anyhow::Error::from)
    })?;
    for src in tokenizer_files {
        let name = src.file_name().expect("tokenizer files are named");
        write_atomic(&out_dir.join(name), |tmp| {
            fs::copy(&src, tmp)
                .map(drop)
                .with_context(|| format!("cannot copy {}", src.display()))
        })?;
    }
    // Make the renames themselves durable (best effort: not every platform can sync a folder).
    if let Ok(dir) = File::open(out_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn present_tokenizer_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = TOKENIZER_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.is_file())
        .collect();
    ensure!(
        !files.is_empty(),
        "{}: no tokenizer files to copy (looked for {})",
        dir.display(),
        TOKENIZER_FILES.join(", ")
    );
    Ok(files)
}

/// Runs `write` on a temporary path next to `dest`, flushes it to disk, then renames it to `dest`.
pub(crate) fn write_atomic(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dest
        .file_name()
        .expect("destinations are files")
        .to_string_lossy();
    let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = write(&tmp)
        .and_then(|()| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .context("cannot flush it to disk")
        })
        .and_then(|()| fs::rename(&tmp, dest).context("cannot rename it into place"));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| anyhow!("cannot write {}: {e:#}", dest.display()))
}

/// Writes the flat buffer as one safetensors file, F32, tensors in layout order.
///
/// The header comes from the safetensors crate; the data is streamed here rather than through
/// `serialize_to_file`, which would copy every tensor and write through its own owner-only
/// (0600) temporary file, leaving a saved model other users cannot read.
fn write_safetensors(path: &Path, layout: &ParamLayout, flat: &[f32]) -> Result<()> {
    let mut offset = 0;
    let infos = layout
        .specs
        .iter()
        .map(|s| {
            let end = offset + s.len() * 4;
            let info = TensorInfo {
                dtype: Dtype::F32,
                shape: s.shape.clone(),
                data_offsets: (offset, end),
            };
            offset = end;
            (s.name.clone(), info)
        })
        .collect();
    // transformers refuses safetensors files whose metadata does not say which framework wrote them.
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(format), infos).map_err(|e| anyhow!("{e}"))?;
    let mut header = serde_json::to_vec(&metadata)?;
    // The format wants the data to start 8-byte aligned; the header is padded with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let mut bytes = Vec::with_capacity(1 << 16);
    for spec in &layout.specs {
        for chunk in flat[spec.offset..spec.offset + spec.len()].chunks(1 << 14) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            out.write_all(&bytes)?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&'static str]) -> HashMap<&'static str, usize> {
        list.iter().enumerate().map(|(i, n)| (*n, i)).collect()
    }

    #[test]
    fn classify_maps_naming_variants() {
        let layout = names(&[
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.bias",
            "bert.pooler.dense.weight",
            "classifier.weight",
        ]);
        let p = |s: &str| FileTensor::Param(s.to_string());
        assert_eq!(
            classify("embeddings.LayerNorm.gamma", &layout),
            p("bert.embeddings.LayerNorm.weight")
        );
        assert_eq!(
            classify("bert.embeddings.LayerNorm.beta", &layout),
            p("bert.embeddings.LayerNorm.bias")
        );
        assert_eq!(
            classify("pooler.dense.weight", &layout),
            p("bert.pooler.dense.weight")
        );
        assert_eq!(
            classify("classifier.weight", &layout),
            p("classifier.weight")
        );
        assert_eq!(
            classify("bert.embeddings.position_ids", &layout),
            FileTensor::PositionIds
        );
        assert_eq!(
            classify("cls.predictions.bias", &layout),
            FileTensor::PretrainingHead
        );
        assert_eq!(classify("qa_outputs.weight", &layout), FileTensor::Unused);
        // The prefix is only added, never doubled: `bert.bert.…` is not a parameter.
        assert_eq!(
            classify("bert.bert.pooler.dense.weight", &layout),
            FileTensor::Unused
        );
    }

    #[test]
    fn copy_tensor_converts_half_types() {
        let values = [1.5f32, -2.0, 0.0, 65504.0];
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let mut out = [0f32; 4];
        copy_tensor(
            &TensorView::new(Dtype::F16, vec![2, 2], &f16_bytes).unwrap(),
            &mut out,
            &[2, 2],
        )
        .unwrap();
        assert_eq!(out, values);
        copy_tensor(
            &TensorView::new(Dtype::BF16, vec![4], &bf16_bytes).unwrap(),
            &mut out,
            &[4],
        )
        .unwrap();
        assert_eq!(out, [1.5, -2.0, 0.0, 65536.0]); // bf16 rounds 65504 up: 8 mantissa bits
        let err = copy_tensor(
            &TensorView::new(Dtype::F16, vec![4], &f16_bytes).unwrap(),
            &mut out,
            &[2, 2],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "has shape [4], the config expects [2, 2]");
    }
}
