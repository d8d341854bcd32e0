"""Weight transfer into segmentation networks, with a report of what was loaded, skipped and re-initialised.

Three initialisations of the fine-tuning stage use it (plus ``random``, which loads nothing):

- ``doll``: :func:`load_pretrained` copies a DoLL pre-trained segmenter (14 outputs) into the downstream network;
  every tensor whose name **and** shape match is copied; the head, whose shape differs (new classes), keeps its
  fresh initialisation and is reported.
- ``classifier``: :func:`load_encoder_from_classifier` copies the encoder of a ``segresnet_encoder`` classifier
  (:func:`bundle.networks.classifiers.build_classifier`; keys ``convInit.*``, ``down_layers.*``) into a SegResNet;
  the decoder and head keep their initialisation.
- ``external``: :func:`load_external` copies any local state-dict file (the ImageNet-transfer, "TII", analogue),
  tolerating shape mismatches (they are skipped and reported).

Nothing is ever downloaded. Checkpoint files may hold a bare ``state_dict`` or a dict of them as written by MONAI's
``CheckpointSaver`` (``{"network": ..., "optimizer": ...}``; with a single object it writes the bare state dict) or
by other trainers (``{"model": ...}``, ``{"state_dict": ...}``). Keys saved from ``DistributedDataParallel``
(``module.``) or ``torch.compile`` (``_orig_mod.``) are un-prefixed automatically. A mismatched checkpoint raises a
:class:`bundle.utils.BundleInputError` (a ``ValueError``) whose message starts with the file's path and says how many
keys matched.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from bundle.utils import BundleInputError, load_checkpoint

from .segmentation import matches_prefix, network_parts, part_of, unwrap

__all__ = [
    "INIT_STRATEGIES",
    "TransferReport",
    "initialise_segmenter",
    "load_encoder_from_classifier",
    "load_external",
    "load_pretrained",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

#: Keys under which trainers store the network's state dict inside a checkpoint dict, in order of preference.
NETWORK_KEYS = ("network", "model", "state_dict", "model_state_dict", "net", "segmenter", "classifier")
#: Key prefixes added by wrappers, removed when every key of the checkpoint carries one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Initialisation strategies of the fine-tuning stage (:func:`initialise_segmenter`).
INIT_STRATEGIES = ("random", "doll", "classifier", "external")
#: Encoder module prefixes of the ``segresnet_encoder`` classifier (identical to SegResNet's).
CLASSIFIER_ENCODER_PREFIXES = ("convInit", "down_layers")

Shape = tuple[int, ...]
Source = str | os.PathLike | Mapping[str, Any] | nn.Module


def _list(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class TransferReport:
    """What :func:`load_pretrained` did, tensor by tensor (names are the destination's ``state_dict`` keys).

    Attributes:
        source: the checkpoint path (or ``<state_dict>`` / ``<module ClassName>`` for in-memory sources).
        network: class name of the destination network.
        loaded: tensors copied from the source.
        skipped_shape: ``(name, source shape, network shape)`` of tensors present in both with different shapes;
            they keep their initialisation (for the head this is the expected "new classes" case).
        skipped_head: head tensors whose shape matched but were not copied because the head as a whole is new (some
            head tensor changed shape), e.g. the PReLU slope of UNet's last up layer.
        missing_in_source: network tensors the source does not have; they keep their (random) initialisation.
        unused_in_source: source tensors the network does not have.
        excluded: network tensors excluded by the caller's ``exclude`` patterns (left at their initialisation).
        head: the network's head tensors (empty for networks without a part map).
        num_network_tensors / num_network_values: size of the destination ``state_dict``.
        loaded_values: number of values (elements) copied.
    """

    source: str
    network: str
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    missing_in_source: list[str] = field(default_factory=list)
    unused_in_source: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    num_network_tensors: int = 0
    num_network_values: int = 0
    loaded_values: int = 0

    @property
    def reinitialised(self) -> list[str]:
        """Network tensors that were not loaded (they keep the initialisation they had before the transfer)."""
        return ([n for n, _, _ in self.skipped_shape] + self.skipped_head + self.missing_in_source + self.excluded)

    @property
    def num_non_head(self) -> int:
        """Network tensors outside the head and not excluded: the denominator of :attr:`non_head_fraction`."""
        head, excluded = set(self.head), set(self.excluded)
        return self.num_network_tensors - len(head | excluded)

    @property
    def non_head_fraction(self) -> float:
        """Fraction of the non-head (non-excluded) network tensors that were loaded (1.0 when there are none)."""
        head = set(self.head)
        n = self.num_non_head
        return 1.0 if n == 0 else sum(1 for k in self.loaded if k not in head) / n

    @property
    def values_fraction(self) -> float:
        """Fraction of the network's values (elements) that were loaded."""
        return self.loaded_values / self.num_network_values if self.num_network_values else 0.0

    def scalars(self) -> dict[str, float]:
        """Counts and fractions only (for ``mlflow.log_metrics`` / ``log_params``)."""
        return {
            "transfer_loaded": float(len(self.loaded)),
            "transfer_skipped_shape": float(len(self.skipped_shape)),
            "transfer_skipped_head": float(len(self.skipped_head)),
            "transfer_missing_in_source": float(len(self.missing_in_source)),
            "transfer_unused_in_source": float(len(self.unused_in_source)),
            "transfer_excluded": float(len(self.excluded)),
            "transfer_non_head_fraction": float(self.non_head_fraction),
            "transfer_values_fraction": float(self.values_fraction),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary with the full name lists (for ``mlflow.log_dict(report.as_dict(), ...)``)."""
        return {
            "source": self.source,
            "network": self.network,
            "num_network_tensors": self.num_network_tensors,
            **self.scalars(),
            "loaded": list(self.loaded),
            "skipped_shape": [{"name": n, "source_shape": list(s), "network_shape": list(d),
                               "head": n in set(self.head)} for n, s, d in self.skipped_shape],
            "skipped_head": list(self.skipped_head),
            "missing_in_source": list(self.missing_in_source),
            "unused_in_source": list(self.unused_in_source),
            "excluded": list(self.excluded),
            "head": list(self.head),
        }

    def __str__(self) -> str:
        head = set(self.head)
        new_head = [f"{n} {tuple(s)}->{tuple(d)}" for n, s, d in self.skipped_shape if n in head]
        other = [f"{n} {tuple(s)}->{tuple(d)}" for n, s, d in self.skipped_shape if n not in head]
        lines = [
            f"Weight transfer {self.source} -> {self.network} ({self.num_network_tensors} tensors)",
            f"  loaded:             {len(self.loaded)} tensors ({100 * self.non_head_fraction:.1f}% of the "
            f"{self.num_non_head} non-head tensors; {100 * self.values_fraction:.1f}% of all values)",
            f"  new head (shape):   {len(new_head)}: {_list(new_head)}",
        ]
        if self.skipped_head:
            lines.append(f"  head, not loaded:   {len(self.skipped_head)}: {_list(self.skipped_head)}")
        lines += [
            f"  skipped (shape):    {len(other)}: {_list(other)}",
            f"  not in source:      {len(self.missing_in_source)} (left at init): {_list(self.missing_in_source)}",
            f"  unused in source:   {len(self.unused_in_source)}: {_list(self.unused_in_source)}",
        ]
        if self.excluded:
            lines.append(f"  excluded:           {len(self.excluded)}: {_list(self.excluded)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _extract_state_dict(obj: Any, label: str | None, checkpoint_key: str | None) -> dict[str, torch.Tensor]:
    """The network's state dict inside a loaded checkpoint object (see the module docstring)."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise BundleInputError(label, f"not a checkpoint: expected a state dict or a dict of them, got "
                                      f"{type(obj).__name__}")
    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            raise BundleInputError(label, f"checkpoint has no key {checkpoint_key!r} (keys: "
                                          f"{_list([str(k) for k in obj])})")
        return _extract_state_dict(obj[checkpoint_key], label, None)
    if _is_state_dict(obj):
        return dict(obj)
    # a dict of objects: state dicts (network, optimizer...) and scalars
    for key in NETWORK_KEYS:
        if key in obj and _is_state_dict(obj[key]):
            return dict(obj[key])
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    nested = [k for k, v in obj.items() if _is_state_dict(v)]
    if len(nested) == 1 and not tensors:
        return dict(obj[nested[0]])
    if tensors and not nested:  # a state dict with a few non-tensor extras
        return {str(k): v for k, v in tensors.items()}
    raise BundleInputError(label, "cannot tell which entry of the checkpoint holds the network's weights (keys: "
                                  f"{_list([str(k) for k in obj])}); pass checkpoint_key=...")


def _normalise_keys(sd: dict[str, torch.Tensor], key_prefix_map: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    if key_prefix_map:
        mapped = {}
        prefixes = sorted(key_prefix_map, key=len, reverse=True)  # longest prefix first
        for k, v in sd.items():
            for p in prefixes:
                if k.startswith(p):
                    k = key_prefix_map[p] + k[len(p):]
                    break
            mapped[k] = v
        sd = mapped
    for p in WRAPPER_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def read_state_dict(source: Source, *, map_location: str | torch.device = "cpu", checkpoint_key: str | None = None,
                    key_prefix_map: Mapping[str, str] | None = None,
                    weights_only: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Read a network state dict from a file, a checkpoint dict, a state dict or a module.

    Args:
        source: path to a ``.pt``/``.pth`` file, a (checkpoint) mapping, or an ``nn.Module``.
        map_location: passed to ``torch.load``.
        checkpoint_key: the entry of a checkpoint dict holding the network (default: found automatically).
        key_prefix_map: rename source key prefixes, e.g. ``{"backbone.": "convInit."}`` (longest prefix first).
        weights_only: must stay ``True`` (kept for compatibility): files load through
            :func:`bundle.utils.load_checkpoint`, tensors and plain values only.

    Returns:
        ``(state_dict, label)``: the tensors by key and a label for messages (the path, or ``<state_dict>``).

    Raises:
        BundleInputError: missing or unreadable file, or no identifiable state dict (the message names the file).
    """
    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        if not weights_only:
            raise ValueError("loading pickled Python objects from a checkpoint is not supported (it can run code); "
                             "re-save the trusted file's state_dict with torch.save and load that")
        obj = load_checkpoint(label, map_location=map_location)
        sd = _extract_state_dict(obj, label, checkpoint_key)
    else:
        label = f"<module {type(source).__name__}>" if isinstance(source, nn.Module) else "<state_dict>"
        sd = _extract_state_dict(source, None, checkpoint_key)
    sd = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise BundleInputError(label if isinstance(source, (str, os.PathLike)) else None,
                               "checkpoint holds no tensors")
    return _normalise_keys(sd, key_prefix_map), label


# --------------------------------------------------------------------------------------------------------------------
# transfer
# --------------------------------------------------------------------------------------------------------------------
def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Module prefix (``"conv_final"``) or glob (``"*.adn.*"``) match."""
    for p in patterns:
        if any(c in p for c in "*?[") and fnmatch.fnmatchcase(name, p):
            return True
        if matches_prefix(name, (p,)):
            return True
    return False


def _transfer(net: nn.Module, src: Mapping[str, torch.Tensor], label: str, path: str | None, *,
              exclude: Sequence[str], strict_shapes: bool, min_fraction: float,
              ignored_in_source: Sequence[str] = ()) -> TransferReport:
    """Match, check and load ``src`` into ``net``; ``ignored_in_source`` are source keys the caller filtered out
    (reported as unused)."""
    root = unwrap(net)
    dst = root.state_dict()
    try:
        parts = network_parts(root)
        head_prefixes: tuple[str, ...] = parts.head
    except ValueError:
        parts, head_prefixes = None, ()
    report = TransferReport(source=label, network=type(root).__name__, num_network_tensors=len(dst),
                            num_network_values=sum(int(t.numel()) for t in dst.values()))
    report.head = [k for k in dst if matches_prefix(k, head_prefixes)]
    head = set(report.head)
    candidates: list[str] = []
    for k, t in dst.items():
        if _matches_any(k, exclude):
            report.excluded.append(k)
        elif k not in src:
            report.missing_in_source.append(k)
        elif tuple(src[k].shape) != tuple(t.shape):
            report.skipped_shape.append((k, tuple(src[k].shape), tuple(t.shape)))
        else:
            candidates.append(k)
    if any(n in head for n, _, _ in report.skipped_shape):  # the head is new: none of it comes from the source
        report.skipped_head = [k for k in candidates if k in head]
        candidates = [k for k in candidates if k not in head]
    report.loaded = candidates
    report.unused_in_source = [k for k in src if k not in dst] + [k for k in ignored_in_source if k not in src]
    report.loaded_values = sum(int(dst[k].numel()) for k in candidates)

    by_name = len(candidates) + len(report.skipped_shape) + len(report.skipped_head)
    if not candidates:
        raise BundleInputError(path, (
            f"no tensor of the checkpoint matches the network {report.network} ({len(dst)} tensors): 0 keys match by "
            f"name and shape ({by_name} by name only; the checkpoint has {len(src)} keys, e.g. "
            f"{_list(list(src), 3)}; the network's are e.g. {_list(list(dst), 3)}). The checkpoint is for another "
            "architecture or configuration."))
    body_mismatch = [(n, s, d) for n, s, d in report.skipped_shape if n not in head]
    if strict_shapes and body_mismatch:
        n, s, d = body_mismatch[0]
        where = part_of(n, parts) if parts is not None else "network"
        raise BundleInputError(path, (
            f"{len(body_mismatch)} non-head tensors of {report.network} have a different shape in the checkpoint "
            f"(first: {n} [{where}] checkpoint {tuple(s)} vs network {tuple(d)}); {len(candidates)} of {len(dst)} "
            "keys match by name and shape. The checkpoint was trained with another configuration (e.g. "
            "init_filters, channels, in_channels); pass strict_shapes=False to skip such tensors."))
    if report.non_head_fraction < min_fraction:
        raise BundleInputError(path, (
            f"only {len(candidates)} of the {report.num_non_head} non-head tensors of {report.network} match the "
            f"checkpoint by name and shape ({100 * report.non_head_fraction:.1f}% < min_fraction "
            f"{100 * min_fraction:.1f}%; {len(report.missing_in_source)} missing in the checkpoint, "
            f"{len(report.skipped_shape)} with another shape, {len(report.unused_in_source)} checkpoint keys "
            "unused). The checkpoint is probably for another architecture."))

    result = root.load_state_dict({k: src[k] for k in candidates}, strict=False)
    if result.unexpected_keys:  # cannot happen: candidates are destination keys
        raise RuntimeError(f"unexpected keys while loading: {result.unexpected_keys}")
    logger.info("%s", report)
    if body_mismatch:
        logger.warning("%d non-head tensors skipped for a shape mismatch (left at their initialisation): %s",
                       len(body_mismatch), _list([n for n, _, _ in body_mismatch]))
    return report


def load_pretrained(net: nn.Module, source: Source, *, exclude: Sequence[str] = (), strict_shapes: bool = True,
                    map_location: str | torch.device = "cpu", key_prefix_map: Mapping[str, str] | None = None,
                    min_fraction: float = 0.5, checkpoint_key: str | None = None,
                    weights_only: bool = True) -> TransferReport:
    """Copy every tensor of ``source`` whose name and shape match into ``net`` (in place) and report.

    The head (:func:`bundle.networks.segmentation.head_module_names`) is special: when any of its tensors differs in
    shape (the downstream task has other classes), none of the head is copied, so the whole head keeps its fresh
    initialisation. All other tensors that are not loaded also keep the values they had (their initialisation).

    Args:
        net: destination network (``DistributedDataParallel`` wrappers are unwrapped).
        source: checkpoint path, (checkpoint) mapping or module; see :func:`read_state_dict`.
        exclude: network tensors not to load: module prefixes (``"conv_final"``) or globs (``"*.adn.*"``).
        strict_shapes: if True, a shape mismatch outside the head is an error (another configuration); if False,
            such tensors are skipped and reported.
        map_location: passed to ``torch.load``.
        key_prefix_map: rename source key prefixes before matching, e.g. ``{"encoder.": "convInit."}``.
        min_fraction: fail when fewer than this fraction of the network's non-head (non-excluded) tensors load.
        checkpoint_key: the entry of a checkpoint dict holding the network (default: found automatically).
        weights_only: passed to ``torch.load``.

    Returns:
        the :class:`TransferReport` (also logged at INFO level).

    Raises:
        BundleInputError: (a ``ValueError``) the file is missing/unreadable, nothing matched, a non-head shape
            mismatch with ``strict_shapes``, or fewer than ``min_fraction`` loaded. The message starts with the
            file's path and gives the number of matching keys.
    """
    src, label = read_state_dict(source, map_location=map_location, checkpoint_key=checkpoint_key,
                                 key_prefix_map=key_prefix_map, weights_only=weights_only)
    path = label if isinstance(source, (str, os.PathLike)) else None
    return _transfer(net, src, label, path, exclude=exclude, strict_shapes=strict_shapes, min_fraction=min_fraction)


def load_external(net: nn.Module, path: str | os.PathLike, *, exclude: Sequence[str] = (),
                  strict_shapes: bool = False, min_fraction: float = 0.5,
                  map_location: str | torch.device = "cpu", key_prefix_map: Mapping[str, str] | None = None,
                  checkpoint_key: str | None = None, weights_only: bool = True) -> TransferReport:
    """The ``external`` initialisation (ImageNet-transfer analogue): any local state-dict file, loaded like
    :func:`load_pretrained` but tolerant of shape mismatches by default (skipped and reported). No download."""
    return load_pretrained(net, path, exclude=exclude, strict_shapes=strict_shapes, map_location=map_location,
                           key_prefix_map=key_prefix_map, min_fraction=min_fraction, checkpoint_key=checkpoint_key,
                           weights_only=weights_only)


def load_encoder_from_classifier(net: nn.Module, classifier_ckpt: Source, *,
                                 map_location: str | torch.device = "cpu", checkpoint_key: str | None = None,
                                 weights_only: bool = True) -> TransferReport:
    """The ``classifier`` initialisation: copy a ``segresnet_encoder`` classifier's encoder into a SegResNet.

    The classifier (:class:`bundle.networks.classifiers.SegResNetEncoderClassifier`) keeps SegResNet's parameter
    names ``convInit.*`` and ``down_layers.*``; they map one to one. Every encoder tensor of ``net`` must be loaded
    (same ``init_filters``, ``blocks_down``, ``in_channels``, norm); decoder and head keep their initialisation and
    appear under ``missing_in_source``; the classifier's pooling head appears under ``unused_in_source``.

    Raises:
        ValueError: ``net`` is not a SegResNet.
        BundleInputError: the checkpoint is not a ``segresnet_encoder`` classifier or its encoder does not match
            (the message names the file and the mismatching keys).
    """
    root = unwrap(net)
    parts = network_parts(root)
    if parts.arch != "segresnet":
        raise ValueError(f"classifier-encoder initialisation needs a SegResNet segmenter (got {type(root).__name__}); "
                         "the segresnet_encoder classifier has SegResNet's encoder")
    src, label = read_state_dict(classifier_ckpt, map_location=map_location, checkpoint_key=checkpoint_key,
                                 weights_only=weights_only)
    path = label if isinstance(classifier_ckpt, (str, os.PathLike)) else None
    enc_src = {k: v for k, v in src.items() if matches_prefix(k, CLASSIFIER_ENCODER_PREFIXES)}
    if not enc_src:
        raise BundleInputError(path, (
            f"not a segresnet_encoder classifier checkpoint: none of its {len(src)} keys is under convInit.* or "
            f"down_layers.* (e.g. {_list(list(src), 3)}); build the classifier with "
            "bundle.networks.classifiers.build_classifier('segresnet_encoder')"))
    dst_sd = root.state_dict()
    dst_enc = [k for k in dst_sd if matches_prefix(k, parts.encoder)]
    missing = [k for k in dst_enc if k not in enc_src]
    extra = sorted(set(enc_src) - set(dst_enc))
    shapes = [f"{k} {tuple(enc_src[k].shape)}->{tuple(dst_sd[k].shape)}" for k in dst_enc
              if k in enc_src and tuple(enc_src[k].shape) != tuple(dst_sd[k].shape)]
    if missing or extra or shapes:  # checked before anything is loaded: a failure leaves ``net`` untouched
        raise BundleInputError(path, (
            f"the classifier's encoder does not match the segmenter's (different init_filters, blocks_down, "
            f"in_channels or norm?): {len(dst_enc) - len(missing) - len(shapes)} of {len(dst_enc)} encoder keys match "
            f"by name and shape; missing in the classifier: {_list(missing)}; other shape: {_list(shapes)}; "
            f"classifier encoder keys the segmenter lacks: {_list(extra)}"))
    report = _transfer(root, enc_src, label, path, exclude=(), strict_shapes=True, min_fraction=0.0,
                       ignored_in_source=[k for k in src if k not in enc_src])
    return report


def initialise_segmenter(net: nn.Module, init: str = "random", path: str | os.PathLike | None = None,
                         **kwargs: Any) -> TransferReport | None:
    """Apply one initialisation strategy of the fine-tuning stage (one config id): ``random`` (keep the
    constructor's initialisation; returns None), ``doll`` (:func:`load_pretrained`), ``classifier``
    (:func:`load_encoder_from_classifier`) or ``external`` (:func:`load_external`). ``kwargs`` go to the loader."""
    name = str(init).lower()
    if name not in INIT_STRATEGIES:
        raise ValueError(f"unknown initialisation {init!r}; choose one of {', '.join(INIT_STRATEGIES)}")
    if name == "random":
        logger.info("random initialisation: no weights loaded into %s", type(unwrap(net)).__name__)
        return None
    if path is None or str(path) == "":
        raise ValueError(f"initialisation {name!r} needs a checkpoint path")
    if name == "doll":
        return load_pretrained(net, path, **kwargs)
    if name == "classifier":
        return load_encoder_from_classifier(net, path, **kwargs)
    return load_external(net, path, **kwargs)
