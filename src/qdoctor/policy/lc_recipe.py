"""llm-compressor recipes in: an llm-compressor recipe (YAML/JSON) → a qdoctor recipe dict.

llm-compressor's recipe format (``llmcompressor/recipe/recipe.py: Recipe.from_dict``) nests
modifiers as ``<name>_stage: {<group>_modifiers: {ModifierName: {field: value}}}``; older files
put ``<group>_modifiers`` or the modifiers themselves at the top. This module reads every
modifier in order and maps the ones qdoctor can express onto the fields of
``policy.recipe.Recipe.to_dict`` (``smoothing``, ``scheme``, ``gptq``, ``rotation``):

- ``SmoothQuantModifier`` → one ``smoothquant`` step, α = ``smoothing_strength`` (default 0.5);
  each of its ``mappings`` (default: llm-compressor's LLaMA mappings, input_layernorm → q/k/v and
  post_attention_layernorm → gate/up) must be one of qdoctor's producer → consumer pairs with all
  of its consumers, and becomes the consumer globs of the step;
- ``QuantizationModifier`` / ``GPTQModifier`` → the scheme: a preset (``scheme: W8A8``, read from
  compressed-tensors' ``PRESET_SCHEMES``), ``{PRESET: targets}`` or ``config_groups``; ``targets``
  and ``ignore`` become globs with compressed-tensors' precedence (exact names, then regexes in
  sorted order, then the class ``Linear``) turned into qdoctor's (the last matching override wins);
  GPTQ's ``dampening_frac``, ``actorder`` and ``block_size`` → ``gptq: {dampening, act_order,
  block_size, propagate: true}`` (llm-compressor's sequential pipeline calibrates each layer on
  the outputs of the quantized ones before it);
- ``SpinQuantModifier`` → ``rotation: {r1, r2, r4}``.

Every field is either mapped, reported in a note (one line: what qdoctor does instead and why it
does not change the plan's meaning, e.g. the calibration data, which the recipe does not carry),
or refused with a ``QDoctorError`` naming it — never dropped silently. Regular expressions
(``re:.*q_proj``, matched with ``re.match`` as compressed-tensors does) become ``fnmatch`` globs
(``*q_proj*``); a translation is checked against the layer names of every LLaMA-like family of
the registry and refused where the two would select different layers.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import re
from dataclasses import dataclass, field

from qdoctor.errors import QDoctorError
from qdoctor.models.registry import ARCHITECTURES
from qdoctor.quant.spec import LayerScheme

QUANT_MODIFIERS = ("QuantizationModifier", "GPTQModifier")
# llmcompressor/modifiers/transform/smoothquant/utils.py: DEFAULT_SMOOTHQUANT_MAPPINGS
DEFAULT_SMOOTHQUANT_MAPPINGS = [
    [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
    [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"],
]
# Block indices the glob translations are checked on: 1-, 2- and 3-digit ones (Llama-3-70B has 80 blocks).
SAMPLE_BLOCKS = (*range(12), 19, 20, 31, 79, 99, 100, 127)
# Modifier fields that only schedule a training run; a one-shot recipe leaves them unset.
SCHEDULE_FIELDS = ("index", "group", "start", "end", "update")


@dataclass
class Imported:
    """What an llm-compressor recipe became: the qdoctor recipe dict and the notes for the user."""

    recipe: dict
    notes: list[str] = field(default_factory=list)


def is_lc_recipe(data) -> bool:
    """An llm-compressor recipe: ``*_stage`` / ``*_modifiers`` / ``…Modifier`` keys at the top and
    none of a qdoctor recipe's (``qdoctor_recipe``, ``scheme``)."""
    if not isinstance(data, dict) or "qdoctor_recipe" in data or "scheme" in data:
        return False
    return any(isinstance(k, str) and (k.endswith("_stage") or k.endswith("_modifiers") or k.endswith("Modifier"))
               for k in data)


