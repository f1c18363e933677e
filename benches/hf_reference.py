#!/usr/bin/env python3
"""The reference side of `bertft-cuda bench`: the same training benchmark in PyTorch.

For each model, precision and batch size it times full training steps (forward, backward,
gradient clipping at 1.0, AdamW, dropout on) on fixed-length random token batches, every
position a real token, with three implementations:

  hf-trainer     the Hugging Face Trainer (TrainingArguments(per_device_train_batch_size=...,
                 fp16/bf16, max_steps, report_to=[], save_strategy='no', logging off)); step
                 times are the gaps between synchronized `on_step_end` callbacks, so they include
                 the Trainer's data loading as a user of it gets it;
  torch-eager    a plain PyTorch loop: attn_implementation='sdpa', fused AdamW, autocast (+
                 GradScaler for fp16);
  torch-compile  the same loop over torch.compile(model).

It prints the columns `bertft-cuda bench` prints (samples/s, tokens/s, ms/step median and min,
model TFLOP/s, MFU, peak memory) as a Markdown table, so both tools' rows go into one table in
benches/RESULTS.md, and writes them with --json. The FLOP count is the same as bertft-cuda's
(src/model/flops.rs): per token 6*N_matmul + 12*layers*hidden*seq, N_matmul =
layers*(4*hidden^2 + 2*hidden*intermediate). Rates are over the whole timed run
(steps*batch / total time); MFU is against --peak-tflops (default 989, the dense fp16/bf16 peak
of an H100/H200, when the GPU is one; otherwise MFU is '-' unless given). Peak memory is
torch.cuda.max_memory_allocated() on a GPU, the process's peak RSS (VmHWM) on the CPU.

Models: BERT-base (BertConfig(): the bert-base-uncased shape) randomly initialized with 2
labels; --minilm-dir adds all-MiniLM-L6-v2 from its Hugging Face folder; --tiny replaces
BERT-base with benches/tiny_config.json (for smoke tests; `bertft-cuda bench --config
benches/tiny_config.json` runs the same model). Nothing is downloaded: it runs without network.

Needs torch and transformers; the Trainer also needs accelerate (transformers[torch]); without
it the hf-trainer rows are skipped with a notice.

GPU machine (the comparison; see benches/README.md):
    python3 benches/hf_reference.py --batch-sizes 32,64 --seq-len 128 --steps 50 --fp16

CPU smoke test (verified in /work/venv, torch 2.15 / transformers 5.24, with accelerate 1.15
on PYTHONPATH for the Trainer rows, and without it):
    /work/venv/bin/python benches/hf_reference.py --device cpu --steps 2 --warmup 1 \
        --batch-sizes 2 --seq-len 16 --tiny

SST-2 mode (--sst2-dir): fine-tunes with the Trainer for one epoch over train.tsv (dynamic
padding with DataCollatorWithPadding, batch 32, max length 128, lr 1e-4, warmup 0.06, weight
decay 0.01: the README's `bertft-cuda train` command) and evaluates on dev.tsv, reporting wall
clock and accuracy. The model is MiniLM (--minilm-dir) if given, else BERT-base random init;
the tokenizer comes from --tokenizer-dir, else --minilm-dir. The TSVs have a header row; the
text column is `sentence` (GLUE) or `text`, the label column `label`; no quote processing.
    python3 benches/hf_reference.py --sst2-dir ../shared/data/sst2 --minilm-dir <folder> --fp16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

IMPLS = ("hf-trainer", "torch-eager", "torch-compile")
COLUMNS = (
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
)
# The narrowest numeric column, as in bertft-cuda's table (src/bench/report.rs).
MIN_NUMBER_WIDTH = 8
# Dense fp16/bf16 tensor-core TFLOP/s of the SXM parts; PCIe/NVL variants are slower.
KNOWN_GPUS = {"H100": 989.0, "H200": 989.0}
LEARNING_RATE = 5e-5
MAX_GRAD_NORM = 1.0


# ---------------------------------------------------------------- models and FLOPs


@dataclass
class ModelSpec:
    name: str
    config: BertConfig
    folder: str | None = None  # pre-trained weights, or None for a random init


TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_config.json")


def tiny_config(vocab_size: int | None = None) -> BertConfig:
    """benches/tiny_config.json, the config `bertft-cuda bench --config` takes for the same model;
    SST-2 mode widens its vocabulary to the tokenizer's."""
    with open(TINY_CONFIG) as f:
        fields = json.load(f)
    if vocab_size:
        fields["vocab_size"] = vocab_size
    return BertConfig(**fields)


