//! `bertft-cuda`: fine-tune BERT-family sequence classifiers.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "bertft-cuda",
    version,
    about = "Fine-tune BERT-family models for text classification"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a model folder, report its shape and, given a text, its prediction (CPU).
    Inspect(cli::inspect::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => cli::inspect::run(&args),
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