def modifiers_of(data: dict) -> list[tuple[str, dict]]:
    """(modifier name, its fields) in recipe order, from any of the three nestings."""
    out: list[tuple[str, dict]] = []

    def take(group: dict, where: str) -> None:
        for name, fields in group.items():
            if fields is None:
                fields = {}
            if not isinstance(fields, dict):
                raise QDoctorError(f"{where}.{name}: a modifier's fields must be a mapping, got {fields!r}")
            out.append((str(name), fields))

    for key, value in data.items():
        if key == "args":
            if value:
                raise QDoctorError("recipe 'args' (variables substituted into the modifiers) are not supported: "
                                   "write the values into the modifiers")
            continue
        if not isinstance(value, dict) and not str(key).endswith("Modifier"):
            raise QDoctorError(f"{key}: expected a mapping of modifiers")
        if str(key).endswith("_stage"):
            for group_key, group in value.items():
                if not (str(group_key).endswith("_modifiers") and isinstance(group, dict)):
                    raise QDoctorError(f"{key}.{group_key}: a stage holds '<name>_modifiers' mappings")
                take(group, f"{key}.{group_key}")
        elif str(key).endswith("_modifiers"):
            take(value, str(key))
        elif str(key).endswith("Modifier"):
            take({key: value}, "recipe")
        else:
            raise QDoctorError(f"unknown top-level key {key!r} in an llm-compressor recipe "
                               "(expected <name>_stage, <name>_modifiers or a Modifier)")
    if not out:
        raise QDoctorError("the llm-compressor recipe has no modifiers")
    return out


# ---------------------------------------------------------------- regex → glob

_ALTERNATION = re.compile(r"\((?:\?:)?([^()]*)\)")


def regex_to_globs(pattern: str) -> list[str]:
    """The ``fnmatch`` globs selecting the names ``re.match(pattern, name)`` selects (``re.match``
    is anchored at the start only, so an unanchored end becomes a trailing ``*``). Handles ``.*``,
    ``.+``, ``.``, escaped literals, ``\\d+`` and one level of ``(a|b)`` alternation; anything
    else is refused."""
    p = pattern[1:] if pattern.startswith("^") else pattern
    anchored = p.endswith("$") and not p.endswith("\\$")
    p = p[:-1] if anchored else p
    parts, pos = [], 0
    for m in _ALTERNATION.finditer(p):
        parts.append([p[pos:m.start()]])
        parts.append(m.group(1).split("|"))
        pos = m.end()
    parts.append([p[pos:]])
    globs = []
    for combo in itertools.product(*parts):
        g = _plain_regex_to_glob("".join(combo), pattern)
        if not anchored and not g.endswith("*"):
            g += "*"
        globs.append(g)
    return list(dict.fromkeys(globs))