def model_specs(args, vocab_size: int | None = None) -> list[ModelSpec]:
    specs = []
    if args.tiny:
        specs.append(ModelSpec("benches/tiny_config.json (random init)", tiny_config(vocab_size)))
    elif not (args.sst2_dir and args.minilm_dir):
        # BertConfig() is bert-base-uncased's shape (vocab 30522, hidden 768, 12 layers).
        specs.append(ModelSpec("bert-base-uncased (random init)", BertConfig(num_labels=2)))
    if args.minilm_dir:
        cfg = BertConfig.from_pretrained(args.minilm_dir, num_labels=2)
        specs.append(ModelSpec(f"all-MiniLM-L6-v2 ({args.minilm_dir})", cfg, args.minilm_dir))
    return specs


def make_model(spec: ModelSpec, seed: int, device: str) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    if spec.folder:
        # fp32 master weights whatever the folder stores (benches/device/pack.sh carries MiniLM
        # in fp16, which transformers would otherwise keep: GradScaler then refuses to unscale
        # fp16 gradients); `.float()` rather than a dtype argument, whose name changed in 5.x.
        model = BertForSequenceClassification.from_pretrained(
            spec.folder, num_labels=2, attn_implementation="sdpa"
        ).float()
    else:
        model = BertForSequenceClassification._from_config(
            spec.config, attn_implementation="sdpa"
        )
    return model.to(device).train()


def matmul_params(cfg: BertConfig) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * (4 * h * h + 2 * h * i)


def train_flops_per_token(cfg: BertConfig, seq_len: int) -> int:
    return 6 * matmul_params(cfg) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# ---------------------------------------------------------------- data


class RandomBatches(torch.utils.data.Dataset):
    """Fixed-length rows of random ids (never the padding id 0), all positions attended."""

    def __init__(self, rows: int, seq_len: int, vocab_size: int, num_labels: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, vocab_size, (rows, seq_len), generator=g)
        self.labels = torch.randint(0, num_labels, (rows,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        ids = self.input_ids[i]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "labels": self.labels[i],
        }

    def batch(self, step: int, batch: int, device: str) -> dict:
        rows = slice(step * batch, (step + 1) * batch)
        ids = self.input_ids[rows]
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "token_type_ids": torch.zeros_like(ids).to(device),
            "labels": self.labels[rows].to(device),
        }


# ---------------------------------------------------------------- memory and clocks


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def reset_peak_memory(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0), as bertft-cuda bench does.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else vm_hwm_bytes()


# ---------------------------------------------------------------- implementations


@dataclass
class Setting:
    batch: int
    seq_len: int
    warmup: int
    steps: int


@dataclass
class Measured:
    step_s: list[float]
    last_loss: float
    extra: dict = field(default_factory=dict)


def amp_dtype(precision: str):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def run_loop(spec, s: Setting, precision, device, seed, compiled: bool) -> Measured:
    """The plain PyTorch loop (eager or compiled), timed step by step."""
    model = make_model(spec, seed, device)
    step_model = torch.compile(model) if compiled else model
    # Fused, as the Trainer's default optim (adamw_torch_fused); torch < 2.4 refuses it on the CPU.
    params = list(model.parameters())
    try:
        fused = True
        opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    except RuntimeError:
        fused = False
        opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    dtype = amp_dtype(precision)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    rows = (s.warmup + s.steps) * s.batch
    data = RandomBatches(rows, s.seq_len, spec.config.vocab_size, 2, seed)
    times, loss = [], float("nan")
    for step in range(s.warmup + s.steps):
        batch = data.batch(step, s.batch, device)  # drawn before the clock, as bertft-cuda bench does
        synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            out = step_model(**batch)
        if scaler:
            scaler.scale(out.loss).backward()
            scaler.unscale_(opt)
        else:
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        loss = out.loss.item()
    if compiled:
        torch._dynamo.reset()  # the compiled graphs hold the model: let it go with this setting
    return Measured(times[s.warmup:], loss, {"optim": f"torch.optim.AdamW(fused={fused})"})


