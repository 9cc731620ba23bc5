"""Source layouts -> a deterministic list of samples per split (`SourcePlan`); no image is decoded here."""

from __future__ import annotations

from lipnext_scale.data.sources.base import SourcePlan, check_unique_keys

KINDS = ("imagenet", "cifar10", "cifar100", "tiny-imagenet", "digits")


def list_source(kind: str, source: str | None, splits: list[str] | None = None) -> SourcePlan:
    """Detect the layout under `source` and list every sample of the requested splits."""
    if kind == "digits":
        from lipnext_scale.data.sources.digits import list_digits as lister
    elif kind in ("cifar10", "cifar100"):
        from lipnext_scale.data.sources.cifar import list_cifar

        def lister(src):
            return list_cifar(kind, src)
    elif kind == "tiny-imagenet":
        from lipnext_scale.data.sources.tiny_imagenet import list_tiny_imagenet as lister
    elif kind == "imagenet":
        from lipnext_scale.data.sources.imagenet import list_imagenet as lister
    else:
        raise ValueError(f"unknown data set kind {kind!r}; choose one of {', '.join(KINDS)}")
    plan = lister(source)
    if splits is not None:
        unknown = sorted(set(splits) - set(plan.splits))
        if unknown:
            raise ValueError(f"split(s) {unknown} not in {kind} (it has {', '.join(plan.splits)})")
        plan.splits = {s: plan.splits[s] for s in plan.splits if s in splits}
    check_unique_keys(plan)
    return plan
