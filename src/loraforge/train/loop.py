"""The training loop: data -> LoRA model -> AdamW steps, with checkpoints, resume and DDP.

The loss is summed over answer tokens and divided by the number of answer tokens in the whole
optimizer step (all micro-batches, all processes), so gradient accumulation and data parallel
training give the same update as one big batch. Logits are computed only where a label exists.
`--method dpo | orpo` trains on preference pairs instead (train/preference.py: the objectives).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge import LoraError
from loraforge import data as D
from loraforge.train import distributed as dist
from loraforge.train.checkpoint import data_order_state, find_latest, load_checkpoint, save_checkpoint
from loraforge.core.config import LoraConfig, parse_targets
from loraforge.eval.score import answer_loss_sum, rows_loss
from loraforge.core.io import atomic_write_bytes, save_adapter
from loraforge.train.log import MetricsLog, peak_memory_mb, read_records
from loraforge.core.ops import adapter_params, attach, format_report, parameter_report
from loraforge.models import load_model, load_tokenizer, pick_device
from loraforge.train.config import TrainConfig, dump
from loraforge.train import early_stop
from loraforge.train.early_stop import EarlyStopping

logger = logging.getLogger(__name__)


# --- data --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    train_rows: list[dict]
    val_rows: list[dict]
    notes: list[str]
    n_examples: int


def prepare_data(cfg: TrainConfig, tokenizer) -> Prepared:
    if cfg.method != "sft":
        return prepare_pairs(cfg, tokenizer)
    from loraforge.data.sources import parse_columns
    from loraforge.data.stream import use_streaming

    if use_streaming(cfg.streaming, cfg.data):
        return prepare_stream(cfg, tokenizer)
    examples = D.load_examples(cfg.data, cfg.split, parse_columns(cfg.columns))
    train, val, note = D.train_val_split(examples, cfg.val_fraction, seed=cfg.seed)
    notes = [note] if note else []
    notes += [f"warning: {w}" for w in D.stop_notes(train, tokenizer, stop_token_ids(cfg, tokenizer), cfg.max_len)]
    encoded = D.encode_examples(train, tokenizer, cfg.train_on_prompt, cfg.max_len)
    if encoded.note():
        notes.append(encoded.note())
    val_rows = D.pack(D.encode_examples(val, tokenizer, cfg.train_on_prompt, cfg.max_len).pairs,
                      cfg.max_tokens) if val else []
    return Prepared(D.pack(encoded.pairs, cfg.max_tokens), val_rows, notes, len(examples))


def prepare_stream(cfg: TrainConfig, tokenizer) -> Prepared:
    """--streaming: rows read, tokenized and packed as training goes, in bounded memory (data.stream)."""
    from loraforge.data.sources import parse_columns
    from loraforge.data.stream import VAL_WINDOW, open_stream

    if not cfg.max_steps:
        raise LoraError(f"streaming {cfg.data}: pass --max-steps (a stream's length is not known up front) "
                        f"or --streaming off")
    if cfg.split or dist.world_size() > 1:
        raise LoraError("streaming reads one file in one process: drop --split and --nproc, or --streaming off")
    stream, val_rows, first = open_stream(cfg.data, tokenizer, parse_columns(cfg.columns), cfg.train_on_prompt,
                                          cfg.max_len, cfg.max_tokens, cfg.shuffle_buffer, cfg.val_fraction, cfg.seed)
    notes = [(f"streaming {cfg.data}: shuffled in a buffer of {cfg.shuffle_buffer} rows (no global shuffle); "
              f"validation drawn from the first {VAL_WINDOW} examples; {cfg.max_steps} steps, passing over the "
              f"file again at its end")]
    notes += [f"warning: {w}" for w in D.stop_notes(first, tokenizer, stop_token_ids(cfg, tokenizer), cfg.max_len)]
    return Prepared(stream, val_rows, notes, len(first))


def resume_stream(rows, latest: Path):
    """A streaming run continues at the reader position its checkpoint saved."""
    from loraforge.data.stream import RowStream
    from loraforge.train.checkpoint import data_stream_state

    if latest is None:
        return
    state = data_stream_state(latest)
    if isinstance(rows, RowStream) != (state is not None):
        raise LoraError(f"checkpoint {latest} was written by a {'streaming' if state else 'non-streaming'} run; "
                        f"resume with --streaming {'on' if state else 'off'}")
    if state is not None:
        rows.restore(state)


def data_order(cfg: TrainConfig, rows) -> dict | None:
    """What an in-memory run's row order depends on beyond (seed, batch size): kept in each
    checkpoint, so that --resume continues the same order (None for a stream: it keeps its own)."""
    return None if hasattr(rows, "step_batches") else {"group_by_length": cfg.group_by_length}


def resume_data_order(cfg: TrainConfig, rows, latest: Path | None) -> TrainConfig:
    """On --resume, the order the checkpoint's run used: a checkpoint from before batches were
    grouped by length continues in plain shuffled order (with a note); a different
    --group-by-length setting is refused, since the rest of the epoch would repeat some rows and
    skip others."""
    if latest is None or data_order(cfg, rows) is None:
        return cfg
    saved = data_order_state(latest)
    grouped = saved.get("group_by_length") if isinstance(saved, dict) else None
    if grouped is None:
        if cfg.group_by_length:
            logger.info(f"note: checkpoint {latest} predates length-grouped batches; "
                        f"this run continues its shuffled order (as --no-group-by-length)")
        return dataclasses.replace(cfg, group_by_length=False)
    if grouped != cfg.group_by_length:
        flag = "without --no-group-by-length" if grouped else "with --no-group-by-length"
        raise LoraError(f"checkpoint {latest} was written with batches {'' if grouped else 'not '}grouped by "
                        f"length; resume {flag}, or start over without --resume")
    return cfg


def stream_position(rows) -> dict | None:
    return rows.state() if hasattr(rows, "state") else None


def stop_token_ids(cfg: TrainConfig, tokenizer) -> set[int]:
    """The token ids generation stops at: the model's generation_config eos (one id or a list),
    else the tokenizer's eos."""
    from loraforge.models.loading import resolve_model_path

    path = Path(resolve_model_path(cfg.model)) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def prepare_pairs(cfg: TrainConfig, tokenizer) -> Prepared:
    """Preference rows for dpo / orpo: one {"chosen", "rejected"} row per pair, not packed."""
    from loraforge.data.pairs import encode_pairs, load_pairs

    pairs = load_pairs(cfg.data)
    train, val, note = D.train_val_split(pairs, cfg.val_fraction, seed=cfg.seed)
    notes = [note] if note else []
    train_rows, dropped = encode_pairs(train, tokenizer, cfg.max_len)
    val_rows = encode_pairs(val, tokenizer, cfg.max_len)[0] if val else []
    if dropped:
        notes.append(f"max_len={cfg.max_len}: dropped {dropped} pair(s) whose chosen or rejected answer did not fit")
    return Prepared(train_rows, val_rows, notes, len(pairs))