def training_args(**kw):
    """TrainingArguments across transformers 4.4x-5.x: renamed and removed fields."""
    params = inspect.signature(transformers.TrainingArguments.__init__).parameters
    if "use_cpu" in kw and "use_cpu" not in params:
        kw["no_cuda"] = kw.pop("use_cpu")
    if "eval_strategy" in kw and "eval_strategy" not in params:
        kw["evaluation_strategy"] = kw.pop("eval_strategy")
    # transformers 4.x takes a warmup fraction as warmup_ratio; 5.x as a warmup_steps below 1.
    if 0 < kw.get("warmup_steps", 0) < 1 and "warmup_ratio" in params:
        kw["warmup_ratio"] = kw.pop("warmup_steps")
    return transformers.TrainingArguments(**kw)


def optim_name(targs) -> str:
    return str(getattr(targs.optim, "value", targs.optim))


def has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401

        return True
    except ImportError:
        return False


def run_trainer(spec, s: Setting, precision, device, seed) -> Measured:
    """The Trainer's train() for warmup + steps steps; the timed steps are the last `steps`."""
    from transformers import Trainer, TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.stamps:
                synchronize(device)
                self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            synchronize(device)
            self.stamps.append(time.perf_counter())

    model = make_model(spec, seed, device)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="hf-reference-") as out:
        targs = training_args(
            output_dir=out,
            per_device_train_batch_size=s.batch,
            max_steps=s.warmup + s.steps,
            learning_rate=LEARNING_RATE,
            max_grad_norm=MAX_GRAD_NORM,
            fp16=precision == "fp16",
            bf16=precision == "bf16",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            seed=seed,
            use_cpu=device == "cpu",
        )
        rows = (s.warmup + s.steps) * s.batch
        data = RandomBatches(rows, s.seq_len, spec.config.vocab_size, 2, seed)
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer])
        # train() prints its metrics: to stderr, so that stdout is the table alone.
        with contextlib.redirect_stdout(sys.stderr):
            result = trainer.train()
    gaps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    if len(gaps) != s.warmup + s.steps:
        raise RuntimeError(f"the Trainer ran {len(gaps)} steps, not {s.warmup + s.steps}")
    # The Trainer reports the mean loss of all its steps, not the last one.
    extra = {"optim": optim_name(targs), "train_loss": result.training_loss}
    return Measured(gaps[s.warmup:], float("nan"), extra)


# ---------------------------------------------------------------- report


