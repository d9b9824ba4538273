"""Train a caption decoder on a feature cache (teacher forcing, loss over real tokens only): the pooled
Show-and-Tell decoder, or with ``--decoder attention`` Show-Attend-Tell over the cache's feature grids.

    python -m train fit --features feats/flickr8k-lite0 --out runs/flickr8k-lite0 --epochs 20
    python -m train fit --features feats/f8k-lite0-grid --decoder attention --out runs/f8k-att   # needs --grid features
    python -m train fit --features feats/flickr8k-lite0 --out runs/flickr8k-lite0 --resume   # after a kill
    torchrun --nproc_per_node=2 -m train fit --features feats/flickr8k-lite0 --out runs/ddp    # DDP

RUN_DIR gets: args.json (the resolved arguments), checkpoint.pt (after every epoch), metrics.jsonl
(one JSON line per epoch), loss_curve.png, metric_curve.png, and at the end model/: the best epoch's
weights in the Hub layout (config.json, model.safetensors, vocab.json) with loss_curve.png and a
README.md model card.

The loop, nanoGPT style: all features sit in memory as one float32 tensor (on the GPU when training
there) and all captions as one padded id tensor, so a batch is two index operations, no DataLoader.
An epoch visits every (image, caption) pair of the training split once, in an order drawn from a
generator seeded by (seed, epoch), with batches of similar caption lengths (``--bucket``) so the
LSTM runs on nearly unpadded (B, T) blocks; the output head and the loss see real positions only
(``TeacherForcing``). The dropout RNG is also reseeded from (seed, epoch, rank) at the start of each
epoch. So epoch e does the same thing whether the run got there in one go or was
killed and resumed, and a resumed CPU run ends with bit-identical weights.

Under torchrun every rank takes every world_size-th batch of the same order (a few tail batches are
dropped so that all ranks take the same number of steps); rank 0 alone validates, logs and writes.
The skeleton (runtime, argument checks, checkpoints and ``--resume``, early stopping, the epoch loop,
the model folder) is ``train.trainer``'s, shared with ``train.scst``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from storyteller.fileio import write_text_atomic
from storyteller.decoders import DECODERS, ShowAndTell, ShowAttendTell, attention_penalty
from storyteller.vocab import SPECIAL_TOKENS, Vocabulary
from train import trainer
from storyteller.decoding_settings import MAX_LEN_HELP
from train.evaluate import decode_all
from train.features import FEATURE_MEMORY
from train.trainer import default_amp  # noqa: F401  (public here too: tests/test_precision.py imports it from fit)

CHECKPOINT_FORMAT = "storyteller-fit-checkpoint-v1"
# Arguments that may differ between a run and its --resume: they change nothing about the result.
RESUME_MAY_DIFFER = trainer.RESUME_MAY_DIFFER
SELECT_MODES = {"cider": "max", "bleu4": "max", "val_loss": "min"}
# The validation figures stored with the best epoch (and in the exported model's card).
BEST_METRICS = ("val_loss", "bleu1", "bleu2", "bleu3", "bleu4", "cider")
DECODER_TYPES = {"pooled": ShowAndTell.decoder_type, "attention": ShowAttendTell.decoder_type}
# --schedule plateau: halve the learning rate after 2 epochs (patience 1) without a better validation loss.
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 1
# Teacher-forced validation loss batches hold this many times --eval-batch-size captions: no decoding
# loop, so much bigger batches fit than for greedy captions.
VAL_LOSS_BATCH_FACTOR = 5
EXAMPLES = 5  # validation images captioned in the exported model's card
BAR_EVERY = 20  # steps between progress-bar updates (each costs a device sync for the loss)
# (lowest, highest) of each numeric argument (None: no bound); others are refused before anything runs.
ARGUMENT_LIMITS = {
    "max_val_images": (0, None), "max_train_images": (0, None), "stop_after_epochs": (0, None), "attention_dim": (1, None), "attention_reg": (0, None),
    "min_freq": (1, None), "max_caption_words": (1, None), "embed_dim": (1, None), "hidden_dim": (1, None),
    "num_layers": (1, None), "dropout": (0, 1), "epochs": (1, None), "batch_size": (1, None), "lr": (0, None),
    "weight_decay": (0, None), "warmup_epochs": (0, None), "min_lr_ratio": (0, 1), "clip_grad": (0, None),
    "label_smoothing": (0, 1), "bucket": (0, None), "patience": (0, None), "max_len": (1, None),
    "eval_batch_size": (1, None), "num_threads": (0, None)}


# -- arguments -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train fit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("data and outputs")
    io.add_argument("--features", required=True, help="feature cache folder written by `python -m train extract`")
    io.add_argument("--out", required=True, help="run folder for args.json, checkpoint.pt, metrics, plots and model/")
    io.add_argument("--flip-features", default=None,
                    help="a cache of the same photos mirrored left to right (extract --flip): each training caption "
                         "reads its photo from it with probability 0.5, 'left' and 'right' swapped (augmentation)")
    io.add_argument("--train-split", default="train", help="split of the cache to train on")
    io.add_argument("--val-split", default="validation", help="split used for validation loss, BLEU-4 and CIDEr-D")
    io.add_argument("--max-val-images", type=int, default=0,
                    help="validate on the first N images of the validation split only (0: all)")
    io.add_argument("--max-train-images", type=int, default=0,
                    help="train on the first N images of the training split only (0: all; short trial runs)")
    io.add_argument("--feature-memory", choices=FEATURE_MEMORY, default="auto",
                    help="ram: hold the features in memory (GPU memory on CUDA); mmap: keep the cache memory-mapped "
                         "and read each batch's rows from it (features bigger than memory); auto: ram when they "
                         "take at most half the free memory")
    io.add_argument("--resume", action="store_true",
                    help="continue from RUN_DIR/checkpoint.pt if it exists (start fresh otherwise); "
                         "the other arguments must match the ones stored in that checkpoint")
    io.add_argument("--stop-after-epochs", type=int, default=0,
                    help="leave after this many epochs of this invocation without exporting, as if killed "
                         "(time-sliced jobs; --resume continues); 0: run to the end")
    io.add_argument("--export-now", action="store_true",
                    help="with --resume: export the best epoch so far to RUN_DIR/model/ and leave without training "
                         "(a run cut short by a deadline); --resume can still continue it later")

    m = p.add_argument_group("model")
    m.add_argument("--decoder", choices=sorted(DECODER_TYPES), default="pooled",
                   help="pooled: Show-and-Tell on the pooled feature; attention: Show-Attend-Tell over the feature "
                        "grid (needs a cache extracted with --grid)")
    m.add_argument("--attention-dim", type=int, default=512, help="attention decoder: size of the additive attention layer")
    m.add_argument("--attention-reg", type=float, default=1.0,
                   help="attention decoder: weight of the doubly stochastic regulariser (0: off)")
    m.add_argument("--min-freq", type=int, default=5, help="words seen fewer times in the training captions become <unk>")
    m.add_argument("--max-caption-words", type=int, default=30, help="training captions are cut to this many words")
    m.add_argument("--embed-dim", type=int, default=512, help="word embedding size")
    m.add_argument("--hidden-dim", type=int, default=512, help="LSTM hidden size")
    m.add_argument("--num-layers", type=int, default=1, help="stacked LSTM layers")
    m.add_argument("--dropout", type=float, default=0.5, help="dropout on feature, embeddings, between layers and before the head")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=20, help="most epochs to train")
    o.add_argument("--batch-size", type=int, default=256, help="captions per step (per process under torchrun)")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    o.add_argument("--schedule", choices=["cosine", "constant", "plateau"], default="cosine",
                   help="learning-rate schedule: linear warmup then cosine decay to lr*min-lr-ratio, "
                        "warmup then constant, or halve when the validation loss stops improving")
    o.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warmup length in epochs (cosine, constant)")
    o.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine schedule: final lr as a fraction of --lr")
    o.add_argument("--clip-grad", type=float, default=5.0, help="clip the gradient's global L2 norm to this (0: off)")
    o.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    o.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and dropout")
    o.add_argument("--bucket", type=int, default=50,
                   help="sort each run of BUCKET x batch-size shuffled captions by length before batching, so batches "
                        "hold similar lengths (less padding); 0: plain random batches")
    o.add_argument("--packed", action="store_true",
                   help="run the LSTM on packed sequences (model.forward) instead of padded, length-bucketed batches; "
                        "same logits, slower on CPU")

    v = p.add_argument_group("validation and model selection")
    v.add_argument("--select", choices=sorted(SELECT_MODES), default="cider",
                   help="validation figure that picks the exported epoch and drives early stopping")
    v.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better --select figure (0: never stop early)")
    v.add_argument("--max-len", type=int, default=20, help="validation greedy captions: " + MAX_LEN_HELP)
    v.add_argument("--eval-batch-size", type=int, default=500, help="images per greedy-decoding / val-loss batch")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (auto: cuda when available; torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bfloat16 autocast; auto: on CUDA GPUs with bf16 and on CPUs with AMX or AVX-512 BF16, fp32 elsewhere")
    r.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    r.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="tqdm bar per epoch (auto: when stderr is a terminal)")
    return p


# -- data ----------------------------------------------------------------------------------------

@dataclass
class CaptionPairs:
    """Every (image, caption) pair of a split, encoded once.

    Attributes:
        image: (P,) int64 row of each pair's image in the features tensor (on the training device).
        tokens: (P, T) int64 ``<start> w.. <end> <pad>..`` ids (on the training device).
        lengths: (P,) int64 real tokens per row, specials included (on the CPU: packing needs them there).
    """

    image: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, features: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs ``idx`` (B,) CPU -> features (B, F), captions (B, T_max of the batch), lengths (B,) CPU."""
        lengths = self.lengths[idx]
        idx_dev = idx.to(self.tokens.device, non_blocking=True)
        captions = self.tokens[idx_dev, : int(lengths.max())]  # trim to the batch's longest caption
        return features[self.image[idx_dev]], captions, lengths


