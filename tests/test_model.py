import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from storyteller.decoders import ShowAndTell
from storyteller.vocab import Vocabulary

BACKBONE = {"name": "efficientnet_lite0", "weights": "test", "feature_dim": 16,
            "preprocessing": {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}}


def tiny_model(num_layers=2, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    vocab = Vocabulary(["a", "dog", "cat", "runs", "sits"])
    m = ShowAndTell(len(vocab), feature_dim=16, embed_dim=8, hidden_dim=12, num_layers=num_layers, dropout=dropout,
                    backbone=BACKBONE)
    m.vocab = vocab
    return m


def batch():
    captions = torch.tensor([[1, 4, 5, 7, 2, 0], [1, 6, 2, 0, 0, 0], [1, 4, 6, 8, 5, 2]])
    lengths = torch.tensor([5, 3, 6])
    return torch.randn(3, 16), captions, lengths


def test_packed_forward_matches_step_by_step_decoding():
    m = tiny_model().eval()
    feats, caps, lengths = batch()
    logits, targets = m(feats, caps, lengths)
    assert logits.shape == (int((lengths - 1).sum()), m.vocab_size)
    # the same logits, row by row, from init_state + step (teacher forcing by hand)
    ref_logp, ref_tgt = {}, {}
    for b in range(3):
        state = m.init_state(feats[b:b + 1])
        for t in range(int(lengths[b]) - 1):
            logp, state = m.step(caps[b, t:t + 1], state)
            ref_logp[(b, t)], ref_tgt[(b, t)] = logp[0], int(caps[b, t + 1])
    # packed order is time-major over the sequences sorted by length (longest first)
    order = sorted(range(3), key=lambda b: -int(lengths[b]))
    keys = [(b, t) for t in range(int(lengths.max()) - 1) for b in order if t < int(lengths[b]) - 1]
    assert targets.tolist() == [ref_tgt[k] for k in keys]
    torch.testing.assert_close(torch.log_softmax(logits, -1), torch.stack([ref_logp[k] for k in keys]))


def test_padding_costs_nothing_and_changes_nothing():
    m = tiny_model().eval()
    feats, caps, lengths = batch()
    logits, _ = m(feats, caps, lengths)
    caps2 = caps.clone()
    caps2[1, 3:] = 7  # garbage after the end of row 1
    logits2, _ = m(feats, caps2, lengths)
    assert torch.equal(logits, logits2)


def test_training_step_reduces_loss():
    m = tiny_model(dropout=0.1).train()
    feats, caps, lengths = batch()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    losses = []
    for _ in range(30):
        logits, targets = m(feats, caps, lengths)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_pretrained_roundtrip_is_exact(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "vocab.json"} <= {p.name for p in tmp_path.iterdir()}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["vocab_size"] == 9 and cfg["hidden_dim"] == 12 and cfg["num_layers"] == 2
    assert cfg["backbone"] == BACKBONE
    m2 = ShowAndTell.from_pretrained(tmp_path)
    assert not m2.training
    assert m2.vocab == m.vocab and m2.backbone == BACKBONE
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_float16_weights_load_into_float32_model(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, tmp_path / "model.safetensors")
    m2 = ShowAndTell.from_pretrained(tmp_path)
    assert m2.head.weight.dtype == torch.float32
    torch.testing.assert_close(m2.head.weight, m.head.weight.half().float())


def test_loading_is_strict_and_checks_the_vocabulary(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    # a missing tensor is an error, not a silently random layer
    save_file({k: v for k, v in sd.items() if k != "head.bias"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="head.bias"):
        ShowAndTell.from_pretrained(tmp_path)
    save_file(sd, tmp_path / "model.safetensors")
    Vocabulary(["a", "dog"]).save(tmp_path / "vocab.json")
    with pytest.raises(ValueError, match="vocab_size=9"):
        ShowAndTell.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ShowAndTell.from_pretrained(tmp_path)


def test_save_needs_a_matching_vocabulary(tmp_path):
    m = tiny_model()
    m.vocab = None
    with pytest.raises(ValueError, match="vocabulary"):
        m.save_pretrained(tmp_path)
    m.vocab = Vocabulary(["a"])
    with pytest.raises(ValueError, match="vocab_size"):
        m.save_pretrained(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_pretrained_honours_map_location(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    m = ShowAndTell.from_pretrained(tmp_path, map_location="cuda")
    assert all(p.device.type == "cuda" for p in m.parameters())