def significant(x: float) -> str:
    """Three significant digits, no exponent (as bertft-cuda's table)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = 2 - math.floor(math.log10(abs(x)))
    return f"{x:.{max(decimals, 0)}f}"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    mib = 1024 * 1024
    return f"{b / (1024 * mib):.2f} GiB" if b >= 1024 * mib else f"{b / mib:.1f} MiB"


def markdown_row(cells, first_width):
    """Cells padded as bertft-cuda pads them: the first left-aligned, numbers right-aligned."""
    padded = []
    for i, c in enumerate(cells):
        if i == 0:
            padded.append(f"{c:<{max(first_width, len(COLUMNS[0]))}}")
        else:
            padded.append(f"{c:>{max(len(COLUMNS[i]), MIN_NUMBER_WIDTH)}}")
    return "| " + " | ".join(padded) + " |"


def header(first_width: int) -> str:
    names = markdown_row(COLUMNS, first_width)
    widths = [len(c) for c in names[2:-2].split(" | ")]
    rule = ["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]
    return names + "\n| " + " | ".join(rule) + " |"


def result_row(label, s: Setting, m: Measured, flops_per_step, peak_tflops, mem):
    total = sum(m.step_s)
    samples_per_s = s.batch * len(m.step_s) / total
    tflops = flops_per_step * len(m.step_s) / total / 1e12
    return {
        "impl": label.split()[0],
        "backend": label,
        "batch": s.batch,
        "seq_len": s.seq_len,
        "steps": len(m.step_s),
        "warmup_steps": s.warmup,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * s.seq_len,
        "ms_per_step_median": statistics.median(m.step_s) * 1e3,
        "ms_per_step_min": min(m.step_s) * 1e3,
        "step_ms": [t * 1e3 for t in m.step_s],
        "flops_per_step": flops_per_step,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "peak_memory_bytes": mem,
        "last_loss": m.last_loss if m.last_loss == m.last_loss else None,
        **m.extra,
    }


def table_row(r: dict, first_width: int) -> str:
    cells = [
        r["backend"],
        str(r["batch"]),
        str(r["seq_len"]),
        str(r["steps"]),
        significant(r["samples_per_s"]),
        significant(r["tokens_per_s"]),
        significant(r["ms_per_step_median"]),
        significant(r["ms_per_step_min"]),
        significant(r["tflops"]),
        "-" if r["mfu"] is None else significant(r["mfu"] * 100) + "%",
        fmt_bytes(r["peak_memory_bytes"]),
    ]
    return markdown_row(cells, first_width)


def write_json_atomic(path: str, doc: dict):
    """Written under a temporary name next to `path`, then renamed: never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- runs


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def default_peak_tflops(args) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        for gpu, tflops in KNOWN_GPUS.items():
            # The PCIe and NVL variants of the same names are slower: their peak must be given.
            if gpu in name and not any(v in name for v in ("PCIe", "NVL")):
                return tflops
    return None


def precisions(args) -> list[str]:
    chosen = [p for p in ("fp16", "bf16", "fp32") if getattr(args, p)]
    if chosen:
        return chosen
    return ["fp16", "bf16"] if args.device == "cuda" else ["fp32"]


def available_impls(args) -> list[str]:
    if "hf-trainer" in args.impls and not has_accelerate():
        print(
            "notice: accelerate is not installed (the Trainer needs it: pip install "
            "'transformers[torch]'); skipping the hf-trainer rows",
            file=sys.stderr,
        )
        return [i for i in args.impls if i != "hf-trainer"]
    return args.impls


def print_preamble(spec: ModelSpec, args, doc: dict):
    """What the rows have in common, in the words of bertft-cuda bench's preamble."""
    cfg = spec.config
    with torch.device("meta"):  # the shape only: nothing is allocated or initialized
        n_params = sum(p.numel() for p in BertForSequenceClassification(cfg).parameters())
    peak = doc["peak_tflops"]
    print(
        f"model: {spec.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, intermediate {cfg.intermediate_size}, 2 labels, "
        f"{n_params} parameters ({matmul_params(cfg)} in per-token matmuls)"
    )
    print(
        f"flops: {train_flops_per_token(cfg, args.seq_len)} per token at seq {args.seq_len} "
        f"(6·N_matmul + 12·layers·hidden·seq, forward+backward); device: {doc['device']}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; peak: "
        + (f"{peak} TFLOP/s" if peak else 'none given (MFU "-"; --peak-tflops sets it)')
    )


def measure_one(spec: ModelSpec, impl: str, precision: str, s: Setting, args, peak) -> dict:
    """One row: the measurement, or the error that stopped it (e.g. out of memory), so that
    the other settings still run."""
    label = f"{impl} {precision}"
    reset_peak_memory(args.device)
    try:
        if impl == "hf-trainer":
            m = run_trainer(spec, s, precision, args.device, args.seed)
        else:
            compiled = impl == "torch-compile"
            m = run_loop(spec, s, precision, args.device, args.seed, compiled)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"notice: {label}, batch {s.batch} failed: {msg}", file=sys.stderr)
        return {"impl": impl, "precision": precision, "model": spec.name, "batch": s.batch, "error": msg}
    finally:
        gc.collect()
    flops_per_step = train_flops_per_token(spec.config, s.seq_len) * s.batch * s.seq_len
    r = result_row(label, s, m, flops_per_step, peak, peak_memory(args.device))
    r.update(precision=precision, model=spec.name)
    return r


