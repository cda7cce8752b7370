"""Coverage sweep: does the engine soften (or report) every gated op, on every architecture family?

    .venv/bin/python benchmarks/coverage_sweep.py                        # full sweep, prints a Markdown table
    .venv/bin/python benchmarks/coverage_sweep.py --sample               # the fixed CI sample
    .venv/bin/python benchmarks/coverage_sweep.py --sources timm --markdown /tmp/timm.md
    .venv/bin/python benchmarks/coverage_sweep.py --only timm:iformer_h torchvision:vit_b_16

One model per timm architecture family (its smallest-sounding name), every
torchvision classification model, and, when ``transformers`` is installed, its
image classifiers built from shrunken default configs. Random init, inputs of
64x64 where the model takes them (else its default size). Per model:

* forward bit-identical under ``soft_backward`` (``torch.equal`` of the logits);
* oracle: a ``TorchDispatchMode`` (tests/_oracle.py, no engine code) counts the
  gated aten ops of a plain forward; the coverage report must account for each
  (softened, switched off or flagged). ``SILENT``: a gated op the report never
  mentioned, i.e. the plain gradient for part of the network without a word;
* the Soft Pullback is finite; the model's modules, flags and state are unchanged.

A family that cannot be built or run small gets a row saying why. Last line:
``coverage sweep: N/M clean; K with silent gated ops``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _oracle import gated_ops, report_categories  # noqa: E402
from _support import snapshot  # noqa: E402

import sp_lightning as sp  # noqa: E402
from sp_lightning.engine import default_logits  # noqa: E402

SIDE = 64
MAX_PARAMS = 150_000_000  # larger models are left out (a row says so): minutes per model on a CPU
#: Name fragments of small variants, most preferred first (timm names each family's sizes this way).
_SMALL = ("pico", "atto", "femto", "nano", "xxs", "tiny", "mini", "xs", "small", "s0", "m0", "b0", "t0", "_050", "18")
#: The CI sample: one model per attention form and a few CNN families (kept under two minutes).
SAMPLE = (
    "timm:efficientvit_m0", "timm:coat_lite_tiny", "timm:mobilevitv2_050", "timm:levit_128s",
    "timm:xcit_nano_12_p16_224", "torchvision:mobilenet_v3_small", "torchvision:regnet_y_400mf",
    "torchvision:squeezenet1_1", "transformers:vit", "transformers:mobilevitv2",
)


@dataclass
class Row:
    source: str
    name: str
    status: str  # clean | flagged | SILENT | FAILED | not run
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Candidate:
    source: str
    name: str
    build: Callable[[], tuple[nn.Module, Tensor]]


# --------------------------------------------------------------------------- model sources


def _input(side: int, channels: int = 3) -> Tensor:
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))


def _smallest(names: list[str]) -> str:
    for fragment in _SMALL:
        hits = sorted((n for n in names if fragment in n), key=len)
        if hits:
            return hits[0]
    return sorted(names, key=len)[0]


def _timm_candidate(family: str, name: str) -> Candidate:
    import timm

    def build() -> tuple[nn.Module, Tensor]:
        for kwargs, side in (({"img_size": SIDE}, SIDE), ({}, SIDE), ({}, None)):
            try:
                model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            except TypeError:
                continue
            size = side or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            x = _input(size, model.pretrained_cfg.get("input_size", (3,))[0])
            if _runs(model, x):
                return model, x
        raise RuntimeError("no input size it accepts (tried img_size=64, 64, its default)")

    return Candidate("timm", f"{family}: {name}", build)


def _timm_candidates(only: set[str] | None = None) -> Iterator[Candidate]:
    import timm

    for family in timm.list_modules():
        names = timm.list_models(module=family)
        if only is not None:
            names = [n for n in names if n in only]
        if names:
            yield _timm_candidate(family, _smallest(names) if only is None else names[0])


def _torchvision_candidates(only: set[str] | None = None) -> Iterator[Candidate]:
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        if only is not None and name not in only:
            continue

        def build(name: str = name) -> tuple[nn.Module, Tensor]:
            builder = torchvision.models.get_model_builder(name)
            kwargs: dict[str, Any] = {"num_classes": 10}
            if name.startswith("vit_"):
                kwargs["image_size"] = SIDE
            if name in ("inception_v3", "googlenet"):
                kwargs.update(aux_logits=False, init_weights=True)
            model = builder(**kwargs).eval()
            for side in (SIDE, 96, 224, 299):
                x = _input(side)
                if _runs(model, x):
                    return model, x
            raise RuntimeError("no input size it accepts (tried 64, 96, 224, 299)")

        yield Candidate("torchvision", name, build)


#: Config fields shrunk for a small random model (those a config has).
_SHRINK: dict[str, Any] = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
    "image_size": SIDE, "embed_dim": 32, "patch_size": 8, "num_channels": 3,
}


def _shrunk(config: Any) -> Any:
    for key, value in _SHRINK.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(config, key, min(current, value) if key == "patch_size" else value)
    for key in ("depths", "num_heads", "hidden_sizes", "embed_dims", "embed_dim", "num_attention_heads", "depth"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            if key == "depths" or key == "depth":
                setattr(config, key, [1] * len(value))
            elif key in ("num_heads", "num_attention_heads"):
                setattr(config, key, [min(v, 2) for v in value])
    config.num_labels = 10
    return config


def _transformers_candidates(only: set[str] | None = None) -> Iterator[Candidate]:
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    for model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        if only is not None and model_type not in only:
            continue

        def build(model_type: str = model_type) -> tuple[nn.Module, Tensor]:
            config = transformers.AutoConfig.for_model(model_type)
            if hasattr(config, "vision_config"):  # CLIP/SigLIP-style: the vision tower decides
                _shrunk(config.vision_config)
            model = transformers.AutoModelForImageClassification.from_config(_shrunk(config)).eval()
            size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", SIDE)
            size = size if isinstance(size, int) else SIDE
            for side in dict.fromkeys((size, SIDE, 224)):
                x = _input(side, getattr(config, "num_channels", 3) or 3)
                if _runs(model, x):
                    return model, x
            raise RuntimeError(f"no input size it accepts (tried {size}, 64, 224)")

        yield Candidate("transformers", model_type, build)


SOURCES: dict[str, Callable[[set[str] | None], Iterator[Candidate]]] = {
    "timm": _timm_candidates,
    "torchvision": _torchvision_candidates,
    "transformers": _transformers_candidates,
}


def _runs(model: nn.Module, x: Tensor) -> bool:
    try:
        with torch.no_grad():
            default_logits(model(x))
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- checks


def _nonzero_heads(model: nn.Module) -> None:
    """Some builders start with an all-zero classifier, whose input gradient is exactly 0."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)


