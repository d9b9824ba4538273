"""The skeleton ``python -m train fit`` and ``python -m train scst`` share: runtime and torchrun set-up,
argument checks, checkpoints (``weights_only`` loads) and the ``--resume`` argument check, early
stopping, the epoch loop with ``--stop-after-epochs``, and the export of a model folder.

    runtime = start_runtime(args.device, args.amp, args.num_threads)   # rank, world, device, amp dtype
    ckpt = resume_checkpoint(run_dir, args, FORMAT, MAY_DIFFER, parser, "fit")  # None: a fresh start
    progress = Progress.from_checkpoint(ckpt)                           # epoch, history, best, patience
    done = run_epochs(progress, runtime, epochs=..., train_epoch=..., end_epoch=...)
    if done and runtime.is_main: write_model_folder(run_dir, model, examples)
    finish_distributed(runtime.world)

Rank 0 alone validates, checkpoints and writes; the others learn whether it stopped early through
:func:`broadcast_flag`.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from storyteller.fileio import write_json_atomic

CHECKPOINT = "checkpoint.pt"
# Arguments that may differ between a run and its --resume: they change nothing about the result.
RESUME_MAY_DIFFER = frozenset({"resume", "stop_after_epochs", "export_now", "num_threads", "progress", "feature_memory"})
# The RNG seed of (seed, epoch, rank) is seed * SEED_STRIDE + epoch * EPOCH_STRIDE + rank: primes far
# apart, so different (seed, epoch, rank) get different seeds while rank < EPOCH_STRIDE and epochs are
# fewer than SEED_STRIDE / EPOCH_STRIDE (~990). Checkpointed runs depend on these values: never change them.
SEED_STRIDE = 1_000_003
EPOCH_STRIDE = 1_009


def order_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order (the same on every rank: each takes its share of one order).

    Args:
        seed: the run's ``--seed``.
        epoch: 0-based epoch.
    """
    return seed * SEED_STRIDE + epoch


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The RNG seed of one epoch of one rank (dropout masks in fit, sampling in scst).

    Args:
        seed: the run's ``--seed``.
        epoch: 0-based epoch.
        rank: torchrun rank.
    """
    return seed * SEED_STRIDE + epoch * EPOCH_STRIDE + rank


# -- arguments -----------------------------------------------------------------------------------

def refuse(prog: str, message: str) -> NoReturn:
    """Leave with exit status 2 (argparse's, for bad arguments) after one line on stderr.

    The raised SystemExit's text is that line too (``pytest.raises(SystemExit, match=...)``).

    Args:
        prog: the command (``fit``, ``scst``...).
        message: what is wrong and what to do.
    """
    line = f"{prog}: error: {message}"
    print(line, file=sys.stderr)
    err = SystemExit(line)
    err.code = 2
    raise err


def check_ranges(prog: str, args: argparse.Namespace, limits: Mapping[str, tuple[float | None, float | None]]) -> None:
    """Refuse (:func:`refuse`) the first argument outside its ``(lowest, highest)`` range (None: open),
    or not finite.

    Args:
        prog: the command, for the message.
        args: the parsed arguments.
        limits: argument name -> inclusive bounds.
    """
    for name, (lo, hi) in limits.items():
        value = getattr(args, name)
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = (f"between {lo} and {hi}" if lo is not None and hi is not None
                       else f">= {lo}" if lo is not None else f"<= {hi}")
            refuse(prog, f"--{name.replace('_', '-')} must be {allowed}, got {value}")


# -- runtime -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """Where this process trains.

    Attributes:
        rank: torchrun rank (0 without torchrun).
        world: number of processes.
        device: this process's device.
        amp_dtype: autocast dtype (torch.bfloat16) or None for full precision.
    """

    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, logs and writes."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        """How the model trains, in words (for the card)."""
        return "bf16 autocast" if self.amp_dtype is not None else "fp32"


def setup_runtime(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when launched by torchrun with >1 process.

    Args:
        device_arg: ``--device`` (auto, cpu, cuda, cuda:N).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:  # "cuda": this process's local GPU
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def default_amp(device: torch.device) -> torch.dtype | None:
    """bfloat16 where it is fast: CUDA GPUs with bf16, and CPUs with bfloat16 instructions, AMX tiles or
    AVX-512 BF16 (oneDNN runs the LSTM and the GEMMs on them; ~2.3x the fp32 step with AMX in
    bench/bench_train.py, and the decoding issue measured 3.22x the seed loop with bf16 autocast against
    fp32's 1.79x on an AVX-512 BF16 CPU without AMX); None (fp32) elsewhere. The same CPU check as
    ``storyteller.precision`` uses for inference.

    Args:
        device: the training device.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    from storyteller.precision import cpu_has_bf16

    return torch.bfloat16 if cpu_has_bf16() else None


def start_runtime(device_arg: str, amp: str, num_threads: int) -> Runtime:
    """Device, torchrun process group, CPU threads and autocast dtype of a training command.

    Args:
        device_arg: ``--device``.
        amp: ``--amp`` (auto, bf16, off).
        num_threads: ``--num-threads`` (0: torch's default).
    """
    rank, world, device = setup_runtime(device_arg)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    amp_dtype = torch.bfloat16 if amp == "bf16" else default_amp(device) if amp == "auto" else None
    return Runtime(rank, world, device, amp_dtype)


def distribute(module: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel under torchrun (gradients averaged), else itself.

    Args:
        module: what the training step calls.
        runtime: the runtime.
    """
    if runtime.world == 1:
        return module
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def broadcast_flag(flag: bool, runtime: Runtime) -> bool:
    """Rank 0's ``flag`` on every rank (itself without torchrun).

    Args:
        flag: this rank's value (only rank 0's counts).
        runtime: the runtime.
    """
    if runtime.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=runtime.device)
    dist.broadcast(t, 0)
    return bool(t.item())


def finish_distributed(world: int) -> None:
    """Wait for every rank and leave the process group (nothing without torchrun).

    Args:
        world: number of processes.
    """
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def show_progress(progress: str, runtime: Runtime) -> bool:
    """Whether this process draws a tqdm bar: ``--progress on``, or ``auto`` on a terminal; rank 0 only.

    Args:
        progress: ``--progress`` (auto, on, off).
        runtime: the runtime.
    """
    return runtime.is_main and (progress == "on" or (progress == "auto" and sys.stderr.isatty()))


# -- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """torch.save of tensors and plain containers only (loadable with weights_only=True), atomically.

    Args:
        path: destination (RUN_DIR/checkpoint.pt).
        ckpt: the checkpoint dict.
    """
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fmt: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without unpickling any code.

    Args:
        path: the checkpoint file.
        fmt: the ``format`` it must declare (fit's, or scst's).

    Raises:
        ValueError: another format.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} checkpoint (format {ckpt.get('format')!r})")
    return ckpt


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state dict (for checkpoints and the best epoch's weights).

    Args:
        module: the model.
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def check_resume_args(ckpt_path: Path, saved: dict[str, Any], args: argparse.Namespace,
                      may_differ: frozenset[str] | set[str], parser: argparse.ArgumentParser) -> None:
    """Refuse to resume a checkpoint with other arguments than the ones it was trained with.

    The arguments compared are the ones stored in the checkpoint, not RUN_DIR/args.json: a fresh
    start rewrites args.json before its first checkpoint, so a run killed that early leaves an
    args.json that does not describe the checkpoint beside it.

    Args:
        ckpt_path: the checkpoint (for the message).
        saved: the checkpoint's ``args``.
        args: this invocation's arguments.
        may_differ: argument names that may change.
        parser: the command's parser, whose defaults stand in for arguments added since the
            checkpoint was written.

    Raises:
        SystemExit: an argument differs (one line naming each).
    """
    new = vars(args)
    saved = {**{k: parser.get_default(k) for k in new}, **saved}  # args added since: defaults
    diff = sorted(k for k in set(saved) | set(new) if k not in may_differ and saved.get(k) != new.get(k))
    if diff:
        raise SystemExit(f"--resume: arguments differ from those of {ckpt_path}: "
                         + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {new.get(k)!r}" for k in diff)
                         + "; resume with the original arguments, or use a new --out")


def resume_checkpoint(run_dir: Path, args: argparse.Namespace, fmt: str, may_differ: frozenset[str] | set[str],
                      parser: argparse.ArgumentParser, prog: str) -> dict[str, Any] | None:
    """With ``--resume``, RUN_DIR/checkpoint.pt checked against this invocation's arguments; None for a
    fresh start (no ``--resume``, or no checkpoint yet).

    Args:
        run_dir: ``--out``.
        args: this invocation's arguments.
        fmt: the checkpoint format of the command.
        may_differ: arguments that may change on resume.
        parser: the command's parser.
        prog: the command, for messages.

    Raises:
        SystemExit: another command's checkpoint, or other arguments (one line).
    """
    path = run_dir / CHECKPOINT
    if not (args.resume and path.is_file()):
        return None
    try:
        ckpt = load_checkpoint(path, fmt)
    except ValueError as e:
        raise SystemExit(f"{prog}: --resume: {e}") from None
    check_resume_args(path, ckpt["args"], args, may_differ, parser)
    return ckpt


# -- progress and early stopping -----------------------------------------------------------------

def _no_best() -> dict[str, Any]:
    return {"epoch": -1, "value": None, "metrics": {}, "model": None}


@dataclass
class Progress:
    """A run's state between epochs, saved in every checkpoint (:meth:`state`).

    Attributes:
        epoch: epochs finished (the next one to run, 0-based).
        history: one record per validated epoch.
        best: ``{"epoch", "value", "metrics", "model": CPU state dict}`` of the best epoch so far.
        bad_epochs: epochs since the best one (early stopping's patience counter).
        stopped: early stopping fired; a resumed run trains no more.
    """

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=_no_best)
    bad_epochs: int = 0
    stopped: bool = False

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | None) -> Progress:
        """The progress a checkpoint saved (a fresh one for None).

        Args:
            ckpt: a loaded checkpoint, or None.
        """
        if ckpt is None:
            return cls()
        return cls(epoch=ckpt["epoch"], history=ckpt["history"], best=ckpt["best"], bad_epochs=ckpt["bad_epochs"],
                   stopped=ckpt["stopped"])

    def state(self) -> dict[str, Any]:
        """The checkpoint's keys ``epoch``, ``history``, ``best``, ``bad_epochs``, ``stopped``."""
        return {"epoch": self.epoch, "best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped,
                "history": self.history}

    def update(self, record: dict[str, Any], value: float, *, maximize: bool, patience: int,
               model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        """Count a validated epoch: keep it as the best if ``value`` improved, else count it against
        ``patience``; set ``record["best_epoch"]`` and append the record to the history.

        Args:
            record: the epoch's record (``record["epoch"]`` is its 1-based number, 0: the start).
            value: the figure that selects the epoch.
            maximize: higher ``value`` is better (else lower).
            patience: epochs without improvement before stopping (0: never stop).
            model: the model (its weights are copied when the epoch is the best).
            metrics: the figures stored with the best epoch.
        """
        old = self.best["value"]
        if old is None or (value > old if maximize else value < old):
            self.best = {"epoch": record["epoch"], "value": value, "metrics": metrics, "model": cpu_state(model)}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.stopped = patience > 0 and self.bad_epochs >= patience
        record["best_epoch"] = self.best["epoch"]
        self.history.append(record)
        self.epoch = record["epoch"]


def run_epochs(progress: Progress, runtime: Runtime, *, epochs: int, stop_after: int, patience: int, select: str,
               train_epoch: Callable[[int], Any], end_epoch: Callable[[int, Any], None],
               sync: Callable[[], None] | None = None) -> bool:
    """Epochs ``progress.epoch`` .. ``epochs - 1``: every rank trains, rank 0 validates and checkpoints
    (``end_epoch``, which calls ``progress.update``), every rank learns whether it stopped early.

    Args:
        progress: the run's progress (from the checkpoint when resuming).
        runtime: the runtime.
        epochs: ``--epochs``.
        stop_after: ``--stop-after-epochs``: leave after this many epochs of this invocation (0: never).
        patience: ``--patience``, for the early-stop message.
        select: the selecting figure in words, for the early-stop message.
        train_epoch: ``epoch -> result``, on every rank.
        end_epoch: ``(epoch, result) -> None``, on rank 0 only.
        sync: called on every rank after each epoch (e.g. broadcast a learning rate).

    Returns:
        True when the run is over (all epochs, or early stop), False when it left as asked by ``stop_after``.
    """
    ran = 0
    for epoch in range(progress.epoch, epochs):
        if progress.stopped:
            break
        result = train_epoch(epoch)
        if runtime.is_main:
            end_epoch(epoch, result)
            if progress.stopped:
                print(f"early stop: no better {select} for {patience} epochs (best epoch {progress.best['epoch']})",
                      file=sys.stderr)
        progress.stopped = broadcast_flag(progress.stopped, runtime)
        if sync is not None:
            sync()
        ran += 1
        if stop_after and ran >= stop_after and epoch + 1 < epochs and not progress.stopped:
            if runtime.is_main:
                print(f"stopping after {ran} epochs as asked; continue with --resume", file=sys.stderr)
            return False
    return True


# -- outputs -------------------------------------------------------------------------------------

def prepare_run_dir(run_dir: Path, args: argparse.Namespace, runtime: Runtime) -> None:
    """Create RUN_DIR and write args.json (rank 0).

    Args:
        run_dir: ``--out``.
        args: the resolved arguments.
        runtime: the runtime.
    """
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "args.json", vars(args))


def epoch_weights_file(folder: Path, epoch: int) -> Path:
    """Where :func:`save_epoch_weights` keeps epoch ``epoch``'s weights."""
    return folder / f"epoch_{epoch:03d}.safetensors"


def save_epoch_weights(folder: Path, epoch: int, model: torch.nn.Module) -> Path:
    """One epoch's weights (float32 safetensors, atomically), for checkpoint averaging (``train average``).

    Args:
        folder: RUN_DIR/epochs.
        epoch: the epoch (0: the starting model).
        model: the model after that epoch.
    """
    from safetensors.torch import save_file

    from storyteller.fileio import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    path = epoch_weights_file(folder, epoch)
    with atomic_path(path) as tmp:
        save_file({k: v.float().contiguous() for k, v in cpu_state(model).items()}, str(tmp), metadata={"format": "pt"})
    return path


def write_model_folder(run_dir: Path, model: torch.nn.Module, examples: list[dict[str, Any]],
                       carry: tuple[str, ...] = ("loss_curve.png",)) -> Path:
    """Save ``model`` (vocab attached) to RUN_DIR/model/ in the Hub layout with a model card, atomically.

    Args:
        run_dir: the run folder.
        model: the model to export (``save_pretrained``).
        examples: example captions for the card.
        carry: files of RUN_DIR copied into the folder when present (plots).

    Returns:
        the model folder.
    """
    from storyteller.card import write_model_card

    final, tmp, old = run_dir / "model", run_dir / "model.tmp", run_dir / "model.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in carry:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, tmp / name)
    write_model_card(tmp, examples=examples)
    # Swap folders: a reader sees the old complete model or the new one, never a half-written one.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
