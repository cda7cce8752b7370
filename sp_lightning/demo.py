"""`make demo` entry point. The demo itself (issue 6) has not landed yet; say so honestly."""

from __future__ import annotations


def main() -> None:
    """Explain what exists and how to try it until the demo lands."""
    print(
        "sp-lightning demo: not built yet (it arrives with the demo issue).\n"
        "What exists now is the engine; try it with:\n"
        "  .venv/bin/python -c \"import torch, torchvision, sp_lightning as sp; "
        "m = torchvision.models.resnet18(num_classes=10).eval(); x = torch.randn(2, 3, 64, 64); "
        "print(sp.coverage_report(m, x)); print(sp.SoftPullback(m).attribute(x, 3).shape)\""
    )


if __name__ == "__main__":
    main()
