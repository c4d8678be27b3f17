"""Quantization schemes as data: ``QuantSpec`` → ``LayerScheme`` → ``Scheme``.

- ``QuantSpec``: how one tensor is quantized (dtype, granularity, dynamic or static, observer).
- ``LayerScheme``: what happens to one linear layer (weight spec, activation spec, or keep it
  in bf16/fp16/fp32).
- ``Scheme``: a default ``LayerScheme``, per-layer overrides by glob, and an ignore list
  (``lm_head`` by default; embeddings are never ``nn.Linear`` and are never touched).

Every object round-trips through ``to_dict``/``from_dict`` (JSON/YAML-able), so schemes
and recipes are files, not code paths.

Override precedence: the *last* matching glob in ``overrides`` wins (write general globs first,
specific ones after). Globs match full module names with ``fnmatch`` (``*`` crosses dots).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from qdoctor.errors import QDoctorError
from qdoctor.quant.granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    granularity_from_str,
    granularity_to_str,
)

DTYPES = ("int8", "fp8")
WEIGHT_OBSERVERS = ("absmax", "mse")  # observers of one tensor (``quant.fake.SCALE_OBSERVERS``)
KEEP_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    dtype: ``int8`` (symmetric, ±127) or ``fp8`` (E4M3, ±448).
    granularity: which elements share a scale (see ``quant.granularity``).
    dynamic: activations only — scale computed from the live tensor (True) or from
        calibration statistics (False, "static"). Weights are always quantized once.
    observer: how the absmax a behind the scale s = a / qmax is chosen.
        Weights: ``absmax`` (a = max |w| per group) or ``mse`` (clip search: a = c*·absmax with
        c* minimising Σ (w − D(Q(w)))² per group over a grid of clip ratios).
        Static activations: ``absmax`` (max over calibration tokens), ``percentile:<p>`` (p-th
        percentile of the per-token absmax, clipping rare spikes) or ``mse`` (the clip ratio
        minimising the quantization error estimated on the sampled calibration rows).
        Dynamic activations: ``absmax`` only (the scale comes from the live tensor).
    """

    dtype: str = "int8"
    granularity: Granularity = PerChannel()
    dynamic: bool = False
    observer: str = "absmax"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise QDoctorError(f"unknown quantized dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.observer not in WEIGHT_OBSERVERS:
            percentile_of(self.observer)  # validates

    @property
    def qmax(self) -> float:
        return 127.0 if self.dtype == "int8" else 448.0

    def to_dict(self) -> dict[str, Any]:
        d = {"dtype": self.dtype, "granularity": granularity_to_str(self.granularity), "dynamic": self.dynamic}
        if self.observer != "absmax":
            d["observer"] = self.observer
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        _check_keys(d, {"dtype", "granularity", "dynamic", "observer"}, "quantization spec")
        dynamic = d.get("dynamic", False)
        if not isinstance(dynamic, bool):  # bool("false") is True: never guess
            raise QDoctorError(f"'dynamic' must be true or false, got {dynamic!r}")
        return cls(
            dtype=_text(d.get("dtype", "int8"), "dtype"),
            granularity=granularity_from_str(_text(d.get("granularity", "channel"), "granularity")),
            dynamic=dynamic,
            observer=_text(d.get("observer", "absmax"), "observer"),
        )


def percentile_of(observer: str) -> float:
    """Parse ``percentile:<p>`` → p in (0, 100]."""
    if not observer.startswith("percentile:"):
        raise QDoctorError(f"unknown observer {observer!r}: use absmax, mse or percentile:<p> (e.g. percentile:99.9)")
    try:
        p = float(observer.split(":", 1)[1])
    except ValueError:
        raise QDoctorError(f"bad percentile in observer {observer!r}") from None
    if not 0.0 < p <= 100.0:
        raise QDoctorError(f"percentile must be in (0, 100], got {p}")
    return p


@dataclass(frozen=True)
class LayerScheme:
    """What happens to one linear layer.

    ``keep`` set (bf16/fp16/fp32): the layer stays in that precision and ``weights`` /
    ``activations`` must be None. Otherwise ``weights`` is required and ``activations``
    is optional (None = weight-only quantization).
    """

    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    keep: str | None = None

    def __post_init__(self):
        if self.keep is not None:
            if self.keep not in KEEP_DTYPES:
                raise QDoctorError(f"unknown keep dtype {self.keep!r}: use one of {', '.join(KEEP_DTYPES)}")
            if self.weights is not None or self.activations is not None:
                raise QDoctorError("a kept layer has no weight/activation quantization")
            return
        if self.weights is None:
            raise QDoctorError("a quantized layer needs a weight spec (or keep: bf16/fp16/fp32)")
        if isinstance(self.weights.granularity, PerToken):
            raise QDoctorError("weights cannot be quantized per token: use tensor, channel or group:<g>")
        if self.weights.dynamic:
            raise QDoctorError("weights are quantized once; 'dynamic' applies to activations only")
        if self.weights.observer not in WEIGHT_OBSERVERS:
            raise QDoctorError(f"weights take observer {' or '.join(WEIGHT_OBSERVERS)}, not {self.weights.observer!r} "
                               "(percentile applies to static activations)")
        a = self.activations
        if a is not None:
            if a.dynamic and a.observer != "absmax":
                raise QDoctorError(f"dynamic activations are scaled by the live tensor's absmax; observer "
                                   f"{a.observer!r} applies to static activations only")
            if isinstance(a.granularity, PerChannel):
                raise QDoctorError("activations cannot be quantized per channel: use tensor, token or group:<g>")
            if not a.dynamic and not isinstance(a.granularity, PerTensor):
                raise QDoctorError("static activation scales are per-tensor only; per-token/per-group must be dynamic")
            if a.dtype != self.weights.dtype:
                raise QDoctorError(
                    f"weights ({self.weights.dtype}) and activations ({a.dtype}) must share a dtype: "
                    "real W8A8 kernels multiply like with like"
                )

    @property
    def is_quantized(self) -> bool:
        return self.keep is None

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None and not self.activations.dynamic

    def describe(self) -> str:
        """Short label, e.g. ``int8 W:channel A:tensor-static`` or ``keep bf16``."""
        if self.keep:
            return f"keep {self.keep}"
        w = self.weights
        text = f"{w.dtype} W:{granularity_to_str(w.granularity)}"
        a = self.activations
        if a is None:
            return text + " A:none"
        kind = "dynamic" if a.dynamic else "static"
        return text + f" A:{granularity_to_str(a.granularity)}-{kind}"

    def to_dict(self) -> dict[str, Any]:
        if self.keep:
            return {"keep": self.keep}
        d: dict[str, Any] = {"weights": self.weights.to_dict()}
        d["activations"] = self.activations.to_dict() if self.activations else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerScheme":
        if not isinstance(d, dict):
            raise QDoctorError(f"a layer scheme must be a mapping, got {type(d).__name__}")
        _check_keys(d, {"weights", "activations", "keep"}, "layer scheme")
        if d.get("keep"):
            return cls(keep=_text(d["keep"], "keep"))
        w = d.get("weights")
        a = d.get("activations")
        return cls(
            weights=QuantSpec.from_dict(w) if w is not None else None,
            activations=QuantSpec.from_dict(a) if a is not None else None,
        )


@dataclass
class Scheme:
    """A default ``LayerScheme`` for every linear layer, overrides by glob, and an ignore list."""

    name: str
    default: LayerScheme
    overrides: dict[str, LayerScheme] = field(default_factory=dict)
    ignore: tuple[str, ...] = ("lm_head",)
    description: str = ""

    def resolve(self, layer_name: str) -> LayerScheme | None:
        """The scheme for ``layer_name``; None when it is ignored (left untouched)."""
        if any(fnmatch.fnmatchcase(layer_name, pat) for pat in self.ignore):
            return None
        chosen = self.default
        for pattern, ls in self.overrides.items():
            if fnmatch.fnmatchcase(layer_name, pattern):
                chosen = ls
        return chosen

    def with_ignore(self, patterns: tuple[str, ...]) -> "Scheme":
        """The scheme with ``patterns`` added to its ignore list."""
        return Scheme(self.name, self.default, dict(self.overrides), tuple(self.ignore) + tuple(patterns),
                      self.description)

    def with_overrides(self, overrides: dict[str, LayerScheme], name: str | None = None) -> "Scheme":
        merged = dict(self.overrides)
        merged.update(overrides)
        return Scheme(name or self.name, self.default, merged, self.ignore, self.description)

    @property
    def needs_calibration(self) -> bool:
        return self.default.needs_calibration or any(o.needs_calibration for o in self.overrides.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "default": self.default.to_dict(),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
            "ignore": list(self.ignore),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scheme":
        if not isinstance(d, dict):
            raise QDoctorError(f"a scheme must be a mapping, got {type(d).__name__}")
        _check_keys(d, {"name", "description", "default", "overrides", "ignore"}, "scheme")
        if "default" not in d:
            raise QDoctorError("a scheme needs a 'default' layer scheme")
        overrides = d.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise QDoctorError("'overrides' must map layer-name globs to layer schemes")
        ignore = d.get("ignore", ("lm_head",))
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(g, str) for g in ignore):
            raise QDoctorError("'ignore' must be a list of layer-name globs")
        return cls(
            name=str(d.get("name", "custom")),
            default=LayerScheme.from_dict(d["default"]),
            overrides={str(k): LayerScheme.from_dict(v) for k, v in overrides.items()},
            ignore=tuple(ignore),
            description=str(d.get("description", "")),
        )


def _check_keys(d: dict, allowed: set[str], what: str) -> None:
    if not isinstance(d, dict):
        raise QDoctorError(f"a {what} must be a mapping, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        names = ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in unknown))
        raise QDoctorError(f"unknown key(s) in {what}: {names} (allowed: {', '.join(sorted(allowed))})")


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise QDoctorError(f"{what!r} must be a string, got {value!r}")
    return value


def _w(dtype: str, g: Granularity) -> QuantSpec:
    return QuantSpec(dtype=dtype, granularity=g)


def _a(dtype: str, g: Granularity, dynamic: bool) -> QuantSpec:
    return QuantSpec(dtype=dtype, granularity=g, dynamic=dynamic)


def _named(name: str, description: str, weights: QuantSpec, activations: QuantSpec | None) -> Scheme:
    return Scheme(name=name, default=LayerScheme(weights, activations), description=description)


NAMED_SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        _named("w8a8-channel-token", "INT8 per-channel weights, INT8 per-token dynamic activations",
               _w("int8", PerChannel()), _a("int8", PerToken(), True)),
        _named("w8a8-channel-tensor-static", "INT8 per-channel weights, INT8 per-tensor static activations",
               _w("int8", PerChannel()), _a("int8", PerTensor(), False)),
        _named("w8a8-channel-tensor-dynamic", "INT8 per-channel weights, INT8 per-tensor dynamic activations",
               _w("int8", PerChannel()), _a("int8", PerTensor(), True)),
        _named("w8a8-tensor-tensor-static", "INT8 per-tensor weights, INT8 per-tensor static activations",
               _w("int8", PerTensor()), _a("int8", PerTensor(), False)),
        _named("w8a8-group128-token", "INT8 per-group(128) weights, INT8 per-token dynamic activations",
               _w("int8", PerGroup(128)), _a("int8", PerToken(), True)),
        _named("fp8-channel-token", "FP8 E4M3 per-channel weights, FP8 per-token dynamic activations",
               _w("fp8", PerChannel()), _a("fp8", PerToken(), True)),
        _named("fp8-tensor-tensor-static", "FP8 E4M3 per-tensor weights, FP8 per-tensor static activations",
               _w("fp8", PerTensor()), _a("fp8", PerTensor(), False)),
        _named("w8-channel", "INT8 per-channel weights only (activations in full precision)",
               _w("int8", PerChannel()), None),
    ]
}

# The five schemes the spine's table reports (issue 3).
TABLE_SCHEMES = (
    "w8a8-channel-token",
    "w8a8-channel-tensor-static",
    "w8a8-tensor-tensor-static",
    "fp8-channel-token",
    "fp8-tensor-tensor-static",
)


def get_scheme(name_or_scheme: "str | Scheme") -> Scheme:
    """A named scheme, or the scheme itself."""
    if isinstance(name_or_scheme, Scheme):
        return name_or_scheme
    try:
        return NAMED_SCHEMES[name_or_scheme]
    except KeyError:
        raise QDoctorError(
            f"unknown scheme {name_or_scheme!r}; named schemes: {', '.join(NAMED_SCHEMES)}"
        ) from None