def _plain_regex_to_glob(text: str, pattern: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if c == "\\" and text[i:i + 3] == "\\d+":
            out.append("*")
            i += 3
        elif c == "\\" and nxt and not nxt.isalnum():
            out.append(nxt if nxt not in "*?[]" else f"[{nxt}]")
            i += 2
        elif c == "." and nxt in "*+":
            out.append("*" if nxt == "*" else "?*")
            i += 2
        elif c == ".":
            out.append("?")
            i += 1
        elif c.isalnum() or c in "_-/:":
            out.append(c)
            i += 1
        else:
            raise QDoctorError(f"target {'re:' + pattern!r}: the regex construct at {text[i:]!r} has no "
                               "glob equivalent in qdoctor; write the layer names out or use a simpler regex")
    return "".join(out)


@functools.lru_cache(maxsize=1)
def sample_names() -> tuple[str, ...]:
    """Module names of every LLaMA-like family in the registry (blocks ``SAMPLE_BLOCKS``): the names
    a translated target is checked on."""
    names = {"lm_head", "model.embed_tokens", "model.norm"}
    for arch in ARCHITECTURES:
        rels = set(arch.linears) | {p.producer for p in arch.pairs}
        names |= {f"{arch.blocks}.{i}.{rel}" for i in SAMPLE_BLOCKS for rel in rels}
    return tuple(sorted(names))


def match_name(name: str, target: str) -> bool:
    """compressed-tensors' name rule (``utils/match.py: match_name``): ``re:`` → ``re.match``, else
    the exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def target_globs(target: str, what: str) -> list[str]:
    """A name or ``re:`` target as globs, checked to select the same sample names."""
    if not target.startswith("re:"):
        return [target.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]")]
    globs = regex_to_globs(target[3:])
    for n in sample_names():
        if any(fnmatch.fnmatchcase(n, g) for g in globs) != match_name(n, target):
            raise QDoctorError(f"{what} {target!r}: its glob translation {globs} would select {n!r} differently; "
                               "write the layer names out or use a simpler regex")
    return globs


def is_class_target(target: str) -> bool:
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


# ---------------------------------------------------------------- quantization args → QuantSpec

_STRATEGIES = {"tensor": "tensor", "channel": "channel", "token": "token", "group": "group"}
_WEIGHT_OBSERVERS = {None: None, "minmax": None, "static_minmax": None, "memoryless_minmax": None,
                     "mse": "mse", "memoryless_mse": "mse"}


def quant_spec_dict(args, role: str, where: str, notes: list[str]) -> dict:
    """One compressed-tensors ``QuantizationArgs`` as a qdoctor ``QuantSpec`` dict (role: weights |
    input_activations); refuses what qdoctor cannot hold."""
    kind = getattr(args.type, "value", args.type)
    strategy = getattr(args.strategy, "value", args.strategy)
    dynamic = getattr(args.dynamic, "value", args.dynamic)
    if args.num_bits != 8 or kind not in ("int", "float"):
        raise QDoctorError(f"{where}: {args.num_bits}-bit {kind} {role}: qdoctor quantizes to 8 bits only "
                           "(INT8 or FP8 E4M3)")
    if not args.symmetric:
        raise QDoctorError(f"{where}: asymmetric {role} (zero points): qdoctor's quantization is symmetric")
    if strategy not in _STRATEGIES:
        raise QDoctorError(f"{where}: {role} strategy {strategy!r} has no qdoctor granularity "
                           "(tensor, channel, token, group)")
    if dynamic not in (True, False):
        raise QDoctorError(f"{where}: {role} dynamic={dynamic!r} is not supported (true or false)")
    if args.scale_dtype is not None:
        raise QDoctorError(f"{where}: {role} scale_dtype {args.scale_dtype} is not supported (scales are fp32)")
    spec = {"dtype": "int8" if kind == "int" else "fp8",
            "granularity": f"group:{args.group_size}" if strategy == "group" else _STRATEGIES[strategy],
            "dynamic": bool(dynamic)}
    observer = args.observer
    if args.observer_kwargs:
        notes.append(f"{where}: {role} observer_kwargs {dict(args.observer_kwargs)} are not expressible; "
                     "qdoctor's observer uses its own settings")
    if role == "weights":
        if observer not in _WEIGHT_OBSERVERS:
            raise QDoctorError(f"{where}: weight observer {observer!r} has no qdoctor equivalent (minmax, mse)")
        if _WEIGHT_OBSERVERS[observer]:
            spec["observer"] = _WEIGHT_OBSERVERS[observer]
    elif not dynamic:
        if observer in ("mse", "memoryless_mse"):
            spec["observer"] = "mse"
        elif observer in (None, "minmax"):
            notes.append(f"{where}: static input activations with observer {observer or 'unset'} — "
                         "llm-compressor's minmax is a running average of per-batch ranges; qdoctor takes the "
                         "max over all calibration tokens (llm-compressor's static_minmax)")
        elif observer not in ("static_minmax", "memoryless_minmax"):
            raise QDoctorError(f"{where}: activation observer {observer!r} has no qdoctor equivalent "
                               "(static_minmax, minmax, mse)")
    return spec


def layer_scheme_dict(scheme, where: str, notes: list[str]) -> dict:
    """A compressed-tensors ``QuantizationScheme`` as a qdoctor ``LayerScheme`` dict (validated)."""
    if scheme.output_activations is not None:
        raise QDoctorError(f"{where}: output activation quantization has no qdoctor equivalent")
    if scheme.weights is None:
        raise QDoctorError(f"{where}: activation-only quantization (no weights) has no qdoctor equivalent")
    if scheme.format is not None:
        notes.append(f"{where}: format {getattr(scheme.format, 'value', scheme.format)} is not read; qdoctor's "
                     "export infers the compressed-tensors format from the scheme")
    d = {"weights": quant_spec_dict(scheme.weights, "weights", where, notes),
         "activations": quant_spec_dict(scheme.input_activations, "input_activations", where, notes)
         if scheme.input_activations is not None else None}
    try:
        layer_scheme_shape(d)
    except QDoctorError as e:
        raise QDoctorError(f"{where}: {e}") from None
    return d


def layer_scheme_shape(d: dict) -> LayerScheme:
    """The LayerScheme of ``d`` without its observers: the combination is checked here, the observer
    names when the recipe is built (``Recipe.from_dict``: which observers exist is the quant layer's)."""
    return LayerScheme.from_dict({role: None if spec is None else {k: v for k, v in spec.items() if k != "observer"}
                                  for role, spec in d.items()})


# ---------------------------------------------------------------- modifiers

@dataclass
class _Build:
    """The qdoctor recipe being assembled, in qdoctor's order: rotation → smoothing → GPTQ → quantize."""

    notes: list[str] = field(default_factory=list)
    smoothing: list[dict] = field(default_factory=list)
    scheme: dict | None = None
    gptq: dict | None = None
    rotation: dict | None = None
    seen: list[str] = field(default_factory=list)


def _fields(name: str, fields: dict, known: set[str], notes: list[str]) -> dict:
    unknown = set(fields) - known - set(SCHEDULE_FIELDS)
    if unknown:
        raise QDoctorError(f"{name}: unknown field(s) {', '.join(sorted(map(str, unknown)))} "
                           f"(qdoctor reads {', '.join(sorted(known))})")
    for key in SCHEDULE_FIELDS:
        value = fields.get(key)
        if key in ("start", "end") and value not in (None, -1):
            raise QDoctorError(f"{name}: {key}: {value} schedules a training run; qdoctor applies recipes one-shot")
        if key in ("index", "update") and value is not None:
            notes.append(f"{name}: {key} (training schedule) is not used in a one-shot plan")
    return fields


def smoothquant(build: _Build, fields: dict) -> None:
    notes = build.notes
    f = _fields("SmoothQuantModifier", fields, {"smoothing_strength", "mappings", "ignore", "num_calibration_steps",
                                                "calibration_function", "algorithm"}, notes)
    if build.scheme is not None or build.gptq is not None:
        raise QDoctorError("SmoothQuantModifier after a quantization modifier: qdoctor smooths before it quantizes")
    if f.get("algorithm", "smoothquant") != "smoothquant":
        raise QDoctorError(f"SmoothQuantModifier algorithm {f['algorithm']!r} has no qdoctor equivalent (smoothquant)")
    if f.get("calibration_function") is not None:
        raise QDoctorError("SmoothQuantModifier calibration_function (Python code) cannot be read from a file")
    if f.get("num_calibration_steps") is not None:
        notes.append("SmoothQuantModifier num_calibration_steps: qdoctor calibrates on the recipe's calibration "
                     "samples (default 64 × 512 tokens)")
    alpha = f.get("smoothing_strength", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise QDoctorError(f"SmoothQuantModifier smoothing_strength must be in [0, 1], got {alpha!r}")
    mappings = f.get("mappings")
    if mappings is None:
        mappings = DEFAULT_SMOOTHQUANT_MAPPINGS
        notes.append("SmoothQuantModifier mappings not given: llm-compressor's LLaMA mappings (input_layernorm → "
                     "q/k/v, post_attention_layernorm → gate/up)")
    ignore = f.get("ignore") or []
    layers: list[str] = []
    for mapping in mappings:
        layers += mapping_globs(mapping, ignore, notes)
    for target in ignore:
        if not any(match_name(n, target) for n in sample_names()):
            notes.append(f"SmoothQuantModifier ignore {target!r} matches no layer of a LLaMA-like block: no effect")
    notes.append("SmoothQuantModifier: S_j = r_X^α / r_W^(1−α) as in llm-compressor, but r_X = max|X_j| and "
                 "r_W = max|W_j| in qdoctor where llm-compressor uses max−min and 2·max|W_j|: the scales agree "
                 "up to a per-channel factor of at most 2")
    if layers:
        build.smoothing.append({"method": "smoothquant", "alpha": float(alpha), "layers": list(dict.fromkeys(layers))})
    build.seen.append("SmoothQuantModifier")


def _pairs():
    """(arch, pair) for every smoothing pair of the registry (families with the same names once)."""
    seen, out = set(), []
    for arch in ARCHITECTURES:
        for pair in arch.pairs:
            key = (arch.blocks, pair.producer, pair.consumers)
            if key not in seen:
                seen.add(key)
                out.append((arch, pair))
    return out


def mapping_globs(mapping, ignore: list[str], notes: list[str]) -> list[str]:
    """The consumer globs of one llm-compressor mapping ``[[balance targets…], smooth target]``, which
    must name a qdoctor smoothing pair (producer → all of its consumers) in every block it selects."""
    if not (isinstance(mapping, (list, tuple)) and len(mapping) == 2 and isinstance(mapping[1], str)):
        raise QDoctorError(f"SmoothQuantModifier mapping {mapping!r}: expected [[balance layers…], smooth layer]")
    balance = [mapping[0]] if isinstance(mapping[0], str) else list(mapping[0])
    smooth = mapping[1]
    if not balance or not all(isinstance(b, str) for b in balance):
        raise QDoctorError(f"SmoothQuantModifier mapping {mapping!r}: the balance layers must be a list of names")
    globs = [g for b in balance for g in target_globs(b, "SmoothQuantModifier balance layer")]
    selected, wanted, skipped = set(), set(), set()  # (family, producer, block)
    for arch, pair in _pairs():
        for i in SAMPLE_BLOCKS:
            prefix = f"{arch.blocks}.{i}."
            producer, consumers = prefix + pair.producer, [prefix + c for c in pair.consumers]
            key = (arch.family, pair.producer, i)
            if any(fnmatch.fnmatchcase(c, g) for c in consumers for g in globs):
                selected.add(key)
            if not match_name(producer, smooth):
                continue
            hit = [c for c in consumers if any(match_name(c, b) for b in balance)]
            if not hit:
                continue
            if len(hit) != len(consumers):
                raise QDoctorError(f"SmoothQuantModifier mapping {mapping!r}: {pair.producer} feeds "
                                   f"{', '.join(pair.consumers)}; balancing only some of them would change the "
                                   "model's function")
            ignored = [n for n in (producer, *consumers) if any(match_name(n, t) for t in ignore)]
            (skipped if len(ignored) == len(consumers) + 1 else wanted).add(key)
    if not wanted and not skipped:
        raise QDoctorError(f"SmoothQuantModifier mapping {mapping!r} names no qdoctor smoothing pair (norm → q/k/v, "
                           "norm → gate/up, v → o, up → down of a LLaMA-like block)")
    if wanted and skipped:
        raise QDoctorError(f"SmoothQuantModifier mapping {mapping!r}: its ignore list skips it in some blocks only, "
                           "which qdoctor's consumer globs cannot say")
    if not wanted:
        notes.append(f"SmoothQuantModifier mapping {mapping!r}: every layer is in its ignore list; not smoothed")
        return []
    families = {k[0] for k in wanted}
    if {k for k in selected if k[0] in families} != wanted:
        raise QDoctorError(f"SmoothQuantModifier mapping {mapping!r}: its balance globs {globs} would select other "
                           "smoothing pairs too")
    others = sorted({k[0] for k in selected} - families)
    if others:
        notes.append(f"SmoothQuantModifier mapping {mapping!r} names the layers of {', '.join(sorted(families))} "
                     f"models; on {', '.join(others)} models, whose norm feeding the same consumers has another "
                     "name, qdoctor smooths that norm")
    return globs


def quantization(build: _Build, name: str, fields: dict) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme
    from compressed_tensors.quantization.quant_scheme import is_preset_scheme

    notes = build.notes
    known = {"config_groups", "targets", "ignore", "scheme", "kv_cache_scheme", "weight_observer", "input_observer",
             "output_observer", "observer", "bypass_divisibility_checks"}
    if name == "GPTQModifier":
        known |= {"block_size", "dampening_frac", "actorder", "offload_hessians"}
    f = _fields(name, fields, known, notes)
    if f.get("kv_cache_scheme") is not None:
        raise QDoctorError(f"{name}: kv_cache_scheme (KV-cache quantization) has no qdoctor equivalent")
    if f.get("bypass_divisibility_checks"):
        notes.append(f"{name}: bypass_divisibility_checks: qdoctor refuses a group size that does not divide a layer")
    if f.get("offload_hessians"):
        notes.append(f"{name}: offload_hessians is a memory setting; qdoctor keeps one block's Hessians at a time")
    targets = f.get("targets", ["Linear"])
    targets = [targets] if isinstance(targets, str) else list(targets)
    scheme, groups = f.get("scheme"), f.get("config_groups")
    if scheme is not None and groups is not None:
        raise QDoctorError(f"{name}: give either scheme or config_groups (as llm-compressor requires)")
    ct_groups: dict[str, object] = {}
    try:
        if scheme is not None:
            presets = {scheme: targets} if isinstance(scheme, str) else dict(scheme)
            for i, (preset, preset_targets) in enumerate(presets.items()):
                if not is_preset_scheme(str(preset)):
                    raise QDoctorError(f"{name}: unknown preset scheme {preset!r}")
                preset_targets = [preset_targets] if isinstance(preset_targets, str) else list(preset_targets)
                ct_groups[f"{preset} (group_{i})"] = preset_name_to_scheme(str(preset), preset_targets)
        elif groups:
            for gname, g in groups.items():
                ct_groups[str(gname)] = QuantizationScheme.model_validate(g)
    except ValueError as e:  # pydantic: what compressed-tensors itself would refuse
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
        raise QDoctorError(f"{name}: compressed-tensors refuses this scheme: {first}") from None
    if not ct_groups:
        if build.scheme is not None:  # e.g. a GPTQModifier that only sets block_size after a QuantizationModifier
            _gptq(build, name, f, None)
            build.seen.append(name)
            return
        raise QDoctorError(f"{name}: no scheme or config_groups: nothing to quantize")
    if build.scheme is not None:
        raise QDoctorError(f"{name}: a second quantization modifier with its own scheme; qdoctor applies one scheme "
                           "per recipe")
    observers = dict(f.get("observer") or {})
    overrides = {"weights": observers.get("weights", f.get("weight_observer")),
                 "input_activations": observers.get("input", f.get("input_observer"))}
    if observers.get("output", f.get("output_observer")) is not None:
        raise QDoctorError(f"{name}: output_observer: output activation quantization has no qdoctor equivalent")
    for g in ct_groups.values():
        for role, obs in overrides.items():
            args = getattr(g, role)
            if obs is not None and args is not None:
                setattr(g, role, QuantizationArgs.model_validate({**args.model_dump(), "observer": obs}))
    build.scheme = scheme_dict(name, ct_groups, list(f.get("ignore") or []), notes)
    _gptq(build, name, f, ct_groups)
    build.seen.append(name)


def scheme_dict(name: str, ct_groups: dict, ignore: list[str], notes: list[str]) -> dict:
    """compressed-tensors config groups + ignore → a qdoctor Scheme dict with the same layer → scheme map."""
    target_to_group: dict[str, str] = {}
    layer: dict[str, dict] = {}
    for gname, g in ct_groups.items():
        layer[gname] = layer_scheme_dict(g, f"{name} {gname}", notes)
        for t in g.targets:
            target_to_group[t] = gname  # a target listed twice: the later group, as compressed-tensors
    classes = [t for t in target_to_group if is_class_target(t)]
    for t in classes:
        if t != "Linear":
            raise QDoctorError(f"{name}: target class {t!r}: qdoctor quantizes nn.Linear layers (target Linear)")
    # compressed-tensors: exact names > regexes (sorted) > classes; qdoctor: the last matching override wins
    exact = sorted(t for t in target_to_group if not t.startswith("re:") and t not in classes)
    regexes = sorted(t for t in target_to_group if t.startswith("re:"))
    default_group = target_to_group.get("Linear")
    overrides: dict[str, dict] = {}
    for t in reversed(regexes + exact):  # lowest priority first
        for g in target_globs(t, f"{name} target"):
            overrides.pop(g, None)
            overrides[g] = layer[target_to_group[t]]
    ignore_globs = []
    for t in ignore:
        if is_class_target(t):
            notes.append(f"{name}: ignore class {t!r}: qdoctor only quantizes nn.Linear layers; no effect")
            continue
        ignore_globs += target_globs(t, f"{name} ignore")
    if default_group is None:  # layers no group targets stay untouched
        ignore_globs += untargeted_globs(name, list(target_to_group))
        default = next(iter(layer.values()))
    else:
        default = layer[default_group]
    if overrides and all(v == default for v in overrides.values()):
        overrides = {}
    desc = ", ".join(f"{g}: {layer_scheme_shape(ls).describe()}" for g, ls in layer.items())
    return {"name": "llm-compressor " + "+".join(str(g).split(" (")[0] for g in ct_groups),
            "description": f"imported from an llm-compressor {name} ({desc})",
            "default": default, "overrides": overrides, "ignore": list(dict.fromkeys(ignore_globs))}


def untargeted_globs(name: str, targets: list[str]) -> list[str]:
    """Globs of the linear layers no target selects (left in full precision, as llm-compressor does);
    refused when a layer type is targeted in some blocks only (qdoctor's ignore cannot say it)."""
    out = []
    if not any(match_name("lm_head", t) for t in targets):
        out.append("lm_head")
    for arch in ARCHITECTURES:
        for rel in arch.linears:
            hits = [any(match_name(f"{arch.blocks}.{i}.{rel}", t) for t in targets) for i in SAMPLE_BLOCKS]
            if all(hits):
                continue
            if any(hits):
                raise QDoctorError(f"{name}: {rel} is targeted in some blocks only and no group targets Linear; "
                                   "add a config group for the rest (or target Linear) to say how they are quantized")
            out.append(f"*.{rel}")
    return out


def _gptq(build: _Build, name: str, f: dict, ct_groups: dict | None) -> None:
    """GPTQModifier's fields → ``gptq`` (act_order: llm-compressor's default actorder 'static' and
    'weight' order columns by the Hessian diagonal; 'group' needs a g_idx qdoctor does not write)."""
    if name != "GPTQModifier":
        return
    damp = f.get("dampening_frac", 0.01)
    if damp is None:
        raise QDoctorError("GPTQModifier dampening_frac: null (no dampening) is not supported; give a fraction")
    order = f.get("actorder", "static")
    orders = {order} if ct_groups is None else {(getattr(g.weights, "actorder", None) or order) for g in
                                                ct_groups.values()}
    if len(orders) > 1:
        raise QDoctorError(f"GPTQModifier: config groups ask for different actorder values {sorted(map(str, orders))}; "
                           "qdoctor's act_order is one setting per recipe")
    order = getattr(next(iter(orders)), "value", next(iter(orders)))
    if order in ("group", "dynamic"):
        grouped = ct_groups is not None and any(getattr(g.weights.strategy, "value", g.weights.strategy) == "group"
                                                for g in ct_groups.values())
        if grouped:
            raise QDoctorError("GPTQModifier actorder: group reorders per-group scales through a g_idx, which qdoctor "
                               "does not write; use actorder: static")
        notes = build.notes
        notes.append("GPTQModifier actorder: group on non-group weights falls back to no ordering (as llm-compressor)")
        order = None
    if order not in (None, "static", "weight"):
        raise QDoctorError(f"GPTQModifier actorder {order!r}: use static, weight or null")
    build.gptq = {"dampening": float(damp), "act_order": order is not None, "block_size": int(f.get("block_size", 128)),
                  "propagate": True}


def spinquant(build: _Build, fields: dict) -> None:
    notes = build.notes
    f = _fields("SpinQuantModifier", fields, {"rotations", "transform_type", "randomize", "learnable", "precision",
                                              "transform_block_size", "mappings", "norm_mappings",
                                              "transform_config"}, notes)
    if build.seen:
        raise QDoctorError(f"SpinQuantModifier after {build.seen[-1]}: qdoctor rotates first (rotation → smoothing "
                           "→ GPTQ → quantize)")
    rotations = {str(r).upper() for r in (f.get("rotations") or ["R1", "R2"])}
    if "R3" in rotations:
        raise QDoctorError("SpinQuantModifier R3 (online rotation of queries/keys) has no qdoctor equivalent "
                           "(qdoctor rotates R1, R2, R4)")
    if rotations - {"R1", "R2", "R4"}:
        raise QDoctorError(f"SpinQuantModifier rotations {sorted(rotations)}: use R1, R2, R4")
    for key in ("randomize", "learnable"):
        if f.get(key):
            raise QDoctorError(f"SpinQuantModifier {key}: true is not supported")
    for key in ("transform_block_size", "mappings", "norm_mappings", "transform_config"):
        if f.get(key) is not None:
            raise QDoctorError(f"SpinQuantModifier {key}: qdoctor rotates the whole hidden size / head dim of its "
                               "registry's layers; a custom {key} cannot be expressed")
    if f.get("transform_type", "hadamard") != "hadamard":
        notes.append(f"SpinQuantModifier transform_type {f['transform_type']}: qdoctor's rotations are Hadamard "
                     "matrices (the function is preserved either way; the quantization error differs)")
    if f.get("precision") is not None:
        notes.append("SpinQuantModifier precision: qdoctor folds rotations in float64")
    build.rotation = {"r1": "R1" in rotations, "r2": "R2" in rotations, "r4": "R4" in rotations}
    build.seen.append("SpinQuantModifier")


def refuse_quip(build: _Build, fields: dict) -> None:
    raise QDoctorError("QuIPModifier rotates the input (v) / output (u) side of every Linear with its own online "
                       "transform; qdoctor's rotations are SpinQuant's R1/R2 (folded) and R4 (before down_proj) — "
                       "not the same transform; use SpinQuantModifier")


MODIFIERS = {
    "SmoothQuantModifier": smoothquant,
    "QuantizationModifier": lambda b, f: quantization(b, "QuantizationModifier", f),
    "GPTQModifier": lambda b, f: quantization(b, "GPTQModifier", f),
    "SpinQuantModifier": spinquant,
    "QuIPModifier": refuse_quip,
}


def from_llm_compressor(data: dict) -> Imported:
    """The qdoctor recipe dict (``Recipe.to_dict`` keys) of an llm-compressor recipe, with notes."""
    build = _Build()
    for name, fields in modifiers_of(data):
        handler = MODIFIERS.get(name)
        if handler is None:
            raise QDoctorError(f"{name} has no qdoctor equivalent (qdoctor maps {', '.join(MODIFIERS)})")
        handler(build, fields)
    if build.scheme is None:
        raise QDoctorError("the llm-compressor recipe has no QuantizationModifier or GPTQModifier: nothing to "
                           "quantize")
    build.notes.append("calibration data: an llm-compressor recipe does not carry it (oneshot's dataset=); qdoctor "
                       "calibrates on its default (64 × 512 tokens of WikiText-2 valid, seed 0)")
    recipe = {"qdoctor_recipe": 1, "model": "", "smoothing": build.smoothing, "scheme": build.scheme,
              "evidence": {}, "metrics": {}}
    if build.rotation is not None:
        recipe["rotation"] = build.rotation
    if build.gptq is not None:
        recipe["gptq"] = build.gptq
    return Imported(recipe=recipe, notes=build.notes)