def encode_pairs(rows: np.ndarray, captions: list[list[str]], vocab: Vocabulary, max_words: int,
                 device: torch.device | str = "cpu") -> CaptionPairs:
    """Encode the captions of the images ``rows`` into one padded tensor.

    Args:
        rows: image rows of the feature cache.
        captions: the cache's captions, indexed by row.
        vocab: maps words to ids.
        max_words: captions are cut to this many words (``<end>`` still closes them).
        device: where ``image`` and ``tokens`` live.
    """
    image, seqs = [], []
    for r in rows:
        for c in captions[int(r)]:
            ids = vocab.encode(c, add_special=False)[:max_words]
            image.append(int(r))
            seqs.append([Vocabulary.start_id, *ids, Vocabulary.end_id])
    if not seqs:
        raise ValueError("no captions in the selected rows")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    tokens = torch.full((len(seqs), int(lengths.max())), Vocabulary.pad_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return CaptionPairs(torch.tensor(image, dtype=torch.int64).to(device), tokens.to(device), lengths)


def epoch_order(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                bucket: int = 50) -> list[torch.Tensor]:
    """This rank's batches of epoch ``epoch``: index tensors (CPU int64) into the pairs.

    Shuffle all pairs with a generator seeded by (seed, epoch) only, so a resumed run sees the same
    order. With ``bucket > 1``, each run of ``bucket * batch_size`` shuffled pairs is sorted by
    caption length and cut into batches, and the batches are shuffled: a batch then holds captions
    of similar length, so the padded LSTM does little wasted work, while every batch still draws
    from a random slice of the data. Under ``world_size`` ranks, rank r takes batches r, r + W,
    r + 2W... of the shared order, and the tail is trimmed so every rank takes the same number of
    steps (DDP would hang otherwise).

    Args:
        lengths: (P,) caption lengths of the pairs.
        batch_size: pairs per batch (a last, smaller batch may remain).
        seed: the run's seed.
        epoch: 0-based epoch.
        rank: this process's rank.
        world_size: number of processes.
        bucket: batches per length-sorted run (0 or 1: plain random batches).
    """
    g = torch.Generator().manual_seed(trainer.order_seed(seed, epoch))
    perm = torch.randperm(len(lengths), generator=g)
    if bucket > 1:
        batches = []
        for run in perm.split(batch_size * bucket):
            batches += list(run[torch.argsort(lengths[run], stable=True)].split(batch_size))
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    else:
        batches = list(perm.split(batch_size))
    if world_size > 1:
        per_rank = len(batches) // world_size
        if per_rank == 0:
            raise ValueError(f"{len(lengths)} pairs make {len(batches)} batches of {batch_size}: too few for {world_size} ranks")
        batches = batches[rank: per_rank * world_size: world_size]
    return batches


# -- the training step (also timed by bench/gpu_train.py) -------------------------------------

class TeacherForcing(torch.nn.Module):
    """``ShowAndTell.forward``'s contract, ``(features, captions, lengths) -> (logits (N, V), targets (N,))``,
    computed over the padded batch: the LSTM runs dense (B, T) and only the output head and the loss
    are restricted to the N real positions.

    Why not the model's packed forward: on CPU a PackedSequence cannot use the fused oneDNN LSTM and
    falls back to per-step ops (slower than the padded kernel even at zero padding), while length-
    bucketed batches (``epoch_order``) leave almost no padding for the dense kernel to waste. A
    unidirectional LSTM's outputs at real positions never depend on later (padded) inputs, so the
    logits are the same as the packed ones, in batch-major instead of time-major order (tested).
    ``packed=True`` calls ``model.forward`` instead (cuDNN runs both fused).

    Wrapping this module, not the model, in DistributedDataParallel keeps DDP's gradient hooks on
    the path the training step really takes.

    An attention decoder (``ShowAttendTell``) unrolls its LSTM cell step by step over the padded
    batch (each step's attention needs the previous state); with ``attention_reg > 0`` the result has
    a third element, the weighted doubly stochastic penalty, which ``caption_loss`` adds.

    Args:
        model: the decoder to train.
        packed: use the model's packed forward.
        attention_reg: weight of the attention decoder's doubly stochastic penalty (0: none).
    """

    def __init__(self, model: ShowAndTell | ShowAttendTell, packed: bool = False, attention_reg: float = 0.0):
        super().__init__()
        self.model, self.packed, self.attention_reg = model, packed, attention_reg

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if self.packed:
            return m(features, captions, lengths)
        inputs, targets = captions[:, :-1], captions[:, 1:]  # predict token t+1 from tokens <= t
        alphas = None
        if getattr(m, "has_attention", False):
            out, alphas = m.unroll(features, inputs)  # (B, T-1, H), (B, T-1, R)
        else:
            out, _ = m.lstm(m.embed_dropout(m.embed(inputs)), m.initial_lstm_state(features))  # (B, T-1, H)
        # Flat indices of the real positions (up to and including <end>), built from the CPU lengths:
        # a boolean mask on the GPU tensor would make the host wait for the GPU at every step.
        B, T = inputs.shape
        real = (torch.arange(T)[None, :] < (lengths.to("cpu") - 1)[:, None]).flatten().nonzero().squeeze(1)  # (N,)
        real = real.to(out.device, non_blocking=True)
        hidden = out.reshape(B * T, -1).index_select(0, real)  # (N, H)
        logits, tgt = m.head(m.out_dropout(hidden)), targets.reshape(-1).index_select(0, real)  # (N, V), (N,)
        if alphas is not None and self.attention_reg > 0:
            return logits, tgt, self.attention_reg * attention_penalty(alphas, lengths)
        return logits, tgt


def caption_loss(forward: torch.nn.Module, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy of a teacher-forced batch, and the number of predicted tokens.

    Args:
        forward: a TeacherForcing (or its DDP wrapper, or a bare ShowAndTell for the packed path).
        features: (B, F) image features.
        captions: (B, T) padded ids.
        lengths: (B,) CPU lengths, specials included.
        label_smoothing: as in ``F.cross_entropy``.
    """
    logits, targets, *penalty = forward(features, captions, lengths)  # (N, V), (N,) over real positions only
    # fp32 loss: under bf16 autocast the log-softmax over ~10k words needs the extra mantissa.
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    if penalty:  # attention decoder's doubly stochastic term (training only)
        loss = loss + penalty[0]
    return loss, int(targets.numel())


def train_step(forward: torch.nn.Module, optimizer: torch.optim.Optimizer, features: torch.Tensor, captions: torch.Tensor,
               lengths: torch.Tensor, *, amp_dtype: torch.dtype | None = None, clip_grad: float = 0.0,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """One optimiser step on one batch; returns the detached loss and the number of target tokens.

    Args:
        forward: a TeacherForcing in train mode (or its DDP wrapper).
        optimizer: the optimiser of its parameters.
        features: (B, F) on the model's device.
        captions: (B, T) on the model's device.
        lengths: (B,) on the CPU.
        amp_dtype: autocast dtype (torch.bfloat16) or None for full precision.
        clip_grad: global gradient-norm clip (0: off).
        label_smoothing: as in ``F.cross_entropy``.
    """
    with torch.autocast(features.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss, n = caption_loss(forward, features, captions, lengths, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(forward.parameters(), clip_grad)
    optimizer.step()
    return loss.detach(), n


@torch.no_grad()
def validation_loss(model: ShowAndTell, features: torch.Tensor, pairs: CaptionPairs, batch_size: int,
                    amp_dtype: torch.dtype | None = None) -> float:
    """Teacher-forced mean token cross-entropy over all pairs (no dropout, no label smoothing).

    Args:
        model: the decoder.
        features: (N_images, F) all image features.
        pairs: the validation pairs.
        batch_size: pairs per forward.
        amp_dtype: autocast dtype or None.
    """
    was_training = model.training
    model.eval()
    forward = TeacherForcing(model)
    total, count = torch.zeros((), dtype=torch.float64, device=features.device), 0
    # batches of similar lengths: little padding (the order does not change the mean)
    for idx in torch.argsort(pairs.lengths, stable=True).split(batch_size):
        feats, caps, lengths = pairs.batch(features, idx)
        with torch.autocast(features.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss, n = caption_loss(forward, feats, caps, lengths)
        total += loss.double() * n
        count += n
    model.train(was_training)
    return float(total) / count


def greedy_captions(model: ShowAndTell, features: torch.Tensor, rows: np.ndarray, max_len: int, batch_size: int,
                    amp_dtype: torch.dtype | None = None) -> list[str]:
    """Batched greedy captions of the images ``rows`` of ``features`` (``train.evaluate.decode_all``).

    Args:
        model: the decoder, its vocab attached.
        features: (N_images, F) all image features.
        rows: image rows to caption.
        max_len: most decoding steps.
        batch_size: images per decoder batch.
        amp_dtype: autocast dtype or None.
    """
    selected = features[torch.as_tensor(rows, device=features.device)]  # (len(rows), F)
    return decode_all(model, selected, 1, max_len=max_len, batch_size=batch_size, amp_dtype=amp_dtype)


# -- schedule ------------------------------------------------------------------------------------

def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int):
    """The learning-rate schedule of ``--schedule``; cosine/constant step per batch, plateau per epoch.

    Args:
        optimizer: the optimiser whose lr it drives.
        args: the fit arguments (schedule, warmup_epochs, epochs, min_lr_ratio).
        steps_per_epoch: optimiser steps per epoch (of this rank).
    """
    if args.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR,
                                                          patience=PLATEAU_PATIENCE)
    warmup = max(0, round(args.warmup_epochs * steps_per_epoch))
    total = max(1, args.epochs * steps_per_epoch)

    def factor(step: int) -> float:  # multiplier of --lr after `step` optimiser steps
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    # A closure, not a callable object: LambdaLR then saves no code in its state_dict (weights_only loads).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- files ---------------------------------------------------------------------------------------

def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl (rewritten from the checkpoint's history, so it always matches it) and the two plots.

    Args:
        run_dir: the run folder.
        history: one dict per finished epoch.
    """
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    from train.report import plot_curves

    plot_curves(history, run_dir / "loss_curve.png", run_dir / "metric_curve.png")


def build_decoder(model_kwargs: dict[str, Any], **more: Any) -> ShowAndTell | ShowAttendTell:
    """The decoder class named by ``model_kwargs["decoder"]`` (default Show-and-Tell), built from them.

    Args:
        model_kwargs: init arguments as stored in checkpoints (``decoder`` included for attention).
        **more: further init arguments (backbone, extra).
    """
    kind = model_kwargs.get("decoder", ShowAndTell.decoder_type)
    return DECODERS[kind](**model_kwargs, **more)


# -- one run: its arguments, data and model ------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, or exit 2 with one line for nonsense (before any file is written).

    Args:
        argv: command line without the program name.
    """
    args = build_parser().parse_args(argv)
    trainer.check_ranges("fit", args, ARGUMENT_LIMITS)
    if args.decoder == "attention" and args.num_layers != 1:
        trainer.refuse("fit", "the attention decoder has one LSTM layer; drop --num-layers")
    if args.export_now and not args.resume:
        trainer.refuse("fit", "--export-now needs --resume and a checkpoint in --out")
    return args


@dataclass
class FitData:
    """A split's features and captions in memory, as one run trains on them.

    Attributes:
        cache: the FeatureCache.
        features: (N_images, F) float32 pooled features, or (N_images, h, w, F) float16 grids (cast per batch);
            a tensor on the device, or a ``train.features.MappedRows`` read per batch (``--feature-memory``).
        train_rows: training image rows.
        val_rows: validation image rows (``--max-val-images`` applied).
        vocab: the vocabulary (the checkpoint's when resuming).
        train_pairs: every training (image, caption) pair, encoded.
        val_pairs: every validation pair, encoded.
        val_refs: the validation images' raw references.
        flip_features: the same rows' features of the mirrored photos (``--flip-features``), or None.
        mirror_tokens: (V,) token id -> its id in a mirrored caption ("left" <-> "right"), with flip_features.
    """

    cache: Any
    features: torch.Tensor
    train_rows: np.ndarray
    val_rows: np.ndarray
    vocab: Vocabulary
    train_pairs: CaptionPairs
    val_pairs: CaptionPairs
    val_refs: list[list[str]]
    flip_features: torch.Tensor | None = None
    mirror_tokens: torch.Tensor | None = None


def load_data(args: argparse.Namespace, device: torch.device, ckpt: dict[str, Any] | None) -> FitData:
    """Every feature in memory (on ``device``) and every caption encoded once.

    Args:
        args: the fit arguments.
        device: the training device.
        ckpt: the checkpoint being resumed (its vocabulary), or None.

    Raises:
        SystemExit: a missing cache, split or grid (one line naming what is there).
    """
    from train.features import FeatureCache, FeatureCacheError

    try:
        cache = FeatureCache.open(args.features)
        train_rows, val_rows = cache.split(args.train_split), cache.split(args.val_split)
        grid = cache.require_grid() if args.decoder == "attention" else None
    except FeatureCacheError as e:
        raise SystemExit(f"fit: {e}") from None
    if args.max_train_images > 0:
        train_rows = train_rows[: args.max_train_images]
    if args.max_val_images > 0:
        val_rows = val_rows[: args.max_val_images]
    features = features_in_memory(cache, grid, device, args.feature_memory)
    if ckpt is not None:
        vocab = Vocabulary(ckpt["vocab"][len(SPECIAL_TOKENS):])
    else:
        vocab = Vocabulary.build((c for r in train_rows for c in cache.captions[r]), min_freq=args.min_freq)
    flip = None if args.flip_features is None else mirrored_features(args.flip_features, cache, grid is not None,
                                                                      device, args.feature_memory)
    return FitData(cache, features, train_rows, val_rows, vocab,
                   encode_pairs(train_rows, cache.captions, vocab, args.max_caption_words, device),
                   encode_pairs(val_rows, cache.captions, vocab, args.max_caption_words, device),
                   [cache.captions[r] for r in val_rows], flip,
                   None if flip is None else mirror_token_map(vocab, device))


def features_in_memory(cache, grid: np.ndarray | None, device: torch.device, memory: str = "auto"):
    """A cache's features as training reads them, indexed by cache row: its grids (N_images, h, w, F) float16 when
    ``grid`` is given (``cache.require_grid()``), else its pooled vectors (N_images, F) float32; held on ``device``,
    or memory-mapped (``train.features.training_features`` decides, ``--feature-memory``)."""
    from train.features import training_features

    return training_features(cache, None, grid is not None, device, memory,
                             log=lambda m: print(f"fit: {m}", file=sys.stderr))


MIRRORED_WORDS = ("left", "right")  # the words a mirrored photo swaps in its captions


def mirrored_features(path: str, cache, grid: bool, device: torch.device, memory: str = "auto"):
    """The mirrored cache's features (grids for an attention decoder), row for row those of ``cache``.

    Raises:
        SystemExit: not a cache of the same photos mirrored (other rows, another backbone, not mirrored, no grids),
            in one line.
    """
    from train.features import FeatureCache, FeatureCacheError, same_backbone

    try:
        flip = FeatureCache.open(path)
        grids = flip.require_grid() if grid else None
    except FeatureCacheError as e:
        raise SystemExit(f"fit: --flip-features: {e}") from None
    if not flip.manifest.get("dataset", {}).get("mirrored"):
        raise SystemExit(f"fit: --flip-features {path} is not a cache of mirrored photos (make one with extract --flip)")
    if flip.ids != cache.ids or not same_backbone(flip.backbone, cache.backbone):
        raise SystemExit(f"fit: --flip-features {path} holds other photos or another backbone than --features "
                         "(extract both from the same dataset with the same backbone)")
    return features_in_memory(flip, grids, device, memory)


def mirror_token_map(vocab: Vocabulary, device: torch.device) -> torch.Tensor:
    """(V,) each token id's id in the mirrored caption: "left" and "right" swapped where both are words of
    ``vocab``, every other id itself."""
    ids = torch.arange(len(vocab.itos))
    a, b = (vocab.stoi.get(w) for w in MIRRORED_WORDS)
    if a is not None and b is not None:
        ids[a], ids[b] = b, a
    return ids.to(device)


def mirror_half(data: FitData, idx: torch.Tensor, feats: torch.Tensor, caps: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch with each pair, with probability 0.5, read from the mirrored photo and its caption mirrored.

    Args:
        data: the run's data (``flip_features`` and ``mirror_tokens`` set).
        idx: (B,) CPU pair indices of the batch.
        feats: (B, ...) the plain photos' features, as ``CaptionPairs.batch`` gave them.
        caps: (B, T) their captions.
        generator: a CPU generator (seeded per epoch: a resumed run draws the same).
    """
    flip = (torch.rand(len(idx), generator=generator) < 0.5).to(feats.device)  # (B,)
    image = data.train_pairs.image[idx.to(feats.device)][flip]
    feats, caps = feats.clone(), caps.clone()  # the batch's own copies, never the caller's
    feats[flip] = data.flip_features[image]  # only the flipped rows are read from the mirrored cache
    caps[flip] = data.mirror_tokens[caps[flip]]
    return feats, caps


def model_arguments(args: argparse.Namespace, data: FitData) -> dict[str, Any]:
    """The decoder's init arguments (stored in checkpoints as ``model_kwargs``).

    Args:
        args: the fit arguments.
        data: the run's data (vocabulary size, feature size, grid shape).
    """
    if args.decoder == "attention":
        return dict(decoder=ShowAttendTell.decoder_type, vocab_size=len(data.vocab), feature_dim=data.cache.feature_dim,
                    embed_dim=args.embed_dim, hidden_dim=args.hidden_dim, attention_dim=args.attention_dim,
                    dropout=args.dropout, grid=list(data.cache.grid_shape))
    return dict(vocab_size=len(data.vocab), feature_dim=data.cache.feature_dim, embed_dim=args.embed_dim,
                hidden_dim=args.hidden_dim, num_layers=args.num_layers, dropout=args.dropout)


@dataclass
class FitRun:
    """Everything one invocation of fit works with.

    Attributes:
        args: the fit arguments.
        runtime: rank, world, device, autocast.
        run_dir: ``--out``.
        data: features and captions.
        model: the decoder (vocab attached).
        model_kwargs: its init arguments.
        optimizer: AdamW over its parameters.
        scheduler: the ``--schedule`` learning-rate schedule.
        forward: the TeacherForcing the step calls (DDP-wrapped under torchrun).
        progress: epoch, history, best epoch and early-stop state.
    """

    args: argparse.Namespace
    runtime: trainer.Runtime
    run_dir: Path
    data: FitData
    model: ShowAndTell | ShowAttendTell
    model_kwargs: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    forward: torch.nn.Module
    progress: trainer.Progress


def build_run(args: argparse.Namespace, runtime: trainer.Runtime, run_dir: Path, data: FitData,
              ckpt: dict[str, Any] | None) -> FitRun:
    """Model (seeded by ``--seed``), optimiser and schedule, restored from ``ckpt`` when resuming.

    Args:
        args: the fit arguments.
        runtime: the runtime.
        run_dir: ``--out``.
        data: the run's data.
        ckpt: the checkpoint being resumed, or None.
    """
    device = runtime.device
    torch.manual_seed(args.seed)
    model_kwargs = model_arguments(args, data)
    model = build_decoder(model_kwargs).to(device)
    model.vocab = data.vocab
    # fused AdamW on CUDA: one kernel for all parameters instead of a few per tensor
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    steps_per_epoch = len(epoch_order(data.train_pairs.lengths, args.batch_size, args.seed, 0, runtime.rank,
                                      runtime.world, args.bucket))
    scheduler = make_scheduler(optimizer, args, steps_per_epoch)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and len(ckpt["rng"]["cuda"]):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if runtime.is_main:
            print(f"resuming {run_dir} after epoch {ckpt['epoch']}", file=sys.stderr)
    attention_reg = args.attention_reg if args.decoder == "attention" else 0.0
    forward = trainer.distribute(TeacherForcing(model, packed=args.packed, attention_reg=attention_reg), runtime)
    return FitRun(args, runtime, run_dir, data, model, model_kwargs, optimizer, scheduler, forward,
                  trainer.Progress.from_checkpoint(ckpt))


# -- one epoch -----------------------------------------------------------------------------------

def train_epoch(run: FitRun, epoch: int) -> dict[str, float]:
    """One pass over the training pairs (this rank's share of them).

    Args:
        run: the run.
        epoch: 0-based epoch.

    Returns:
        ``{"train_loss": token-weighted mean over every rank, "train_seconds", "captions_per_s"}``.
    """
    from tqdm import tqdm

    args, rt, data = run.args, run.runtime, run.data
    t0 = time.perf_counter()
    run.model.train()
    torch.manual_seed(trainer.epoch_seed(args.seed, epoch, rt.rank))  # dropout masks: a function of (seed, epoch, rank)
    batches = epoch_order(data.train_pairs.lengths, args.batch_size, args.seed, epoch, rt.rank, rt.world, args.bucket)
    total = torch.zeros((), dtype=torch.float64, device=rt.device)  # token-weighted loss sum, no per-step sync
    tokens = seen = 0
    show_bar = trainer.show_progress(args.progress, rt)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show_bar, leave=False, file=sys.stderr)
    mirror = torch.Generator().manual_seed(trainer.epoch_seed(args.seed, epoch, rt.rank) + 1)  # which pairs read a mirror
    for step, idx in enumerate(bar):
        feats, caps, lengths = data.train_pairs.batch(data.features, idx)
        if data.flip_features is not None:
            feats, caps = mirror_half(data, idx, feats, caps, mirror)
        loss, n = train_step(run.forward, run.optimizer, feats, caps, lengths, amp_dtype=rt.amp_dtype,
                             clip_grad=args.clip_grad, label_smoothing=args.label_smoothing)
        if args.schedule != "plateau":
            run.scheduler.step()
        total += loss.double() * n
        tokens += n
        seen += len(idx)
        if show_bar and step % BAR_EVERY == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    if rt.world > 1:  # the logged training loss covers every rank's batches
        agg = torch.stack([total, torch.tensor(float(tokens), dtype=torch.float64, device=rt.device)])
        dist.all_reduce(agg)
        total, tokens = agg[0], int(agg[1])
    seconds = time.perf_counter() - t0
    return {"train_loss": float(total) / tokens, "train_seconds": seconds, "captions_per_s": seen * rt.world / seconds}


def validate_epoch(run: FitRun, epoch: int, trained: dict[str, float]) -> dict[str, Any]:
    """The epoch's record: training figures, validation loss and greedy BLEU-1..4 / CIDEr-D (rank 0).

    Args:
        run: the run.
        epoch: 0-based epoch.
        trained: :func:`train_epoch`'s result.
    """
    from storyteller.metrics import evaluate_captions

    args, data, amp = run.args, run.data, run.runtime.amp_dtype
    val_loss = validation_loss(run.model, data.features, data.val_pairs, args.eval_batch_size * VAL_LOSS_BATCH_FACTOR, amp)
    t1 = time.perf_counter()
    hyps = greedy_captions(run.model, data.features, data.val_rows, args.max_len, args.eval_batch_size, amp)
    scores = evaluate_captions(hyps, data.val_refs)
    return {"epoch": epoch + 1, "train_loss": trained["train_loss"], "val_loss": val_loss,
            **{k: scores[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")},
            "lr": run.optimizer.param_groups[0]["lr"], "train_seconds": round(trained["train_seconds"], 3),
            "captions_per_s": round(trained["captions_per_s"], 1), "decode_seconds": round(time.perf_counter() - t1, 3)}


def save_run(run: FitRun) -> None:
    """RUN_DIR/checkpoint.pt (``storyteller-fit-checkpoint-v1``), metrics.jsonl and the plots (rank 0).

    Args:
        run: the run.
    """
    device = run.runtime.device
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    trainer.save_checkpoint(run.run_dir / trainer.CHECKPOINT, {
        "format": CHECKPOINT_FORMAT, **run.progress.state(), "model": trainer.cpu_state(run.model),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "vocab": list(run.data.vocab.itos), "args": vars(run.args), "model_kwargs": run.model_kwargs,
        "rng": {"cpu": torch.get_rng_state(), "cuda": cuda_rng}})
    write_metrics(run.run_dir, run.progress.history)


def end_epoch(run: FitRun, epoch: int, trained: dict[str, float]) -> None:
    """Validate, step a plateau schedule, keep the best epoch, checkpoint and log (rank 0).

    Args:
        run: the run.
        epoch: 0-based epoch.
        trained: :func:`train_epoch`'s result.
    """
    args = run.args
    record = validate_epoch(run, epoch, trained)
    if args.schedule == "plateau":
        run.scheduler.step(record["val_loss"])
    run.progress.update(record, record[args.select], maximize=SELECT_MODES[args.select] == "max",
                        patience=args.patience, model=run.model, metrics={k: record[k] for k in BEST_METRICS})
    save_run(run)
    print(f"epoch {epoch + 1}: train {record['train_loss']:.4f}  val {record['val_loss']:.4f}  "
          f"BLEU-4 {record['bleu4']:.4f}  CIDEr-D {record['cider']:.4f}  ({record['train_seconds']:.1f}s, "
          f"{record['captions_per_s']:.0f} captions/s){'  *' if run.progress.best['epoch'] == epoch + 1 else ''}",
          file=sys.stderr)


def share_plateau_lr(run: FitRun) -> None:
    """Under torchrun, every rank takes rank 0's learning rate after a plateau schedule's step.

    Args:
        run: the run.
    """
    if run.runtime.world == 1 or run.args.schedule != "plateau":
        return
    lr = torch.tensor([run.optimizer.param_groups[0]["lr"]], dtype=torch.float64, device=run.runtime.device)
    dist.broadcast(lr, 0)
    for g in run.optimizer.param_groups:
        g["lr"] = float(lr)


# -- main ----------------------------------------------------------------------------------------

def log_start(run: FitRun) -> None:
    """One line: data, vocabulary, parameters, device and precision (rank 0)."""
    if not run.runtime.is_main:
        return
    rt, data = run.runtime, run.data
    print(f"fit: {len(data.train_rows)} train images / {len(data.train_pairs)} captions, {len(data.val_rows)} val "
          f"images, vocab {len(data.vocab)}, {sum(p.numel() for p in run.model.parameters()):,} parameters, "
          f"device {rt.device}{f' x {rt.world} ranks' if rt.world > 1 else ''}, amp {rt.amp_dtype}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """``python -m train fit``: see the module docstring and ``--help``.

    Args:
        argv: command line without the program name; defaults to ``sys.argv[1:]``.
    """
    args = parse_args(argv)
    runtime = trainer.start_runtime(args.device, args.amp, args.num_threads)
    run_dir = Path(args.out)
    ckpt = trainer.resume_checkpoint(run_dir, args, CHECKPOINT_FORMAT, RESUME_MAY_DIFFER, build_parser(), "fit")
    if args.export_now and ckpt is None:
        raise SystemExit(f"fit: --export-now needs --resume and a checkpoint in {run_dir}")
    data = load_data(args, runtime.device, ckpt)
    trainer.prepare_run_dir(run_dir, args, runtime)
    run = build_run(args, runtime, run_dir, data, ckpt)
    log_start(run)
    done = True  # --export-now: the best epoch so far, without training
    if not args.export_now:
        done = trainer.run_epochs(run.progress, runtime, epochs=args.epochs, stop_after=args.stop_after_epochs,
                                  patience=args.patience, select=args.select,
                                  train_epoch=functools.partial(train_epoch, run),
                                  end_epoch=functools.partial(end_epoch, run), sync=functools.partial(share_plateau_lr, run))
    if done and runtime.is_main:
        export_best(run_dir, run.progress.best, run.model_kwargs, data.vocab, data.cache, args, data.features,
                    data.val_rows, data.val_refs, run.progress.history, precision=runtime.precision)
    trainer.finish_distributed(runtime.world)


def export_best(run_dir: Path, best: dict[str, Any], model_kwargs: dict[str, Any], vocab: Vocabulary, cache,
                args: argparse.Namespace, features: torch.Tensor, val_rows: np.ndarray, val_refs: list[list[str]],
                history: list[dict[str, Any]], num_examples: int = EXAMPLES, precision: str = "fp32") -> Path:
    """Write the best epoch's model to RUN_DIR/model/ (Hub layout, loss curve, model card), atomically.

    Args:
        run_dir: the run folder.
        best: ``{"epoch", "value", "metrics", "model": state dict}`` of the best epoch.
        model_kwargs: ShowAndTell size arguments.
        vocab: the training vocabulary.
        cache: the FeatureCache (backbone spec, dataset description, ids).
        args: the fit arguments.
        features: (N_images, F) all features, for the example captions.
        val_rows: validation image rows.
        val_refs: their reference captions.
        history: per-epoch records.
        num_examples: validation images captioned in the card.
        precision: how the model was trained (for the card).

    Returns:
        the model folder.
    """
    from storyteller.card import public_dataset

    if best["model"] is None:
        raise RuntimeError("no epoch finished, nothing to export")
    training = {"epochs_run": len(history), "best_epoch": best["epoch"], "select": args.select, "precision": precision,
                "train_split": args.train_split, "val_split": args.val_split,
                "train_images": int(len(cache.split(args.train_split))), "val_images": int(len(val_rows)),
                "hyperparameters": {k: getattr(args, k) for k in (
                    "min_freq", "max_caption_words", "batch_size", "lr", "weight_decay", "schedule", "warmup_epochs",
                    "min_lr_ratio", "clip_grad", "label_smoothing", "dropout", "seed", "epochs", "patience",
                    *(("attention_dim", "attention_reg") if args.decoder == "attention" else ()))},
                "flip_augmentation": args.flip_features is not None}
    metrics = {"split": args.val_split, "decoding": f"greedy, max_len {args.max_len}", **best["metrics"]}
    model = build_decoder(model_kwargs, backbone=copy.deepcopy(cache.backbone),
                          extra={"dataset": public_dataset(cache.manifest.get("dataset", {})), "training": training,
                                 "metrics": metrics})
    model.load_state_dict(best["model"])
    model.vocab = vocab
    model.eval()
    rows = val_rows[:num_examples]
    caps = greedy_captions(model, features.cpu(), rows, args.max_len, len(rows) or 1) if len(rows) else []
    examples = [{"id": cache.ids[int(r)], "references": val_refs[i], "captions": {"greedy": caps[i]}}
                for i, r in enumerate(rows)]

    final = trainer.write_model_folder(run_dir, model, examples)
    print(f"exported epoch {best['epoch']} ({args.select} {best['value']:.4f}) to {final}", file=sys.stderr)
    return final


if __name__ == "__main__":
    main()