def steps_per_epoch(cfg: TrainConfig, n_rows: int) -> int:
    return max(1, math.ceil(n_rows / (cfg.batch_size * cfg.grad_accum)))


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch(cfg, n_rows)))


def step_batches(cfg: TrainConfig, rows: list[dict], step: int) -> list[list[dict]]:
    """The micro-batches of optimizer step `step` (0-based): a pure function of (seed, step), so
    a resumed run sees exactly the data an uninterrupted one would. A stream (data.stream) gives
    its next rows instead: it restores its own position on resume."""
    if hasattr(rows, "step_batches"):
        return rows.step_batches(step, cfg.batch_size, cfg.grad_accum)
    per_epoch = steps_per_epoch(cfg, len(rows))
    epoch, index = divmod(step, per_epoch)
    rows_per_step = cfg.batch_size * cfg.grad_accum
    order = D.length_grouped(rows, cfg.batch_size, cfg.seed, epoch) if cfg.group_by_length \
        else D.shuffled(rows, cfg.seed, epoch)
    chunk = order[index * rows_per_step:(index + 1) * rows_per_step]
    return [chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]


# --- model -------------------------------------------------------------------------------------
def lora_config(cfg: TrainConfig) -> LoraConfig:
    exclude = [name.strip() for name in cfg.exclude.split(",") if name.strip()] or None
    return LoraConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=parse_targets(cfg.targets),
                      exclude_modules=exclude,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init=cfg.init,
                      base_model_name_or_path=cfg.model)


