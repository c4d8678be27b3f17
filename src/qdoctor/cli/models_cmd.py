"""``qdoctor models``: built-in models, supported architectures and named schemes."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list built-in models, supported architectures and named schemes")
    p.set_defaults(func=run)


def run(args) -> int:
    from qdoctor.models.builtin import BUILTINS
    from qdoctor.models.registry import ARCHITECTURES
    from qdoctor.quant.spec import NAMED_SCHEMES

    print("built-in models:")
    for m in BUILTINS.values():
        print(f"  {m.name:<16} {m.description}  [{m.install}]")
    print("architectures (model_type → family):")
    for a in ARCHITECTURES:
        print(f"  {', '.join(a.model_types):<22} {a.family}{'  — ' + a.notes if a.notes else ''}")
    print("named schemes:")
    for s in NAMED_SCHEMES.values():
        print(f"  {s.name:<28} {s.description}")
    return 0
