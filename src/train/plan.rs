//! How a run is cut: each epoch's micro-batches, and from their counts the optimizer steps, the
//! warmup and the logging, evaluation and saving intervals, computed as the Trainer computes them.

use anyhow::{bail, Result};

use crate::data::sampler::{Batching, EpochBatcher, Sampling};
use crate::train::args::{SamplingStrategy, TrainArgs};

/// How many optimizer steps the run has and when it logs, evaluates and saves, computed as
/// the Trainer computes them.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// In the first epoch; with fixed-size batches, in every epoch. A token budget's count can
    /// differ from epoch to epoch (the trainer counts each epoch's own).
    pub micro_batches_per_epoch: u64,
    /// As `micro_batches_per_epoch`: the first epoch's, every epoch's with fixed-size batches.
    pub steps_per_epoch: u64,
    pub max_steps: u64,
    pub epochs: u64,
    pub warmup_steps: u64,
    pub logging_steps: u64,
    pub eval_steps: u64,
    pub save_steps: u64,
}

/// A step interval given as a count, or below 1 as a ratio of the total steps.
fn interval(value: f64, max_steps: u64) -> u64 {
    if value < 1.0 {
        ((max_steps as f64 * value).ceil() as u64).max(1)
    } else {
        value as u64
    }
}

fn sampling(args: &TrainArgs) -> Sampling {
    match (args.group_by_length, args.train_sampling_strategy) {
        (true, _) | (_, SamplingStrategy::GroupByLength) => Sampling::GroupByLength,
        (_, SamplingStrategy::Sequential) => Sampling::Sequential,
        (_, SamplingStrategy::Random) => Sampling::Random,
    }
}

/// What cuts the training epochs of a run over examples of `lengths` tokens.
pub fn train_batcher<'a>(args: &TrainArgs, lengths: &'a [usize]) -> EpochBatcher<'a> {
    EpochBatcher {
        sampling: sampling(args),
        seed: args.data_seed.unwrap_or(args.seed),
        lengths,
        // The Trainer groups by length over whole optimizer steps.
        group_size: args.per_device_train_batch_size * args.gradient_accumulation_steps.max(1),
        batching: args.train_batching(),
    }
}

impl Plan {
    /// The plan of a run whose epochs `batcher` cuts.
    pub fn for_run(args: &TrainArgs, batcher: &EpochBatcher) -> Result<Plan> {
        match batcher.batching {
            Batching::Rows { .. } => Plan::new(args, batcher.lengths.len()),
            Batching::Tokens { .. } => {
                Plan::with_epoch_counts(args, |epoch| batcher.micro_batches(epoch).len() as u64)
            }
        }
    }

    /// The plan with fixed-size batches: every epoch has the same number of steps.
    pub fn new(args: &TrainArgs, rows: usize) -> Result<Plan> {
        let bs = args.per_device_train_batch_size.max(1) as u64;
        let accum = args.gradient_accumulation_steps.max(1) as u64;
        let rows = rows as u64;
        let micro = if args.dataloader_drop_last {
            rows / bs
        } else {
            rows.div_ceil(bs)
        };
        if micro == 0 {
            bail!(
                "{} training rows make no batch of {bs} (with --dataloader-drop-last)",
                rows
            );
        }
        let steps_per_epoch = micro.div_ceil(accum).max(1);
        let (max_steps, epochs) = if args.max_steps > 0 {
            let m = args.max_steps as u64;
            (m, m.div_ceil(steps_per_epoch))
        } else {
            check_epochs(args)?;
            (
                (args.num_train_epochs * steps_per_epoch as f64).ceil() as u64,
                args.num_train_epochs.ceil() as u64,
            )
        };
        Ok(Plan::with_totals(
            args,
            micro,
            steps_per_epoch,
            max_steps,
            epochs,
        ))
    }