def effective_precision(cfg: TrainConfig, device: torch.device) -> str:
    """`auto`: the frozen base stored in bfloat16 with bf16 autocast where the hardware runs bf16
    natively (no per-step weight casts, half the memory), else float32."""
    from loraforge.models import bf16_supported

    if cfg.precision != "auto":
        return cfg.precision
    return "bf16-base" if bf16_supported(device) else "fp32"


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None: no autocast)."""
    return None if precision == "fp32" else torch.bfloat16


def load_base(cfg: TrainConfig, device: torch.device):
    """The frozen base as this run trains over it: in its storage dtype, quantized for QLoRA."""
    precision = effective_precision(cfg, device)  # QLoRA keeps the unquantized rest in bf16 too
    base_dtype = "bfloat16" if precision == "bf16-base" or (cfg.quantize and precision == "bf16") else "float32"
    model = load_model(cfg.model, dtype=base_dtype, device=str(device))
    if cfg.quantize:
        from loraforge.core.quant import quantize_model

        quantize_model(model, cfg.quantize)
    return model


def build_model(cfg: TrainConfig, device: torch.device, new_ids: list[int] | None = None):
    model = load_base(cfg, device)
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)
    attach(model, with_new_tokens(model, lora_config(cfg), new_ids) if new_ids else lora_config(cfg))
    for p in adapter_params(model).values():  # adapters train in float32 whatever the base dtype
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.lean_memory:
        from loraforge.models.lean import make_lean

        make_lean(model)
    model.train()
    return model


def training_tokenizer(cfg: TrainConfig):
    """(tokenizer, ids of the --add-tokens tokens added to it, or None)."""
    from loraforge.core.tokens import grow_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, grow_tokenizer(tokenizer, cfg.add_tokens) if cfg.add_tokens else None


def with_new_tokens(model, config: LoraConfig, new_ids: list[int]) -> LoraConfig:
    """Only the new tokens' rows of the embedding and head train (PEFT's trainable tokens); the
    vocabulary grows first, its new rows drawn around the old rows' mean (transformers' resize)."""
    from loraforge.core.tokens import grow_vocabulary, indices_for

    grow_vocabulary(model, new_ids)
    return dataclasses.replace(config, trainable_token_indices=indices_for(model, new_ids))


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over adapter parameters only; LoRA+ gives lora_B a larger learning rate."""
    params = adapter_params(model)
    b_params = [p for n, p in params.items() if ".lora_B." in n or "lora_embedding_B" in n]
    other = [p for n, p in params.items() if not (".lora_B." in n or "lora_embedding_B" in n)]
    groups = [{"params": other, "lr": cfg.lr},
              {"params": b_params, "lr": cfg.lr * cfg.loraplus_ratio}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay,
                             betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to zero (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- the step ----------------------------------------------------------------------------------
def to_device(batch: dict, device: torch.device, mask_dtype: torch.dtype) -> dict:
    out = {k: v.to(device) for k, v in batch.items()}
    if "attention_mask" in out:
        out["attention_mask"] = out["attention_mask"].to(mask_dtype)
    return out


def train_step(model, micro_batches, optimizer, scheduler, cfg, ctx) -> dict:
    """One optimizer step over this process's share of the micro-batches (SFT rows or preference pairs)."""
    if cfg.method == "sft":
        stats = sft_backward(model, micro_batches, ctx)
    else:
        from loraforge.train import preference

        stats = preference.backward(model, micro_batches, cfg, ctx)
    if not ctx.fsdp:  # FSDP2 reduce-scatters (averages) gradients itself; grad_factor undoes the mean
        dist.all_reduce_grads(ctx.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, cfg.max_grad_norm)
    if not (math.isfinite(stats["loss"]) and math.isfinite(float(grad_norm))):
        raise NonFiniteStep(stats["loss"], float(grad_norm))  # before the update: the adapter stays as it was
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {**stats, "grad_norm": float(grad_norm)}


def sft_backward(model, micro_batches, ctx) -> dict:
    """Forward and backward of the answer NLL, summed and divided by the step's answer tokens."""
    shards = [dist.shard(mb) for mb in micro_batches]
    batches = [D.collate(s, ctx.pad_id, windows=ctx.windows, pad_to_multiple_of=ctx.pad_multiple) for s in shards if s]
    n_tokens = dist.all_sum(sum(D.count_answer_tokens(b["labels"]) for b in batches))
    loss_total = torch.zeros((), device=ctx.device)
    for batch in batches:
        batch = to_device(batch, ctx.device, ctx.mask_dtype)
        with torch.autocast(ctx.device.type, dtype=ctx.autocast or torch.float32, enabled=ctx.autocast is not None):
            loss = answer_loss_sum(model, batch)
        (loss * ctx.grad_factor / max(n_tokens, 1)).backward()
        loss_total += loss.detach()
    seen = dist.all_sum(sum(D.count_tokens(s) for s in shards))  # real tokens, not the batch's padding
    return {"loss": dist.all_sum(float(loss_total)) / max(n_tokens, 1), "tokens": seen, "answer_tokens": n_tokens}


class NonFiniteStep(Exception):
    """A step whose loss or gradient norm is NaN or infinite; raised before the optimizer moves."""

    def __init__(self, loss: float, grad_norm: float):
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


def validation_loss(model, rows, ctx, batch_size: int) -> float | None:
    if not rows:
        return None
    model.eval()
    try:
        return rows_loss(model, rows, ctx.pad_id, batch_size, ctx.autocast, ctx.pad_multiple)
    finally:
        model.train()


# --- the run -----------------------------------------------------------------------------------
@dataclass
class Context:
    device: torch.device
    autocast: torch.dtype | None
    mask_dtype: torch.dtype
    pad_id: int
    params: list[torch.nn.Parameter]
    fsdp: bool = False
    grad_factor: int = 1  # FSDP averages gradients over processes; scaling the loss restores the sum
    windows: bool = False  # windowed attention layers: packing by position ids (data.collate)
    # Batch widths rounded up to a multiple of this: a few shapes recur instead of one per width.
    # oneDNN (CPU bf16 matmuls) keeps per-shape state, so every new width held on to ~10-20 MB
    # for the rest of the run on SmolLM2 (+18 MB a step measured); 16 costs ~3% extra positions.
    pad_multiple: int = 16


def check_output_dir(out: Path, need_bytes: int):
    """Fail before training, not after an hour: the directory must be writable with room to spare."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / ".write-test", b"ok")
        (out / ".write-test").unlink()
    except OSError as err:
        raise LoraError(f"output directory {out} is not writable: {err.strerror or err}") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise LoraError(f"output directory {out} has {free / 1e6:.1f} MB free; checkpoints need about "
                        f"{need_bytes / 1e6:.1f} MB")


def preflight(cfg: TrainConfig):
    """The cheap checks, before any model is loaded: data and output directory given, output writable."""
    if not cfg.data:
        raise LoraError("no training data: pass --data FILE.jsonl")
    if not cfg.out:
        raise LoraError("no output directory: pass --out DIR")
    from loraforge.data.sources import parse_columns
    from loraforge.train.dashboards import check_available, parse_report_to

    parse_columns(cfg.columns)
    check_available(parse_report_to(cfg.report_to))
    check_output_everywhere(Path(cfg.out), need_bytes=0)
    if cfg.fsdp and not (torch.cuda.is_available() and dist.world_size() > 1):
        raise LoraError("--fsdp shards the model over several GPUs: it needs CUDA and --nproc > 1")
    if cfg.fsdp and cfg.save_every:
        raise LoraError("--fsdp writes the adapter at the end only: pass --save-every 0 (no resumable checkpoints)")


def check_output_everywhere(out: Path, need_bytes: int):
    """check_output_dir on the main process; every process raises if it fails (none waits forever)."""
    error = None
    if dist.is_main():
        try:
            check_output_dir(out, need_bytes)
        except LoraError as err:
            error = err
    if dist.all_sum(int(error is not None)):
        raise error or LoraError(f"output directory {out} failed its check on the main process")


@dataclass
class Run:
    """Everything one training run holds: the settings, the model and its optimizer and
    schedule, the data, where it writes, and the steps it covers (``start`` is > 0 on resume)."""

    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: Prepared
    ctx: Context
    log: MetricsLog
    out: Path
    start: int
    total: int
    early: EarlyStopping
    eval_every: int  # steps between validations (0: at the last step only)


def train(cfg: TrainConfig) -> dict:
    """Train an adapter as `cfg` says; writes cfg.out. Returns a summary dict."""
    dist.init()
    created = not Path(cfg.out).exists() if cfg.out else False
    try:
        preflight(cfg)
        run = setup(cfg)
    except BaseException:
        if created and dist.is_main():  # a run that failed before it began leaves no empty directory
            _remove_if_empty(Path(cfg.out))
        raise
    if dist.is_main():
        if run.start == 0:
            drop_stale_checkpoints(run.out)
        announce(run)
        atomic_write_bytes(run.out / "train_config.yaml", dump(cfg).encode())
    summary = run_steps(run)
    if cfg.fsdp or dist.is_main():  # under FSDP every process joins the gather, one writes
        save_adapter(run.model, run.out, write=dist.is_main())
    if dist.is_main():
        if cfg.add_tokens:  # the tokenizer with the new tokens, beside the adapter (as PEFT users save it)
            training_tokenizer(cfg)[0].save_pretrained(run.out)
        run.log.plot(run.out / "loss.png")
    run.log.close()
    dist.barrier()
    return summary


def _remove_if_empty(path: Path):
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (or already gone): keep what is there


def open_dashboards(cfg: TrainConfig, out: Path) -> list:
    """The --report-to reporters (main process only)."""
    from loraforge.train.dashboards import open_reporters, parse_report_to

    names = parse_report_to(cfg.report_to)
    return open_reporters(names, out, dataclasses.asdict(cfg)) if names and dist.is_main() else []


def setup(cfg: TrainConfig) -> Run:
    """Load the data and the model, attach the adapter, build the optimizer and schedule, and
    restore the last checkpoint on --resume."""
    out = Path(cfg.out)
    device = pick_device(cfg.device) if not dist.is_distributed() else dist.device()
    tokenizer, new_ids = training_tokenizer(cfg)
    prepared = prepare_data(cfg, tokenizer)
    model = build_model(cfg, device, new_ids)
    if cfg.fsdp:
        dist.fsdp_wrap(model)
    params = list(adapter_params(model).values())
    check_output_everywhere(out, need_bytes=sum(p.numel() * 4 for p in params) * 6 + (1 << 20))
    autocast = compute_dtype(effective_precision(cfg, device))
    ctx = Context(device, autocast, autocast or torch.float32, tokenizer.pad_token_id, params, cfg.fsdp,
                  dist.world_size() if cfg.fsdp else 1, D.has_windows(model.config))
    optimizer = build_optimizer(model, cfg)
    total = total_steps(cfg, len(prepared.train_rows))
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    latest = find_latest(out) if cfg.resume else None
    if cfg.resume and latest is None and dist.is_main():
        logger.info(f"--resume: no checkpoint in {out}; starting from step 0")
    resume_stream(prepared.train_rows, latest)  # a stream continues at its saved position (refused if the run kinds differ)
    cfg = resume_data_order(cfg, prepared.train_rows, latest)
    start = resume_state(latest, model, optimizer, scheduler, total)
    log = MetricsLog(out, enabled=dist.is_main(), append=start > 0, reporters=open_dashboards(cfg, out))
    log.truncate(start)
    early = early_stopping(cfg, prepared, out, start)
    return Run(cfg, model, optimizer, scheduler, prepared, ctx, log, out, start, total, early,
               early_stop.eval_interval(cfg.eval_every, total, early.enabled))


def early_stopping(cfg: TrainConfig, prepared: Prepared, out: Path, start: int) -> EarlyStopping:
    """Early stopping as configured (off without validation rows, and under FSDP, whose sharded
    adapter is gathered only at the end); on resume, the state the interrupted run had reached."""
    patience = cfg.patience if prepared.val_rows and not cfg.fsdp else 0
    early = EarlyStopping(patience, cfg.min_delta)
    if start and early.enabled:
        early.replay([r for r in read_records(out / "metrics.jsonl") if r.get("step", 0) <= start])
    return early


def drop_stale_checkpoints(out: Path):
    """A run from step 0 must not leave an earlier run's checkpoints for a later --resume to pick up."""
    stale = out / "checkpoints"
    if stale.exists():
        logger.info(f"note: starting from step 0; removing the earlier run's checkpoints in {stale}")
        shutil.rmtree(stale, ignore_errors=True)


def resume_state(latest: Path | None, model, optimizer, scheduler, total: int) -> int:
    """The step to start from: 0, or checkpoint `latest`'s (the one --resume found)."""
    if latest is None:
        return 0
    step = load_checkpoint(latest, model, optimizer, scheduler)
    if step >= total:
        raise LoraError(f"checkpoint {latest} is at step {step} but this run has only {total} steps; "
                        f"raise --max-steps or --epochs to continue it")
    if dist.is_main():
        logger.info(f"resuming from {latest} (step {step})")
    return step


def announce(run: Run):
    cfg, data = run.cfg, run.data
    logger.info(format_report(parameter_report(run.model)))
    for note in data.notes:
        logger.info(f"note: {note}")
    unit = "pairs" if cfg.method != "sft" else "rows"
    rows = f"{len(data.train_rows)} {cfg.method} pairs" if cfg.method != "sft" else \
        f"{len(data.train_rows)} packed rows of <= {cfg.max_tokens} tokens"
    examples = f"{data.n_examples} examples"
    if hasattr(data.train_rows, "step_batches"):  # a stream (data.stream): nothing is counted up front
        examples, rows = f"the examples of {cfg.data}", f"rows of <= {cfg.max_tokens} tokens packed as they are read"
    logger.info(f"{examples} -> {rows}"
                f" (+{len(data.val_rows)} validation {unit}); {run.total} steps of {cfg.batch_size * cfg.grad_accum}"
                f" {unit}; compute {run.ctx.autocast or torch.float32}; processes {dist.world_size()}"
                + (f"; from step {run.start}" if run.start else ""))


def run_steps(run: Run) -> dict:
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=run.total, initial=run.start, disable=not (cfg.progress and dist.is_main()), unit="step",
               dynamic_ncols=True)
    record, done = {}, run.start
    for step in range(run.start, run.total):
        if run.early.should_stop:  # a resumed run that had already stopped
            break
        record = one_step(run, step)
        done = step + 1
        run.log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        watch_validation(run, done, record)
        if cfg.save_every and done % cfg.save_every == 0 and done < run.total and dist.is_main():
            save_checkpoint(run.out, done, run.model, run.optimizer, run.scheduler,
                            data_stream=stream_position(run.data.train_rows),
                            data_order=data_order(run.cfg, run.data.train_rows))
            early_stop.prune_best(run.out, done)
    bar.close()
    last = record or next((r for r in reversed(run.log.records) if "loss" in r), {})  # resumed after the stop
    return {"steps": done, **keep_best(run, done), "final_loss": last.get("loss"), "out": str(run.out),
            **run.log.summary()}


def watch_validation(run: Run, step: int, record: dict):
    """Early stopping's bookkeeping after step `step`: save a new best adapter, note a stop."""
    if not run.early.enabled or "val_loss" not in record:
        return
    if run.early.update(step, record["val_loss"]) and dist.is_main():
        early_stop.save_best(run.out, step, run.model)
    if stopped_early(run, step) and dist.is_main():
        logger.info(f"note: {run.early.reason(step)}")


def stopped_early(run: Run, step: int) -> bool:
    """Whether the patience ran out before the run's last step (at the last one it simply ended)."""
    return run.early.should_stop and step < run.total


def keep_best(run: Run, last: int) -> dict:
    """Put the best evaluation's adapter back into the model (the one train() writes)."""
    early = run.early
    if not early.enabled or not early.best_step:
        return {}
    stopped = stopped_early(run, last)
    if early.best_step != last and dist.is_main():
        early_stop.restore_best(run.out, early.best_step, run.model)
        if not stopped:
            logger.info(f"note: keeping the adapter of step {early.best_step}, the lowest validation loss "
                        f"({early.best:.4f}); --patience 0 keeps the last step's")
    if dist.is_main():  # the newest best file stays, beside the checkpoints: a later --resume reads it
        early_stop.prune_best(run.out, last)
    return {"best_step": early.best_step, "best_val_loss": early.best, "stopped_early": stopped}


def one_step(run: Run, step: int) -> dict:
    """Optimizer step `step` (0-based) and its metrics.jsonl record (validation loss when due)."""
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on inside it)
    began = time.perf_counter()
    try:
        stats = train_step(run.model, step_batches(run.cfg, run.data.train_rows, step), run.optimizer,
                           run.scheduler, run.cfg, run.ctx)
    except NonFiniteStep as bad:
        raise LoraError(stopped_at(run, step + 1, bad)) from None
    elapsed = time.perf_counter() - began
    record = {"step": step + 1, "loss": round(stats["loss"], 5), "lr": lr,
              "tokens": stats["tokens"], "step_s": round(elapsed, 4),
              "tokens_per_s": round(stats["tokens"] / elapsed, 1), "grad_norm": round(stats["grad_norm"], 4),
              "peak_memory_mb": peak_memory_mb(run.ctx.device), **stats.get("metrics", {})}
    every = run.eval_every
    if step + 1 == run.total or (every and (step + 1) % every == 0):
        record.update(validation(run))
    return record