def run_benchmarks(args, doc: dict):
    impls = available_impls(args)
    specs = model_specs(args)
    for spec in specs:  # checked before anything runs
        if args.seq_len > spec.config.max_position_embeddings:
            sys.exit(
                f"error: --seq-len {args.seq_len} is over {spec.name}'s max_position_embeddings "
                f"({spec.config.max_position_embeddings})"
            )
    for spec in specs:
        print_preamble(spec, args, doc)
        labels = [f"{impl} {p}" for p in precisions(args) for impl in impls]
        width = max([len(COLUMNS[0])] + [len(label) for label in labels])
        print(header(width), flush=True)
        for precision in precisions(args):
            for impl in impls:
                for batch in args.batch_sizes:
                    s = Setting(batch, args.seq_len, args.warmup, args.steps)
                    r = measure_one(spec, impl, precision, s, args, doc["peak_tflops"])
                    if "error" not in r:
                        print(table_row(r, width), flush=True)
                    doc["results"].append(r)
                    if args.json:
                        write_json_atomic(args.json, doc)


# ---------------------------------------------------------------- SST-2


def read_tsv(path: str) -> tuple[list[str], list[int]]:
    """GLUE's TSV: a header row, no quote processing; text column `sentence` or `text`."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    head = lines[0].split("\t")
    text_col = "sentence" if "sentence" in head else "text"
    if text_col not in head or "label" not in head:
        sys.exit(f"error: {path}: needs columns sentence (or text) and label, found {', '.join(head)}")
    t, l = head.index(text_col), head.index("label")
    texts, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        cells = line.split("\t")
        if len(cells) != len(head):
            sys.exit(f"error: {path}:{n}: {len(cells)} fields, the header has {len(head)}")
        texts.append(cells[t])
        labels.append(int(cells[l]))
    return texts, labels


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, labels, max_length):
        self.enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def run_sst2(args, doc: dict):
    import numpy as np
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    if not has_accelerate():
        sys.exit(
            "error: --sst2-dir runs the Trainer, which needs accelerate "
            "(pip install 'transformers[torch]')"
        )
    tok_dir = args.tokenizer_dir or args.minilm_dir
    if not tok_dir:
        sys.exit(
            "error: --sst2-dir needs a tokenizer: --tokenizer-dir (e.g. the MiniLM folder) "
            "or --minilm-dir"
        )
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_texts, train_labels = read_tsv(os.path.join(args.sst2_dir, "train.tsv"))
    dev_texts, dev_labels = read_tsv(os.path.join(args.sst2_dir, "dev.tsv"))
    if args.sst2_max_steps > 0:  # only what those steps read is tokenized
        n = args.sst2_max_steps * 32
        train_texts, train_labels = train_texts[:n], train_labels[:n]
    train = Encoded(tokenizer, train_texts, train_labels, 128)
    dev = Encoded(tokenizer, dev_texts, dev_labels, 128)
    print(
        f"SST-2: {len(train)} train rows, {len(dev)} dev rows; device: {doc['device']}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    cols = (
        "model", "impl", "precision", "train rows", "steps", "train s", "samples/s", "eval s",
        "eval accuracy", "peak mem",
    )
    print("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|", flush=True)

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=-1) == p.label_ids).mean())}

    for spec in model_specs(args, vocab_size=len(tokenizer)):
        for precision in precisions(args):
            reset_peak_memory(args.device)
            model = make_model(spec, args.seed, args.device)
            with tempfile.TemporaryDirectory(prefix="hf-reference-sst2-") as out:
                targs = training_args(
                    output_dir=out,
                    per_device_train_batch_size=32,
                    # As benches/device/session.sh's run of ours evaluates.
                    per_device_eval_batch_size=64,
                    num_train_epochs=1,
                    max_steps=args.sst2_max_steps,
                    learning_rate=1e-4,
                    warmup_steps=0.06,
                    weight_decay=0.01,
                    fp16=precision == "fp16",
                    bf16=precision == "bf16",
                    report_to=[],
                    save_strategy="no",
                    logging_strategy="no",
                    eval_strategy="no",
                    disable_tqdm=True,
                    seed=args.seed,
                    use_cpu=args.device == "cpu",
                )
                trainer = Trainer(
                    model=model,
                    args=targs,
                    train_dataset=train,
                    eval_dataset=dev,
                    data_collator=DataCollatorWithPadding(tokenizer),
                    compute_metrics=accuracy,
                )
                synchronize(args.device)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    result = trainer.train()
                synchronize(args.device)
                t1 = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    metrics = trainer.evaluate()
                synchronize(args.device)
                t2 = time.perf_counter()
            rows = min(len(train), result.global_step * 32)
            r = {
                "model": spec.name,
                "impl": "hf-trainer",
                "precision": precision,
                "train_rows": rows,
                "steps": result.global_step,
                "train_seconds": t1 - t0,
                "train_samples_per_s": rows / (t1 - t0),
                "train_loss": result.training_loss,
                "eval_seconds": t2 - t1,
                "eval_accuracy": metrics["eval_accuracy"],
                "peak_memory_bytes": peak_memory(args.device),
                "optim": optim_name(targs),
            }
            print(
                f"| {spec.name} | hf-trainer | {precision} | {rows} | {r['steps']} "
                f"| {r['train_seconds']:.1f} | {significant(r['train_samples_per_s'])} "
                f"| {r['eval_seconds']:.1f} | {r['eval_accuracy']:.4f} "
                f"| {fmt_bytes(r['peak_memory_bytes'])} |",
                flush=True,
            )
            doc["results"].append(r)
            if args.json:
                write_json_atomic(args.json, doc)
            del model, trainer
            gc.collect()


# ---------------------------------------------------------------- main


def comma_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers: {text!r}")
    return values


def comma_impls(text: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in IMPLS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown implementation {bad}: choose from {', '.join(IMPLS)}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--device", choices=("cuda", "cpu"), default="cuda")
    add("--batch-sizes", type=comma_ints, default=[32, 64], help="comma list (default 32,64)")
    add("--seq-len", type=int, default=128)
    add("--steps", type=int, default=50, help="timed steps per setting")
    add("--warmup", "--warmup-steps", dest="warmup", type=int, default=5,
        help="untimed steps before them")
    add("--fp16", action="store_true", help="autocast fp16 + GradScaler (Trainer: fp16=True)")
    add("--bf16", action="store_true", help="autocast bf16 (Trainer: bf16=True)")
    add("--fp32", action="store_true",
        help="no autocast (the default on the CPU; on a GPU, no flag means fp16 and bf16)")
    add("--impls", type=comma_impls, default=list(IMPLS),
        help=f"comma list of {', '.join(IMPLS)} (default all)")
    add("--tiny", action="store_true",
        help="benches/tiny_config.json instead of BERT-base (smoke tests)")
    add("--minilm-dir", help="also benchmark all-MiniLM-L6-v2 from this Hugging Face folder")
    add("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default 989 on an H100/H200)")
    add("--seed", type=int, default=42)
    add("--json", help="also write the results to this file")
    add("--sst2-dir", help="fine-tune on SST-2's train.tsv for one epoch, evaluate on dev.tsv")
    add("--tokenizer-dir", help="SST-2 mode: the tokenizer's folder (e.g. MiniLM's)")
    add("--sst2-max-steps", type=int, default=-1,
        help="SST-2 mode: stop after this many steps (default: the epoch)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.seq_len < 1:
        p.error("--steps and --seq-len must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU (--device cpu runs on the CPU)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: no such folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    doc = {
        "tool": "benches/hf_reference.py",
        "mode": "sst2" if args.sst2_dir else "synthetic",
        "command": " ".join(sys.argv),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flops_formula": "per token: 6*matmul_parameters + 12*layers*hidden*seq_len (forward+backward)",
        "peak_tflops": default_peak_tflops(args),
        "peak_memory": (
            "torch.cuda.max_memory_allocated" if args.device == "cuda" else "host peak RSS (VmHWM)"
        ),
        "seed": args.seed,
        "results": [],
    }
    if args.sst2_dir:
        run_sst2(args, doc)
    else:
        run_benchmarks(args, doc)
    if args.json:
        write_json_atomic(args.json, doc)
    if any("error" in r for r in doc["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