def check(candidate: Candidate) -> Row:
    """Build one model and run every check on it."""
    start = time.perf_counter()
    row = Row(candidate.source, candidate.name, "FAILED")
    try:
        torch.manual_seed(0)
        model, x = candidate.build()
    except Exception as error:
        message = " ".join(str(error).split())[:120]
        row.status, row.detail = "not run", f"cannot build/run small: {type(error).__name__}: {message}"
        return row
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        row.status, row.detail = "not run", f"{params / 1e6:.0f} M parameters: too large for a CPU sweep"
        return row
    try:
        _nonzero_heads(model)
        problems = _checks(model, x)
        row.status, row.detail = problems[0], "; ".join(problems[1:])
    except Exception as error:
        message = " ".join(str(error).split())[:160]
        row.detail = f"{type(error).__name__}: {message} ({traceback.extract_tb(error.__traceback__)[-1].name})"
    row.seconds = time.perf_counter() - start
    return row


def _checks(model: nn.Module, x: Tensor) -> list[str]:
    """[status, problems...]."""
    before = snapshot(model)
    leaf = x.clone().requires_grad_(True)
    plain = default_logits(model(leaf))
    with sp.soft_backward(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.UncoveredGatedOpWarning)
        soft = default_logits(model(leaf))
    problems = [] if torch.equal(plain, soft) else ["forward NOT bit-identical"]
    report = sp.coverage_report(model, x)
    seen, reported = gated_ops(model, x), report_categories(report)
    silent = {c: seen[c] - reported[c] for c in seen if seen[c] > reported[c]}
    extra = {c: reported[c] - seen[c] for c in reported if reported[c] > seen[c]}
    if silent:
        problems.append("silent: " + ", ".join(f"{c} x{n}" for c, n in sorted(silent.items())))
    if extra:
        problems.append("reported beyond the oracle: " + ", ".join(f"{c} x{n}" for c, n in sorted(extra.items())))
    if report.uncovered:
        problems.append("flagged: " + ", ".join(f"{n} x{c}" for n, c in sorted(report.uncovered.items())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.UncoveredGatedOpWarning)
        attribution = sp.SoftPullback(model).attribute(x, 0)
    if not bool(torch.isfinite(attribution).all()):
        problems.append("SP not finite")
    after = snapshot(model)
    if any(before[k] != after[k] for k in before if k not in ("state", "grads")) or any(
        not torch.equal(before["state"][k], after["state"][k]) for k in before["state"]
    ):
        problems.append("state NOT restored")
    softened = ", ".join(f"{n} x{c}" for n, c in sorted(report.softened.items()))
    failed = [p for p in problems if not p.startswith(("flagged", "reported beyond"))]
    status = "SILENT" if silent else "FAILED" if failed else "flagged" if report.uncovered or extra else "clean"
    return [status, *problems, f"softened: {softened or 'none'}"]


# --------------------------------------------------------------------------- driver


def candidates(sources: list[str], only: tuple[str, ...] | None = None) -> list[Candidate]:
    """Every candidate of ``sources``, or only the models named in ``only`` (``source:model`` entries)."""
    if only is None:
        return [c for source in sources for c in SOURCES[source](None)]
    wanted: dict[str, set[str]] = {}
    for entry in only:
        source, name = entry.split(":", 1)
        wanted.setdefault(source, set()).add(name)
    return [c for source in sources for c in SOURCES[source](wanted.get(source, set()))]


def summary(rows: list[Row]) -> str:
    ran = [r for r in rows if r.status != "not run"]
    clean = sum(r.status == "clean" for r in ran)
    silent = sum(r.status == "SILENT" for r in ran)
    return f"coverage sweep: {clean}/{len(ran)} clean; {silent} with silent gated ops"


def markdown(rows: list[Row]) -> str:
    lines = ["| source | model | status | seconds | details |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.source} | {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines)


def sweep(sources: list[str], only: tuple[str, ...] | None = None, echo: bool = True) -> list[Row]:
    """Check every candidate (see :func:`candidates`), printing a line per model when ``echo``."""
    rows = []
    for candidate in candidates(sources, only):
        row = check(candidate)
        rows.append(row)
        if echo:
            print(f"{row.status:<8} {row.source}:{row.name} ({row.seconds:.1f} s) {row.detail}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--sample", action="store_true", help="only the fixed CI sample")
    parser.add_argument("--only", nargs="+", help="only these models, as source:model (e.g. timm:iformer_h)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = sweep(args.sources, SAMPLE if args.sample else tuple(args.only) if args.only else None)
    table = markdown(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n\n" + summary(rows) + "\n")
    print(summary(rows))


if __name__ == "__main__":
    main()