    /// The plan when epoch `e` has `micro_in_epoch(e)` micro-batches, a count that may vary from
    /// epoch to epoch (a token budget over a shuffled order). "Steps per epoch" is then each
    /// epoch's own `⌈micro / accumulation⌉`, and the Trainer's rules generalize as:
    /// - `--max-steps M`: the epochs are as many as it takes for their steps to reach `M`;
    /// - `--num-train-epochs E`: every whole epoch below `⌊E⌋` runs in full, then the fraction
    ///   `E − ⌊E⌋` of epoch `⌊E⌋`'s steps, rounded up, so the run stops as far into its last
    ///   epoch as the Trainer's `⌈E × steps_per_epoch⌉` does; with equal counts the two agree.
    fn with_epoch_counts(
        args: &TrainArgs,
        mut micro_in_epoch: impl FnMut(u64) -> u64,
    ) -> Result<Plan> {
        let accum = args.gradient_accumulation_steps.max(1) as u64;
        let first_micro = micro_in_epoch(0);
        if first_micro == 0 {
            bail!("no training rows to make a batch of");
        }
        let mut steps_in = |epoch: u64| micro_in_epoch(epoch).div_ceil(accum).max(1);
        let first_steps = first_micro.div_ceil(accum);
        let (max_steps, epochs) = if args.max_steps > 0 {
            let target = args.max_steps as u64;
            let (mut steps, mut epochs) = (0, 0);
            while steps < target {
                steps += steps_in(epochs);
                epochs += 1;
            }
            (target, epochs)
        } else {
            check_epochs(args)?;
            let whole = args.num_train_epochs.floor();
            let full_steps: u64 = (0..whole as u64).map(&mut steps_in).sum();
            // ⌈E·s⌉ − ⌊E⌋·s, not ⌈(E − ⌊E⌋)·s⌉: the subtraction E − ⌊E⌋ rounds (1.01 − 1 is
            // 0.01000000000000000888), so only this form equals the Trainer's ⌈E × s⌉ whenever
            // the epochs' counts are equal.
            let last = steps_in(whole as u64);
            let partial_steps =
                (args.num_train_epochs * last as f64).ceil() as u64 - whole as u64 * last;
            (
                full_steps + partial_steps,
                args.num_train_epochs.ceil() as u64,
            )
        };
        Ok(Plan::with_totals(
            args,
            first_micro,
            first_steps,
            max_steps,
            epochs,
        ))
    }

    /// The warmup and the intervals, which follow from the total steps.
    fn with_totals(
        args: &TrainArgs,
        micro_batches_per_epoch: u64,
        steps_per_epoch: u64,
        max_steps: u64,
        epochs: u64,
    ) -> Plan {
        let warmup_steps = match args.warmup_ratio {
            Some(r) if args.warmup_steps == 0.0 => (max_steps as f64 * r).ceil() as u64,
            _ if args.warmup_steps < 1.0 => (max_steps as f64 * args.warmup_steps).ceil() as u64,
            _ => args.warmup_steps as u64,
        };
        let logging_steps = interval(args.logging_steps, max_steps);
        Plan {
            micro_batches_per_epoch,
            steps_per_epoch,
            max_steps,
            epochs,
            warmup_steps,
            logging_steps,
            eval_steps: args
                .eval_steps
                .map(|e| interval(e, max_steps))
                .unwrap_or(logging_steps),
            save_steps: interval(args.save_steps, max_steps),
        }
    }
}