def validation(run: Run) -> dict:
    """The held-out figures of metrics.jsonl: val_loss (and val_pref_accuracy for dpo / orpo)."""
    if run.cfg.method != "sft":
        from loraforge.train.preference import validate

        return validate(run.model, run.data.val_rows, run.cfg, run.ctx)
    return {"val_loss": validation_loss(run.model, run.data.val_rows, run.ctx, run.cfg.batch_size)}


def stopped_at(run: Run, step: int, bad: NonFiniteStep) -> str:
    """The one-line report of a run stopped by a non-finite step: what, where, what was kept."""
    what = "loss" if not math.isfinite(bad.loss) else "gradient norm"
    latest = find_latest(run.out)
    kept = (f"the last good checkpoint is {latest} (continue with --resume, e.g. with a lower --lr)" if latest
            else "no adapter was written (no checkpoint was due yet)")
    return f"step {step}: the {what} is {bad.loss if what == 'loss' else bad.grad_norm}; training stopped before " \
           f"that update; {kept}"


def cli_train(args) -> int:
    from loraforge.train.config import resolve

    cfg = resolve(args.config, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if cfg.nproc > 1 and not dist.launched():
        preflight(cfg)
        return dist.launch(cfg.nproc, dump(cfg))
    summary = train(cfg)
    if dist.is_main():
        kept = f"; kept step {summary['best_step']}'s adapter, val loss {summary['best_val_loss']:.4f}" \
            if summary.get("best_step") else ""
        loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
        print(f"adapter written to {summary['out']} ({summary['steps']} steps, final loss {loss}{kept})")
    return 0

