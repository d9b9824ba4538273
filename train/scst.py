"""Self-critical sequence training (SCST, Rennie et al. 2017): fine-tune a trained captioner on CIDEr-D.

    python -m train scst --init models/flickr8k-lite0-attention --features feats/f8k-lite0-grid --out runs/scst
    python -m train scst --init runs/f8k --features feats/flickr8k-lite0 --out runs/scst --resume   # after a kill
    torchrun --nproc_per_node=2 -m train scst --init runs/f8k --features feats/flickr8k-lite0 --out runs/scst-ddp

``--init`` is a model folder in the Hub layout (or a Hub id), or a ``fit`` run folder (its model/).
Each step takes a batch of training images and, for each image:

1. samples K captions (``--samples``, default 5) from the model, all K x B of the batch in one
   ``model.step`` call per time step, without gradient, dropout off;
2. scores each sample against the image's references: CIDEr-D with document frequencies from the
   training split's references, computed once (``train.reward``), optionally mixed with sentence
   BLEU-4 (``--reward cider:1,bleu4:0.5``);
3. subtracts a baseline: the mean reward of the image's *other* K-1 samples (default), or the reward
   of the greedy caption (``--baseline greedy``);
4. re-scores the samples with one teacher-forced ``model.forward(features, captions, lengths)`` with
   gradient, and minimises -(reward - baseline) x (mean log-probability of the sample's tokens).

The sampling policy and the re-scored one are the same distribution: both run in eval mode (no
dropout) and forbid the same tokens, ``storyteller.token_rules.step_mask`` (``<pad>``, ``<start>``,
``<unk>``, and ``<end>`` as the first word; the searches take their rules from there too). The model
is touched only through ``init_state``, ``step`` and ``forward``, and the features of a split come
from :func:`load_split_features`, so another decoder with that interface trains unchanged.

Validation after every epoch (and once before the first, the starting model as "epoch 0"): greedy
and beam search with the starting model's recommended decoding (``config["extra"]["decoding"]``)
plus the bad-ending rule (``--bad-endings``), BLEU-1..4, CIDEr-D, mean length, distinct words and
the share of captions ending on a function word. The epoch with the best beam CIDEr-D (the model's
default decoding) is kept, with early stopping (``--patience``). Engineering shared with ``fit``
(``train.trainer``): RUN_DIR/args.json, checkpoint.pt (atomic, ``weights_only=True``), metrics.jsonl,
reward_curve.png, metric_curve.png, ``--resume`` with bit-identical results on CPU, DDP under
torchrun (rank r takes every world-th batch, gradients averaged), and model/ in the Hub layout with a
card that names the starting model, with the bad-ending rule in its decoding settings.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from storyteller.fileio import write_text_atomic
from storyteller.decoders import load_decoder
from storyteller.decoding_settings import BAD_ENDINGS_HELP, MAX_LEN_HELP, parse_bad_endings
from storyteller.token_rules import step_mask
from storyteller.vocab import Vocabulary
from train import fit, trainer
from train.evaluate import DECODING_FALLBACK, caption_statistics, decode_all
from storyteller.cider import CaptionReward
from train.features import FEATURE_MEMORY
from train.reward import parse_reward_weights

CHECKPOINT_FORMAT = "storyteller-scst-checkpoint-v1"
# Arguments that may differ between a run and its --resume. Unlike fit (whose cosine schedule spans
# --epochs), the learning rate is constant, so epoch e does the same whatever --epochs is: a finished
# run can be continued for more epochs with --resume --epochs N, as if it had been asked for N at first.
RESUME_MAY_DIFFER = trainer.RESUME_MAY_DIFFER | {"epochs", "keep_epochs"}
EPOCHS_DIR = "epochs"  # RUN_DIR/epochs/epoch_NNN.safetensors with --keep-epochs (train average reads them)
# (lowest, highest) of each numeric argument (None: no bound); others are refused before anything runs.
# --epochs 0 is allowed: it scores the starting model and exports it.
ARGUMENT_LIMITS = {
    "max_train_images": (0, None), "max_val_images": (0, None), "stop_after_epochs": (0, None), "samples": (1, None),
    "max_len": (1, None), "epochs": (0, None), "batch_size": (1, None), "lr": (0, None), "weight_decay": (0, None),
    "clip_grad": (0, None), "beam": (0, None), "patience": (0, None), "eval_batch_size": (1, None),
    "num_threads": (0, None), "xe_weight": (0, None)}
XE_MAX_WORDS = 30  # --xe-weight's human captions are cut to this many words, as fit cuts its training captions
EXAMPLES = 5  # validation images captioned in the exported model's card
BAR_EVERY = 5  # steps between progress-bar updates
# check_vocabulary reads the captions of this many images: enough to tell another dataset or language.
VOCAB_CHECK_IMAGES = 2000
MIN_KNOWN_WORDS = 0.5  # ... and refuses a cache when the model knows fewer of their words than this


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train scst", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("data and outputs")
    io.add_argument("--init", required=True, help="model to fine-tune: model folder (Hub layout), Hub id, or fit run folder")
    io.add_argument("--features", required=True, help="feature cache of the model's backbone (python -m train extract)")
    io.add_argument("--out", required=True, help="run folder for args.json, checkpoint.pt, metrics, plots and model/")
    io.add_argument("--train-split", default="train", help="split to train on; its references give the document frequencies")
    io.add_argument("--val-split", default="validation", help="split for validation and model selection")
    io.add_argument("--max-train-images", type=int, default=0, help="train on the first N images of the split only (0: all)")
    io.add_argument("--max-val-images", type=int, default=0, help="validate on the first N images only (0: all)")
    io.add_argument("--feature-memory", choices=FEATURE_MEMORY, default="auto",
                    help="training features: ram holds them in memory (GPU memory on CUDA), mmap reads each batch's "
                         "rows from the memory-mapped cache; auto: ram when they take at most half the free memory")
    io.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt (same arguments)")
    io.add_argument("--stop-after-epochs", type=int, default=0,
                    help="leave after this many epochs of this invocation without exporting, as if killed (0: run to the end)")
    io.add_argument("--keep-epochs", action="store_true",
                    help=f"also keep every epoch's weights in RUN_DIR/{EPOCHS_DIR}/ (float32 safetensors), for "
                         "`python -m train average`")

    s = p.add_argument_group("SCST")
    s.add_argument("--samples", type=int, default=5, help="captions sampled per image (K)")
    s.add_argument("--baseline", choices=["mean", "greedy"], default="mean",
                   help="mean: mean reward of the image's other K-1 samples; greedy: reward of its greedy caption")
    s.add_argument("--reward", default="cider:1", help="reward mix NAME:WEIGHT,... of cider (CIDEr-D) and bleu4")
    s.add_argument("--max-len", type=int, default=20, help="sampled captions: " + MAX_LEN_HELP)
    s.add_argument("--epochs", type=int, default=5, help="most epochs (passes over the training images)")
    s.add_argument("--xe-weight", type=float, default=0.0,
                   help="add this weight x the cross-entropy of one human caption per image (drawn anew each step) "
                        "to the policy loss: keeps the model nearer people's wording, against SCST's loss of "
                        "distinct words and its stock phrases (0: pure SCST)")
    s.add_argument("--batch-size", type=int, default=50, help="images per step (per process under torchrun)")
    s.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (constant)")
    s.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    s.add_argument("--clip-grad", type=float, default=5.0, help="clip the gradient's global L2 norm (0: off)")
    s.add_argument("--seed", type=int, default=0, help="seed of the image order and of the sampling")

    v = p.add_argument_group("validation and model selection")
    v.add_argument("--beam", type=int, default=0, help="beam size of validation (0: the model's recommended, else 3)")
    v.add_argument("--bad-endings", default="standard",
                   help=BAD_ENDINGS_HELP + "; at decoding: validation and the exported model's settings (the words "
                        "its vocabulary has)")
    v.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better beam CIDEr-D (0: never)")
    v.add_argument("--eval-batch-size", type=int, default=500, help="images per validation decoding batch")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (auto: cuda when available)")
    r.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="bfloat16 autocast (as fit)")
    r.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    r.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="tqdm bar per epoch")
    return p


# -- model and data --------------------------------------------------------------------------------

def load_init_model(init: str) -> tuple[torch.nn.Module, str]:
    """The model to fine-tune and a short name for it (no machine path).

    Args:
        init: a model folder, a fit run folder (its ``model/``), or a Hub repo id.
    """
    path = Path(init)
    if (path / "model" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "model"  # a fit run folder
    try:
        model = load_decoder(str(path) if path.is_dir() else init)  # Show-and-Tell, Show-Attend-Tell or an ensemble
    except (OSError, ValueError) as e:
        raise SystemExit(f"scst: cannot load --init {init}: {e}") from None
    name = init if not path.is_dir() else (path.parent.name if path.name == "model" else path.name)
    return model, name


def load_split_features(cache, rows: np.ndarray, model: torch.nn.Module, device: torch.device | str = "cpu",
                        memory: str = "auto"):
    """Features of the cache rows ``rows`` as the model takes them: the one place that reads them.

    Show-and-Tell: (N, F) float32 pooled vectors. Show-Attend-Tell (or an ensemble holding one): (N, h, w, F) float16 grids
    (the model casts a batch to its weights' dtype), as ``fit`` keeps them. Held on ``device``, or memory-mapped
    and read per batch when they do not fit (``train.features.training_features``, ``--feature-memory``).

    Args:
        cache: the FeatureCache.
        rows: row numbers.
        model: the decoder (its ``feature_dim`` must match the cache's).
        device: the training device.
        memory: ``auto``, ``ram`` or ``mmap``.

    Raises:
        SystemExit: another feature size, or no grids for an attention model.
    """
    from train.features import FeatureCacheError, training_features

    if cache.feature_dim != model.feature_dim:
        raise SystemExit(f"scst: the cache has {cache.feature_dim}-d features but the model takes {model.feature_dim}-d")
    try:
        return training_features(cache, np.asarray(rows), getattr(model, "has_attention", False), device, memory,
                                 log=lambda m: print(f"scst: {m}", file=sys.stderr) if memory != "ram" else None)
    except FeatureCacheError as e:  # an attention model (or an ensemble with one) given a pooled-only cache
        raise SystemExit(f"scst: {e}") from None


def check_vocabulary(vocab: Vocabulary, references: list[list[str]], where: str) -> None:
    """Refuse a cache whose captions the model's vocabulary mostly does not know (another dataset or language)."""
    from storyteller.vocab import tokenize

    tokens = [t for refs in references[:VOCAB_CHECK_IMAGES] for r in refs for t in tokenize(r)]
    known = sum(t in vocab.stoi for t in tokens) / max(len(tokens), 1)
    if known < MIN_KNOWN_WORDS:
        raise SystemExit(f"scst: the model's vocabulary knows only {known:.0%} of the words of {where}'s captions; "
                         f"the model and the feature cache do not belong together")


# -- one SCST step ---------------------------------------------------------------------------------

@torch.no_grad()
def sample_captions(model: torch.nn.Module, features: torch.Tensor, k: int, max_len: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``k`` captions per image, all images and samples in one ``model.step`` per time step.

    Args:
        model: the decoder (``init_state``, ``step``), in eval mode.
        features: (B, ...) image features.
        k: samples per image.
        max_len: most steps; a caption cut there has no ``<end>``.
        generator: the sampling RNG.

    Returns:
        ``(captions, lengths)``: captions (B*k, T) ``<start> w.. [<end>] <pad>..`` (samples of image b
        are rows b*k .. b*k+k-1), lengths (B*k,) CPU real tokens per row, ``<start>`` included.
    """
    B, dev = features.shape[0], features.device
    images = torch.arange(B, device=dev).repeat_interleave(k)  # (N = B*k,) the photo of each sample
    state = model.init_state(features, images)  # k rows per photo; an attention decoder projects its regions once
    products = model.products()  # the step's matrices for the current weights, made once for the whole sample
    N = B * k
    tokens = torch.full((N,), Vocabulary.start_id, dtype=torch.long, device=dev)
    columns = [tokens]
    finished = torch.zeros(N, dtype=torch.bool, device=dev)
    lengths = torch.ones(N, dtype=torch.long, device=dev)
    for t in range(max_len):
        logp, state = model.step(tokens, state, products)  # (N, V) log-probabilities
        logp = logp.float() + step_mask(logp.shape[1], t, device=dev)  # the searches' token rules
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (N,)
        nxt = torch.where(finished, Vocabulary.pad_id, nxt)
        lengths += (~finished).long()
        finished |= nxt == Vocabulary.end_id
        columns.append(nxt)
        tokens = nxt
        if bool(finished.all()):
            break
    return torch.stack(columns, 1), lengths.cpu()  # (N, T), (N,)


def forward_rows(captions: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample and time step of each row ``model.forward`` returned: (N,) each, on the CPU.

    ``forward`` returns the real positions in an order of its choosing: packed (time-major over the
    samples sorted by length, as ``ShowAndTell`` does) or batch-major. Both candidates are built
    from the lengths and the one whose targets equal the returned ones is used.

    Args:
        captions: (S, T) the captions passed to forward.
        lengths: (S,) CPU lengths passed to forward.
        targets: (N,) the targets forward returned.

    Raises:
        ValueError: neither order matches.
    """
    from torch.nn.utils.rnn import pack_padded_sequence

    S, T = captions.shape
    steps = lengths - 1
    grid = torch.stack([torch.arange(S)[:, None].expand(S, T - 1), torch.arange(T - 1)[None, :].expand(S, T - 1)], -1)
    packed = pack_padded_sequence(grid, steps, batch_first=True, enforce_sorted=False).data  # (N, 2) time-major
    batch_major = grid[torch.arange(T - 1)[None, :] < steps[:, None]]  # (N, 2)
    cpu_targets = targets.cpu()
    for rows in (packed, batch_major):
        if rows.shape[0] == cpu_targets.shape[0] and torch.equal(captions.cpu()[rows[:, 0], rows[:, 1] + 1], cpu_targets):
            return rows[:, 0], rows[:, 1]
    raise ValueError("model.forward returned its positions in an unknown order (neither packed nor batch-major)")


@contextlib.contextmanager
def dropout_off_train_mode(model: torch.nn.Module):
    """Training mode with every dropout at p = 0: the function of eval mode (the policy that sampled),
    in the mode cuDNN needs for an RNN forward that is differentiated (on CUDA, ``nn.LSTM`` in eval mode
    raises "cudnn RNN backward can only be called in training mode"). Dropout at p = 0 returns its input
    unchanged and draws no random numbers, so CPU results are bit-identical to eval mode."""
    drops = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rnns = [(m, m.dropout) for m in model.modules() if isinstance(m, torch.nn.RNNBase)]
    was_training = model.training
    try:
        for m, _ in drops:
            m.p = 0.0
        for m, _ in rnns:
            m.dropout = 0.0
        model.train(True)
        yield model
    finally:
        model.train(was_training)
        for m, p in drops:
            m.p = p
        for m, p in rnns:
            m.dropout = p


def policy_loss(forward: torch.nn.Module, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                advantage: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
    """-mean over samples of advantage x (mean log-probability of the sample's tokens), with gradient.

    Args:
        forward: the model (or its DDP wrapper): ``(features, captions, lengths, images) -> (logits (N, V), targets (N,))``.
        features: (B, ...) features, one row per photo.
        captions: (S, T) sampled captions.
        lengths: (S,) CPU lengths.
        advantage: (S,) reward - baseline.
        images: (S,) the photo of each sample, an index into ``features`` (None: one sample per photo).
    """
    logits, targets = forward(features, captions, lengths, images)  # (N, V), (N,) over real positions
    sample, time_step = forward_rows(captions, lengths, targets)
    sample, time_step = sample.to(logits.device), time_step.to(logits.device)
    # the sampler's masks (storyteller.token_rules), one row per time step: the same distribution it drew from
    masks = torch.stack([step_mask(logits.shape[1], t, device=logits.device) for t in range(captions.shape[1] - 1)])
    logits = logits.float() + masks[time_step]  # (N, V)
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    steps = (lengths - 1).to(logits.device).float()  # tokens predicted per sample
    weight = advantage.to(logits.device)[sample] / steps[sample]  # (N,): mean over each sample's tokens
    return -(weight * logp).sum() / captions.shape[0]


def rewards_of(captions: torch.Tensor, lengths: torch.Tensor, image: np.ndarray, refs: list[list[np.ndarray]],
               scorer: CaptionReward, vocab_map: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    """(S,) reward of each caption: sum of weight x metric against the references of its image.

    Args:
        captions: (S, T) ``<start> w.. [<end>] <pad>..`` ids.
        lengths: (S,) CPU lengths.
        image: (S,) index into ``refs``.
        refs: reference word ids per image (``CaptionReward.encode_references``).
        scorer: the reward with its document frequencies.
        vocab_map: (V,) model id -> reward word id.
        weights: ``{"cider": w, "bleu4": w}``.
    """
    rows = captions.cpu().numpy()
    hyps = []
    for row, n in zip(rows, lengths.tolist()):
        ids = row[1:n]
        hyps.append(vocab_map[ids[ids > Vocabulary.unk_id]])  # words only (drops <end>)
    cider, bleu4 = scorer.score(hyps, image, refs)
    return weights.get("cider", 0.0) * cider + weights.get("bleu4", 0.0) * bleu4


def advantages(reward: np.ndarray, k: int, baseline: np.ndarray | None = None) -> np.ndarray:
    """reward - baseline per sample: the mean of the image's other k-1 samples, or ``baseline`` per image.

    Args:
        reward: (B*k,) rewards, samples of one image adjacent.
        k: samples per image.
        baseline: (B,) greedy rewards, or None for the mean of the others.
    """
    r = reward.reshape(-1, k)  # (B, k)
    if baseline is not None:
        return (r - baseline[:, None]).reshape(-1)
    others = (r.sum(1, keepdims=True) - r) / (k - 1)  # (B, k): excludes the sample itself
    return (r - others).reshape(-1)


def scst_step(policy: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer, feats: torch.Tensor,
              refs: list[list[np.ndarray]], scorer: CaptionReward, vocab_map: np.ndarray, weights: dict[str, float],
              k: int, max_len: int, baseline: str, generator: torch.Generator, clip_grad: float = 0.0,
              amp_dtype: torch.dtype | None = None,
              xe: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> dict[str, Any]:
    """One SCST update on a batch of images: sample, reward, baseline, policy-gradient step.

    Args:
        policy: the model or its DDP wrapper (its forward gives the gradient).
        model: the bare model (sampling, greedy baseline, gradient clipping).
        optimizer: the optimiser of its parameters.
        feats: (B, ...) features of the batch's images.
        refs: their references as reward word ids, per image.
        scorer: the reward (document frequencies).
        vocab_map: (V,) model id -> reward word id.
        weights: the reward mix.
        k: samples per image.
        max_len: most sampling steps.
        baseline: ``mean`` (of the other k-1 samples) or ``greedy``.
        generator: the sampling RNG.
        clip_grad: gradient-norm clip (0: off).
        amp_dtype: autocast dtype or None.
        xe: ``(captions (B, T), lengths (B,) CPU, weight)``: one human caption per image whose cross-entropy,
            times the weight, is added to the policy loss (``--xe-weight``); None: pure SCST.

    Returns:
        ``{"reward": (B*k,) rewards, "greedy_reward": (B,) or None, "loss": float,
        "sample_seconds", "reward_seconds", "update_seconds"}``.
    """
    autocast = dict(device_type=feats.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    image = np.repeat(np.arange(feats.shape[0]), k)  # (B*k,) image of each sample
    ta = time.perf_counter()
    with torch.autocast(**autocast):
        captions, lengths = sample_captions(model, feats, k, max_len, generator)  # (B*k, T), (B*k,)
    tb = time.perf_counter()
    reward = rewards_of(captions, lengths, image, refs, scorer, vocab_map, weights)  # (B*k,)
    base = None
    if baseline == "greedy":
        from storyteller.decoding import greedy_search

        with torch.autocast(**autocast):
            greedy = greedy_search(model, feats, max_len=max_len)
        cider, bleu4 = scorer.score([vocab_map[np.array(c.tokens, dtype=np.int64)] for c in greedy],
                                    np.arange(len(greedy)), refs)
        base = weights.get("cider", 0.0) * cider + weights.get("bleu4", 0.0) * bleu4  # (B,)
    adv = torch.from_numpy(advantages(reward, k, base)).float()  # (B*k,)
    tc = time.perf_counter()
    with torch.autocast(**autocast), dropout_off_train_mode(model):
        loss = policy_loss(policy, feats, captions, lengths, adv, torch.from_numpy(image).to(feats.device))
        if xe is not None:  # the same function (eval, no dropout) on people's captions of these photos
            logits, targets = policy(feats, xe[0], xe[1])
            loss = loss + xe[2] * torch.nn.functional.cross_entropy(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    td = time.perf_counter()
    return {"reward": reward, "greedy_reward": base, "loss": float(loss.detach()),
            "sample_seconds": tb - ta, "reward_seconds": tc - tb, "update_seconds": td - tc}


# -- validation ------------------------------------------------------------------------------------

def validate(model: torch.nn.Module, features: torch.Tensor, refs: list[list[str]], decoding: dict[str, Any],
             batch_size: int, amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """Greedy and beam figures on the validation features: ``{"greedy": {...}, "beam": {...}}``.

    Args:
        model: the decoder.
        features: (N, ...) validation features on the model's device.
        refs: raw references per image.
        decoding: ``beam_size``, ``alpha``, ``no_repeat_ngram_size``, ``max_len``, ``min_len``, ``bad_endings``.
        batch_size: images per decoder batch.
        amp_dtype: autocast dtype or None.
    """
    from storyteller.metrics import evaluate_captions

    kw = {k: decoding[k] for k in ("max_len", "no_repeat_ngram_size", "min_len", "bad_endings")}
    out = {}
    for name, beam in (("greedy", 1), ("beam", decoding["beam_size"])):
        texts = decode_all(model, features, beam, batch_size=batch_size, alpha=decoding["alpha"], amp_dtype=amp_dtype, **kw)
        scores = evaluate_captions(texts, refs)
        out[name] = {**{k: scores[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")}, **caption_statistics(texts)}
    return out


# -- one run: its arguments, data and model ------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, float]]:
    """The parsed command line and the reward mix, or exit 2 with one line for nonsense (before any
    file is written or any model loaded).

    Args:
        argv: command line without the program name.
    """
    args = build_parser().parse_args(argv)
    trainer.check_ranges("scst", args, ARGUMENT_LIMITS)
    if args.samples < 2 and args.baseline == "mean":
        trainer.refuse("scst", "--baseline mean needs --samples >= 2 (the mean of the other samples)")
    try:
        weights = parse_reward_weights(args.reward)
        parse_bad_endings(args.bad_endings)
    except ValueError as e:
        trainer.refuse("scst", str(e))
    return args, weights


@dataclass
class ScstData:
    """The images one run trains and validates on.

    Attributes:
        cache: the FeatureCache.
        train_rows: training image rows (``--max-train-images`` applied).
        val_rows: validation image rows (``--max-val-images`` applied).
        train_refs: raw references of the training images (the reward's document frequencies).
        val_refs: raw references of the validation images.
        train_feats: (N_train, ...) their features on the training device (or a ``train.features.MappedRows``).
        val_feats: (N_val, ...) validation features on the training device.
    """

    cache: Any
    train_rows: np.ndarray
    val_rows: np.ndarray
    train_refs: list[list[str]]
    val_refs: list[list[str]]
    train_feats: torch.Tensor
    val_feats: torch.Tensor


def load_data(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
              ckpt: dict[str, Any] | None) -> ScstData:
    """The feature cache's splits as ``model`` reads them, checked against the model.

    Args:
        args: the scst arguments.
        model: the starting model (backbone, vocabulary, feature size).
        device: the training device.
        ckpt: the checkpoint being resumed (its vocabulary must be the model's), or None.

    Raises:
        SystemExit: a missing cache or split, another backbone or vocabulary (one line).
    """
    from train.features import FeatureCache, FeatureCacheError

    try:
        cache = FeatureCache.open(args.features, expect_backbone=model.backbone) if model.backbone else FeatureCache.open(args.features)
        train_rows, val_rows = cache.split(args.train_split), cache.split(args.val_split)
    except FeatureCacheError as e:  # missing cache or split, other backbone: one line
        raise SystemExit(f"scst: {e}") from None
    if args.max_train_images > 0:
        train_rows = train_rows[: args.max_train_images]
    if args.max_val_images > 0:
        val_rows = val_rows[: args.max_val_images]
    train_refs = [cache.captions[r] for r in train_rows]
    check_vocabulary(model.vocab, train_refs, f"split {args.train_split!r} of {args.features}")
    if ckpt is not None and ckpt["vocab"] != list(model.vocab.itos):
        raise SystemExit(f"scst: --resume: the vocabulary of {args.init} is not the one {args.out} was trained with")
    return ScstData(cache, train_rows, val_rows, train_refs, [cache.captions[r] for r in val_rows],
                    load_split_features(cache, train_rows, model, device, args.feature_memory),  # (N_train, ...)
                    load_split_features(cache, val_rows, model, device, "ram"))  # (N_val, ...): small, always held


def validation_decoding(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    """Decoding of validation and of the exported model: the starting model's recommended one (else
    the captioner's defaults), ``--beam`` when given, plus the ``--bad-endings`` its vocabulary has.

    Args:
        args: the scst arguments.
        model: the starting model.
    """
    from storyteller.decoding_settings import decoding_hints

    decoding = {**DECODING_FALLBACK, **decoding_hints(model.extra)}
    if args.beam > 0:
        decoding["beam_size"] = args.beam
    bad_endings = [w for w in parse_bad_endings(args.bad_endings) if w in model.vocab.stoi]
    return {**decoding, "bad_endings": bad_endings}


@dataclass
class ScstRun:
    """Everything one invocation of scst works with.

    Attributes:
        args: the scst arguments.
        weights: the reward mix.
        runtime: rank, world, device, autocast.
        run_dir: ``--out``.
        model: the model being fine-tuned (vocab attached), in eval mode.
        init_name: the starting model's name.
        policy: what the policy loss calls (the model, DDP-wrapped under torchrun).
        optimizer: AdamW over its parameters.
        data: features and references.
        scorer: the reward with the training references' document frequencies.
        train_ref_ids: the training references as reward word ids.
        vocab_map: (V,) model token id -> reward word id.
        decoding: validation's decoding settings.
        progress: epoch, history, best epoch and early-stop state.
    """

    args: argparse.Namespace
    weights: dict[str, float]
    runtime: trainer.Runtime
    run_dir: Path
    model: torch.nn.Module
    init_name: str
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: ScstData
    scorer: CaptionReward
    train_ref_ids: list[list[np.ndarray]]
    vocab_map: np.ndarray
    decoding: dict[str, Any]
    progress: trainer.Progress
    xe_pairs: Any = None  # --xe-weight: fit.CaptionPairs of every training caption, the images' in train order
    xe_first: np.ndarray | None = None  # (N_train,) each image's first pair
    xe_count: np.ndarray | None = None  # (N_train,) its number of captions

    def xe_batch(self, idx: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """One human caption per image of the batch (``idx``, training-image positions), drawn with ``rng``,
        for ``scst_step``'s ``xe``; None without ``--xe-weight``."""
        if self.xe_pairs is None:
            return None
        pick = self.xe_first[idx.numpy()] + (rng.random(len(idx)) * self.xe_count[idx.numpy()]).astype(np.int64)
        lengths = self.xe_pairs.lengths[pick]
        captions = self.xe_pairs.tokens[torch.from_numpy(pick).to(self.xe_pairs.tokens.device), : int(lengths.max())]
        return captions, lengths, self.args.xe_weight


def build_run(args: argparse.Namespace, weights: dict[str, float], runtime: trainer.Runtime, run_dir: Path,
              model: torch.nn.Module, init_name: str, data: ScstData, ckpt: dict[str, Any] | None) -> ScstRun:
    """Reward (document frequencies computed once), decoding, optimiser, restored from ``ckpt`` when
    resuming; logs one line.

    Args:
        args: the scst arguments.
        weights: the reward mix.
        runtime: the runtime.
        run_dir: ``--out``.
        model: the starting model.
        init_name: its name.
        data: the run's data.
        ckpt: the checkpoint being resumed, or None.
    """
    t0 = time.perf_counter()
    scorer = CaptionReward(data.train_refs)
    train_ref_ids = scorer.encode_references(data.train_refs)
    vocab_map = scorer.vocab_map(model.vocab.itos)
    df_seconds = time.perf_counter() - t0
    decoding = validation_decoding(args, model)
    device = runtime.device
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if runtime.is_main:
            print(f"resuming {run_dir} after epoch {ckpt['epoch']}", file=sys.stderr)
    model.eval()  # SCST samples and re-scores without dropout: one policy
    if runtime.is_main:
        print(f"scst: from {init_name}, {len(data.train_rows)} train images x {args.samples} samples, "
              f"{len(data.val_rows)} val images, reward {weights}, baseline {args.baseline}, device {device}"
              f"{f' x {runtime.world} ranks' if runtime.world > 1 else ''}, amp {runtime.amp_dtype}; "
              f"document frequencies in {df_seconds:.1f}s", file=sys.stderr)
    run = ScstRun(args, weights, runtime, run_dir, model, init_name, trainer.distribute(model, runtime), optimizer,
                  data, scorer, train_ref_ids, vocab_map, decoding, trainer.Progress.from_checkpoint(ckpt))
    if args.xe_weight > 0:  # every training caption encoded once; pairs of one image are adjacent
        run.xe_pairs = fit.encode_pairs(data.train_rows, data.cache.captions, model.vocab, XE_MAX_WORDS, device)
        run.xe_count = np.array([len(data.cache.captions[r]) for r in data.train_rows], dtype=np.int64)
        run.xe_first = np.cumsum(run.xe_count) - run.xe_count
    return run


# -- one epoch -----------------------------------------------------------------------------------

def train_epoch(run: ScstRun, epoch: int) -> dict[str, Any]:
    """One pass over the training images (this rank's share of them), one :func:`scst_step` per batch.

    Args:
        run: the run.
        epoch: 0-based epoch.

    Returns:
        ``{"seconds": {"sample", "reward", "update"}, "reward_sum": (sum of rewards, samples, sum of
        greedy rewards) over every rank, "train_seconds"}``.
    """
    from tqdm import tqdm

    args, rt, data = run.args, run.runtime, run.data
    t0 = time.perf_counter()
    batches = fit.epoch_order(torch.zeros(len(data.train_rows)), args.batch_size, args.seed, epoch, rt.rank, rt.world,
                              bucket=0)
    gen = torch.Generator(device=rt.device).manual_seed(trainer.epoch_seed(args.seed, epoch, rt.rank))  # sampling
    xe_rng = np.random.default_rng(trainer.epoch_seed(args.seed, epoch, rt.rank))  # --xe-weight's captions
    seconds = {"sample": 0.0, "reward": 0.0, "update": 0.0}
    reward_sum = torch.zeros(3, dtype=torch.float64)  # (sum of rewards, samples, sum of greedy rewards), this rank
    show_bar = trainer.show_progress(args.progress, rt)
    bar = tqdm(batches, desc=f"scst {epoch + 1}/{args.epochs}", disable=not show_bar, leave=False, file=sys.stderr)
    for step, idx in enumerate(bar):
        feats = data.train_feats[idx.to(rt.device)]  # (B, ...)
        refs = [run.train_ref_ids[i] for i in idx.tolist()]
        out = scst_step(run.policy, run.model, run.optimizer, feats, refs, run.scorer, run.vocab_map, run.weights,
                        args.samples, args.max_len, args.baseline, gen, args.clip_grad, rt.amp_dtype,
                        run.xe_batch(idx, xe_rng))
        for key in seconds:
            seconds[key] += out[f"{key}_seconds"]
        greedy = out["greedy_reward"]
        reward_sum += torch.tensor([float(out["reward"].sum()), float(out["reward"].size),
                                    float(greedy.sum()) if greedy is not None else 0.0], dtype=torch.float64)
        if show_bar and step % BAR_EVERY == 0:
            bar.set_postfix(reward=f"{reward_sum[0] / reward_sum[1]:.3f}")
    bar.close()
    if rt.world > 1:  # the logged reward covers every rank's samples
        agg = reward_sum.to(rt.device)
        dist.all_reduce(agg)
        reward_sum = agg.cpu()
    return {"seconds": seconds, "reward_sum": reward_sum, "train_seconds": time.perf_counter() - t0}


def validation_record(run: ScstRun, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The epoch's record: ``extra`` plus greedy and beam figures on validation.

    Args:
        run: the run.
        epoch: 1-based epoch (0: the starting model).
        extra: training figures of the epoch.
    """
    t1 = time.perf_counter()
    val = validate(run.model, run.data.val_feats, run.data.val_refs, run.decoding, run.args.eval_batch_size,
                   run.runtime.amp_dtype)
    return {"epoch": epoch, **extra, **{f"greedy_{k}": v for k, v in val["greedy"].items()},
            **{f"beam_{k}": v for k, v in val["beam"].items()}, "cider": val["beam"]["cider"],
            "bleu4": val["beam"]["bleu4"], "val_seconds": round(time.perf_counter() - t1, 3)}


def keep_record(run: ScstRun, record: dict[str, Any]) -> None:
    """Count a validated epoch (best by beam CIDEr-D), then checkpoint: RUN_DIR/checkpoint.pt
    (``storyteller-scst-checkpoint-v1``), metrics.jsonl and the plots (rank 0).

    Args:
        run: the run.
        record: the epoch's record.
    """
    run.progress.update(record, record["cider"], maximize=True, patience=run.args.patience, model=run.model,
                        metrics=record)
    if run.args.keep_epochs:
        trainer.save_epoch_weights(run.run_dir / EPOCHS_DIR, record["epoch"], run.model)
    trainer.save_checkpoint(run.run_dir / trainer.CHECKPOINT, {
        "format": CHECKPOINT_FORMAT, **run.progress.state(), "model": trainer.cpu_state(run.model),
        "optimizer": run.optimizer.state_dict(), "vocab": list(run.model.vocab.itos), "args": vars(run.args)})
    write_metrics(run.run_dir, run.progress.history)


def validate_start(run: ScstRun) -> None:
    """Epoch 0 of a fresh run: the starting model's figures, so that SCST has to beat it (rank 0).

    Args:
        run: the run.
    """
    if run.runtime.is_main and not run.progress.history:
        record = validation_record(run, 0, {})
        keep_record(run, record)
        print(f"epoch 0 (start): beam {run.decoding['beam_size']} BLEU-4 {record['bleu4']:.4f} CIDEr-D "
              f"{record['cider']:.4f}, greedy CIDEr-D {record['greedy_cider']:.4f}", file=sys.stderr)
    run.progress.stopped = trainer.broadcast_flag(run.progress.stopped, run.runtime)


def end_epoch(run: ScstRun, epoch: int, trained: dict[str, Any]) -> None:
    """Validate, keep the best epoch, checkpoint and log (rank 0).

    Args:
        run: the run.
        epoch: 0-based epoch.
        trained: :func:`train_epoch`'s result.
    """
    args, seconds, reward_sum = run.args, trained["seconds"], trained["reward_sum"]
    train_seconds = trained["train_seconds"]
    extra = {"mean_reward": float(reward_sum[0] / reward_sum[1]), "lr": run.optimizer.param_groups[0]["lr"],
             "train_seconds": round(train_seconds, 3), **{f"{k}_seconds": round(v, 3) for k, v in seconds.items()}}
    if args.baseline == "greedy":
        extra["mean_greedy_reward"] = float(reward_sum[2] * args.samples / reward_sum[1])
    record = validation_record(run, epoch + 1, extra)
    keep_record(run, record)
    print(f"epoch {epoch + 1}: reward {record['mean_reward']:.4f}  beam {run.decoding['beam_size']} BLEU-4 "
          f"{record['bleu4']:.4f} CIDEr-D {record['cider']:.4f}  greedy CIDEr-D {record['greedy_cider']:.4f}  "
          f"bad endings {record['beam_bad_ending_share']:.3f}  ({train_seconds:.0f}s: sample {seconds['sample']:.0f}s, "
          f"reward {seconds['reward']:.1f}s, forward+backward {seconds['update']:.0f}s)"
          f"{'  *' if run.progress.best['epoch'] == epoch + 1 else ''}", file=sys.stderr)


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """``python -m train scst``: see the module docstring and ``--help``.

    Args:
        argv: command line without the program name; defaults to ``sys.argv[1:]``.
    """
    args, weights = parse_args(argv)
    runtime = trainer.start_runtime(args.device, args.amp, args.num_threads)
    run_dir = Path(args.out)
    ckpt = trainer.resume_checkpoint(run_dir, args, CHECKPOINT_FORMAT, RESUME_MAY_DIFFER, build_parser(), "scst")
    model, init_name = load_init_model(args.init)
    data = load_data(args, model, runtime.device, ckpt)
    trainer.prepare_run_dir(run_dir, args, runtime)
    run = build_run(args, weights, runtime, run_dir, model, init_name, data, ckpt)
    validate_start(run)
    done = trainer.run_epochs(run.progress, runtime, epochs=args.epochs, stop_after=args.stop_after_epochs,
                              patience=args.patience, select="beam CIDEr-D",
                              train_epoch=functools.partial(train_epoch, run), end_epoch=functools.partial(end_epoch, run))
    if done and runtime.is_main:
        export(run_dir, run.progress.best, model, init_name, data.cache, len(data.train_rows), args, run.decoding,
               data.val_feats, data.val_rows, data.val_refs, run.progress.history, weights)
    trainer.finish_distributed(runtime.world)


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl (from the checkpoint's history) and the reward / validation curves."""
    import json

    from train.report import plot_scst_curves

    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_scst_curves(history, run_dir / "reward_curve.png", run_dir / "metric_curve.png")


HYPERPARAMETERS = ("samples", "baseline", "reward", "max_len", "epochs", "batch_size", "lr", "weight_decay",
                   "clip_grad", "seed", "patience", "xe_weight")


def training_record(args: argparse.Namespace, init_name: str, weights: dict[str, float],
                    init_extra: dict[str, Any]) -> dict[str, Any]:
    """What a model card says of an SCST run: the method in words, the splits, the starting model and the
    hyperparameters (the exported model's, and ``train average``'s for a run's epochs).

    Args:
        args: the scst arguments (RUN_DIR/args.json).
        init_name: the starting model's name.
        weights: the reward mix (``parse_reward_weights``).
        init_extra: the starting model's ``extra``.
    """
    reward = " + ".join(f"{w:g} x {'CIDEr-D' if k == 'cider' else 'BLEU-4'}" for k, w in weights.items() if w)
    method = (f"fine-tuned from `{init_name}` with self-critical sequence training (SCST): reward {reward} "
              f"(document frequencies of the {args.train_split} references), {args.samples} samples per image, "
              f"baseline {'mean of the other samples' if args.baseline == 'mean' else 'greedy caption'}")
    if getattr(args, "xe_weight", 0):
        method += f", plus {args.xe_weight:g} x the cross-entropy of one human caption per image"
    return {"train_split": args.train_split, "val_split": args.val_split, "method": method, "init_model": init_name,
            "init_training": init_extra.get("training"),
            "hyperparameters": {k: getattr(args, k, None) for k in HYPERPARAMETERS}}


def export(run_dir: Path, best: dict[str, Any], model: torch.nn.Module, init_name: str, cache, n_train: int,
           args: argparse.Namespace,
           decoding: dict[str, Any], val_feats: torch.Tensor, val_rows: np.ndarray, val_refs: list[list[str]],
           history: list[dict[str, Any]], weights: dict[str, float]) -> Path:
    """The best epoch's model to RUN_DIR/model/ (Hub layout, card naming the starting model, decoding settings).

    Args:
        run_dir: the run folder.
        best: ``{"epoch", "value", "metrics", "model"}`` of the best epoch (epoch 0: the starting model).
        model: the trained model (copied, not changed).
        init_name: the starting model's name.
        cache: the FeatureCache.
        n_train: training images used.
        args: the scst arguments.
        decoding: the recommended decoding (the starting model's plus bad endings).
        val_feats: (N_val, ...) validation features.
        val_rows: validation rows (example ids).
        val_refs: their references.
        history: per-epoch records.
        weights: the reward mix.
    """
    m = best["metrics"]
    training = {**(model.extra.get("training") or {}), **training_record(args, init_name, weights, model.extra),
                "train_images": int(n_train),
                "val_images": int(len(val_rows)), "select": f"beam {decoding['beam_size']} CIDEr-D",
                "epochs_run": len(history) - 1, "best_epoch": best["epoch"]}
    metrics = {"split": args.val_split, "decoding": "greedy, max_len " + str(decoding["max_len"]),
               **{k: m[f"greedy_{k}"] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")}}
    recommended = {k: decoding[k] for k in ("beam_size", "alpha", "no_repeat_ngram_size", "max_len")}
    if decoding.get("bad_endings"):
        recommended["bad_endings"] = list(decoding["bad_endings"])
    # A new instance of the model's own class from its init arguments (the Hub mixin records them),
    # with the new metadata: save_pretrained writes those arguments to config.json.
    config = {**model.init_arguments(),
              "extra": {**model.extra, "training": training, "metrics": metrics, "decoding": recommended}}
    out = type(model)(**config)
    out.load_state_dict(best["model"])
    out.vocab = model.vocab
    out.eval()
    rows = val_rows[:EXAMPLES]
    texts = decode_all(out, val_feats[: len(rows)].cpu(), 1, max_len=decoding["max_len"], batch_size=len(rows) or 1) if len(rows) else []
    examples = [{"id": cache.ids[int(r)], "references": val_refs[i], "captions": {"greedy": texts[i]}} for i, r in enumerate(rows)]
    final = trainer.write_model_folder(run_dir, out, examples, carry=("reward_curve.png", "metric_curve.png"))
    print(f"exported epoch {best['epoch']} (beam CIDEr-D {best['value']:.4f}) to {final}", file=sys.stderr)
    return final


if __name__ == "__main__":
    main()