fn check_epochs(args: &TrainArgs) -> Result<()> {
    if args.num_train_epochs <= 0.0 {
        bail!("--num-train-epochs must be positive (or give --max-steps)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn args(options: &[&str]) -> TrainArgs {
        let required = [
            "train",
            "--model",
            "m",
            "--train-file",
            "t.tsv",
            "--output-dir",
            "o",
        ];
        Cli::parse_from(required.iter().chain(options)).args
    }

    /// Lengths 3 … 40, scattered, so that a shuffle changes how many fit in a budget.
    fn lengths(n: usize) -> Vec<usize> {
        (0..n).map(|i| (i * 7919 + 13) % 38 + 3).collect()
    }

    fn steps_per_epoch(batcher: &EpochBatcher, accum: u64, epochs: u64) -> Vec<u64> {
        (0..epochs)
            .map(|e| (batcher.micro_batches(e).len() as u64).div_ceil(accum))
            .collect()
    }

    #[test]
    fn fixed_size_batches_keep_the_trainers_plan() {
        let lens = lengths(96);
        let a = args(&["--num-train-epochs", "2.5", "--warmup-steps", "0.1"]);
        let plan = Plan::for_run(&a, &train_batcher(&a, &lens)).unwrap();
        assert_eq!(plan, Plan::new(&a, 96).unwrap());
        assert_eq!(
            (plan.steps_per_epoch, plan.max_steps, plan.epochs),
            (12, 30, 3)
        );
        assert_eq!(plan.warmup_steps, 3);
    }

    #[test]
    fn a_budget_over_a_fixed_order_gives_the_trainers_rule() {
        let lens = lengths(96);
        let a = args(&[
            "--max-tokens-per-batch",
            "100",
            "--train-sampling-strategy",
            "sequential",
            "--num-train-epochs",
            "2.5",
            "--gradient-accumulation-steps",
            "2",
        ]);
        let batcher = train_batcher(&a, &lens);
        let micro = batcher.micro_batches(0).len() as u64;
        let plan = Plan::for_run(&a, &batcher).unwrap();
        assert_eq!(plan.micro_batches_per_epoch, micro);
        assert_eq!(plan.steps_per_epoch, micro.div_ceil(2));
        // Every epoch alike: ⌈E × steps_per_epoch⌉, as the Trainer computes it.
        assert_eq!(
            plan.max_steps,
            (2.5 * plan.steps_per_epoch as f64).ceil() as u64
        );
        assert_eq!(plan.epochs, 3);
        // Fractions that land on a whole step, where computing E − ⌊E⌋ first would round up
        // one step too many (1 + 5/100: (1.05 − 1)·100 = 5.000000000000004).
        let s = plan.steps_per_epoch;
        for whole in [0u64, 1, 2] {
            for k in 1..s {
                let e = whole as f64 + k as f64 / s as f64;
                let a = args(&[
                    "--max-tokens-per-batch",
                    "100",
                    "--train-sampling-strategy",
                    "sequential",
                    "--num-train-epochs",
                    &e.to_string(),
                    "--gradient-accumulation-steps",
                    "2",
                ]);
                let plan = Plan::for_run(&a, &train_batcher(&a, &lens)).unwrap();
                assert_eq!(plan.max_steps, (e * s as f64).ceil() as u64, "epochs {e}");
            }
        }
    }

    #[test]
    fn a_budget_over_shuffled_epochs_counts_each_epochs_steps() {
        let lens = lengths(200);
        let budget = [
            "--max-tokens-per-batch",
            "100",
            "--gradient-accumulation-steps",
            "2",
        ];
        let a = args(
            &[
                &budget[..],
                &["--num-train-epochs", "2.5", "--warmup-steps", "0.1"],
            ]
            .concat(),
        );
        let batcher = train_batcher(&a, &lens);
        let steps = steps_per_epoch(&batcher, 2, 3);
        assert!(
            steps[0] != steps[1] || steps[1] != steps[2],
            "the test needs epochs of different counts: {steps:?}"
        );
        let plan = Plan::for_run(&a, &batcher).unwrap();
        // Two whole epochs, then half of the third's steps, rounded up.
        let want = steps[0] + steps[1] + steps[2].div_ceil(2);
        assert_eq!((plan.max_steps, plan.epochs), (want, 3));
        assert_eq!(plan.steps_per_epoch, steps[0]);
        assert_eq!(plan.warmup_steps, (want as f64 * 0.1).ceil() as u64);

        // --max-steps: as many epochs as its steps reach into.
        let target = steps[0] + 1;
        let a = args(&[&budget[..], &["--max-steps", &target.to_string()]].concat());
        let plan = Plan::for_run(&a, &train_batcher(&a, &lens)).unwrap();
        assert_eq!((plan.max_steps, plan.epochs), (target, 2));
        let a = args(&[&budget[..], &["--max-steps", &steps[0].to_string()]].concat());
        assert_eq!(
            Plan::for_run(&a, &train_batcher(&a, &lens)).unwrap().epochs,
            1
        );
    }

    #[test]
    fn whole_epochs_with_a_budget_run_every_batch() {
        let lens = lengths(200);
        let a = args(&["--max-tokens-per-batch", "90", "--num-train-epochs", "3"]);
        let batcher = train_batcher(&a, &lens);
        let plan = Plan::for_run(&a, &batcher).unwrap();
        assert_eq!(
            plan.max_steps,
            steps_per_epoch(&batcher, 1, 3).iter().sum::<u64>()
        );
    }

    #[test]
    fn a_budget_over_no_rows_is_an_error() {
        let a = args(&["--max-tokens-per-batch", "90"]);
        assert!(Plan::for_run(&a, &train_batcher(&a, &[])).is_err());
    }
}
