//! `bertft-cuda`: fine-tune BERT-family sequence classifiers.

use std::process::ExitCode;

use bertft_cuda::cli;
use bertft_cuda::train::args::{expand_args_file, EvaluateArgs, PredictArgs, TrainArgs};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bertft-cuda",
    version,
    about = "Fine-tune BERT-family models for text classification",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model on a labelled file (the Trainer's train(), then evaluate()).
    Train(Box<TrainArgs>),
    /// Evaluate a model on a labelled file (the Trainer's evaluate()).
    Evaluate(EvaluateArgs),
    /// Classify the rows of a file, writing JSONL (the Trainer's predict()).
    Predict(PredictArgs),
    /// Load a model folder, report its shape and, given a text, its prediction (CPU).
    Inspect(cli::inspect::InspectArgs),
    /// Time full training steps on random batches: throughput, TFLOP/s, MFU, peak memory.
    Bench(cli::bench::BenchArgs),
    /// Check the CUDA setup (driver, GPUs, NVRTC, cuBLAS) and compile every kernel.
    Doctor(cli::doctor::DoctorArgs),
}

fn main() -> ExitCode {
    let argv = match expand_args_file(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    let result = match cli.command {
        Command::Train(args) => cli::train::run(&args),
        Command::Evaluate(args) => cli::evaluate::run(&args),
        Command::Predict(args) => cli::predict::run(&args),
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Doctor(args) => cli::doctor::run(&args),
        Command::Bench(args) => cli::bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain, outermost first.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
