//! The progress bar, or plain log lines when the output is not a terminal.
