//! The benchmark's table (Markdown, one row per setting, printed as each finishes) and its JSON
//! file. `benches/hf_reference.py` prints the same columns, so the rows of both tools can be
//! pasted into one table in `benches/RESULTS.md`.

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use crate::bench::memory::MemoryProbe;
use crate::bench::stats::Measurement;
use crate::model::weights::write_atomic;

pub const COLUMNS: [&str; 11] = [
    "backend",
    "batch",
    "seq",
    "steps",
    "samples/s",
    "tokens/s",
    "ms/step median",
    "ms/step min",
    "TFLOP/s",
    "MFU",
    "peak mem",
];

/// What is common to every row of a run.
pub struct RunInfo {
    pub backend: String,
    /// `bert-base-uncased (random init)`, a config path, or a model folder.
    pub model: String,
    pub parameters: usize,
    pub matmul_parameters: u64,
    /// What the dense layers' GEMMs read their operands as (fp32, tf32, fp16, bf16).
    pub precision: &'static str,
    pub peak_tflops: Option<f64>,
    pub memory: MemoryProbe,
    pub seed: u64,
    pub command: String,
}

/// The table's header: column names and the Markdown separator, the first column as wide as
/// the backend's name so that rows line up.
pub fn header(backend_width: usize) -> String {
    let names = pad_cells(COLUMNS.map(String::from).to_vec(), backend_width);
    let rule: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let dashes = "-".repeat(c.len().max(3) - 1);
            if i == 0 {
                format!("{dashes}-")
            } else {
                format!("{dashes}:")
            }
        })
        .collect();
    format!("{}\n{}", markdown_row(&names), markdown_row(&rule))
}

pub fn row(info: &RunInfo, m: &Measurement) -> String {
    let cells = vec![
        info.backend.clone(),
        m.setting.batch.to_string(),
        m.setting.seq_len.to_string(),
        m.step_times.len().to_string(),
        significant(m.samples_per_second()),
        significant(m.tokens_per_second()),
        significant(m.median_ms()),
        significant(m.min_ms()),
        significant(m.tflops()),
        m.mfu(info.peak_tflops)
            .map_or("-".into(), |f| format!("{}%", significant(f * 100.0))),
        m.peak_memory_bytes.map_or("-".into(), bytes),
    ];
    markdown_row(&pad_cells(cells, info.backend.len()))
}

/// The whole run as JSON: what was run, then one object per setting with exact values.
pub fn to_json(info: &RunInfo, measurements: &[Measurement]) -> Value {
    let results: Vec<Value> = measurements
        .iter()
        .map(|m| {
            json!({
                "impl": "bertft-cuda",
                "backend": info.backend,
                "precision": info.precision,
                "batch": m.setting.batch,
                "seq_len": m.setting.seq_len,
                "steps": m.step_times.len(),
                "warmup_steps": m.setting.warmup_steps,
                "samples_per_s": m.samples_per_second(),
                "tokens_per_s": m.tokens_per_second(),
                "ms_per_step_median": m.median_ms(),
                "ms_per_step_min": m.min_ms(),
                "step_ms": m.step_times.iter().map(|t| t.as_secs_f64() * 1e3).collect::<Vec<_>>(),
                "flops_per_step": m.flops_per_step,
                "tflops": m.tflops(),
                "mfu": m.mfu(info.peak_tflops),
                "peak_memory_bytes": m.peak_memory_bytes,
                "last_loss": finite_or_null(m.last_loss),
            })
        })
        .collect();
    json!({
        "tool": "bertft-cuda bench",
        "version": env!("CARGO_PKG_VERSION"),
        "command": info.command,
        "backend": info.backend,
        "model": info.model,
        "parameters": info.parameters,
        "matmul_parameters": info.matmul_parameters,
        "flops_formula": "per token: 6*matmul_parameters + 12*layers*hidden*seq_len (forward+backward)",
        "precision": info.precision,
        "peak_tflops": info.peak_tflops,
        "peak_memory": info.memory.describe(),
        "seed": info.seed,
        "results": results,
    })
}

/// Writes `value` to `path` under a temporary name, then renames it into place.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    write_atomic(path, |tmp| std::fs::write(tmp, &text).map_err(Into::into))
}

fn finite_or_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// The narrowest a numeric column is: small models' TFLOP/s (`0.000531`) still line up.
const MIN_NUMBER_WIDTH: usize = 8;

/// Cells padded to their column names' widths (at least [`MIN_NUMBER_WIDTH`]; the first to
/// `first_width`), numbers right-aligned.
fn pad_cells(cells: Vec<String>, first_width: usize) -> Vec<String> {
    cells
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            if i == 0 {
                format!("{c:<w$}", w = first_width.max(COLUMNS[0].len()))
            } else {
                format!("{c:>w$}", w = COLUMNS[i].len().max(MIN_NUMBER_WIDTH))
            }
        })
        .collect()
}

fn markdown_row(cells: &[String]) -> String {
    format!("| {} |", cells.join(" | "))
}

/// Three significant digits, without an exponent (`1234`, `12.3`, `0.00123`).
pub fn significant(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let decimals = 2 - x.abs().log10().floor() as i32;
    format!("{x:.prec$}", prec = decimals.max(0) as usize)
}

/// Bytes in MiB or GiB (binary units, as `nvidia-smi` and PyTorch's memory summaries).
pub fn bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let b = b as f64;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::stats::Setting;

    #[test]
    fn significant_digits() {
        assert_eq!(significant(1234.4), "1234");
        assert_eq!(significant(12.345), "12.3");
        assert_eq!(significant(0.0012345), "0.00123");
        assert_eq!(significant(0.0), "0");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(bytes(5 << 30), "5.00 GiB");
    }

    #[test]
    fn rows_line_up_with_the_header() {
        let info = RunInfo {
            backend: "cpu (2 threads)".into(),
            model: "tiny".into(),
            parameters: 10,
            matmul_parameters: 8,
            precision: "fp32",
            peak_tflops: None,
            memory: MemoryProbe::HostRss,
            seed: 42,
            command: "bertft-cuda bench".into(),
        };
        let m = Measurement {
            setting: Setting {
                batch: 32,
                seq_len: 128,
                warmup_steps: 1,
                steps: 2,
            },
            step_times: vec![Duration::from_millis(500); 2],
            flops_per_step: 10_u64.pow(12),
            peak_memory_bytes: Some(1 << 30),
            last_loss: f64::NAN,
        };
        let header = header(info.backend.len());
        let row = row(&info, &m);
        let bars = |s: &str| -> Vec<usize> { s.match_indices('|').map(|(i, _)| i).collect() };
        for line in header.lines() {
            assert_eq!(bars(line), bars(&row), "\n{header}\n{row}");
        }
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(
            cells[1..12],
            [
                "cpu (2 threads)",
                "32",
                "128",
                "2",
                "64.0",
                "8192",
                "500",
                "500",
                "2.00",
                "-",
                "1.00 GiB"
            ]
        );
        let json = to_json(&info, &[m]);
        assert_eq!(json["results"][0]["mfu"], Value::Null);
        assert_eq!(json["results"][0]["last_loss"], Value::Null);
    }
}
